"""Checkpoint merging (model soups, SLERP, task arithmetic, TIES, DARE), tensor by tensor.

Ruan et al. mitigate over-memorization by merging checkpoints of one fine-tuning
trajectory (or of several runs). The methods follow the semantics mergekit documents;
the code is written from those formulas. Notation: θᵢ the i-th model's tensor, θ_b the
base's, δᵢ = θᵢ − θ_b its task vector, wᵢ its weight (default 1), λ = `lambda_`,
p = `density`, W = Σ wᵢ.

  linear          θ = Σ wᵢ θᵢ / W   (normalize, the default)   or   Σ wᵢ θᵢ.
                  weights=None is the uniform soup.
  task_arithmetic θ = θ_b + λ Σ wᵢ δᵢ   (normalize: divided by W; off by default).
  ties            δ̂ᵢ = δᵢ with all but its ⌊p·n⌋ largest |entries| zeroed (per model, per
                  tensor or layer; equal magnitudes are kept lowest flat index first); γ =
                  sign(Σ wᵢ δ̂ᵢ) elementwise with a sum of exactly 0 electing +1 (mergekit's
                  choice); entry i *agrees* where sign(wᵢ δ̂ᵢ) = γ (a zero entry never agrees);
                  merged = Σ_agree wᵢ δ̂ᵢ / Σ_agree wᵢ (the disjoint mean, normalize on by
                  default; an element no model agrees on gets 0; normalize=False gives the
                  disjoint sum); θ = θ_b + λ·merged.
  dare_linear     δ̂ᵢ = δᵢ ⊙ mᵢ / p with mᵢ ~ Bernoulli(p) elementwise (so E[δ̂ᵢ] = δᵢ), then
                  task_arithmetic on δ̂ᵢ.
  dare_ties       the same drop-and-rescale δ̂ᵢ, then ties' election and disjoint mean.
  slerp           two tensors (or layers) a, b (base and one model, or two models), flattened:
                  â = a/|a|, b̂ = b/|b|, Ω = arccos(â·b̂),
                  θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b, falling back to the plain
                  lerp (1−t)a + tb where |â·b̂| > 0.9995 (nearly parallel) or either norm is
                  ~0 (no angle is defined; mergekit would treat the pair as orthogonal).
                  t is one number or chosen per tensor.

Stacked layers: the decoder stores its blocks' parameters stacked over a leading `layers`
axis (one array per block parameter, not one per layer). mergekit, and the papers that use
it, merge each layer's tensor on its own, so every method whose result depends on the
tensor as a whole (slerp's angle, ties' top-k, DARE's masks; `PER_LAYER_METHODS`) is
applied to each slice along the stacked axes and the results stacked back; the
elementwise ones (linear, task_arithmetic) need no slicing. Which axes are stacked is read
from the model's structure, never guessed from shapes: the `logical_axes` metadata of the
nnx Variables ('layers' entries, `layer_axes_of`), which `PytreeSource` over an nnx State
and `OrbaxCheckpointSource` of a training run report (or `merge(..., layer_axes=)`). A
plain array without such metadata is merged whole.

DARE masks are reproducible: the key of model i on a tensor is
fold_in(fold_in(key(seed), crc32(path) & 0x7fffffff), i), and on layer l of a stacked
tensor fold_in(that, l) (`dare_key`), so a layer's mask depends neither on which other
tensors are merged nor on how many layers are stacked, nor on the sharding (threefry is
partitionable).

Scale: `merge` pulls one tensor at a time from every `TensorSource` (lazy: an orbax
checkpoint restores only that array), computes it in float32 under `jit` (a stacked tensor
one layer at a time, `lax.map`), casts it back to the first model's dtype and hands it to a
`TensorSink`. Host memory therefore holds at most one tensor per input, never whole
models. Outputs keep the input arrays' sharding (inputs on other devices are first moved
there), so a `PytreeSink` collects the merged model on the accelerators, sharded like the
inputs, ready for an orbax save. Tensors of
non-floating dtypes are copied from the first model. Every process of a multi-host job
must run `merge` with the same arguments (the order of reads is deterministic).
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import zlib
from typing import Any, Callable, Hashable, Iterable, Mapping, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memdyn_jax.errors import FieldError

Path = tuple[Hashable, ...]

METHODS = ("linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "slerp")
_NEEDS_BASE = ("task_arithmetic", "ties", "dare_linear", "dare_ties")
_USES_DENSITY = ("ties", "dare_linear", "dare_ties")
_USES_LAMBDA = _NEEDS_BASE
_DEFAULT_NORMALIZE = {"linear": True, "task_arithmetic": False, "ties": True,
                      "dare_linear": False, "dare_ties": True, "slerp": False}
# Methods whose result on an entry depends on the rest of the tensor (norms, top-k, the
# mask stream): applied per layer along stacked axes. The others are elementwise.
PER_LAYER_METHODS = ("slerp", "ties", "dare_linear", "dare_ties")
LAYERS_AXIS = "layers"  # the logical axis name of a stack of layers (models.transformer)
DEFAULT_T = 0.5  # slerp's t where none is given
DEFAULT_LAMBDA = 1.0  # the task-vector scale where none is given
SLERP_DOT_THRESHOLD = 0.9995
_EPS = 1e-8


class MergeConfigError(FieldError):
  """A bad merge setting; `field` names the offending `MergeConfig` field."""


def path_str(path: Path) -> str:
  """The name of a tensor path, e.g. ('layers', 0, 'kernel') -> 'layers/0/kernel'.

  Sources are matched by this name, so int and str keys ('0' vs 0) are interchangeable.
  """
  return "/".join(str(k) for k in path)


TValue = float | Mapping[str, float] | Sequence[tuple[str, float]] | Callable[[str], float]


@dataclasses.dataclass(frozen=True)
class MergeConfig:
  """How to merge. Fields a method does not use must stay None.

  Attributes:
    method: one of `METHODS`.
    weights: one weight per model (not for the base); None = all 1 (uniform).
    t: slerp only (default `DEFAULT_T`, 0.5): a number in [0, 1], or per tensor: a mapping
      (or pairs) from regular expression to t, the first pattern `re.search`-ing the tensor
      path ('layers/0/attn/kernel') wins ('' matches everything, a fallback), or a callable
      path -> t.
    lambda_: task-vector scale of the base-relative methods (default `DEFAULT_LAMBDA`, 1).
    density: fraction of each task vector kept, in (0, 1]; required by ties and dare_*.
    seed: DARE mask seed.
    normalize: divide by the (agreeing) weight sum; None = the method's default
      (linear, ties, dare_ties: True; task_arithmetic, dare_linear: False).
  """
  method: str
  weights: tuple[float, ...] | None = None
  t: TValue | None = None
  lambda_: float | None = None
  density: float | None = None
  seed: int = 0
  normalize: bool | None = None

  def __post_init__(self):
    if self.method not in METHODS:
      raise MergeConfigError("method", f"{self.method!r} is not one of {METHODS}")
    if self.weights is not None:
      if isinstance(self.weights, (str, bytes)) or not isinstance(self.weights, Iterable):
        raise MergeConfigError("weights", f"must be a sequence of numbers, got {self.weights!r}")
      weights = tuple(float(w) for w in self.weights)
      if not weights or not all(math.isfinite(w) for w in weights):
        raise MergeConfigError("weights", f"must be a non-empty list of finite numbers, got {weights}")
      if self.method == "slerp":
        raise MergeConfigError("weights", "slerp takes no weights (use t)")
      if self.resolved_normalize and abs(sum(weights)) < _EPS and self.method in (
          "linear", "task_arithmetic", "dare_linear"):
        raise MergeConfigError("weights", f"sum to 0, cannot normalize: {weights}")
      object.__setattr__(self, "weights", weights)
    if self.t is not None:
      if self.method != "slerp":
        raise MergeConfigError("t", f"is only used by slerp, not {self.method}")
      if isinstance(self.t, Mapping) or (isinstance(self.t, (list, tuple))):
        pairs = tuple(self.t.items()) if isinstance(self.t, Mapping) else tuple(self.t)
        for pair in pairs:
          if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise MergeConfigError("t", f"per-tensor t must map pattern strings to numbers, got {pair!r}")
          try:
            re.compile(pair[0])
          except re.error as e:
            raise MergeConfigError("t", f"bad pattern {pair[0]!r}: {e}") from e
          _check_t(pair[1])
        object.__setattr__(self, "t", tuple((p, float(v)) for p, v in pairs))
      elif not callable(self.t):
        _check_t(self.t)
    if self.lambda_ is not None:
      if self.method not in _USES_LAMBDA:
        raise MergeConfigError("lambda_", f"is only used by {_USES_LAMBDA}, not {self.method}")
      if not isinstance(self.lambda_, (int, float)) or not math.isfinite(self.lambda_):
        raise MergeConfigError("lambda_", f"must be a finite number, got {self.lambda_!r}")
    if self.method in _USES_DENSITY:
      if self.density is None:
        raise MergeConfigError("density", f"is required by {self.method}")
      if not isinstance(self.density, (int, float)) or not 0.0 < self.density <= 1.0:
        raise MergeConfigError("density", f"must be in (0, 1], got {self.density!r}")
    elif self.density is not None:
      raise MergeConfigError("density", f"is only used by {_USES_DENSITY}, not {self.method}")
    if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
      raise MergeConfigError("seed", f"must be a non-negative int, got {self.seed!r}")
    if self.normalize is not None and not isinstance(self.normalize, bool):
      raise MergeConfigError("normalize", f"must be a bool or None, got {self.normalize!r}")
    if self.method == "slerp" and self.normalize:
      raise MergeConfigError("normalize", "slerp has nothing to normalize")

  @property
  def resolved_normalize(self) -> bool:
    return _DEFAULT_NORMALIZE[self.method] if self.normalize is None else self.normalize

  def resolved(self) -> MergeConfig:
    """The config with the defaults its method uses made explicit (slerp's t, the
    task-vector scale, normalize): the same merge, as a record should state it, so that an
    explicit default and an omitted one are one setting."""
    return dataclasses.replace(
        self, t=DEFAULT_T if self.method == "slerp" and self.t is None else self.t,
        lambda_=(DEFAULT_LAMBDA if self.method in _USES_LAMBDA and self.lambda_ is None
                 else self.lambda_),
        normalize=self.resolved_normalize)

  @property
  def needs_base(self) -> bool:
    return self.method in _NEEDS_BASE

  def t_for(self, name: str) -> float:
    """The slerp t of the tensor named `name` (see `path_str`).

    Raises:
      MergeConfigError: no per-tensor pattern matches, or a callable returned a bad t.
    """
    if self.t is None:
      return DEFAULT_T
    if isinstance(self.t, tuple):
      for pattern, value in self.t:
        if re.search(pattern, name):
          return value
      raise MergeConfigError("t", f"no pattern matches tensor {name!r} (add '' as a fallback)")
    if callable(self.t):
      value = self.t(name)
      _check_t(value, f" (for tensor {name!r})")
      return float(value)
    return float(self.t)

  def model_weights(self, num_models: int) -> tuple[float, ...]:
    """The weights of `num_models` models (all 1 when `weights` is None)."""
    if self.weights is None:
      return (1.0,) * num_models
    if len(self.weights) != num_models:
      raise MergeConfigError("weights", f"has {len(self.weights)} entries for {num_models} models")
    return self.weights


def _check_t(value, where: str = "") -> None:
  if isinstance(value, bool) or not isinstance(value, (int, float, np.floating)) or not (
      0.0 <= value <= 1.0):
    raise MergeConfigError("t", f"must be in [0, 1], got {value!r}{where}")


# ------------------------------------------------------------------------------------------
# Sources and sinks.
# ------------------------------------------------------------------------------------------


class TensorSource(Protocol):
  """A model whose tensors are read one at a time (lazily where the storage allows).

  A source that knows its model's structure may also have `layer_axes(path)`: the axes
  along which that tensor stacks layers (() for none), or None where it cannot tell.
  """

  def paths(self) -> Sequence[Path]:
    """Every tensor's path, in a fixed order."""

  def get(self, path: Path) -> Any:
    """One tensor (jax or numpy array)."""


