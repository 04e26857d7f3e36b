"""Learning-rate schedules and optimizers built from a `TrainConfig`.

Schedules match Hugging Face's `get_*_schedule_with_warmup` step for step (the papers
trained with HF Trainer): warmup rises linearly from 0, so the update of step 0 is a no-op,
as in HF.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from memdyn_jax.train.config import TrainConfig

# Parameters named like this are not weight-decayed (HF Trainer excludes biases and norms).
NO_DECAY_NAMES = ("bias", "scale")


def schedule_value(kind: str, step, peak, warmup, decay_steps):
  """The learning rate at optimizer step `step` (0-based), in closed form.

  linear: peak·s/w for s < w, then peak·(T − s)/(T − w).
  cosine: peak·s/w for s < w, then peak·½(1 + cos(π (s − w)/(T − w))).
  constant: peak·s/w for s < w, then peak.
  (T − w = `decay_steps`.) Works on Python numbers and on traced arrays alike, so the
  hyper-parameters can live in the optimizer state (`scale_by_schedule_state`).
  """
  step = jnp.asarray(step, jnp.float32)
  after_warmup = jnp.clip((step - warmup) / jnp.maximum(decay_steps, 1.0), 0.0, 1.0)
  if kind == "linear":
    after = peak * (1.0 - after_warmup)
  elif kind == "cosine":
    after = peak * 0.5 * (1.0 + jnp.cos(jnp.pi * after_warmup))
  elif kind == "constant":
    after = peak * jnp.ones_like(after_warmup)
  else:
    raise ValueError(f"unknown schedule {kind!r}")
  rising = peak * step / jnp.maximum(warmup, 1.0)
  return jnp.where(step < warmup, rising, after)


def _schedule_hparams(cfg: TrainConfig, total_steps: int) -> tuple[float, float, float]:
  w = cfg.warmup(total_steps)
  return float(cfg.learning_rate), float(w), float(max(total_steps - w, 1))


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each optimizer step (0-based), for a run of `total_steps`.

  Matches `get_{linear,cosine,constant}_schedule_with_warmup` of HF; see `schedule_value`.
  """
  peak, w, decay = _schedule_hparams(cfg, total_steps)
  return lambda step: schedule_value(cfg.schedule, step, peak, w, decay)


class ScheduleState(NamedTuple):
  """Optimizer-state leaves of `scale_by_schedule_state`: the step and the schedule."""

  count: jax.Array
  peak: jax.Array
  warmup: jax.Array
  decay_steps: jax.Array


def scale_by_schedule_state(kind: str, peak: float, warmup: float,
                            decay_steps: float) -> optax.GradientTransformation:
  """Scales updates by −lr(step), the schedule's numbers kept in the optimizer state.

  Unlike `optax.scale_by_learning_rate(schedule)`, whose schedule constants are baked into
  the compiled step, runs that differ only in learning rate or length share one program
  (one compilation for a whole sweep; with a persistent compilation cache, for re-runs too).
  """
  def init(params):
    del params
    return ScheduleState(jnp.zeros([], jnp.int32), jnp.float32(peak), jnp.float32(warmup),
                         jnp.float32(decay_steps))

  def update(updates, state, params=None):
    del params
    lr = schedule_value(kind, state.count, state.peak, state.warmup, state.decay_steps)
    updates = jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)
    return updates, state._replace(count=optax.safe_increment(state.count))

  return optax.GradientTransformation(init, update)


def decay_mask(params) -> object:
  """A tree of bools like `params`: True where weight decay applies."""
  def keep(path, _):
    # The last dict key names the parameter; nnx adds a trailing `.value` attribute key.
    names = [k.key for k in path if isinstance(k, jax.tree_util.DictKey)]
    return not names or str(names[-1]) not in NO_DECAY_NAMES
  return jax.tree_util.tree_map_with_path(keep, params)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """Global-norm clipping (if `max_grad_norm` > 0) followed by the configured optimizer.

  The returned transform expects *whole-batch* gradients: accumulation happens in the
  train step (see `memdyn_jax.train.step`), not in optax, so one `update` = one step.
  """
  lr = scale_by_schedule_state(cfg.schedule, *_schedule_hparams(cfg, total_steps))
  if cfg.optimizer == "adamw":  # = optax.adamw, with the schedule in the state
    opt = optax.chain(optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps),
                      optax.add_decayed_weights(cfg.weight_decay, mask=decay_mask), lr)
  elif cfg.optimizer == "adam":
    opt = optax.chain(optax.scale_by_adam(b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps), lr)
  elif cfg.beta1:  # sgd with momentum = optax.sgd(lr, momentum)
    opt = optax.chain(optax.trace(decay=cfg.beta1), lr)
  else:
    opt = lr
  if cfg.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
  return opt


def global_norm(tree) -> jax.Array:
  """L2 norm over every leaf, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.float32(0)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
