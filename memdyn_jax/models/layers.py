"""Building blocks shared by the model families: parameters with logical axes, norms,
rotary embeddings, attention over a KV cache, and MLPs.

Every parameter is an `nnx.Param` carrying `logical_axes` (MaxText's idea): layers name
what an axis *is* (`embed`, `heads`, `mlp`, ...) and `memdyn_jax.sharding` maps names to
mesh axes with one rules table. Numerics follow the HF PyTorch modules: norms and
softmax in float32, attention scores accumulated in float32.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import splash
from memdyn_jax.models.config import QK_NORMS, RMS_NORM_STYLES

Initializer = Callable[..., jax.Array]
_NEG_INF = -1e30  # finite so fully-masked (padding) rows stay NaN-free


def make_param(rngs: nnx.Rngs | None, init: Initializer, shape: Sequence[int],
               axes: Sequence[str | None], dtype) -> nnx.Param:
  """An `nnx.Param` of `shape`, initialised by `init`, tagged with `logical_axes`."""
  if len(shape) != len(axes):
    raise ValueError(f"shape {tuple(shape)} and logical axes {tuple(axes)} differ in rank")
  key = rngs.params() if rngs is not None else jax.random.key(0)
  return nnx.Param(init(key, tuple(shape), dtype), logical_axes=tuple(axes))


def normal_init(stddev: float) -> Initializer:
  return lambda key, shape, dtype: (stddev * jax.random.normal(key, shape)).astype(dtype)


def zeros_init(key, shape, dtype):
  del key
  return jnp.zeros(shape, dtype)


def ones_init(key, shape, dtype):
  del key
  return jnp.ones(shape, dtype)


class RMSNorm(nnx.Module):
  """RMSNorm computed in float32. `offset=1` gives Gemma's `x * (1 + w)`.

  `shape` (an int or a tuple): the trailing axes normalised together, and the weight's
  shape (`axes` its logical axes). `upcast_weight`: multiply by the weight in float32 and
  cast after (Gemma, OLMo 2), rather than cast the normalised activations back first
  (Llama); default: with an offset. `rms_norm` builds the three styles by name.
  """

  def __init__(self, shape: int | Sequence[int], eps: float, *, offset: float = 0.0,
               upcast_weight: bool | None = None, axes: Sequence[str | None] = ("norm",),
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    shape = (shape,) if isinstance(shape, (int, np.integer)) else tuple(shape)
    self.eps = eps
    self.offset = offset
    self.upcast_weight = bool(offset) if upcast_weight is None else upcast_weight
    self.reduce_axes = tuple(range(-len(shape), 0))
    init = zeros_init if offset else ones_init
    self.scale = make_param(rngs, init, shape, axes, param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=self.reduce_axes, keepdims=True)
                              + self.eps)
    if self.upcast_weight:  # Gemma and OLMo 2 multiply in float32, then cast
      return (x32 * (self.offset + self.scale[...].astype(jnp.float32))).astype(dtype)
    # Llama casts the normalised activations back before the weight multiply.
    return self.scale[...].astype(dtype) * x32.astype(dtype)


# RMSNorm(offset, upcast_weight) of each style in `config.RMS_NORM_STYLES`.
_RMS_NORM_STYLE_ARGS = {"cast_then_scale": dict(offset=0.0, upcast_weight=False),
                        "scale_then_cast": dict(offset=0.0, upcast_weight=True),
                        "one_plus_scale": dict(offset=1.0, upcast_weight=True)}


def rms_norm(style: str, shape: int | Sequence[int], eps: float, **kwargs) -> RMSNorm:
  """An `RMSNorm` of `style`, one of `config.RMS_NORM_STYLES`."""
  if style not in RMS_NORM_STYLES:
    raise ValueError(f"RMSNorm style {style!r} not in {RMS_NORM_STYLES}")
  return RMSNorm(shape, eps, **_RMS_NORM_STYLE_ARGS[style], **kwargs)


class LayerNorm(nnx.Module):
  """LayerNorm with bias, statistics in float32 (GPT-Neo)."""

  def __init__(self, dim: int, eps: float, *, param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    self.eps = eps
    self.scale = make_param(rngs, ones_init, (dim,), ("norm",), param_dtype)
    self.bias = make_param(rngs, zeros_init, (dim,), ("norm",), param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
    return y.astype(x.dtype)


class Dense(nnx.Module):
  """y = x @ W (+ b), with W's logical axes given; W may have several input/output axes.

  `n_in` leading axes of the kernel contract with the trailing `n_in` axes of x.
  `memdyn_jax.train.lora.apply_lora` may add low-rank adapters (`lora_a`, `lora_b`, ...);
  without them the computation is unchanged.
  """

  def __init__(self, shape: Sequence[int], axes: Sequence[str | None], *, n_in: int = 1,
               use_bias: bool = False, dtype=jnp.float32, param_dtype=jnp.float32,
               init_std: float = 0.02, rngs: nnx.Rngs | None = None):
    self.n_in = n_in
    self.dtype = dtype
    self.kernel = make_param(rngs, normal_init(init_std), shape, axes, param_dtype)
    self.bias = (make_param(rngs, zeros_init, shape[n_in:], axes[n_in:], param_dtype)
                 if use_bias else None)

  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.kernel[...].astype(self.dtype)
    n_out = kernel.ndim - self.n_in
    y = matmul(x.astype(self.dtype), kernel, self.n_in)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype).reshape((1,) * (y.ndim - n_out) + self.bias.shape)
    if getattr(self, "lora_a", None) is not None:  # adapters added by memdyn_jax.train.lora
      y = y + self._lora_delta(x)
    return y

  def _lora_delta(self, x: jax.Array) -> jax.Array:
    """lora_scale * dropout(x) @ A @ B; dropout only when `deterministic` is False."""
    x = x.astype(self.dtype)
    if self.lora_dropout > 0 and not self.deterministic:
      keep = 1.0 - self.lora_dropout
      key = jax.random.wrap_key_data(self.lora_dropout_key[...])
      x = jnp.where(jax.random.bernoulli(key, keep, x.shape), x / keep, 0).astype(x.dtype)
    a = self.lora_a[...].astype(self.dtype)  # (in..., r)
    b = self.lora_b[...].astype(self.dtype)  # (r, out...)
    delta = matmul(matmul(x, a, self.n_in), b, 1)
    return (self.lora_scale * delta).astype(self.dtype)


def matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
  """x (..., *in) @ kernel (*in, *out) -> (..., *out), as one 2-D matmul.

  Flattening the leading (batch, length) axes and the kernel's in/out axes first is free on
  every backend (row-major reshapes), and it matters on XLA:CPU: the weight gradient of a
  dot contracting over two leading axes ran 2.5x slower than that of the 2-D form (SwiGLU
  MLP forward + backward, 8x128 tokens, hidden 256: 38 ms vs 14 ms).
  """
  in_shape, out_shape = kernel.shape[:n_in], kernel.shape[n_in:]
  if x.shape[x.ndim - n_in:] != in_shape:
    raise ValueError(f"input {x.shape} does not end in the kernel's input axes {in_shape}")
  lead = x.shape[:x.ndim - n_in]
  y = jnp.dot(x.reshape(-1, math.prod(in_shape)),
              kernel.reshape(math.prod(in_shape), math.prod(out_shape)))
  return y.reshape(*lead, *out_shape)


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
  if name == "silu":
    return jax.nn.silu
  if name in ("gelu_pytorch_tanh", "gelu_new"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  raise ValueError(f"unsupported activation {name!r}")


class GatedMLP(nnx.Module):
  """down(act(gate(x)) * up(x)): SwiGLU (Llama) and GeGLU (Gemma 2)."""

  def __init__(self, hidden: int, inner: int, act: str, *, use_bias: bool = False, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    kw = dict(use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.gate_proj = Dense((hidden, inner), ("embed", "mlp"), **kw)
    self.up_proj = Dense((hidden, inner), ("embed", "mlp"), **kw)
    self.down_proj = Dense((inner, hidden), ("mlp", "embed"), **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class PlainMLP(nnx.Module):
  """proj(act(fc(x))) with biases (GPT-Neo)."""

  def __init__(self, hidden: int, inner: int, act: str, *, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.c_fc = Dense((hidden, inner), ("embed", "mlp"), **kw)
    self.c_proj = Dense((inner, hidden), ("mlp", "embed"), **kw)
    self.act = activation(act)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.c_proj(self.act(self.c_fc(x)))


# ----------------------------------------------------------------------------- RoPE


def rope_inv_freq(head_dim: int, theta: float, rope_type: str, params: dict[str, Any],
                  max_position_embeddings: int, seq_len: jax.Array | None = None) -> jax.Array:
  """Inverse frequencies as HF computes them for each supported `rope_type`.

  `head_dim`: the rotated dims (`ModelConfig.rotary_dim`: fewer than a head's under partial
  rotary). `dynamic` (NTK) and `longrope` depend on the longest position in the call
  (`seq_len`), like HF's forward: LongRoPE takes its long factors past
  `original_max_position_embeddings`, its short ones up to it.
  """
  exponents = np.arange(0, head_dim, 2, dtype=np.float64) / head_dim
  if rope_type == "dynamic":
    factor = params["factor"]
    seq = jnp.maximum(seq_len.astype(jnp.float32), float(max_position_embeddings))
    base = theta * ((factor * seq / max_position_embeddings) - (factor - 1)) ** (head_dim / (head_dim - 2))
    return 1.0 / (base ** jnp.asarray(exponents, jnp.float32))
  inv = 1.0 / (theta ** exponents)
  if rope_type == "longrope":
    short = (inv / np.asarray(params["short_factor"])).astype(np.float32)
    long = (inv / np.asarray(params["long_factor"])).astype(np.float32)
    return jnp.where(seq_len > params["original_max_position_embeddings"], long, short)
  if rope_type == "linear":
    inv = inv / params["factor"]
  elif rope_type == "llama3":
    factor, lo, hi = params["factor"], params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > old_len / lo, inv / factor, inv)
    smooth = (old_len / wavelen - lo) / (hi - lo)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < old_len / hi) & ~(wavelen > old_len / lo)
    inv = np.where(medium, smoothed, scaled)
  elif rope_type != "default":
    raise ValueError(f"unsupported rope_type {rope_type!r}")
  return jnp.asarray(inv.astype(np.float32))


def rope_cos_sin(positions: jax.Array, inv_freq: jax.Array,
                 scale: float = 1.0) -> tuple[jax.Array, jax.Array]:
  """cos/sin tables (B, T, rotary dims) in float32, HF's `cat(freqs, freqs)` layout, times
  `scale` (HF's `attention_scaling`: LongRoPE's attention factor, else 1)."""
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  cos, sin = jnp.cos(emb), jnp.sin(emb)
  if scale != 1.0:
    cos, sin = cos * scale, sin * scale
  return cos, sin


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates x (B, T, H, D) with HF's rotate-half convention. Tables narrower than D rotate
  the first dims only (partial rotary, as HF's Phi-3); the rest pass through."""
  rotary = cos.shape[-1]
  if rotary < x.shape[-1]:
    return jnp.concatenate([apply_rope(x[..., :rotary], cos, sin), x[..., rotary:]], axis=-1)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  cos = cos[:, :, None, :].astype(x.dtype)
  sin = sin[:, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def identity_rope(cos: jax.Array, sin: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Tables shaped like (cos, sin) that rotate by nothing (cos 1, sin 0): `apply_rope` with
  them returns exactly x. The row of the stacked per-layer tables that the layers without
  RoPE (SmolLM3's NoPE layers) pick, so every layer takes one code path."""
  return jnp.ones_like(cos), jnp.zeros_like(sin)


# ----------------------------------------------------------------------------- attention


def attention_mask(q_slots: jax.Array, k_slots: jax.Array, key_valid: jax.Array,
                   window: jax.Array) -> jax.Array:
  """Boolean (B, Tq, S): causal in slot order, key must be a real token, and within `window`.

  Slots are indices in the (left-padded) sequence/cache, as HF's masks use; `window` 0
  means global attention. A local window allows `0 <= q - k < window`.
  """
  diff = q_slots[:, None] - k_slots[None, :]
  allowed = diff >= 0
  allowed &= (window <= 0) | (diff < window)
  return allowed[None] & key_valid[:, None, :]


ATTENTION_IMPLS = ("reference", "auto", "xla", "cudnn", "splash")
_DENSE_MASK_IMPLS = ("reference", "auto", "xla", "cudnn")
_GPU_BACKENDS = ("gpu", "cuda", "rocm")
_CPU_REASON = "CPU: the einsum path tuned for XLA:CPU"
_SOFTCAP_REASON = "logit soft-capping: jax.nn.dot_product_attention cannot cap logits"

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
  """The attention path `attention` runs for a requested impl on a backend.

  impl: "reference", "xla", "cudnn", "auto" (`jax.nn.dot_product_attention` picks: cuDNN
  flash attention on NVIDIA GPUs where it applies) or "splash" (TPU Pallas kernel;
  `interpret` when not on a TPU). reason: why this is not simply what was requested, or "".
  """

  requested: str
  impl: str
  reason: str = ""
  interpret: bool = False

  def describe(self) -> str:
    return f"{self.impl} ({self.reason})" if self.reason else self.impl


def choose_attention(impl: str, *, backend: str, q_len: int, kv_len: int, softcap: float,
                     kv_cache: bool = False, windows_known: bool = True) -> AttentionChoice:
  """Which attention path runs, and why. Pure: the backend is an argument.

  "auto" is what each chip runs best: the splash kernel on TPU where it can express the
  call (else XLA's fused attention), `jax.nn.dot_product_attention`'s own pick on GPU (cuDNN
  flash attention where it applies), and the reference einsums on CPU (the path tuned for
  XLA:CPU, and HF-exact). "splash" falls back like "auto" on TPU. Whatever cannot cap logits
  (`jax.nn.dot_product_attention`) falls back to "reference" on a soft-capped model.
  """
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"attention impl {impl!r} not in {ATTENTION_IMPLS}")
  if impl == "reference":
    return AttentionChoice(impl, "reference")
  if impl == "auto" and backend == "cpu":
    return AttentionChoice(impl, "reference", _CPU_REASON)
  reasons = []
  if impl == "splash" or (impl == "auto" and backend == "tpu"):
    why_not = splash.unsupported_reason(q_len=q_len, kv_len=kv_len, kv_cache=kv_cache,
                                        windows_known=windows_known)
    if why_not is None:
      on_tpu = backend == "tpu"
      return AttentionChoice(impl, "splash", "" if on_tpu else
                             f"Pallas interpret mode on {backend}: slow, for tests",
                             interpret=not on_tpu)
    reasons.append(f"splash: {why_not}")
  fused = impl if impl in ("xla", "cudnn") else "auto" if backend in _GPU_BACKENDS else "xla"
  if softcap:
    return AttentionChoice(impl, "reference", "; ".join(reasons + [_SOFTCAP_REASON]))
  return AttentionChoice(impl, fused, "; ".join(reasons))


ATTENTION_PHASES = ("forward", "prefill", "decode")


def attention_choice_for_config(cfg, impl: str, *, backend: str, seq_len: int,
                                phase: str = "forward") -> AttentionChoice:
  """`choose_attention` for a `ModelConfig` (for plans and the README).

  phase: "forward" (training, scoring: T = S = seq_len), "prefill" (T = S = seq_len into a
  KV cache) or "decode" (one token against a cache of seq_len slots).
  """
  if phase not in ATTENTION_PHASES:
    raise ValueError(f"phase {phase!r} not in {ATTENTION_PHASES}")
  return choose_attention(impl, backend=backend, q_len=1 if phase == "decode" else seq_len,
                          kv_len=seq_len, softcap=cfg.attn_logit_softcap,
                          kv_cache=phase != "forward")


_LOGGED_CHOICES: set[AttentionChoice] = set()


def _log_once(choice: AttentionChoice) -> None:
  if (choice.reason or choice.impl != choice.requested) and choice not in _LOGGED_CHOICES:
    _LOGGED_CHOICES.add(choice)
    level = logging.INFO if choice.requested == "auto" else logging.WARNING
    log.log(level, "attention_impl=%r runs %s", choice.requested, choice.describe())


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, q_slots: jax.Array,
              k_slots: jax.Array, key_valid: jax.Array, window: jax.Array | int, scale: float,
              softcap: float = 0.0, impl: str = "reference", kv_cache: bool = False,
              layer_windows: tuple[int, ...] | None = None) -> jax.Array:
  """Masked grouped-query attention through the path `choose_attention` picks (logged once).

  q (B,T,H,D) -> (B,T,H,D); k/v (B,S,K,D), or with `kv_cache` a cache layer: k (B,K,D,S),
  v (B,K,S,D) (the cache's layout: see `dot_attention`). The mask is
  `attention_mask(q_slots, k_slots, key_valid, window)`. `layer_windows`: the static windows
  a traced `window` is one of (the config's), which the splash kernel needs.
  """
  if isinstance(window, (int, np.integer)) and layer_windows is None:
    layer_windows = (int(window),)
  kv_layout = "cache" if kv_cache else "bskd"
  choice = choose_attention(impl, backend=sharding_lib.target_platform(), q_len=q.shape[1],
                            kv_len=v.shape[2 if kv_cache else 1], softcap=softcap,
                            kv_cache=kv_cache, windows_known=layer_windows is not None)
  _log_once(choice)
  if choice.impl == "splash":
    return splash.splash_attention(q, k, v, key_valid, window=window, layer_windows=layer_windows,
                                   scale=scale, softcap=softcap, interpret=choice.interpret)
  mask = attention_mask(q_slots, k_slots, key_valid, window)
  return dot_attention(q, k, v, mask, scale=scale, softcap=softcap, impl=choice.impl,
                       kv_layout=kv_layout)


KV_LAYOUTS = ("bskd", "cache")


def to_cache_layout(k: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Fresh keys/values (..., B, T, K, D) in the KV cache's layout (`kv_layout="cache"`):
  keys (..., B, K, D, T), slots last; values (..., B, K, T, D), slots second to last."""
  return jnp.moveaxis(k, -3, -1), jnp.swapaxes(v, -3, -2)


def dot_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, *, scale: float,
                  softcap: float = 0.0, impl: str = "reference",
                  kv_layout: str = "bskd") -> jax.Array:
  """Grouped-query attention. q (B,T,H,D), k/v (B,S,K,D), mask (B,T,S) -> (B,T,H,D).

  `kv_layout="cache"`: a KV cache layer, keys (B,K,D,S) and values (B,K,S,D), in which the
  reference einsums are plain batched matmuls over (B,K), keys included (q @ k with no
  transposed operand: 1.4x faster decode attention on XLA:CPU than keys (B,K,S,D)), and a
  decode step transposes no cache.

  `impl="reference"`: explicit einsums, scores and softmax in float32 (as HF eager), heads
  sharing K/V groups without copies. Otherwise `jax.nn.dot_product_attention` with that
  implementation ("auto" lets JAX pick, e.g. cuDNN flash attention on NVIDIA GPUs). The
  fused kernels cannot express logit soft-capping (Gemma 2), so a soft-capped model always
  takes the reference path. (The splash kernel takes the mask's parts, not a dense mask:
  see `attention`.)
  """
  if impl not in _DENSE_MASK_IMPLS:
    raise ValueError(f"attention impl {impl!r} with a dense mask not in {_DENSE_MASK_IMPLS}")
  if kv_layout not in KV_LAYOUTS:
    raise ValueError(f"kv_layout {kv_layout!r} not in {KV_LAYOUTS}")
  if impl != "reference" and not softcap:
    if kv_layout == "cache":  # the fused kernels take (B,S,K,D)
      k, v = jnp.transpose(k, (0, 3, 1, 2)), jnp.swapaxes(v, 1, 2)
    return jax.nn.dot_product_attention(
        q, k, v, mask=mask[:, None, :, :], scale=scale,
        implementation=None if impl == "auto" else impl).astype(q.dtype)
  k_axes, v_axes = ("bkds", "bksd") if kv_layout == "cache" else ("bskd", "bskd")
  b, t, h, d = q.shape
  kv_heads = k.shape[k_axes.index("k")]
  groups = h // kv_heads
  # Each KV head's queries (its group's heads x positions) form one matrix: both einsums
  # are then batched matmuls over (B, K) with a single row dimension, in the dot's own
  # output layout. (Two row dimensions, "btkgd,...->bkgts", ran 1.5-2.5x slower on
  # XLA:CPU, decode included; with T = 1 the transposes here are free.)
  q = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)
  q = q.reshape(b, kv_heads, groups * t, d)
  scores = jnp.einsum(f"bkmd,{k_axes}->bkms", q, k, preferred_element_type=jnp.float32)
  scores = scores.reshape(b, kv_heads, groups, t, -1) * scale
  if softcap:
    scores = jnp.tanh(scores / softcap) * softcap
  scores = jnp.where(mask[:, None, None, :, :], scores, _NEG_INF)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum(f"bkms,{v_axes}->bkmd", probs.reshape(b, kv_heads, groups * t, -1), v)
  return out.reshape(b, kv_heads, groups, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nnx.Module):
  """Multi-head / grouped-query self-attention with optional RoPE, biases and softcap.

  `qk_norm` (`QK_NORMS`) normalises q and k before RoPE with an RMSNorm of `qk_norm_style`
  (`rms_norm`): "head" over each head's head_dim, one (head_dim,) weight shared by
  the heads (Qwen3, Gemma 3); "projection" over the whole projection, all heads at once,
  with a (heads, head_dim) weight sharded like the projection (OLMo 2).
  """

  def __init__(self, hidden: int, num_heads: int, num_kv_heads: int, head_dim: int, *,
               qkv_bias: bool, out_bias: bool, qk_norm: str = "none",
               qk_norm_style: str = "cast_then_scale", norm_eps: float = 1e-6, dtype=jnp.float32,
               param_dtype=jnp.float32, rngs: nnx.Rngs | None = None):
    if qk_norm not in QK_NORMS:
      raise ValueError(f"qk_norm {qk_norm!r} not in {QK_NORMS}")
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.q_proj = Dense((hidden, num_heads, head_dim), ("embed", "heads", "head_dim"),
                        use_bias=qkv_bias, **kw)
    self.k_proj = Dense((hidden, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                        use_bias=qkv_bias, **kw)
    self.v_proj = Dense((hidden, num_kv_heads, head_dim), ("embed", "kv_heads", "head_dim"),
                        use_bias=qkv_bias, **kw)
    self.o_proj = Dense((num_heads, head_dim, hidden), ("heads", "head_dim", "embed"), n_in=2,
                        use_bias=out_bias, **kw)

    def qk_norm_of(heads, heads_axis):
      if qk_norm == "none":
        return None
      shape, axes = (((head_dim,), ("norm",)) if qk_norm == "head" else
                     ((heads, head_dim), (heads_axis, "head_dim")))
      return rms_norm(qk_norm_style, shape, norm_eps, axes=axes, param_dtype=param_dtype,
                      rngs=rngs)

    self.q_norm = qk_norm_of(num_heads, "heads")
    self.k_norm = qk_norm_of(num_kv_heads, "kv_heads")

  def __call__(self, x: jax.Array, *, rope: tuple[jax.Array, jax.Array] | None,
               layer_cache: tuple[jax.Array, jax.Array, jax.Array] | None, write_index: jax.Array,
               q_slots: jax.Array, k_slots: jax.Array, key_valid: jax.Array, window: jax.Array,
               scale: float, softcap: float, impl: str = "reference",
               layer_windows: tuple[int, ...] | None = None):
    """Returns (output, the updated cache (k, v) or the fresh (k, v) when there is no cache).

    `layer_cache` is (k, v, layer): the keys (L,B,K,D,S) and values (L,B,K,S,D) of *every*
    layer, and this layer's index. The new tokens are written in place at slot
    `write_index` of `layer` and the layer is attended from there, so a decode step copies
    no cache besides reading it. With `layer` None, k/v are this layer's own (B,K,D,S) /
    (B,K,S,D) cache (per-layer caches: attending straight from it spares the copy a slice
    of the stacked cache costs on CPU).
    `window` is this layer's (traced) window, `layer_windows` the config's (see `attention`).
    """
    q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    if layer_cache is not None:
      cache_k, cache_v, layer = layer_cache
      def write(c, x, slot_axis):  # x in the cache's layer layout
        start = [0] * x.ndim
        start[slot_axis] = write_index
        x = x.astype(c.dtype)
        if layer is None:
          return jax.lax.dynamic_update_slice(c, x, start)
        return jax.lax.dynamic_update_slice(c, x[None], [layer] + start)

      new_k, new_v = to_cache_layout(k, v)
      cache_k, cache_v = write(cache_k, new_k, 3), write(cache_v, new_v, 2)
      k, v = (cache_k, cache_v) if layer is None else (cache_k[layer], cache_v[layer])
    out = attention(q, k.astype(q.dtype), v.astype(q.dtype), q_slots=q_slots, k_slots=k_slots,
                    key_valid=key_valid, window=window, scale=scale, softcap=softcap, impl=impl,
                    kv_cache=layer_cache is not None, layer_windows=layer_windows)
    return self.o_proj(out), ((cache_k, cache_v) if layer_cache is not None else (k, v))
