"""LoRA adapters (Hu et al., 2021) on the models' `layers.Dense` projections.

`apply_lora` gives each targeted `Dense` two trainable factors, `lora_a` (in..., r) and
`lora_b` (r, out...), and the layer computes

    y = x @ W (+ b) + (alpha / r) · dropout(x) @ A @ B.

A starts PEFT-style (uniform in ±1/sqrt(fan_in)) and B at zero, so a freshly adapted model
computes exactly what the base model does. Adapters are `LoraParam`s, an `nnx.Param`
subclass: train them alone with `nnx.Optimizer(model, tx, wrt=LoraParam)` (or
`trainable_filter(model)`), and differentiate with `nnx.DiffState(0, LoraParam)`.

Blocks are stored stacked, so adapters inside `blocks` get the leading `layers` axis too
(`('layers', <in axes>, None)` / `('layers', None, <out axes>)`): the transformer's
`lax.scan` slices them per layer like every other parameter, and the sharding rules place
them (the rank axis is replicated). Adapters are created unsharded; call
`memdyn_jax.sharding.shard_model` after `apply_lora` on a mesh.

Dropout (on the adapter's input only, as PEFT does) is off unless the model is in training
mode (`model.train()`; `model.eval()` turns it off again; adapted layers start in eval
mode). Its randomness comes from a per-layer key stored in the layer
(`LoraDropoutKey`); the scanned blocks cannot advance an RNG counter, so the trainer calls
`set_lora_dropout_key(model, fold_in(key, step))` each step (inside the jitted step is fine).

`merge_lora` folds the adapters into the kernels (W + scale · A @ B) and removes them, giving
a plain model for evaluation and `models.save_pretrained`.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memdyn_jax.models import layers

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_LORA_ATTRS = ("lora_a", "lora_b", "lora_dropout_key", "lora_scale", "lora_dropout",
               "deterministic")


class LoraParam(nnx.Param):
  """A LoRA adapter factor: the only parameters that train when LoRA is on."""


class LoraDropoutKey(nnx.Variable):
  """Raw key data (leading axes..., key words) for an adapter's input dropout; not trained."""


@dataclasses.dataclass(frozen=True)
class LoraConfig:
  """LoRA hyper-parameters.

  Attributes:
    rank: r, the adapters' inner dimension.
    alpha: scale numerator; the update is scaled by alpha / rank.
    dropout: dropout rate on the adapter input in training mode (0 disables it).
    target_modules: names of `Dense` submodules to adapt (the last path component, e.g.
      `q_proj`); each must name at least one `Dense` in the model. GPT-Neo's MLP is
      `c_fc`/`c_proj` rather than the Llama names of the default.
  """

  rank: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = DEFAULT_TARGETS

  def __post_init__(self):
    if self.rank < 1:
      raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
    if isinstance(self.target_modules, str) or not self.target_modules:
      raise ValueError(f"target_modules must be a non-empty tuple of names, "
                       f"got {self.target_modules!r}")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


def _dense_modules(model: nnx.Module) -> Iterator[tuple[tuple, layers.Dense]]:
  for path, node in nnx.iter_graph(model):
    if isinstance(node, layers.Dense):
      yield tuple(path), node


def _lora_modules(model: nnx.Module) -> list[tuple[tuple, layers.Dense]]:
  # Sorted by path so key derivation does not depend on graph traversal order.
  found = [(p, d) for p, d in _dense_modules(model) if getattr(d, "lora_a", None) is not None]
  return sorted(found, key=lambda item: tuple(map(str, item[0])))


def _num_leading(dense: layers.Dense) -> int:
  """How many leading kernel axes are stacking axes (`layers`) rather than in/out axes."""
  axes = dense.kernel.get_metadata().get("logical_axes") or ()
  n = 0
  while n < len(axes) and axes[n] == "layers":
    n += 1
  return n


def _as_typed_key(key: jax.Array) -> jax.Array:
  if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
    return key
  return jax.random.wrap_key_data(key)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _init_adapters(key: jax.Array, specs: tuple, rank: int) -> list[tuple[jax.Array, ...]]:
  """(A, B, dropout key data) per spec.

  All A's come from one flat uniform draw (and all dropout keys from one split): XLA:CPU
  takes seconds to compile each differently shaped threefry op.
  """
  a_shapes = [lead + in_shape + (rank,) for lead, in_shape, _, _ in specs]
  key_counts = [math.prod(lead) for lead, _, _, _ in specs]
  a_key, dropout_key = jax.random.split(key)
  flat = jax.random.uniform(a_key, (sum(math.prod(s) for s in a_shapes),), jnp.float32, -1.0, 1.0)
  dropout_keys = jax.random.key_data(jax.random.split(dropout_key, sum(key_counts)))
  out, a_at, key_at = [], 0, 0
  for (lead, in_shape, out_shape, dtype), a_shape, n_keys in zip(specs, a_shapes, key_counts):
    # PEFT's kaiming_uniform_(a=sqrt(5)) bound on A: 1 / sqrt(fan_in).
    bound = 1.0 / math.sqrt(math.prod(in_shape))
    a = flat[a_at:a_at + math.prod(a_shape)].reshape(a_shape) * bound
    keys = dropout_keys[key_at:key_at + n_keys].reshape(lead + dropout_keys.shape[1:])
    a_at, key_at = a_at + math.prod(a_shape), key_at + n_keys
    out.append((a.astype(dtype), jnp.zeros(lead + (rank,) + out_shape, dtype), keys))
  return out


