"""Learning-rate schedules and optimizers built from a `TrainConfig`.

Schedules match Hugging Face's `get_*_schedule_with_warmup` step for step (the papers
trained with HF Trainer): warmup rises linearly from 0, so the update of step 0 is a no-op,
as in HF.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from memdyn_jax.train.config import TrainConfig

# Parameters named like this are not weight-decayed (HF Trainer excludes biases and norms).
NO_DECAY_NAMES = ("bias", "scale")


def make_schedule(cfg: TrainConfig, total_steps: int) -> optax.Schedule:
  """The learning rate at each optimizer step (0-based), for a run of `total_steps`.

  linear: lr·s/w for s < w, then lr·(T − s)/(T − w).
  cosine: lr·s/w for s < w, then lr·½(1 + cos(π (s − w)/(T − w))).
  constant: lr·s/w for s < w, then lr.
  """
  lr = cfg.learning_rate
  w = cfg.warmup(total_steps)
  decay_steps = max(total_steps - w, 1)
  if cfg.schedule == "linear":
    after = optax.linear_schedule(lr, 0.0, decay_steps)
  elif cfg.schedule == "cosine":
    after = optax.cosine_decay_schedule(lr, decay_steps, alpha=0.0)
  else:
    after = optax.constant_schedule(lr)
  if w == 0:
    return after
  return optax.join_schedules([optax.linear_schedule(0.0, lr, w), after], [w])


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
  schedule = make_schedule(cfg, total_steps)
  if cfg.optimizer == "adamw":
    opt = optax.adamw(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps,
                      weight_decay=cfg.weight_decay, mask=decay_mask)
  elif cfg.optimizer == "adam":
    opt = optax.adam(schedule, b1=cfg.beta1, b2=cfg.beta2, eps=cfg.eps)
  else:
    opt = optax.sgd(schedule, momentum=cfg.beta1 or None)
  if cfg.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), opt)
  return opt


def global_norm(tree) -> jax.Array:
  """L2 norm over every leaf, accumulated in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.float32(0)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))
