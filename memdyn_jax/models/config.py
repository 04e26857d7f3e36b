"""`ModelConfig`: the architecture of a causal LM, built from a Hugging Face `config.json`.

HF configs are first normalised by `transformers.AutoConfig` (defaults, `layer_types`,
`rope_parameters` standardisation), then every field that changes the computation is
read explicitly. A value the model code does not implement raises `ValueError` naming
the field: a config we accept is a config we compute exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Mapping


# HF `model_type` -> our family module.
FAMILY_OF_MODEL_TYPE = {
    "llama": "llama",
    "mistral": "llama",
    "qwen2": "llama",
    "gemma2": "gemma2",
    "gpt_neo": "gpt_neo",
}

_SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
_SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters shared by all families.

  `layer_windows[i]` is the attention window of layer i (0 = global causal attention),
  so alternating local/global layers (Gemma 2, GPT-Neo) are data, not code paths.
  """

  family: str
  model_type: str
  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  max_position_embeddings: int
  norm_eps: float
  hidden_act: str
  layer_windows: tuple[int, ...]
  tie_word_embeddings: bool = False
  attention_bias: bool = False  # q/k/v biases (Qwen2)
  attention_out_bias: bool = False  # o_proj bias
  mlp_bias: bool = False
  rope_theta: float = 10000.0
  rope_type: str = "default"  # "none" for learned positions (GPT-Neo)
  rope_params: tuple[tuple[str, float], ...] = ()
  attn_scale: float = 0.0  # multiplier of q·k; 0 means 1/sqrt(head_dim)
  attn_logit_softcap: float = 0.0  # 0 = off
  final_logit_softcap: float = 0.0
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # The HF config dict we were built from, re-emitted by `save_pretrained`.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  @property
  def rope(self) -> dict[str, float]:
    return dict(self.rope_params)

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)


def _unsupported(field: str, value: Any, why: str) -> ValueError:
  return ValueError(f"config field {field!r} = {value!r} is not supported: {why}")


def from_hf_config(config: Mapping[str, Any] | Any) -> ModelConfig:
  """Builds a `ModelConfig` from a HF config dict (as in `config.json`) or `PretrainedConfig`."""
  import transformers  # heavy import kept local

  if isinstance(config, Mapping):
    raw = dict(config)
    model_type = raw.get("model_type")
    if model_type is None:
      raise ValueError("config has no 'model_type' field; cannot tell the architecture")
    if model_type not in FAMILY_OF_MODEL_TYPE:
      raise ValueError(
          f"config field 'model_type' = {model_type!r} is not supported; "
          f"supported: {sorted(FAMILY_OF_MODEL_TYPE)}")
    fields = {k: v for k, v in raw.items() if k not in ("model_type", "transformers_version")}
    hf = transformers.AutoConfig.for_model(model_type, **fields)
  else:
    hf = config
    raw = hf.to_dict()
    model_type = hf.model_type
    if model_type not in FAMILY_OF_MODEL_TYPE:
      raise ValueError(
          f"config field 'model_type' = {model_type!r} is not supported; "
          f"supported: {sorted(FAMILY_OF_MODEL_TYPE)}")
  family = FAMILY_OF_MODEL_TYPE[model_type]
  builder = {"llama": _llama_like, "gemma2": _gemma2, "gpt_neo": _gpt_neo}[family]
  kwargs = builder(hf, raw)
  eos = getattr(hf, "eos_token_id", None)
  if isinstance(eos, list):
    eos = tuple(eos)
  cfg = ModelConfig(
      family=family,
      model_type=model_type,
      bos_token_id=getattr(hf, "bos_token_id", None),
      eos_token_id=eos,
      pad_token_id=getattr(hf, "pad_token_id", None),
      hf_config_json=json.dumps(raw, sort_keys=True),
      **kwargs,
  )
  if cfg.num_heads % cfg.num_kv_heads:
    raise _unsupported("num_key_value_heads", cfg.num_kv_heads,
                       f"must divide num_attention_heads = {cfg.num_heads}")
  return cfg