class TensorSink(Protocol):
  """Receives merged tensors one at a time."""

  def put(self, path: Path, array: jax.Array) -> None:
    """Stores one merged tensor."""


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _key_name(key) -> Hashable:
  for attr in ("key", "idx", "name"):  # DictKey / FlattenedIndexKey, SequenceKey, GetAttrKey
    if hasattr(key, attr):
      return getattr(key, attr)
  raise TypeError(f"unsupported pytree key {key!r}")


def _flatten(tree) -> list[tuple[Path, Any]]:
  """(path, leaf) pairs; nnx Variables count as leaves (their wrapper is not a path level)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_variable)
  out, seen = [], set()
  for keys, leaf in flat:
    path = tuple(_key_name(k) for k in keys)
    name = path_str(path)
    if name in seen:
      raise ValueError(f"two tensors share the path name {name!r}")
    seen.add(name)
    out.append((path, leaf))
  return out


def _variable_layer_axes(leaf) -> tuple[int, ...] | None:
  """The stacked-layer axes of an nnx Variable by its `logical_axes` (None: no metadata)."""
  if not _is_variable(leaf):
    return None
  axes = leaf.get_metadata().get("logical_axes")
  if axes is None:
    return None
  return tuple(i for i, name in enumerate(axes) if name == LAYERS_AXIS)


def layer_axes_of(tree: Any) -> dict[str, tuple[int, ...]]:
  """Per tensor name (`path_str`), the axes along which it stacks layers, from the
  `logical_axes` metadata of a pytree's nnx Variables (e.g. `nnx.state(model, nnx.Param)`,
  abstract or not); tensors without that metadata are left out."""
  out = {}
  for path, leaf in _flatten(tree):
    axes = _variable_layer_axes(leaf)
    if axes is not None:
      out[path_str(path)] = axes
  return out


class PytreeSource:
  """A `TensorSource` over an in-memory pytree: nested dicts, lists, an nnx `State` (whose
  Variables' `logical_axes` give `layer_axes`)."""

  def __init__(self, tree: Any):
    self.tree = tree
    self._leaves = dict(_flatten(tree))
    self._paths = tuple(self._leaves)

  def paths(self) -> Sequence[Path]:
    return self._paths

  def get(self, path: Path) -> Any:
    leaf = self._leaves[tuple(path)]
    return leaf[...] if _is_variable(leaf) else leaf

  def layer_axes(self, path: Path) -> tuple[int, ...] | None:
    return _variable_layer_axes(self._leaves[tuple(path)])


class PytreeSink:
  """A `TensorSink` collecting merged tensors (wherever they live: device, sharded).

  Args:
    template: optional pytree giving the result's structure (e.g. the nnx `State` of a
      model: Variables are rebuilt with the merged values). Without one, `result()` is a
      nested dict keyed by the path components.
  """

  def __init__(self, template: Any = None):
    self.template = template
    self._arrays: dict[str, tuple[Path, jax.Array]] = {}

  def put(self, path: Path, array: jax.Array) -> None:
    self._arrays[path_str(path)] = (tuple(path), array)

  def result(self) -> Any:
    """The merged pytree.

    Raises:
      ValueError: the template and the stored tensors name different paths.
    """
    if self.template is None:
      out: dict = {}
      for path, array in self._arrays.values():
        node = out
        for key in path[:-1]:
          node = node.setdefault(key, {})
        node[path[-1]] = array
      return out
    flat, treedef = jax.tree_util.tree_flatten_with_path(self.template, is_leaf=_is_variable)
    names = [path_str(tuple(_key_name(k) for k in keys)) for keys, _ in flat]
    missing = sorted(set(names) - set(self._arrays))
    extra = sorted(set(self._arrays) - set(names))
    if missing or extra:
      raise ValueError(f"merged tensors do not match the template: missing {missing[:5]}, "
                       f"not in template {extra[:5]}")
    leaves = [leaf.replace(self._arrays[name][1]) if _is_variable(leaf) else self._arrays[name][1]
              for name, (_, leaf) in zip(names, flat)]
    return jax.tree_util.tree_unflatten(treedef, leaves)


class OrbaxCheckpointSource:
  """Reads the parameters of one checkpoint of a training run (`memdyn_jax.train.checkpoints`)
  one array at a time, with orbax's partial restore (`PyTreeRestore(partial_restore=True)`).

  Paths are those of the saved nnx `State` without the Variables' trailing 'value' key,
  so they match a `PytreeSource` over `nnx.state(model, nnx.Param)` (list indices become
  strings: 'layers/0/...'; names are compared with `path_str`). `layer_axes` comes from
  the run's model (run.json and model_config.json, built abstractly: nothing allocated);
  a directory without them reports None (unknown: merged whole).

  Args:
    run_dir: the training run directory.
    step: checkpoint step.
    item: the checkpoint item holding the parameters.
    sharding: where restored arrays go: a `Sharding` for all, a callable
      (path, shape, dtype) -> Sharding (e.g. from the logical-axis rules), or None = the
      first local device.

  Raises:
    ValueError: no such step, a LoRA run (its checkpoints hold adapters only: merge the
      models `checkpoints.restore(..., merge_lora=True)` returns, via `PytreeSource`), or
      a non-array leaf.
    checkpoints.CheckpointReadError: the metadata (here) or an array (`get`) cannot be read.
  """

  def __init__(self, run_dir: str, step: int, *, item: str = "params",
               sharding: jax.sharding.Sharding | Callable | None = None):
    import orbax.checkpoint as ocp
    from memdyn_jax.train import checkpoints
    self._ocp = ocp
    steps = checkpoints.list_steps(run_dir)
    if step not in steps:
      raise ValueError(f"{run_dir} has no checkpoint at step {step}; steps: {steps}")
    if os.path.exists(os.path.join(run_dir, checkpoints.RUN_INFO)):
      if checkpoints.read_run_info(run_dir).get("config", {}).get("lora"):
        raise ValueError(f"{run_dir} is a LoRA run: its checkpoints hold adapters, not weights; "
                         "merge the models checkpoints.restore(merge_lora=True) returns instead")
    from etils import epath
    self.directory = epath.Path(checkpoints.checkpoint_dir(run_dir)) / str(step) / item
    if not self.directory.is_dir():
      raise ValueError(f"checkpoint {step} of {run_dir} has no item {item!r}")
    self._sharding = sharding
    self._run_dir, self._item = run_dir, item
    self._layer_axes: dict[str, tuple[int, ...]] | None = None
    self._reading = functools.partial(checkpoints.reading_checkpoint, run_dir, step)
    self._handler = ocp.PyTreeCheckpointHandler()
    try:
      with self._reading():
        meta_tree = self._handler.metadata(self.directory).tree
    except BaseException:  # noqa: BLE001 - cleans up, then re-raises
      self._handler.close()  # else its event loop is torn down at exit, noisily
      raise
    flat, _ = jax.tree_util.tree_flatten_with_path(meta_tree)
    stored = [(tuple(_key_name(k) for k in keys), meta) for keys, meta in flat]
    for keys, meta in stored:
      if not hasattr(meta, "shape") or not hasattr(meta, "dtype"):
        raise ValueError(f"{path_str(keys)} in {self.directory} is not an array: {meta!r}")
    # nnx Variables are saved as {'value': array}: drop that level from the names.
    strip = bool(stored) and all(keys[-1] == "value" for keys, _ in stored)
    self._index = {path_str(keys[:-1] if strip else keys): (keys, meta) for keys, meta in stored}
    self._paths = tuple(tuple(keys[:-1] if strip else keys) for keys, _ in stored)

  def paths(self) -> Sequence[Path]:
    return self._paths

  def shape(self, path: Path) -> tuple[int, ...]:
    """A tensor's shape, from the checkpoint's metadata (no array is read)."""
    return tuple(self._index[path_str(path)][1].shape)

  def layer_axes(self, path: Path) -> tuple[int, ...] | None:
    """The axes along which a tensor stacks layers, from the run's model structure."""
    if self._layer_axes is None:
      self._layer_axes = self._model_layer_axes()
    return self._layer_axes.get(path_str(path))

  def _model_layer_axes(self) -> dict[str, tuple[int, ...]]:
    from memdyn_jax import sharding as sharding_lib
    from memdyn_jax.train import checkpoints
    if self._item != "params" or not all(
        os.path.exists(os.path.join(self._run_dir, name))
        for name in (checkpoints.RUN_INFO, checkpoints.MODEL_CONFIG)):
      return {}
    mesh = sharding_lib.make_mesh(devices=jax.local_devices()[:1])
    _, params, _ = checkpoints.abstract_params(self._run_dir, mesh)
    return layer_axes_of(params)

  def get(self, path: Path) -> jax.Array:
    keys, meta = self._index[path_str(path)]
    shape, dtype = tuple(meta.shape), meta.dtype
    if self._sharding is None:
      sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    elif isinstance(self._sharding, jax.sharding.Sharding):
      sharding = self._sharding
    else:
      sharding = self._sharding(tuple(path), shape, dtype)
    item = _nest(keys, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    restore_args = _nest(keys, self._ocp.ArrayRestoreArgs(sharding=sharding))
    with self._reading():
      restored = self._handler.restore(self.directory, args=self._ocp.args.PyTreeRestore(
          item=item, restore_args=restore_args, partial_restore=True))
    for key in keys:
      restored = restored[key]
    return restored

  def close(self) -> None:
    self._handler.close()


def _nest(keys: Path, leaf) -> dict:
  for key in reversed(keys):
    leaf = {key: leaf}
  return leaf


def to_pytree(source: TensorSource, template: Any = None) -> Any:
  """Reads every tensor of a source into a pytree (see `PytreeSink` for `template`)."""
  sink = PytreeSink(template)
  for path in source.paths():
    sink.put(path, source.get(path))
  return sink.result()


# ------------------------------------------------------------------------------------------
# Per-tensor math (float32, under jit).
# ------------------------------------------------------------------------------------------


def keep_count(density: float, n: int) -> int:
  """How many of n entries TIES keeps: ⌊density·n⌋.

  The 1e-9 absorbs float error (0.29·100 = 28.999…: 29 kept where mergekit's plain
  int() keeps 28).
  """
  return min(n, int(math.floor(density * n + 1e-9)))


def _trim_magnitude(delta: jax.Array, density: float) -> jax.Array:
  """Zeroes all but the k = ⌊density·n⌋ largest |entries|; equal magnitudes are kept lowest
  flat index first (what a stable descending argsort would pick).

  Instead of sorting (slow on CPU, a gather when sharded) the k-th largest magnitude τ is
  found by bisection on the float bits of |δ| (monotone for non-negative floats): 32
  counting passes, each an elementwise compare and a reduction.
  """
  n = delta.size
  k = keep_count(density, n)
  if k >= n:
    return delta
  if k == 0:
    return jnp.zeros_like(delta)
  flat = delta.reshape(-1)
  bits = jax.lax.bitcast_convert_type(jnp.abs(flat), jnp.int32)

  def bisect(_, bounds):
    lo, hi = bounds  # invariant: count(bits >= lo) >= k > count(bits >= hi)
    mid = lo + (hi - lo) // 2
    ok = jnp.sum(bits >= mid, dtype=jnp.int32) >= k
    return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid)

  tau, _ = jax.lax.fori_loop(0, 32, bisect, (jnp.int32(0), jnp.max(bits) + 1))
  above, at = bits > tau, bits == tau
  room = k - jnp.sum(above, dtype=jnp.int32)
  keep = above | (at & (jnp.cumsum(at, dtype=jnp.int32) <= room))
  return jnp.where(keep, flat, 0.0).reshape(delta.shape)


def _dare(delta: jax.Array, key: jax.Array, density: float) -> jax.Array:
  if density >= 1.0:
    return delta
  keep = jax.random.bernoulli(key, density, delta.shape)
  return jnp.where(keep, delta / density, 0.0)


def _sum(xs):
  return functools.reduce(jnp.add, xs)


def _ties_combine(deltas, weights, normalize: bool):
  weighted = [w * d for w, d in zip(weights, deltas)]
  elected = jnp.where(_sum(weighted) >= 0, 1.0, -1.0)  # an exact 0 elects +
  agree = [jnp.sign(wd) == elected for wd in weighted]
  merged = _sum([jnp.where(a, wd, 0.0) for a, wd in zip(agree, weighted)])
  if not normalize:
    return merged
  divisor = _sum([jnp.where(a, w, 0.0) for a, w in zip(agree, weights)])
  # No agreeing entry: the numerator is 0 too, and the result is 0.
  return merged / jnp.where(jnp.abs(divisor) < _EPS, 1.0, divisor)


def _slerp(a, b, t):
  na, nb = jnp.linalg.norm(a.reshape(-1)), jnp.linalg.norm(b.reshape(-1))
  degenerate = (na < _EPS) | (nb < _EPS)
  dot = jnp.sum((a / jnp.where(degenerate, 1.0, na)) * (b / jnp.where(degenerate, 1.0, nb)))
  dot = jnp.clip(dot, -1.0, 1.0)
  use_lerp = degenerate | (jnp.abs(dot) > SLERP_DOT_THRESHOLD)
  omega = jnp.arccos(dot)
  sin_omega = jnp.where(use_lerp, 1.0, jnp.sin(omega))  # the slerp branch is unused there
  s0 = jnp.sin((1.0 - t) * omega) / sin_omega
  s1 = jnp.sin(t * omega) / sin_omega
  return jnp.where(use_lerp, (1.0 - t) * a + t * b, s0 * a + s1 * b)


def _merge_math(base, xs, weights, t, lambda_, keys, *, method, normalize, density):
  """The merge of one tensor (or one layer's slice), in float32."""
  xs = [x.astype(jnp.float32) for x in xs]
  weights = [weights[i] for i in range(len(xs))]
  if method == "linear":
    out = _sum([w * x for w, x in zip(weights, xs)])
    return out / _sum(weights) if normalize else out
  if method == "slerp":
    return _slerp(xs[0], xs[1], t)
  base = base.astype(jnp.float32)
  deltas = [x - base for x in xs]
  if method == "ties":
    deltas = [_trim_magnitude(d, density) for d in deltas]
  elif method in ("dare_linear", "dare_ties"):
    deltas = [_dare(d, keys[i], density) for i, d in enumerate(deltas)]
  if method in ("ties", "dare_ties"):
    merged = _ties_combine(deltas, weights, normalize)
  else:
    merged = _sum([w * d for w, d in zip(weights, deltas)])
    if normalize:
      merged = merged / _sum(weights)
  return base + lambda_ * merged


def _fold_layer(keys, index):
  """Each model's key folded with a layer's index (one fold per stacked axis)."""
  for i in range(index.shape[0]):
    keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, index[i])
  return keys


