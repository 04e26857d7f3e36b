"""TPU Pallas splash attention for the model's masks (causal, padding, sliding window).

`jax.experimental.pallas.ops.tpu.splash_attention` runs one example at a time: q (heads, T, D),
k/v (kv_heads, S, D) with grouped-query heads natively (query head h reads KV head
h // (heads / kv_heads), our layout), a *static* mask object per head, logit soft-capping
(`attn_logits_soft_cap`) and segment ids. How our masks map onto it:

- causal / sliding window: `CausalMask`, or `LocalMask` with window (w - 1, 0), which allows
  0 <= q - k < w exactly as `layers.attention_mask` does.
- per-layer windows are scanned data (a traced scalar per layer), but a splash mask is
  static: one kernel per distinct window of the config, picked with `lax.switch`.
- padding: segment ids = key validity. A real query attends to real keys only, as in the
  reference; a padding query attends to padding keys (the reference gives it no keys) — its
  output is never read by a real position, so logits at real positions agree.
- query scaling: q is multiplied by `scale` before the kernel (it has no scale argument).
- batch: `vmap` over examples; under a mesh, `shard_map` over the batch and head axes the
  rules table names (a Pallas kernel cannot be partitioned by GSPMD).

What splash cannot express is reported by `unsupported_reason` (the caller falls back):
sequence lengths that are not a multiple of 128 (its block size), and KV-cache calls, whose
query slots start at a traced cache index (a splash mask offset is static); decode is one
query token anyway. Off TPU the kernel runs in Pallas interpret mode (slow; for tests).
"""
from __future__ import annotations

import contextlib
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu import splash_attention as sa
from jax.sharding import PartitionSpec as P

from memdyn_jax import sharding as sharding_lib

# Splash tiles are multiples of the TPU's 128 lanes; larger tiles are faster where they fit.
BLOCK_CANDIDATES = (512, 256, 128)


def block_size(q_len: int, kv_len: int) -> int | None:
  """The largest tile in `BLOCK_CANDIDATES` dividing both lengths, or None."""
  for block in BLOCK_CANDIDATES:
    if q_len % block == 0 and kv_len % block == 0:
      return block
  return None


def unsupported_reason(*, q_len: int, kv_len: int, kv_cache: bool, windows_known: bool
                       ) -> str | None:
  """Why splash cannot run this call (a sentence), or None when it can."""
  if q_len == 1:
    return "decode step (one query token): nothing for a flash kernel to tile"
  if kv_cache:
    return ("KV-cache forward: query slots start at the traced cache index, and a splash mask "
            "offset is static")
  if q_len != kv_len:
    return f"query length {q_len} != key length {kv_len} outside a KV cache"
  if block_size(q_len, kv_len) is None:
    return f"sequence length {q_len} is not a multiple of {BLOCK_CANDIDATES[-1]} (splash tile)"
  if not windows_known:
    return "the layer's attention window is traced and the config's windows were not given"
  return None


def distinct_windows(layer_windows: tuple[int, ...], seq_len: int) -> tuple[int, ...]:
  """The distinct effective windows, 0 = global; a window >= seq_len is global here."""
  return tuple(sorted({0 if w <= 0 or w >= seq_len else int(w) for w in layer_windows}))


def splash_mask(q_len: int, kv_len: int, window: int, num_heads: int) -> sa.MultiHeadMask:
  """The static part of `layers.attention_mask` (causal, window) for every head."""
  if window > 0:
    head_mask = sa.LocalMask((q_len, kv_len), window_size=(window - 1, 0), offset=0)
  else:
    head_mask = sa.CausalMask((q_len, kv_len))
  return sa.MultiHeadMask([head_mask] * num_heads)


