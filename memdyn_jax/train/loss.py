"""Next-token cross-entropy on target tokens, and per-example perplexity.

Convention (that of `memdyn_jax.tasks.tokenize`): `target_mask[b, t] = 1` says token t is
under the loss, predicted from the logits at position t − 1. Position 0 is never predicted.

Normalization: the training loss of a global batch is

    L = Σ_b w_b Σ_t m_bt ℓ_bt  /  Σ_b Σ_t m_bt

with ℓ the token NLL, m the target mask and w the per-example weights (1 by default; the
memorization-reweight sampler renormalizes them to mean 1). The denominator is the
*unweighted* count of target tokens of the whole global batch — all micro-batches and all
hosts — so gradient accumulation and sharding give exactly the full-batch mean (HF
Trainer instead averages per-micro-batch means, which weights tokens unequally).

A mixture-of-experts model may add its router's load-balancing loss (HF's
`load_balancing_loss_func`, `models.moe.load_balancing_loss`) to the objective:
L + c · mean over micro-batches of aux(micro-batch), c from `router_aux_coefficient`. The
loss is a product of two means over a micro-batch's real tokens (all devices' together), so
unlike L it is per micro-batch; without accumulation it is HF's `loss + coef * aux_loss` of
the batch. (HF Trainer with accumulation adds c · aux of every micro-batch to a loss summed
over them, A times ours; under DDP each device computes it over its own rows.)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memdyn_jax.models.config import ModelConfig
from memdyn_jax.train.config import ROUTER_AUX_LOSSES


def token_nll(logits: jax.Array, input_ids: jax.Array, target_mask: jax.Array) -> jax.Array:
  """Masked per-token NLL (B, T − 1) in float32: entry t scores token t + 1."""
  logits = logits[:, :-1].astype(jnp.float32)
  labels = input_ids[:, 1:]
  logz = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, labels[..., None], axis=-1)[..., 0]
  return (logz - picked) * target_mask[:, 1:].astype(jnp.float32)


def num_target_tokens(target_mask: jax.Array) -> jax.Array:
  """Target tokens that are predicted (position 0 excluded), as float32."""
  return jnp.sum(target_mask[..., 1:].astype(jnp.float32))


def weighted_nll_sum(logits: jax.Array, input_ids: jax.Array, target_mask: jax.Array,
                     weights: jax.Array | None = None) -> jax.Array:
  """Σ_b w_b Σ_t m_bt ℓ_bt: the loss numerator of one (micro-)batch."""
  per_row = jnp.sum(token_nll(logits, input_ids, target_mask), axis=-1)
  if weights is not None:
    per_row = per_row * weights.astype(jnp.float32)
  return jnp.sum(per_row)


def masked_mean_loss(logits: jax.Array, input_ids: jax.Array, target_mask: jax.Array,
                     weights: jax.Array | None = None) -> jax.Array:
  """The training loss of one batch (module docstring); 0 if it has no target token."""
  return (weighted_nll_sum(logits, input_ids, target_mask, weights)
          / jnp.maximum(num_target_tokens(target_mask), 1.0))


def example_perplexity(logits: jax.Array, input_ids: jax.Array,
                       target_mask: jax.Array) -> jax.Array:
  """exp(mean target-token NLL) per row (B,); 1 for a row with no target token."""
  nll = token_nll(logits, input_ids, target_mask)
  count = jnp.maximum(jnp.sum(target_mask[:, 1:].astype(jnp.float32), axis=-1), 1.0)
  return jnp.exp(jnp.sum(nll, axis=-1) / count)


def router_aux_coefficient(mode: str, cfg: ModelConfig) -> float:
  """The weight of the load-balancing loss in the objective (0: not computed) for
  `TrainConfig.router_aux_loss` `mode`: "hf" the model config's `router_aux_loss_coef` where
  HF's model adds the loss (`output_router_logits`), "on" that coefficient always, "off" 0.
  0 for a model without routers."""
  if mode not in ROUTER_AUX_LOSSES:
    raise ValueError(f"router_aux_loss {mode!r} not in {ROUTER_AUX_LOSSES}")
  if not cfg.is_moe or mode == "off" or (mode == "hf" and not cfg.router_aux_loss_in_hf_loss):
    return 0.0
  return float(cfg.router_aux_loss_coef)
