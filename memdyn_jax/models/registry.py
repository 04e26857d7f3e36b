"""Model families: what each declares, the table of them, and the machinery every family
shares (HF config -> `ModelConfig` -> HF config, model construction).

A family lives in one module of `memdyn_jax.models.families` that declares, at module
level, `FAMILY = Family(...)`:

- `name`: the family's name (`ModelConfig.family`);
- `model_types`: each HF `model_type` it reads -> the HF class `save_pretrained` writes in
  `config.json`'s `architectures`;
- `config_fields(hf, raw)`: the HF config (normalised by `transformers.AutoConfig`; `raw`:
  the dict as given) -> `ModelConfig` fields. `from_hf_config` fills in those every family
  shares (`family`, `model_type`, token ids, the source config). A value the model code
  does not implement raises `config.unsupported(field, ...)`;
- `key_rules(cfg)`: one `KeyRule` per parameter, HF tensor name (`{i}` = layer) <-> our
  parameter path and layout (Tunix's per-family `params.py` regex map), read by
  `hf_io.from_pretrained` and `save_pretrained`; an HF tensor fusing several parameters
  (Phi-3's `qkv_proj`) has one rule per part (`KeyRule.fused`);
- `model_class`: the NNX `transformer.CausalLM` subclass (its block, final norm, embedding);
- `ignored_keys`: regexes of HF tensors that carry no parameter (old checkpoints' buffers);
- `tiny_configs`: tiny HF configs (name -> kwargs; `model_type` defaults to the name) that
  exercise its features, for `memdyn_jax.testing` and the tests.

Adding a family:
1. Write `memdyn_jax/models/families/<family>.py`: the block and model over `layers` and
   `transformer`; `config_fields` (`llama.decoder_fields`, `config.rope_fields` and
   `config.check_activation` cover the common fields); `key_rules` (`llama.key_rules` for
   Llama's tensor names); tiny configs; `FAMILY`.
2. Test it: its tiny configs as cases of tests/models/test_parity.py (HF logits, KV cache)
   and test_hf_io.py's round trip; a row in the README's families table.
Nothing else changes: every public module of the package is imported on the first look-up
and its `FAMILY` registered (modules named `_…` are helpers). `register` adds a family from
anywhere else (a test, user code). A `model_type` no family reads is a one-line
`ValueError` naming the supported ones; two families claiming one is an error too.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import re
from typing import Any, Callable, Mapping, Sequence

import jax.numpy as jnp
from flax import nnx

from memdyn_jax.models import families as families_package
from memdyn_jax.models.config import ModelConfig, unsupported
from memdyn_jax.models.transformer import CausalLM

# ----------------------------------------------------------------------------- key rules

# Transforms: see `hf_io._to_ours` / `_to_hf`. BATCHED_LINEAR (read only): HF (n, out, in),
# a stack of matrices in one tensor (HF's fused experts) -> our (n, in, out).
SAME, FLAT, LINEAR, BATCHED_LINEAR = "same", "flat", "linear", "batched_linear"
# The indices an HF tensor name may hold, in the order of our parameter's leading axes:
# "{i}" the layer (the `layers` axis), "{e}" the expert (the `expert` axis after it).
NAME_INDICES = ("i", "e")


@dataclasses.dataclass(frozen=True)
class KeyRule:
  hf: str  # HF tensor name; "{i}" = layer index, "{e}" = expert index (`NAME_INDICES`)
  ours: str  # our parameter path, dot-separated ("blocks.…" params are stacked over layers)
  transform: str = SAME  # SAME: as is; FLAT: HF 1-D; LINEAR: HF (out, in) -> our (in…, out…)
  n_in: int = 1  # LINEAR: how many of our leading (per-layer) axes are input axes
  # A fused HF tensor (Phi-3's qkv_proj, gate_up_proj) holds several of our parameters one
  # after another along its output axis (the first; BATCHED_LINEAR: the second to last):
  # `fused` is each one's length there, in order, and `part` which one this rule's parameter
  # is. Split on load, concatenated on save.
  fused: tuple[int, ...] = ()
  part: int = 0
  # Another layout of the parameter that `from_pretrained` reads where a checkpoint holds it
  # instead of the written rule's tensors; `save_pretrained` never writes it.
  read_only: bool = False

  @property
  def rows(self) -> slice:
    """The rows of the (fused) HF tensor that are this rule's parameter."""
    if not self.fused:
      return slice(None)
    return slice(sum(self.fused[:self.part]), sum(self.fused[:self.part + 1]))

  @property
  def fused_axis(self) -> int:
    """The HF tensor's axis that `fused` splits: its output axis."""
    return -2 if self.transform == BATCHED_LINEAR else 0

  @property
  def indices(self) -> tuple[str, ...]:
    """The indices its HF name holds (`NAME_INDICES`): one HF tensor per value of our
    parameter's leading axes, that many of them."""
    return tuple(n for n in NAME_INDICES if "{" + n + "}" in self.hf)

  @property
  def pattern(self) -> re.Pattern:
    """Matches its HF names; group `n` of each index n in `indices`."""
    pattern = re.escape(self.hf)
    for n in self.indices:
      pattern = pattern.replace(re.escape("{" + n + "}"), rf"(?P<{n}>\d+)")
    return re.compile("^" + pattern + "$")

  def name(self, index: tuple[int, ...]) -> str:
    """The HF tensor name at `index` (one value per entry of `indices`)."""
    return self.hf.format(**dict(zip(self.indices, index)))

  @property
  def stacked(self) -> bool:
    return "{i}" in self.hf