def _per_layer(fn, base, xs, keys, layer_axes, out_dtype):
  """`fn(base, xs, keys)` on each layer's slice along `layer_axes`, stacked back in place.

  `lax.map` runs the layers one after another, so float32 temporaries are one layer's, not
  the stack's (the point for big models); each layer's DARE keys are `_fold_layer`'s.
  """
  lead = tuple(range(len(layer_axes)))
  stack = tuple(xs[0].shape[a] for a in layer_axes)

  def to_rows(x):  # the stacked axes first, flattened into one
    x = jnp.moveaxis(x, layer_axes, lead)
    return x.reshape((-1,) + x.shape[len(lead):])

  indices = jnp.stack(jnp.unravel_index(jnp.arange(math.prod(stack)), stack), axis=-1)

  def one(args):
    b, layer_xs, index = args
    layer_keys = None if keys is None else _fold_layer(keys, index)
    return fn(b, layer_xs, layer_keys).astype(out_dtype)

  rows = jax.lax.map(one, (None if base is None else to_rows(base),
                           [to_rows(x) for x in xs], indices))
  return jnp.moveaxis(rows.reshape(stack + rows.shape[1:]), lead, layer_axes)


@functools.partial(jax.jit, static_argnames=("method", "normalize", "density", "layer_axes",
                                             "out_dtype", "sharding"))
