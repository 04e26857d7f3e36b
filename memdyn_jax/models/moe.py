"""A sparse mixture-of-experts MLP (Qwen3-MoE's): a top-k softmax router over SwiGLU experts,
dropless, with HF's load-balancing auxiliary loss.

Routing is HF's `Qwen3MoeTopKRouter` step for step: router logits in the compute dtype (HF's
`F.linear` in the hidden dtype), softmax in float32, the `top_k` most probable experts
(`jax.lax.top_k`), renormalised to sum 1 when `norm_topk_prob`, the weights cast back to the
compute dtype. Every token reaches all of its k experts: there is no capacity and nothing is
dropped (HF has none either), so the output does not depend on what else is in the batch.

Two ways to compute the experts (`MOE_IMPLS`), the same function of the same weights:
- "ragged": the token slots are sorted by expert and each expert's rows go through its
  weights with `jax.lax.ragged_dot`, a grouped matmul (MaxText's "sparse matmul"): the
  FLOPs of the k chosen experts only. Under a mesh (`jax.set_mesh`) it runs in a
  `shard_map` over the batch axes (`data`, `fsdp`): each device sorts its own tokens (a sort
  across devices would gather every token everywhere) against the expert weights, which
  GSPMD all-gathers at the boundary (FSDP's gather); the expert width `mlp` stays split
  over `tensor` and the partial outputs are summed (`psum`), Megatron-style.
  XLA:TPU runs ragged dots natively. XLA:GPU (by XLA's source) hands bf16/f16 ones to
  cuDNN's grouped matmul where its version allows and otherwise expands them into a masked
  dense dot (not measured here: no GPU). jax lowers them on CPU the same masked way
  (num_experts times the rows: k times the FLOPs of "dense").
- "dense": every expert on every token, weighted by the (mostly zero) gates of the chosen
  ones: `num_experts / top_k` times the expert FLOPs, but plain einsums, the cheaper of the
  two on CPU.
"auto" (the default) is "ragged" on TPU and GPU and "dense" on CPU, by the platform the
program is compiled for (`sharding.target_platform`); `set_moe_impl` picks one for a model.

Ties: when two experts' router probabilities are exactly equal at the k-th place,
`jax.lax.top_k` keeps the lower expert index; `torch.topk` does not promise an order for
ties (CPU and CUDA kernels may pick differently), so on such a token HF may pick another
expert. Exact ties are unlikely with float32 probabilities of a trained or random router; a
zero router (or identical rows) ties every expert. (HF's eager and grouped expert kernels
also sum a token's k expert outputs in another order than ours: float rounding only.)
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import layers

MOE_IMPLS = ("auto", "ragged", "dense")


def choose_moe_impl(impl: str, platform: str) -> str:
  """The expert computation that runs for `impl` on `platform` ("ragged" or "dense")."""
  if impl not in MOE_IMPLS:
    raise ValueError(f"moe impl {impl!r} not in {MOE_IMPLS}")
  if impl != "auto":
    return impl
  return "dense" if platform == "cpu" else "ragged"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RouterStats:
  """What the load-balancing loss needs of one layer's routing (stacked over layers by the
  decoder), summed over the real tokens (those with mask 1) of a batch:
  expert_counts (num_experts,): how many of the tokens' top-k slots chose each expert;
  prob_sums (num_experts,): the router probabilities; tokens (): how many tokens."""

  expert_counts: jax.Array
  prob_sums: jax.Array
  tokens: jax.Array


def router_stats(probs: jax.Array, expert_ids: jax.Array, mask: jax.Array) -> RouterStats:
  """`RouterStats` of probs (B, T, E) float32 and the chosen expert_ids (B, T, k) over the
  tokens where mask (B, T) is 1 (HF's `load_balancing_loss_func` with an attention mask)."""
  weight = mask.astype(jnp.float32)
  k, num_experts = expert_ids.shape[-1], probs.shape[-1]
  # A scatter-add of the mask over the chosen experts (HF's), not a (B, T, k, E) one-hot.
  counts = jnp.zeros((num_experts,), jnp.float32).at[expert_ids.reshape(-1)].add(
      jnp.repeat(weight.reshape(-1), k))
  prob_sums = jnp.einsum("bte,bt->e", probs, weight)
  return RouterStats(expert_counts=jax.lax.stop_gradient(counts), prob_sums=prob_sums,
                     tokens=jnp.sum(weight))


def load_balancing_loss(stats: RouterStats, num_experts: int) -> jax.Array:
  """HF's `load_balancing_loss_func` (Switch Transformer's eq. 4-6) from the stats of every
  layer (leading `layers` axis): num_experts * sum_e f_e * P_e, where f_e is the share of
  top-k slots routed to expert e and P_e its mean router probability, both over all layers'
  tokens together (as HF concatenates the layers). Gradients reach the router through P
  only (the counts are of a top-k, as HF's). 0 for a batch without real tokens."""
  tokens = jnp.maximum(jnp.sum(stats.tokens), 1.0)
  share = jnp.sum(stats.expert_counts, axis=0) / tokens
  mean_prob = jnp.sum(stats.prob_sums, axis=0) / tokens
  return num_experts * jnp.sum(share * mean_prob)


# ----------------------------------------------------------------------------- experts


def _ragged_experts(x, expert_ids, weights, gate, up, down, act):
  """Sorted dispatch: x (..., H), expert_ids and weights (..., k); kernels (E, H, I) and
  (E, I, H). Each token slot is a row of a grouped matmul in its expert's group."""
  hidden, k, num_experts = x.shape[-1], expert_ids.shape[-1], gate.shape[0]
  flat_ids = expert_ids.reshape(-1)
  order = jnp.argsort(flat_ids)  # stable: slots of one expert keep their token order
  rows = jnp.take(x.reshape(-1, hidden), order // k, axis=0)
  group_sizes = jnp.bincount(flat_ids, length=num_experts).astype(jnp.int32)
  h = act(jax.lax.ragged_dot(rows, gate, group_sizes)) * jax.lax.ragged_dot(rows, up, group_sizes)
  out = jax.lax.ragged_dot(h, down, group_sizes)
  out = jnp.take(out, jnp.argsort(order), axis=0).reshape(-1, k, hidden)  # slots back in place
  out = jnp.sum(out * weights.reshape(-1, k, 1), axis=1)
  return out.reshape(x.shape)


def _dense_experts(x, expert_ids, weights, gate, up, down, act):
  """Every expert on every token, the unchosen ones gated by 0."""
  num_experts = gate.shape[0]
  gates = jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype)
                  * weights[..., None], axis=-2)  # (..., E)
  h = act(jnp.einsum("...h,ehi->...ei", x, gate)) * jnp.einsum("...h,ehi->...ei", x, up)
  return jnp.einsum("...ei,eih->...h", h * gates[..., None], down)