# ----------------------------------------------------------------------------- families


@dataclasses.dataclass(frozen=True)
class Family:
  """What a model family declares (see the module docstring)."""

  name: str
  model_types: Mapping[str, str]  # HF model_type -> HF architecture class name
  config_fields: Callable[[Any, dict[str, Any]], dict[str, Any]]
  key_rules: Callable[[ModelConfig], Sequence[KeyRule]]
  model_class: type[CausalLM]
  ignored_keys: tuple[str, ...] = ()
  tiny_configs: Mapping[str, Mapping[str, Any]] = dataclasses.field(default_factory=dict)


_FAMILIES: dict[str, Family] = {}
_BY_MODEL_TYPE: dict[str, Family] = {}
_TINY: dict[str, Family] = {}
_discovered = False


def register(family: Family) -> Family:
  """Adds `family` to the table; returns it.

  Raises:
    ValueError: its name, one of its model types or one of its tiny configs' names is taken
      by another family, or a tiny config's `model_type` is not among its own.
  """
  _discover()
  return _add(family)


def unregister(name: str) -> None:
  """Removes the family `name` (tests register families of their own)."""
  _discover()
  if name not in _FAMILIES:
    raise KeyError(f"no model family {name!r} is registered; known: {sorted(_FAMILIES)}")
  family = _FAMILIES.pop(name)
  for table in (_BY_MODEL_TYPE, _TINY):
    for key in [k for k, f in table.items() if f is family]:
      del table[key]


def _add(family: Family) -> Family:
  taken = [f"name {family.name!r}"] if family.name in _FAMILIES else []
  taken += [f"model_type {t!r} (family {_BY_MODEL_TYPE[t].name!r})"
            for t in family.model_types if t in _BY_MODEL_TYPE]
  taken += [f"tiny config {n!r} (family {_TINY[n].name!r})"
            for n in family.tiny_configs if n in _TINY]
  if taken:
    raise ValueError(f"family {family.name!r}: already registered: {', '.join(taken)}")
  foreign = [n for n, c in family.tiny_configs.items()
             if c.get("model_type", n) not in family.model_types]
  if foreign:
    raise ValueError(f"family {family.name!r}: tiny configs {foreign} are of model types it "
                     f"does not read ({sorted(family.model_types)})")
  _FAMILIES[family.name] = family
  _BY_MODEL_TYPE.update((t, family) for t in family.model_types)
  _TINY.update((n, family) for n in family.tiny_configs)
  return family


def _discover() -> None:
  """Registers the `FAMILY` of every public module of `memdyn_jax.models.families`, once.
  Lazy (on the first look-up), so a family module may import this one."""
  global _discovered
  if _discovered:
    return
  found = []
  for info in sorted(pkgutil.iter_modules(families_package.__path__), key=lambda m: m.name):
    if info.name.startswith("_"):
      continue
    module = importlib.import_module(f"{families_package.__name__}.{info.name}")
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, Family):
      raise TypeError(f"{module.__name__} declares no `FAMILY = Family(...)`")
    found.append(family)
  try:
    for family in found:
      _add(family)
  except ValueError:  # two modules claim one name: every look-up says so, none half-works
    for table in (_FAMILIES, _BY_MODEL_TYPE, _TINY):
      table.clear()
    raise
  _discovered = True


def families() -> dict[str, Family]:
  """{name: family} of every registered family."""
  _discover()
  return dict(_FAMILIES)


def supported_model_types() -> list[str]:
  _discover()
  return sorted(_BY_MODEL_TYPE)


def family_of(model_type: str) -> Family:
  """The family that reads HF `model_type`.

  Raises:
    ValueError: no family does (one line naming the supported types).
  """
  _discover()
  if model_type not in _BY_MODEL_TYPE:
    raise ValueError(f"config field 'model_type' = {model_type!r} is not supported; "
                     f"supported: {sorted(_BY_MODEL_TYPE)}")
  return _BY_MODEL_TYPE[model_type]