def _merge_kernel(base, xs, weights, t, lambda_, keys, *, method, normalize, density, layer_axes,
                  out_dtype, sharding):
  fn = functools.partial(_merge_math, weights=weights, t=t, lambda_=lambda_, method=method,
                         normalize=normalize, density=density)
  if layer_axes and method in PER_LAYER_METHODS:
    out = _per_layer(lambda b, x, k: fn(b, x, keys=k), base, list(xs), keys, layer_axes,
                     out_dtype)
  else:
    out = fn(base, list(xs), keys=keys).astype(out_dtype)
  if sharding is not None:
    out = jax.lax.with_sharding_constraint(out, sharding)
  return out


def dare_key(seed: int, name: str, model_index: int, layer: Sequence[int] = ()) -> jax.Array:
  """The DARE mask key of model `model_index` on tensor `name` (see `path_str`); of its
  layer `layer` (an index per stacked axis) where the tensor stacks layers."""
  key = jax.random.fold_in(jax.random.key(seed), zlib.crc32(name.encode()) & 0x7FFFFFFF)
  key = jax.random.fold_in(key, model_index)
  for index in layer:
    key = jax.random.fold_in(key, index)
  return key


def _check_layer_axes(layer_axes: Sequence[int], ndim: int, name: str) -> tuple[int, ...]:
  axes = tuple(int(a) for a in layer_axes)
  if any(not -ndim <= a < ndim for a in axes):
    raise ValueError(f"layer axes {axes} out of range for tensor {name} of rank {ndim}")
  axes = tuple(sorted(a % ndim for a in axes))
  if len(set(axes)) != len(axes):
    raise ValueError(f"layer axes {tuple(layer_axes)} of tensor {name} repeat an axis")
  return axes