def _sharded_ragged_experts(x, expert_ids, weights, gate, up, down, act):
  """`_ragged_experts` per device under the mesh in scope (module docstring); x (B, T, H)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return _ragged_experts(x, expert_ids, weights, gate, up, down, act)
  size = lambda a: mesh.shape[a] if a in mesh.axis_names else 1
  batch_axes = tuple(a for a in ("data", "fsdp") if size(a) > 1)
  if batch_axes and x.shape[0] % math.prod(size(a) for a in batch_axes):
    batch_axes = ()  # rows that do not split evenly: one global sort (GSPMD's placement)
  tensor = "tensor" if size("tensor") > 1 and gate.shape[-1] % size("tensor") == 0 else None
  if not batch_axes and tensor is None:
    return _ragged_experts(x, expert_ids, weights, gate, up, down, act)
  rows = P(batch_axes if len(batch_axes) > 1 else (batch_axes[0] if batch_axes else None))

  def local(x, expert_ids, weights, gate, up, down):
    out = _ragged_experts(x, expert_ids, weights, gate, up, down, act)
    return jax.lax.psum(out, tensor) if tensor else out  # partial sums over the split width

  return jax.shard_map(
      local, mesh=mesh, in_specs=(rows, rows, rows, P(None, None, tensor), P(None, None, tensor),
                                  P(None, tensor, None)),
      out_specs=rows)(x, expert_ids, weights, gate, up, down)


class SparseMoE(nnx.Module):
  """A top-k routed mixture of SwiGLU experts (module docstring). Parameters: `router`
  (hidden, experts), and `gate_proj`, `up_proj` (experts, hidden, inner) and `down_proj`
  (experts, inner, hidden) with an `expert` logical axis."""

  def __init__(self, hidden: int, inner: int, num_experts: int, top_k: int, *,
               norm_topk_prob: bool, act: str, dtype=jnp.float32, param_dtype=jnp.float32,
               impl: str = "auto", rngs: nnx.Rngs | None = None):
    if not 0 < top_k <= num_experts:
      raise ValueError(f"top_k = {top_k} must be in [1, num_experts = {num_experts}]")
    choose_moe_impl(impl, "cpu")  # validates the name
    self.top_k = top_k
    self.norm_topk_prob = norm_topk_prob
    self.impl = impl
    self.dtype = dtype
    self.act_name = act
    self.router = layers.Dense((hidden, num_experts), ("embed", None), dtype=dtype,
                               param_dtype=param_dtype, rngs=rngs)
    init = layers.normal_init(0.02)
    self.gate_proj = layers.make_param(rngs, init, (num_experts, hidden, inner),
                                       ("expert", "embed", "mlp"), param_dtype)
    self.up_proj = layers.make_param(rngs, init, (num_experts, hidden, inner),
                                     ("expert", "embed", "mlp"), param_dtype)
    self.down_proj = layers.make_param(rngs, init, (num_experts, inner, hidden),
                                       ("expert", "mlp", "embed"), param_dtype)

  def route(self, x: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(probs (..., E) float32, weights (..., k) in the compute dtype, expert ids (..., k))."""
    logits = self.router(x)
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    top_probs, expert_ids = jax.lax.top_k(probs, self.top_k)
    if self.norm_topk_prob:
      top_probs = top_probs / jnp.sum(top_probs, axis=-1, keepdims=True)
    return probs, top_probs.astype(logits.dtype), expert_ids

  def __call__(self, x: jax.Array, stats_mask: jax.Array | None = None
               ) -> tuple[jax.Array, RouterStats | None]:
    """x (B, T, hidden) -> (output (B, T, hidden), the `RouterStats` of the tokens where
    `stats_mask` (B, T) is 1, or None without a mask)."""
    x = x.astype(self.dtype)
    probs, weights, expert_ids = self.route(x)
    kernels = tuple(p[...].astype(self.dtype) for p in (self.gate_proj, self.up_proj,
                                                        self.down_proj))
    impl = choose_moe_impl(self.impl, sharding_lib.target_platform())
    experts = _sharded_ragged_experts if impl == "ragged" else _dense_experts
    out = experts(x, expert_ids, weights, *kernels, layers.activation(self.act_name))
    stats = None if stats_mask is None else router_stats(probs, expert_ids, stats_mask)
    return out, stats


def set_moe_impl(model: nnx.Module, impl: str) -> nnx.Module:
  """Makes every `SparseMoE` of `model` compute its experts with `impl` (`MOE_IMPLS`);
  returns the model."""
  choose_moe_impl(impl, "cpu")
  for _, module in nnx.iter_graph(model):
    if isinstance(module, SparseMoE):
      module.impl = impl
  return model
