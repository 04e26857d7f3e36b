"""`ModelConfig`: the architecture of a causal LM, and the checks HF config translators share.

Each family translates an HF config into `ModelConfig` fields in its own module
(`Family.config_fields`, see `registry`); `registry.from_hf_config` is the entry point.
Every field that changes the computation is read explicitly: a value the model code does
not implement raises `unsupported(field, ...)`, a `ValueError` naming the field, so a
config we accept is a config we compute exactly.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new")
# q/k normalisation before RoPE (`ModelConfig.qk_norm`): none; RMSNorm over each head's
# head_dim (Qwen3, Gemma 3); RMSNorm over the whole q (k) projection, all heads (OLMo 2).
QK_NORMS = ("none", "head", "projection")
# How an RMSNorm applies its weight (`layers.rms_norm`): Llama casts the normalised
# activations back, then multiplies; OLMo 2 multiplies in float32, then casts; Gemma
# multiplies by (1 + w) in float32, then casts.
RMS_NORM_STYLES = ("llama", "olmo", "gemma")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters shared by all families.

  `layer_windows[i]` is the attention window of layer i (0 = global causal attention),
  so alternating local/global layers (Gemma 2, GPT-Neo) are data, not code paths. So is
  per-layer RoPE (Gemma 3's local and global bases): `layer_rope_thetas[i]` is layer i's
  base and `layer_rope_scaled[i]` whether `rope_type`/`rope_params` scale its frequencies;
  both empty = every layer rotates with `rope_theta`, scaled (`rope_layers`).
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
  qk_norm: str = "none"  # QK_NORMS: q/k RMSNorm before RoPE, per head or per projection
  qk_norm_style: str = "llama"  # RMS_NORM_STYLES: how the q/k norms apply their weight
  layer_rope_thetas: tuple[float, ...] = ()  # per-layer RoPE base; () = rope_theta
  layer_rope_scaled: tuple[bool, ...] = ()  # per-layer: rope_type scales it; () = all
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

  def rope_layers(self) -> tuple[tuple[float, bool], ...]:
    """(base, scaled by `rope_type`) of every layer's RoPE."""
    thetas = self.layer_rope_thetas or (self.rope_theta,) * self.num_layers
    scaled = self.layer_rope_scaled or (True,) * self.num_layers
    if len(thetas) != self.num_layers or len(scaled) != self.num_layers:
      raise ValueError(f"layer_rope_thetas ({len(thetas)}) and layer_rope_scaled "
                       f"({len(scaled)}) must name all {self.num_layers} layers")
    return tuple(zip(map(float, thetas), map(bool, scaled)))


def unsupported(field: str, value: Any, why: str) -> ValueError:
  """The error for a config value the model code does not implement (raise it)."""
  return ValueError(f"config field {field!r} = {value!r} is not supported: {why}")


def rope_fields(hf, raw) -> dict[str, Any]:
  """`rope_theta`, `rope_type` and `rope_params` of an HF config with RoPE (`raw`: the dict
  as given, for `rope_theta` where the normalised config dropped it)."""
  params = dict(getattr(hf, "rope_parameters", None) or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise unsupported("rope_scaling.rope_type", rope_type, f"supported: {SUPPORTED_ROPE_TYPES}")
  theta = params.get("rope_theta", raw.get("rope_theta", getattr(hf, "rope_theta", None)))
  if theta is None:
    theta = getattr(hf, "default_theta", 10000.0)
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    raise unsupported("partial_rotary_factor", params["partial_rotary_factor"], "only 1.0")
  extra = {}
  if rope_type in ("linear", "dynamic"):
    extra["factor"] = float(params["factor"])
  elif rope_type == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
      if key not in params:
        raise ValueError(f"config field 'rope_scaling.{key}' is required for rope_type 'llama3'")
      extra[key] = float(params[key])
  return dict(rope_theta=float(theta), rope_type=rope_type,
              rope_params=tuple(sorted(extra.items())))


def check_activation(field: str, act: str) -> str:
  """`act` if the model code implements it, else `unsupported(field, ...)`."""
  if act not in SUPPORTED_ACTIVATIONS:
    raise unsupported(field, act, f"supported: {SUPPORTED_ACTIVATIONS}")
  return act


def attn_scale(cfg: ModelConfig) -> float:
  return cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