def merge_tensor(config: MergeConfig, path: Path, tensors: Sequence[Any], base: Any = None, *,
                 layer_axes: Sequence[int] = ()) -> jax.Array:
  """Merges one tensor of every model (and the base's).

  For slerp, `tensors` are the two endpoints (t=0 gives the first). The result has the
  first tensor's dtype and, if it is a jax Array, its sharding.

  Args:
    config, path, tensors, base: as above; `path` names the tensor (DARE keys, slerp t).
    layer_axes: the axes along which the tensor stacks layers: the `PER_LAYER_METHODS`
      merge each layer's slice on its own (the result equals stacking the merges of the
      slices, DARE keys as `dare_key` with the layer's index).

  Raises:
    ValueError: shapes differ, the base is missing/superfluous for the method, or bad
      layer axes.
    MergeConfigError: the weights do not match the models.
  """
  name = path_str(path)
  if not tensors:
    raise ValueError("no tensors to merge")
  if config.needs_base and base is None:
    raise ValueError(f"{config.method} needs a base tensor for {name}")
  if not config.needs_base and base is not None:
    raise ValueError(f"{config.method} takes no base tensor (for {name})")
  if config.method == "slerp" and len(tensors) != 2:
    raise ValueError(f"slerp merges exactly 2 tensors, got {len(tensors)} for {name}")
  inputs = list(tensors) + ([base] if base is not None else [])
  shapes = {tuple(np.shape(x)) for x in inputs}
  if len(shapes) != 1:
    raise ValueError(f"tensor {name} has different shapes across models: {sorted(shapes)}")
  weights = config.model_weights(len(tensors))
  ref = tensors[0]
  layer_axes = _check_layer_axes(layer_axes, np.ndim(ref), name)
  sharding = next((x.sharding for x in [*tensors, base] if isinstance(x, jax.Array)), None)

  def place(x):
    if sharding is None:
      return jnp.asarray(x)
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    return jax.device_put(x, sharding)

  if not jnp.issubdtype(ref.dtype, jnp.floating):
    return place(ref)  # integer buffers are not averaged: keep the first model's
  keys = None
  if config.method.startswith("dare"):
    keys = jnp.stack([dare_key(config.seed, name, i) for i in range(len(tensors))])
  t = config.t_for(name) if config.method == "slerp" else 0.0
  lambda_ = DEFAULT_LAMBDA if config.lambda_ is None else config.lambda_
  return _merge_kernel(
      place(base) if base is not None else None, tuple(place(x) for x in tensors),
      jnp.asarray(weights, jnp.float32), jnp.float32(t), jnp.float32(lambda_), keys,
      method=config.method, normalize=config.resolved_normalize,
      density=None if config.density is None else float(config.density),
      layer_axes=layer_axes, out_dtype=jnp.dtype(ref.dtype), sharding=sharding)


