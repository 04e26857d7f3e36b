"""The decoder-only causal LM shared by every family: embeddings, a scanned stack of
blocks, final norm and LM head, with a plain forward and a KV-cache forward.

Conventions (those of HF `generate` with left padding):
- `attention_mask` (B, T) is 1 on real tokens, 0 on padding; padding never influences a
  real position.
- positions default to `cumsum(mask) - 1` (clipped at 0 on left padding), continued from the
  cache on decode, so a left-padded row computes exactly what it computes unpadded.
- masks are built on *slots* (indices in the padded sequence / cache), as HF's masks are;
  with left padding a row's real tokens are contiguous, so slot and position distances agree.

Blocks are stored stacked (leading `layers` axis) and run with `lax.scan`: one compiled
block regardless of depth (shallow stacks are unrolled: FULL_UNROLL_MAX_LAYERS), and a
per-layer attention window (`ModelConfig.layer_windows`) and RoPE
(`ModelConfig.rope_layers`: Gemma 3's local and global bases, SmolLM3's layers without RoPE)
scanned alongside, so alternating local/global layers need no second code path. The KV
cache rides in the scan carry.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from memdyn_jax.models import layers
from memdyn_jax.models.config import ModelConfig, attn_scale

REMAT_POLICIES = ("none", "full", "dots")
# Shallow stacks are unrolled: on CPU a scanned layer loop costs ~1.7x in the backward pass
# (per-iteration slicing and stacking of residuals), and unrolling a few layers adds little
# compile time. Deep stacks (and rematerialised ones) stay scanned: one compiled block,
# bounded compile time and memory.
FULL_UNROLL_MAX_LAYERS = 8
# Decoding keeps one cache array per layer and runs the layers unrolled up to this depth
# (deeper stacks: one stacked cache in the scan carry). A layer of a stacked cache is a
# dynamic slice, which XLA:CPU copies out before attending; per-layer arrays are read in
# place: SmolLM2-135M's 30 layers decode 10-17% faster per step (16-64 rows). Unrolling a
# decode step compiles one small program per layer, which deep models afford.
PER_LAYER_CACHE_MAX_LAYERS = 64


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
  """Keys/values of every layer in a padded slot layout.

  k: (layers, B, kv_heads, head_dim, S) and v: (layers, B, kv_heads, S, head_dim) (heads
  before slots, keys transposed: both attention matmuls over a cache layer are plain
  batched matmuls, see `layers.dot_attention`), or (`CausalLM.per_layer_cache`) tuples of
  one such array per layer without the `layers` axis; key_valid (B, S): slot
  holds a real token; index: next slot to write (shared by rows); next_pos (B,): next
  position id per row.
  """

  k: jax.Array | tuple[jax.Array, ...]
  v: jax.Array | tuple[jax.Array, ...]
  key_valid: jax.Array
  index: jax.Array
  next_pos: jax.Array

  @property
  def per_layer(self) -> bool:
    return isinstance(self.k, (tuple, list))

  @property
  def max_len(self) -> int:
    return self.key_valid.shape[1]

  def axes(self, which: str) -> tuple[str, ...]:
    """Logical axes of each "k" or "v" array (for sharding constraints)."""
    if which not in ("k", "v"):
      raise ValueError(f"cache arrays are 'k' or 'v', not {which!r}")
    axes = {"k": ("batch", "kv_heads", "head_dim", "length"),
            "v": ("batch", "kv_heads", "length", "head_dim")}[which]
    return axes if self.per_layer else ("layers",) + axes

  def map_kv(self, fn) -> "KVCache":
    """The cache with `fn(array, logical_axes)` applied to every k/v array."""
    def f(kv, axes):
      return tuple(fn(x, axes) for x in kv) if self.per_layer else fn(kv, axes)
    return dataclasses.replace(self, k=f(self.k, self.axes("k")), v=f(self.v, self.axes("v")))


def _stack_blocks(make_block, n: int, rngs: nnx.Rngs):
  """Creates `n` blocks with stacked parameters and prepends `layers` to their logical axes."""
  keys = jax.random.split(rngs.params(), n)
  blocks = nnx.vmap(lambda key: make_block(nnx.Rngs(params=key)), in_axes=0, out_axes=0)(keys)
  for _, var in nnx.iter_graph(blocks):
    if isinstance(var, nnx.Param):
      var.set_metadata("logical_axes", ("layers",) + tuple(var.get_metadata()["logical_axes"]))
  return blocks


def constrain_batch(x: jax.Array) -> jax.Array:
  """Pins activations (B, ...) to batch sharding over the active mesh's data axes.

  Without it GSPMD lets the `embed`-on-fsdp weight sharding win on an fsdp mesh: every
  device computes the whole batch and all-reduces activations (measured by `plan_scale`:
  130 GiB vs 7.8 GiB per chip for Llama-3-8B on 64 chips). A no-op without a mesh in scope
  (`jax.set_mesh`) or when the batch does not divide over the data axes.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  axes = tuple(a for a in ("data", "fsdp") if a in mesh.axis_names and mesh.shape[a] > 1)
  if not axes or x.shape[0] % math.prod(mesh.shape[a] for a in axes):
    return x
  spec = P(axes if len(axes) > 1 else axes[0], *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)


