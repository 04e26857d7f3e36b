"""The jitted train step: gradient accumulation over micro-batches, clipping, update.

The model is split once into `(graphdef, trained, rngs, frozen)`: `trained` are the
variables the optimizer updates (`nnx.Param`, or only `LoraParam` with LoRA), `rngs` the
model's RNG streams (dropout; carried and checkpointed so a resumed run draws the same
masks), `frozen` everything else. The step is a pure function of these states and the batch,
compiled once; `trained`, `opt_state` and `rngs` are donated.

A global batch arrives as (A, micro, T) arrays: A = accumulation steps, micro-batch axis
sharded over ('data', 'fsdp'). Gradients of the A micro-batches are summed in a `lax.scan`,
each micro-batch's loss numerator divided by the target-token count of the *global* batch,
so the accumulated gradient is exactly that of the global-batch loss in
`memdyn_jax.train.loss`. A mixture of experts' load-balancing loss, when weighted in
(`router_aux_loss_coef`), joins the objective per micro-batch (see `memdyn_jax.train.loss`).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import moe
from memdyn_jax.train import loss as loss_lib
from memdyn_jax.train.optim import global_norm

BATCH_KEYS = ("input_ids", "attention_mask", "target_mask")


def split_model(model: nnx.Module, wrt: Any = nnx.Param):
  """(graphdef, trained, rngs, frozen) states of `model`; `wrt` filters the trained ones."""
  return nnx.split(model, wrt, nnx.RngState, ...)


def to_microbatches(batch: dict[str, np.ndarray], accumulation_steps: int) -> dict[str, np.ndarray]:
  """Host-side (B, ...) -> (A, B / A, ...): micro-batch a holds rows [a·B/A, (a+1)·B/A)."""
  out = {}
  for k, v in batch.items():
    b = v.shape[0]
    if b % accumulation_steps:
      raise ValueError(f"batch of {b} rows does not split into {accumulation_steps} micro-batches")
    out[k] = v.reshape((accumulation_steps, b // accumulation_steps) + v.shape[1:])
  return out


def microbatch_sharding(mesh: Mesh, ndim: int, rules=sharding_lib.DEFAULT_RULES) -> NamedSharding:
  """Sharding of an (A, micro, ...) array: micro-batch rows over the batch mesh axes."""
  batch_spec = sharding_lib.batch_sharding(mesh, 1, rules).spec
  return NamedSharding(mesh, P(None, *batch_spec, *([None] * (ndim - 2))))


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, *,
                    state_shardings: tuple | None = None, batch_shardings: dict | None = None,
                    donate: bool = True, seed: int = 0,
                    model_hook: Callable[[nnx.Module, jax.Array], None] | None = None,
                    router_aux_loss_coef: float = 0.0) -> Callable:
  """The jitted `step(trained, opt_state, rngs, frozen, batch, step_index) -> (trained,
  opt_state, rngs, metrics)`.

  Args:
    graphdef: the model's graph definition (from `split_model`).
    tx: the optimizer (`make_optimizer`).
    state_shardings: shardings of (trained, opt_state, rngs, frozen), pinned on input and
      output so the layout never drifts between steps; None lets XLA choose.
    batch_shardings: shardings of the batch dict; None lets XLA choose.
    donate: donate `trained`, `opt_state` and `rngs` buffers.
    seed: with `step_index` and the micro-batch index, derives the key given to `model_hook`.
    model_hook: `hook(model, key)` called on the merged model before each micro-batch's
      forward pass (LoRA dropout keys). Keys are a function of (seed, step, micro-batch)
      only, so a resumed run draws the same randomness.
    router_aux_loss_coef: c > 0 adds c times a routed model's load-balancing loss to the
      objective (`loss.router_aux_coefficient`); 0 computes none.

  `batch` has "input_ids", "attention_mask", "target_mask" (A, micro, T) and "weights"
  (A, micro) float32 per-example loss weights. Metrics (replicated scalars): "loss" (the
  global-batch loss), "grad_norm" (before clipping), "target_tokens", "finite" (loss and
  gradient norm both finite), and with a load-balancing term "router_aux_loss" (its
  unweighted value, the mean over micro-batches; the objective is loss + c times it).
  """
  with_aux = router_aux_loss_coef > 0

  def loss_fn(trained, rngs, frozen, mb, denom, n_micro, key):
    # copy=True: fresh Variables owned by this trace, so the hook may write to them.
    model = nnx.merge(graphdef, trained, rngs, frozen, copy=True)
    if model_hook is not None:
      model_hook(model, key)
    if with_aux:
      logits, stats = model.logits_and_router_stats(mb["input_ids"], mb["attention_mask"])
      if stats is None:
        raise ValueError("router_aux_loss_coef > 0 for a model without routers")
      aux = moe.load_balancing_loss(stats, model.cfg.num_experts)
    else:
      logits, aux = model(mb["input_ids"], mb["attention_mask"]), jnp.float32(0)
    num = loss_lib.weighted_nll_sum(logits, mb["input_ids"], mb["target_mask"], mb["weights"])
    loss = num / denom
    objective = loss + router_aux_loss_coef * aux / n_micro
    return objective, (nnx.state(model, nnx.RngState), loss, aux / n_micro)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def step(trained, opt_state, rngs, frozen, batch, step_index):
    denom = jnp.maximum(loss_lib.num_target_tokens(batch["target_mask"]), 1.0)
    zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), trained)
    step_key = jax.random.fold_in(jax.random.key(seed), step_index)
    n_micro = batch["input_ids"].shape[0]

    def micro(carry, xs):
      grads, total, total_aux, rngs = carry
      mb, i = xs
      key = jax.random.fold_in(step_key, i)
      (_, (rngs, loss, aux)), g = grad_fn(trained, rngs, frozen, mb, denom, n_micro, key)
      grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
      return (grads, total + loss, total_aux + aux, rngs), None

    (grads, loss, aux, rngs), _ = jax.lax.scan(
        micro, (zeros, jnp.float32(0), jnp.float32(0), rngs), (batch, jnp.arange(n_micro)))
    grad_norm = global_norm(grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, trained)
    updates, opt_state = tx.update(grads, opt_state, trained)
    trained = optax.apply_updates(trained, updates)
    metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": denom,
               "finite": jnp.isfinite(loss) & jnp.isfinite(aux) & jnp.isfinite(grad_norm)}
    if with_aux:
      metrics["router_aux_loss"] = aux
    return trained, opt_state, rngs, metrics

  kwargs: dict[str, Any] = {}
  if state_shardings is not None:
    trained_s, opt_s, rngs_s, frozen_s = state_shardings
    mesh = jax.tree.leaves(trained_s)[0].mesh
    replicated = NamedSharding(mesh, P())
    kwargs["in_shardings"] = (trained_s, opt_s, rngs_s, frozen_s, batch_shardings, replicated)
    metric_names = ("loss", "grad_norm", "target_tokens", "finite") + (
        ("router_aux_loss",) if with_aux else ())
    kwargs["out_shardings"] = (trained_s, opt_s, rngs_s,
                               {k: replicated for k in metric_names})
  return jax.jit(step, donate_argnums=(0, 1, 2) if donate else (), **kwargs)


def make_perplexity_fn(graphdef: nnx.GraphDef, out_sharding: NamedSharding | None = None
                       ) -> Callable:
  """Jitted `fn(trained, rngs, frozen, input_ids, attention_mask, target_mask) -> (B,)`
  per-example target perplexity, with dropout off; `out_sharding` (e.g. replicated, so
  every host can read it) pins the output layout."""

  def fn(trained, rngs, frozen, input_ids, attention_mask, target_mask):
    model = nnx.merge(graphdef, trained, rngs, frozen)
    if hasattr(model, "eval"):
      model.eval()  # scoring must not drop out
    logits = model(input_ids, attention_mask)
    return loss_lib.example_perplexity(logits, input_ids, target_mask)

  return jax.jit(fn, out_shardings=out_sharding)


def shardings_of(tree) -> Any:
  """The sharding of every array leaf of `tree`."""
  return jax.tree.map(lambda x: x.sharding, tree)