# ------------------------------------------------------------------------------------------
# Whole models.
# ------------------------------------------------------------------------------------------


def _index(source: TensorSource) -> dict[str, Path]:
  index = {}
  for path in source.paths():
    name = path_str(path)
    if name in index:
      raise ValueError(f"a source lists tensor {name!r} twice")
    index[name] = tuple(path)
  return index


def _stacked_axes(name: str, sources: Sequence[tuple[TensorSource, Mapping[str, Path]]],
                  given: Mapping[str, Sequence[int]] | None) -> tuple[int, ...]:
  """A tensor's stacked-layer axes: as given, else as the sources that know say."""
  if given is not None:
    return tuple(given.get(name, ()))
  said = {tuple(axes) for source, index in sources if hasattr(source, "layer_axes")
          for axes in [source.layer_axes(index[name])] if axes is not None}
  if len(said) > 1:
    raise ValueError(f"the sources disagree on the stacked layer axes of {name}: {sorted(said)}")
  return said.pop() if said else ()


def merge(config: MergeConfig, base: TensorSource | None, models: Sequence[TensorSource],
          out: TensorSink, *, layer_axes: Mapping[str, Sequence[int]] | None = None) -> None:
  """Merges models tensor by tensor into `out`, reading one tensor per source at a time.

  Args:
    config: the method and its settings.
    base: the base model; required by task_arithmetic/ties/dare_*; for slerp it is the
      t=0 endpoint (then give one model), otherwise None.
    models: the models to merge (slerp: two in all, counting the base).
    out: receives each merged tensor under the first model's path.
    layer_axes: per tensor name, the axes along which it stacks layers (merged one layer
      at a time by the `PER_LAYER_METHODS`; unnamed tensors: none), e.g. `layer_axes_of`
      the model's parameter State; None = what the sources report (`TensorSource`), a
      tensor no source knows being merged whole.

  Raises:
    ValueError: wrong number of models, a base missing or not used, sources whose tensor
      names or shapes differ or that disagree on a tensor's stacked axes, or `layer_axes`
      naming tensors the models lack.
    MergeConfigError: weights that do not match the models.
  """
  models = list(models)
  if not models:
    raise ValueError("no models to merge")
  if config.needs_base and base is None:
    raise ValueError(f"{config.method} needs a base model")
  if config.method == "linear" and base is not None:
    raise ValueError("linear takes no base model (it averages the models)")
  slerp_base = config.method == "slerp" and base is not None
  if config.method == "slerp" and len(models) + slerp_base != 2:
    raise ValueError(f"slerp merges exactly 2 models (base included), got "
                     f"{len(models) + slerp_base}")
  if slerp_base:
    models, base = [base, *models], None
  config.model_weights(len(models))  # fail before any reading
  indexes = [_index(m) for m in models]
  base_index = _index(base) if base is not None else None
  names = list(indexes[0])
  for i, other in enumerate(indexes[1:] + ([base_index] if base_index is not None else []), 1):
    if set(other) != set(names):
      who = "the base" if i == len(indexes) else f"model {i}"
      missing = sorted(set(names) - set(other))[:5]
      extra = sorted(set(other) - set(names))[:5]
      raise ValueError(f"{who} and model 0 hold different tensors: {who} lacks {missing}, "
                       f"has extra {extra}")
  if layer_axes is not None and set(layer_axes) - set(names):
    raise ValueError(f"layer_axes names tensors the models lack: "
                     f"{sorted(set(layer_axes) - set(names))[:5]}")
  sources = list(zip(models, indexes)) + ([(base, base_index)] if base is not None else [])
  for name in names:
    # Only the whole-tensor methods look (an orbax source builds its model to answer).
    axes = (_stacked_axes(name, sources, layer_axes) if config.method in PER_LAYER_METHODS
            else ())
    tensors = [m.get(ix[name]) for m, ix in zip(models, indexes)]
    base_tensor = base.get(base_index[name]) if base is not None else None
    out.put(indexes[0][name], merge_tensor(config, indexes[0][name], tensors, base_tensor,
                                           layer_axes=axes))