def _rope(hf, raw) -> dict[str, Any]:
  params = dict(getattr(hf, "rope_parameters", None) or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in _SUPPORTED_ROPE_TYPES:
    raise _unsupported("rope_scaling.rope_type", rope_type, f"supported: {_SUPPORTED_ROPE_TYPES}")
  theta = params.get("rope_theta", raw.get("rope_theta", getattr(hf, "rope_theta", None)))
  if theta is None:
    theta = getattr(hf, "default_theta", 10000.0)
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise _unsupported("partial_rotary_factor", params["partial_rotary_factor"], "only 1.0")
  extra = {}
  if rope_type in ("linear", "dynamic"):
    extra["factor"] = float(params["factor"])
  elif rope_type == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
      if key not in params:
        raise ValueError(f"config field 'rope_scaling.{key}' is required for rope_type 'llama3'")
      extra[key] = float(params[key])
  return dict(rope_theta=float(theta), rope_type=rope_type, rope_params=tuple(sorted(extra.items())))


def _check_act(field: str, act: str) -> str:
  if act not in _SUPPORTED_ACTIVATIONS:
    raise _unsupported(field, act, f"supported: {_SUPPORTED_ACTIVATIONS}")
  return act


def _llama_like(hf, raw) -> dict[str, Any]:
  n_layers = hf.num_hidden_layers
  heads = hf.num_attention_heads
  head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // heads
  window = getattr(hf, "sliding_window", None)
  if hf.model_type == "llama":
    if raw.get("sliding_window"):
      raise _unsupported("sliding_window", raw["sliding_window"], "Llama has no sliding window")
    windows = (0,) * n_layers
  elif hf.model_type == "mistral":
    windows = (int(window) if window else 0,) * n_layers
  else:  # qwen2: per-layer types
    types = getattr(hf, "layer_types", None) or ["full_attention"] * n_layers
    windows = tuple(int(window) if t == "sliding_attention" and window else 0 for t in types)
  if getattr(hf, "pretraining_tp", 1) not in (1, None):
    raise _unsupported("pretraining_tp", hf.pretraining_tp, "only 1")
  qkv_bias = bool(getattr(hf, "attention_bias", False)) or hf.model_type == "qwen2"
  return dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size,
      num_layers=n_layers,
      num_heads=heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
      head_dim=head_dim,
      max_position_embeddings=hf.max_position_embeddings,
      norm_eps=float(hf.rms_norm_eps),
      hidden_act=_check_act("hidden_act", hf.hidden_act),
      layer_windows=windows,
      tie_word_embeddings=bool(hf.tie_word_embeddings),
      attention_bias=qkv_bias,
      # Llama's `attention_bias` also adds an o_proj bias; Qwen2's o_proj has none.
      attention_out_bias=bool(getattr(hf, "attention_bias", False)) and hf.model_type != "qwen2",
      mlp_bias=bool(getattr(hf, "mlp_bias", False)),
      **_rope(hf, raw),
  )


def _gemma2(hf, raw) -> dict[str, Any]:
  n_layers = hf.num_hidden_layers
  types = hf.layer_types
  windows = tuple(int(hf.sliding_window) if t == "sliding_attention" and hf.sliding_window else 0
                  for t in types)
  act = getattr(hf, "hidden_activation", None) or hf.hidden_act
  return dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size,
      num_layers=n_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads,
      head_dim=hf.head_dim,
      max_position_embeddings=hf.max_position_embeddings,
      norm_eps=float(hf.rms_norm_eps),
      hidden_act=_check_act("hidden_activation", act),
      layer_windows=windows,
      tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
      attention_bias=bool(getattr(hf, "attention_bias", False)),
      attention_out_bias=bool(getattr(hf, "attention_bias", False)),
      attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
      attn_logit_softcap=float(hf.attn_logit_softcapping or 0.0),
      final_logit_softcap=float(hf.final_logit_softcapping or 0.0),
      **_rope(hf, raw),
  )


def _gpt_neo(hf, raw) -> dict[str, Any]:
  layers = list(hf.attention_layers)
  if len(layers) != hf.num_layers:
    raise _unsupported("attention_types", raw.get("attention_types"),
                       f"expands to {len(layers)} layers but num_layers = {hf.num_layers}")
  for t in layers:
    if t not in ("global", "local"):
      raise _unsupported("attention_types", t, "only 'global' and 'local'")
  windows = tuple(int(hf.window_size) if t == "local" else 0 for t in layers)
  return dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size or 4 * hf.hidden_size,
      num_layers=hf.num_layers,
      num_heads=hf.num_heads,
      num_kv_heads=hf.num_heads,
      head_dim=hf.hidden_size // hf.num_heads,
      max_position_embeddings=hf.max_position_embeddings,
      norm_eps=float(hf.layer_norm_epsilon),
      hidden_act=_check_act("activation_function", hf.activation_function),
      layer_windows=windows,
      tie_word_embeddings=True,
      attention_out_bias=True,
      mlp_bias=True,
      rope_type="none",
      attn_scale=1.0,  # GPT-Neo does not scale q·k by 1/sqrt(d)
  )


def attn_scale(cfg: ModelConfig) -> float:
  return cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