def apply_lora(model: nnx.Module, cfg: LoraConfig, rngs: nnx.Rngs) -> nnx.Module:
  """Adds LoRA adapters to every `Dense` whose name is in `cfg.target_modules` (in place).

  Args:
    model: a `CausalLM` (or any module built from `layers.Dense`) without adapters.
    cfg: rank, alpha, dropout and target module names.
    rngs: `rngs.params()` initialises A and seeds the dropout keys.

  Returns:
    `model`, now with adapters (base parameters untouched).

  Raises:
    ValueError: a target name matches no `Dense`, or the model already has adapters.
  """
  denses = sorted(_dense_modules(model), key=lambda item: tuple(map(str, item[0])))
  names = sorted({str(p[-1]) for p, _ in denses if p})
  unknown = [t for t in cfg.target_modules if t not in names]
  if unknown:
    raise ValueError(f"LoRA target modules {unknown} match no Dense layer; "
                     f"the model's Dense layers are {names}")
  if _lora_modules(model):
    raise ValueError("model already has LoRA adapters; merge_lora first")
  targets = set(cfg.target_modules)
  chosen = [dense for path, dense in denses if path and str(path[-1]) in targets]
  specs = []  # (lead shape, in shape, out shape, dtype name) per adapted layer
  for dense in chosen:
    lead, n_in, shape = _num_leading(dense), dense.n_in, tuple(dense.kernel.shape)
    specs.append((shape[:lead], shape[lead:lead + n_in], shape[lead + n_in:],
                  np.dtype(dense.kernel[...].dtype).name))
  inits = _init_adapters(rngs.params(), tuple(specs), cfg.rank)
  for dense, (a, b, key_data) in zip(chosen, inits):
    lead, n_in = _num_leading(dense), dense.n_in
    axes = tuple(dense.kernel.get_metadata().get("logical_axes") or (None,) * dense.kernel.ndim)
    dense.lora_a = LoraParam(a, logical_axes=axes[:lead + n_in] + (None,))
    dense.lora_b = LoraParam(b, logical_axes=axes[:lead] + (None,) + axes[lead + n_in:])
    dense.lora_dropout_key = LoraDropoutKey(key_data)
    dense.lora_scale = float(cfg.scale)
    dense.lora_dropout = float(cfg.dropout)
    dense.deterministic = True  # eval mode until model.train()
  return model


def has_lora(model: nnx.Module) -> bool:
  """Whether any `Dense` in `model` carries LoRA adapters."""
  return bool(_lora_modules(model))


def trainable_filter(model: nnx.Module):
  """The `wrt` filter for the optimizer: `LoraParam` when adapted, else every `nnx.Param`."""
  return LoraParam if has_lora(model) else nnx.Param


def set_lora_dropout_key(model: nnx.Module, key: jax.Array) -> None:
  """Writes fresh dropout keys into every adapter, derived from `key` (typed or raw).

  `key` is split once into one key per adapted layer and stacked layer (modules in sorted
  path order), so masks differ across modules and layers. Call once per step with a
  step-dependent key; works inside `nnx.jit` (the keys are variables, not static attributes).
  """
  adapted = _lora_modules(model)
  leads = [tuple(d.lora_a.shape[:_num_leading(d)]) for _, d in adapted]
  counts = [math.prod(lead) for lead in leads]
  # One split for all modules: each differently shaped split is a separate XLA:CPU compile.
  data = jax.random.key_data(jax.random.split(_as_typed_key(key), sum(counts)))
  at = 0
  for (_, dense), lead, n in zip(adapted, leads, counts):
    dense.lora_dropout_key[...] = data[at:at + n].reshape(lead + data.shape[1:])
    at += n


def merged_kernel(dense: layers.Dense) -> jax.Array:
  """W + scale · A @ B for one adapted `Dense`, in float32 then cast to W's dtype."""
  lead = _num_leading(dense)
  kernel = dense.kernel[...]
  a = dense.lora_a[...].astype(jnp.float32)
  b = dense.lora_b[...].astype(jnp.float32)
  # Batch over the stacking axes, contract the rank axis: (lead, in.., r) x (lead, r, out..).
  delta = jax.lax.dot_general(
      a, b, (((a.ndim - 1,), (lead,)), (tuple(range(lead)), tuple(range(lead)))),
      precision=jax.lax.Precision.HIGHEST)  # laid out (lead..., in..., out...) like W
  return (kernel.astype(jnp.float32) + dense.lora_scale * delta).astype(kernel.dtype)


def merge_lora(model: nnx.Module) -> nnx.Module:
  """Folds every adapter into its kernel and removes the adapters (in place).

  Returns:
    `model` with plain `nnx.Param` kernels W + (alpha / r) · A @ B and no LoRA attributes,
    the same structure as the base model (ready for `models.save_pretrained`).

  Raises:
    ValueError: the model has no adapters.
  """
  adapted = _lora_modules(model)
  if not adapted:
    raise ValueError("model has no LoRA adapters to merge")
  for _, dense in adapted:
    dense.kernel[...] = merged_kernel(dense)
    for attr in _LORA_ATTRS:
      delattr(dense, attr)
  return model