def _as_source(x) -> TensorSource:
  return x if hasattr(x, "paths") and hasattr(x, "get") else PytreeSource(x)


def merge_pytrees(config: MergeConfig, base: Any, models: Sequence[Any], *,
                  layer_axes: Mapping[str, Sequence[int]] | None = None) -> Any:
  """`merge` on in-memory pytrees (or sources); the result has the first model's
  structure (its nnx Variables rebuilt), or nested dicts if it is not a pytree. An nnx
  State's stacked layers are merged per layer (its `logical_axes`; see `merge`)."""
  models = [_as_source(m) for m in models]
  template = models[0].tree if isinstance(models[0], PytreeSource) else None
  sink = PytreeSink(template)
  merge(config, None if base is None else _as_source(base), models, sink,
        layer_axes=layer_axes)
  return sink.result()


@dataclasses.dataclass(frozen=True)
class GreedySoupResult:
  """The outcome of `greedy_soup`.

  Attributes:
    params: the soup (the uniform average of the ingredients).
    ingredients: candidate indices in the soup, in the order they were added.
    score: the soup's validation score.
    individual_scores: each candidate's own score (index order).
    history: (candidate index, score of the soup with it, accepted) per tried candidate.
  """
  params: Any
  ingredients: tuple[int, ...]
  score: float
  individual_scores: tuple[float, ...]
  history: tuple[tuple[int, float, bool], ...]