def get_family(cfg: ModelConfig) -> Family:
  """The family `cfg` was built by."""
  _discover()
  if cfg.family not in _FAMILIES:
    raise ValueError(f"unknown model family {cfg.family!r}; known: {sorted(_FAMILIES)}")
  return _FAMILIES[cfg.family]


def tiny_configs() -> dict[str, Mapping[str, Any]]:
  """{name: HF config kwargs} of every registered family's tiny test configs."""
  _discover()
  return {name: family.tiny_configs[name] for name, family in _TINY.items()}


# ----------------------------------------------------------------------------- HF config


def from_hf_config(config: Mapping[str, Any] | Any) -> ModelConfig:
  """Builds a `ModelConfig` from a HF config dict (as in `config.json`) or `PretrainedConfig`.

  HF configs are first normalised by `transformers.AutoConfig` (defaults, `layer_types`,
  `rope_parameters` standardisation), then the family reads every field that changes the
  computation (`Family.config_fields`).
  """
  import transformers  # heavy import kept local

  if isinstance(config, Mapping):
    raw = dict(config)
    model_type = raw.get("model_type")
    if model_type is None:
      raise ValueError("config has no 'model_type' field; cannot tell the architecture")
    family = family_of(model_type)
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    hf = transformers.AutoConfig.for_model(model_type, **fields)
  else:
    hf = config
    raw = hf.to_dict()
    model_type = hf.model_type
    family = family_of(model_type)
  eos = getattr(hf, "eos_token_id", None)
  if isinstance(eos, list):
    eos = tuple(eos)
  cfg = ModelConfig(
      family=family.name,
      model_type=model_type,
      bos_token_id=getattr(hf, "bos_token_id", None),
      eos_token_id=eos,
      pad_token_id=getattr(hf, "pad_token_id", None),
      hf_config_json=json.dumps(raw, sort_keys=True),
      **family.config_fields(hf, raw),
  )
  if cfg.num_heads % cfg.num_kv_heads:
    raise unsupported("num_key_value_heads", cfg.num_kv_heads,
                      f"must divide num_attention_heads = {cfg.num_heads}")
  return cfg


def to_hf_config(cfg: ModelConfig, dtype) -> dict[str, Any]:
  """The `config.json` `save_pretrained` writes: the HF config `cfg` was built from, with
  its model type, architecture, parameter dtype and embedding tying stated."""
  hf_config = dict(cfg.hf_config)
  hf_config["model_type"] = cfg.model_type
  hf_config["architectures"] = [get_family(cfg).model_types[cfg.model_type]]
  hf_config["dtype"] = str(dtype.name)
  hf_config["tie_word_embeddings"] = cfg.tie_word_embeddings
  return hf_config


# ----------------------------------------------------------------------------- construction


def model_class(cfg: ModelConfig) -> type[CausalLM]:
  return get_family(cfg).model_class


def build_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
                remat: str = "none", attention_impl: str = "auto",
                unroll_layers: bool = False) -> CausalLM:
  """A randomly initialised model (for pre-training from scratch and tests)."""
  return model_class(cfg)(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                          attention_impl=attention_impl, unroll_layers=unroll_layers,
                          rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   remat: str = "none", attention_impl: str = "auto",
                   unroll_layers: bool = False) -> CausalLM:
  """The model with `ShapeDtypeStruct` leaves: shapes and logical axes, nothing allocated."""
  return nnx.eval_shape(lambda: build_model(cfg, dtype=dtype, param_dtype=param_dtype,
                                            remat=remat, attention_impl=attention_impl,
                                            unroll_layers=unroll_layers))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{dotted parameter path: shape}, from the abstract model (nothing is allocated)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return {".".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(state)}


def num_params(cfg: ModelConfig) -> int:
  """The parameter count of the architecture `cfg` describes."""
  return int(sum(math.prod(shape) for shape in param_shapes(cfg).values()))


def num_active_params(cfg: ModelConfig) -> int:
  """The parameters one token uses (a mixture of experts' "activated" count, embeddings
  included): a parameter with an `expert` logical axis counts `num_experts_per_tok` of its
  `num_experts` experts; a dense model's count is `num_params`."""
  total = 0
  for _, var in nnx.to_flat_state(nnx.state(abstract_model(cfg), nnx.Param)):
    size = math.prod(var.shape)
    if "expert" in var.get_metadata().get("logical_axes", ()):
      size = size // cfg.num_experts * cfg.num_experts_per_tok
    total += size
  return int(total)