@functools.lru_cache(maxsize=64)
def _kernel(q_len: int, kv_len: int, window: int, num_heads: int, softcap: float,
            interpret: bool):
  block = block_size(q_len, kv_len)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  # Built under a trace, the kernel's mask arrays would be tracers; cached, they would leak.
  # They are made eagerly on the default device, outside the mesh in scope: a deviceless
  # TPU topology (`memdyn_jax.plan`) has devices that compile programs but hold no data.
  with jax.ensure_compile_time_eval(), _no_concrete_mesh():
    return sa.make_splash_mha(splash_mask(q_len, kv_len, window, num_heads), block_sizes=sizes,
                              head_shards=1, q_seq_shards=1,
                              attn_logits_soft_cap=softcap or None, interpret=interpret)


@contextlib.contextmanager
def _no_concrete_mesh():
  """Clears the concrete mesh `jax.set_mesh` put in scope (the abstract one stays), so eager
  arrays land on the default device. JAX has no public way to do this inside a trace;
  `set_mesh` itself swaps this same thread-local state."""
  from jax._src import config as jax_config, mesh as mesh_lib
  previous = jax_config.device_context.swap_local(mesh_lib.empty_concrete_mesh)
  try:
    yield
  finally:
    jax_config.device_context.set_local(previous)


def _local_attention(q, k, v, segment_ids, window_index, *, windows, softcap, interpret):
  """Kernel call on one shard: q (B, H, T, D), k/v (B, K, S, D), segment ids (B, S)."""
  _, heads, q_len, _ = q.shape
  kv_len = k.shape[2]

  def run(window):
    kernel = _kernel(q_len, kv_len, window, heads, float(softcap), interpret)
    per_example = lambda q, k, v, s: kernel(q, k, v, segment_ids=sa.SegmentIds(q=s, kv=s))
    return lambda: jax.vmap(per_example)(q, k, v, segment_ids)

  if len(windows) == 1:
    return run(windows[0])()
  return jax.lax.switch(window_index, [run(w) for w in windows])


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, key_valid: jax.Array, *,
                     window: jax.Array | int, layer_windows: tuple[int, ...], scale: float,
                     softcap: float = 0.0, interpret: bool = False) -> jax.Array:
  """Self-attention without a cache. q (B,T,H,D), k/v (B,T,K,D), key_valid (B,T) -> (B,T,H,D).

  `window` is this layer's window (traced or static); `layer_windows` the static windows
  it is one of (the config's). Check `unsupported_reason` first.
  """
  seq_len = q.shape[1]
  windows = distinct_windows(layer_windows, seq_len)
  effective = jnp.where((window <= 0) | (window >= seq_len), 0, window)
  window_index = sum(jnp.where(effective == w, i, 0) for i, w in enumerate(windows))
  local = functools.partial(_local_attention, windows=windows, softcap=softcap,
                            interpret=interpret)
  # Head-major layout for the kernel; scale q since the kernel takes no scale.
  q = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
  k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
  segment_ids = key_valid.astype(jnp.int32)
  window_index = jnp.asarray(window_index, jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or math.prod(mesh.shape.values()) == 1:
    out = local(q, k, v, segment_ids, window_index)
  else:
    out = _sharded(local, mesh, q, k, v, segment_ids, window_index)
  return jnp.swapaxes(out, 1, 2).astype(q.dtype)


def _sharded(local, mesh, q, k, v, segment_ids, window_index):
  """Runs `local` per shard: batch over the data axes, heads over the tensor axis."""
  spec = sharding_lib.logical_to_spec(("batch", "heads", "length", "head_dim"), shape=q.shape,
                                      mesh=mesh)
  batch_axes, head_axes = spec[0], spec[1]
  if head_axes is not None:
    names = (head_axes,) if isinstance(head_axes, str) else head_axes
    if k.shape[1] % math.prod(mesh.shape[a] for a in names):
      # KV heads that do not split like the query heads: give every query head its own copy,
      # so each shard holds the KV heads its query heads read.
      groups = q.shape[1] // k.shape[1]
      k, v = jnp.repeat(k, groups, axis=1), jnp.repeat(v, groups, axis=1)
  kv_spec = P(batch_axes, head_axes, None, None)
  return jax.shard_map(local, mesh=mesh,
                       in_specs=(spec, kv_spec, kv_spec, P(batch_axes, None), P()),
                       out_specs=spec, check_vma=False)(q, k, v, segment_ids, window_index)