def _remat(fn, policy: str):
  if policy == "none":
    return fn
  if policy == "full":
    return jax.checkpoint(fn)
  if policy == "dots":
    return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
  raise ValueError(f"remat policy {policy!r} not in {REMAT_POLICIES}")


class CausalLM(nnx.Module):
  """Base class; a family implements `make_block`, `embed_tokens` and `final_norm`.

  A family whose blocks route tokens to experts sets `has_router`: its blocks take a
  `stats_mask` and then return their router statistics too (`logits_and_router_stats`).
  """

  has_router = False

  def __init__(self, cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
               remat: str = "none", attention_impl: str = "auto", unroll_layers: bool = False,
               rngs: nnx.Rngs | None = None):
    rngs = rngs if rngs is not None else nnx.Rngs(0)
    if remat not in REMAT_POLICIES:
      raise ValueError(f"remat policy {remat!r} not in {REMAT_POLICIES}")
    if attention_impl not in layers.ATTENTION_IMPLS:
      raise ValueError(f"attention_impl {attention_impl!r} not in {layers.ATTENTION_IMPLS}")
    self.attention_impl = attention_impl
    self.unroll_layers = unroll_layers
    self.cfg = cfg
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.remat = remat
    self.embedding = layers.make_param(rngs, layers.normal_init(0.02),
                                       (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"),
                                       param_dtype)
    self.init_extra(rngs)
    self.blocks = _stack_blocks(self.make_block, cfg.num_layers, rngs)
    self.final_norm = self.make_final_norm(rngs)
    if cfg.tie_word_embeddings:
      self.lm_head = None
    else:
      self.lm_head = layers.Dense((cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"),
                                  dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  # -- family hooks -----------------------------------------------------------------
  def init_extra(self, rngs: nnx.Rngs) -> None:
    """Extra top-level parameters (GPT-Neo's learned positions)."""

  def make_block(self, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def make_final_norm(self, rngs: nnx.Rngs) -> nnx.Module:
    raise NotImplementedError

  def embed_tokens(self, input_ids: jax.Array, positions: jax.Array) -> jax.Array:
    return jnp.take(self.embedding[...], input_ids, axis=0).astype(self.dtype)

  # -- shared machinery -------------------------------------------------------------
  def rope_tables(self, positions: jax.Array):
    """cos/sin tables (B, T, rotary_dim) of the one RoPE every layer rotates with, or None
    without RoPE. Otherwise (`layer_rope_rows`: Gemma 3's local and global bases, SmolLM3's
    layers without RoPE) stacked (R, B, T, rotary_dim): one table per `rope_variants` entry,
    in its order, then an identity table (cos 1, sin 0) if some layers do not rotate."""
    cfg = self.cfg
    variants = self.rope_variants
    if not variants:
      return None
    seq_len = jnp.max(positions) + 1 if cfg.rope_type in ("dynamic", "longrope") else None
    tables = []
    for theta, scaled in variants:
      rope_type, params = (cfg.rope_type, cfg.rope) if scaled else ("default", {})
      inv_freq = layers.rope_inv_freq(cfg.rotary_dim, theta, rope_type, params,
                                      cfg.max_position_embeddings, seq_len)
      tables.append(layers.rope_cos_sin(positions, inv_freq, params.get("attention_factor", 1.0)))
    rows = self.layer_rope_rows()
    if rows is None:
      return tables[0]
    if len(variants) in rows:  # the identity row, for the layers without RoPE
      tables.append(layers.identity_rope(*tables[0]))
    return tuple(jnp.stack(t) for t in zip(*tables))

  @property
  def rope_variants(self) -> tuple[tuple[float, bool], ...]:
    """The distinct (theta, scaled) RoPEs of the layers that rotate (`ModelConfig.rope_layers`),
    sorted: one cos/sin table each."""
    return tuple(sorted({(r.theta, r.scaled) for r in self.cfg.rope_layers() if r.uses_rope}))

  def layer_rope_rows(self) -> tuple[int, ...] | None:
    """Each layer's row of the stacked `rope_tables`: its RoPE's index in `rope_variants`, or
    for a layer without RoPE the identity row after them. None where no layer needs a row
    of its own: every layer rotates with one RoPE, or none rotates."""
    variants = self.rope_variants
    ropes = self.cfg.rope_layers()
    if not variants or (len(variants) == 1 and all(r.uses_rope for r in ropes)):
      return None
    return tuple(variants.index((r.theta, r.scaled)) if r.uses_rope else len(variants)
                 for r in ropes)

  def logits_from_hidden(self, h: jax.Array) -> jax.Array:
    h = self.final_norm(h)
    if self.lm_head is None:
      logits = jnp.einsum("bte,ve->btv", h, self.embedding[...].astype(self.dtype))
    else:
      logits = self.lm_head(h)
    logits = logits.astype(jnp.float32)
    if self.cfg.final_logit_softcap:
      cap = self.cfg.final_logit_softcap
      logits = jnp.tanh(logits / cap) * cap
    return logits

  def _run_blocks(self, h, *, rope, cache: KVCache | None, q_slots, k_slots, key_valid,
                  collect_kv: bool = False, stats_mask: jax.Array | None = None):
    """The block stack. Returns (h, cache (k, v)) with a cache, else (h, None), or with
    `collect_kv` (no cache) (h, (k, v)): each layer's fresh keys/values, (L,B,T,K,D).
    With `stats_mask` (no cache; routed blocks only, `has_router`) each block also returns
    its router statistics over the tokens the mask marks, and the result is
    ((h, kv or None), statistics stacked over layers)."""
    cfg = self.cfg
    graphdef, block_state = nnx.split(self.blocks)
    windows = jnp.asarray(cfg.layer_windows, jnp.int32)
    # Per-layer RoPE is scanned data, like the windows: each layer picks its row of the
    # stacked tables (none to pick with one RoPE for all).
    rows = self.layer_rope_rows()
    rope_rows = jnp.asarray(rows if rows is not None else (0,) * cfg.num_layers, jnp.int32)
    attn_kwargs = dict(scale=attn_scale(cfg), softcap=cfg.attn_logit_softcap,
                       impl=self.attention_impl, layer_windows=cfg.layer_windows)
    write_index = cache.index if cache is not None else jnp.int32(0)

    # The whole cache rides in the carry: each layer writes its new tokens in place (no
    # per-layer slices stacked back as scan outputs).
    def body(carry, xs):
      h, kv_all = carry
      state, window, layer, rope_row = xs
      block = nnx.merge(graphdef, state)
      layer_cache = None if kv_all is None else (*kv_all, layer)
      layer_rope = rope if rows is None else tuple(t[rope_row] for t in rope)
      stats_kwargs = {} if stats_mask is None else {"stats_mask": stats_mask}
      h, kv, *stats = block(h, rope=layer_rope, layer_cache=layer_cache,
                            write_index=write_index, q_slots=q_slots, k_slots=k_slots,
                            key_valid=key_valid, window=window, **attn_kwargs, **stats_kwargs)
      if kv_all is None:
        return (h, None), (kv if collect_kv else None, stats[0] if stats else None)
      return (h, kv), None

    if cache is not None and cache.per_layer:
      # Unrolled with one cache array per layer: each layer reads and writes its own.
      # (`layer` None tells Attention its cache is this layer's own.) The layer's weights
      # are dynamic slices at indices XLA cannot fold: a static slice fuses into its
      # consumer dot, which XLA:CPU then runs as a slow generic loop (3-5x slower step).
      new_k, new_v = [], []
      layer_ids = jax.lax.optimization_barrier(jnp.arange(cfg.num_layers))
      for layer in range(cfg.num_layers):
        state = jax.tree.map(
            lambda x, i=layer_ids[layer]: jax.lax.dynamic_index_in_dim(x, i, keepdims=False),
            block_state)
        (h, (k, v)), _ = body((h, (cache.k[layer], cache.v[layer])),
                              (state, windows[layer], None, rope_rows[layer]))
        new_k.append(k)
        new_v.append(v)
      return h, (tuple(new_k), tuple(new_v))
    body = _remat(body, self.remat)
    kv_all = (cache.k, cache.v) if cache is not None else None
    # Remat keeps the scan: the point is bounded memory, which the loop structure gives.
    unroll = cfg.num_layers if self.unrolled_layers else 1
    (h, new_kv), per_layer = jax.lax.scan(
        body, (h, kv_all), (block_state, windows, jnp.arange(cfg.num_layers), rope_rows),
        unroll=unroll)
    fresh_kv, stats = per_layer if kv_all is None else (None, None)
    out = h, (fresh_kv if collect_kv else new_kv)
    return out if stats_mask is None else (out, stats)

  def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
               positions: jax.Array | None = None) -> jax.Array:
    """Logits (B, T, V) in float32 for a (left- or right-) padded batch."""
    return constrain_batch(self.logits_from_hidden(
        self.hidden_states(input_ids, attention_mask, positions=positions)))

  def logits_and_router_stats(self, input_ids: jax.Array,
                              attention_mask: jax.Array | None = None, *,
                              positions: jax.Array | None = None) -> tuple[jax.Array, Any]:
    """`__call__`'s logits and every layer's router statistics over the real tokens
    (`moe.RouterStats`, stacked over layers), for the load-balancing loss; None for a
    model without routers (`has_router`)."""
    if not self.has_router:
      return self(input_ids, attention_mask, positions=positions), None
    (h, _), stats = self._forward_fresh(input_ids, attention_mask, positions, collect_kv=False,
                                        router_stats=True)
    return constrain_batch(self.logits_from_hidden(h)), stats

  def hidden_states(self, input_ids: jax.Array, attention_mask: jax.Array | None = None, *,
                    positions: jax.Array | None = None) -> jax.Array:
    """The last block's output (B, T, hidden), before the final norm: `__call__` without
    the LM head, for callers that take the logits a slice at a time (the scorer: a
    B x T x V logits array is the largest tensor of a forward)."""
    h, _ = self._forward_fresh(input_ids, attention_mask, positions, collect_kv=False)
    return h

  def _forward_fresh(self, input_ids, attention_mask, positions, *, collect_kv: bool,
                     router_stats: bool = False):
    """The forward of a sequence attending over itself only: (h, per-layer (k, v) or None),
    and with `router_stats` ((h, ...), the blocks' router statistics over the real tokens)."""
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    valid = attention_mask.astype(bool)
    if positions is None:
      positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    h = constrain_batch(self.embed_tokens(input_ids, positions))
    slots = jnp.arange(t)
    return self._run_blocks(h, rope=self.rope_tables(positions), cache=None, q_slots=slots,
                            k_slots=slots, key_valid=valid, collect_kv=collect_kv,
                            stats_mask=valid if router_stats else None)

  def prefill(self, input_ids: jax.Array, attention_mask: jax.Array | None, max_len: int,
              cache_dtype=None) -> tuple[jax.Array, KVCache]:
    """A prompt's forward into a fresh cache of `max_len` slots: the last block's output
    (B, T, hidden) and the cache, as `hidden_states_with_cache` on `init_cache(B, max_len)`
    gives them, but attending over the prompt's T keys, not all `max_len` slots (the
    empty slots cost a sampler's prefill 15-30%), and writing the cache once."""
    b, t = input_ids.shape
    if t > max_len:
      raise ValueError(f"a prompt of {t} slots does not fit a cache of {max_len}")
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    h, fresh_kv = self._forward_fresh(input_ids, attention_mask, None, collect_kv=True)
    k, v = layers.to_cache_layout(*fresh_kv)  # (L,B,K,D,T), (L,B,K,T,D)
    dtype = cache_dtype or self.dtype

    def to_slots(x, slot_axis):  # T slots -> max_len slots
      widths = [(0, 0)] * x.ndim
      widths[slot_axis] = (0, max_len - t)
      x = jnp.pad(x.astype(dtype), widths)
      return tuple(x) if self.per_layer_cache else x

    valid = attention_mask.astype(bool)
    cache = KVCache(k=to_slots(k, 4), v=to_slots(v, 3),
                    key_valid=jnp.pad(valid, ((0, 0), (0, max_len - t))), index=jnp.int32(t),
                    next_pos=valid.sum(axis=1).astype(jnp.int32))
    return h, cache

  @property
  def unrolled_layers(self) -> bool:
    """Shallow stacks without remat run their layers unrolled (FULL_UNROLL_MAX_LAYERS), and
    any stack built with `unroll_layers` (the planner's cost estimates: XLA's cost analysis
    counts a loop's body once)."""
    return self.unroll_layers or (self.cfg.num_layers <= FULL_UNROLL_MAX_LAYERS
                                  and self.remat == "none")

  @property
  def per_layer_cache(self) -> bool:
    """Caches hold one array per layer, decoded unrolled (PER_LAYER_CACHE_MAX_LAYERS)."""
    return self.cfg.num_layers <= PER_LAYER_CACHE_MAX_LAYERS

  def init_cache(self, batch_size: int, max_len: int, dtype=None) -> KVCache:
    """An empty cache: stacked keys (L,B,K,D,S) and values (L,B,K,S,D), or one array per
    layer (`per_layer_cache`)."""
    cfg = self.cfg
    dtype = dtype or self.dtype
    k_shape = (batch_size, cfg.num_kv_heads, cfg.head_dim, max_len)
    v_shape = (batch_size, cfg.num_kv_heads, max_len, cfg.head_dim)
    if self.per_layer_cache:
      zeros = lambda shape: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
    else:
      zeros = lambda shape: jnp.zeros((cfg.num_layers, *shape), dtype)
    k, v = zeros(k_shape), zeros(v_shape)
    return KVCache(k=k, v=v,
                   key_valid=jnp.zeros((batch_size, max_len), bool), index=jnp.int32(0),
                   next_pos=jnp.zeros((batch_size,), jnp.int32))

  def forward_with_cache(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                         cache: KVCache, *, positions: jax.Array | None = None
                         ) -> tuple[jax.Array, KVCache]:
    """Prefill (T > 1) or decode (T = 1) step: logits (B, T, V) and the updated cache.

    Tokens are written at slots [cache.index, cache.index + T); positions continue each
    row's count of real tokens unless given (B, T).
    """
    h, cache = self.hidden_states_with_cache(input_ids, attention_mask, cache,
                                             positions=positions)
    return self.logits_from_hidden(h), cache

  def hidden_states_with_cache(self, input_ids: jax.Array, attention_mask: jax.Array | None,
                               cache: KVCache, *, positions: jax.Array | None = None
                               ) -> tuple[jax.Array, KVCache]:
    """`forward_with_cache` without the LM head: the last block's output (B, T, hidden)
    and the updated cache. A prefill needs the logits of its last position only (a
    B x T x V prefill logits array costs as much as the rest of the prefill)."""
    b, t = input_ids.shape
    if attention_mask is None:
      attention_mask = jnp.ones((b, t), jnp.int32)
    valid = attention_mask.astype(bool)
    if positions is None:
      positions = cache.next_pos[:, None] + jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
    key_valid = jax.lax.dynamic_update_slice_in_dim(cache.key_valid, valid, cache.index, axis=1)
    h = constrain_batch(self.embed_tokens(input_ids, positions))
    h, (new_k, new_v) = self._run_blocks(
        h, rope=self.rope_tables(positions), cache=cache, q_slots=cache.index + jnp.arange(t),
        k_slots=jnp.arange(cache.max_len), key_valid=key_valid)
    new_cache = KVCache(k=new_k, v=new_v, key_valid=key_valid, index=cache.index + t,
                        next_pos=cache.next_pos + valid.sum(axis=1).astype(jnp.int32))
    return h, new_cache


def attn_block_kwargs(cfg: ModelConfig, dtype, param_dtype) -> dict[str, Any]:
  return dict(hidden=cfg.hidden_size, num_heads=cfg.num_heads, num_kv_heads=cfg.num_kv_heads,
              head_dim=cfg.head_dim, qkv_bias=cfg.attention_bias, out_bias=cfg.attention_out_bias,
              qk_norm=cfg.qk_norm, qk_norm_style=cfg.qk_norm_style, norm_eps=cfg.norm_eps,
              dtype=dtype, param_dtype=param_dtype)