def greedy_soup(candidates: Sequence[Any], evaluate: Callable[[Any], float], *,
                scores: Sequence[float] | None = None, template: Any = None
                ) -> GreedySoupResult:
  """Wortsman et al.'s greedy soup (Recipe 1, as in mergekit-style tooling).

  Candidates are sorted by their own validation score, best first (ties keep the given
  order); the soup starts as the best one, and each next candidate joins only if the
  uniform average of the soup plus it scores strictly higher than the soup so far.

  Args:
    candidates: `TensorSource`s or pytrees (e.g. checkpoints of one trajectory).
    evaluate: params -> validation score (higher is better, e.g. accuracy).
    scores: the candidates' own scores if already known (saves evaluating each one).
    template: structure of the params passed to `evaluate` (see `PytreeSink`); default:
      the first candidate's if it is a pytree.

  Returns:
    A `GreedySoupResult`.

  Raises:
    ValueError: no candidates, or `scores` of the wrong length.
  """
  sources = [_as_source(c) for c in candidates]
  if not sources:
    raise ValueError("greedy_soup needs at least one candidate")
  if template is None and isinstance(sources[0], PytreeSource):
    template = sources[0].tree

  def soup_of(indices):
    sink = PytreeSink(template)
    merge(MergeConfig("linear"), None, [sources[i] for i in indices], sink)
    return sink.result()

  if scores is None:
    scores = [float(evaluate(to_pytree(s, template))) for s in sources]
  elif len(scores) != len(sources):
    raise ValueError(f"{len(scores)} scores for {len(sources)} candidates")
  scores = tuple(float(s) for s in scores)
  order = sorted(range(len(sources)), key=lambda i: -scores[i])  # stable: ties keep order
  ingredients, best = [order[0]], scores[order[0]]
  params = soup_of(ingredients)
  history = []
  for i in order[1:]:
    trial = soup_of(ingredients + [i])
    score = float(evaluate(trial))
    accepted = score > best
    history.append((i, score, accepted))
    if accepted:
      ingredients.append(i)
      best, params = score, trial
  return GreedySoupResult(params=params, ingredients=tuple(ingredients), score=best,
                          individual_scores=scores, history=tuple(history))
