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
from typing import Any, NamedTuple

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "longrope")
SUPPORTED_ACTIVATIONS = ("silu", "gelu_pytorch_tanh", "gelu_new")
# q/k normalisation before RoPE (`ModelConfig.qk_norm`): none; RMSNorm over each head's
# head_dim (Qwen3, Gemma 3); RMSNorm over the whole q (k) projection, all heads (OLMo 2).
QK_NORMS = ("none", "head", "projection")
# How an RMSNorm applies its weight (`layers.rms_norm`): cast the normalised activations
# back, then multiply (Llama, Qwen3); multiply in float32, then cast (OLMo 2); multiply by
# (1 + w) in float32, then cast (Gemma).
RMS_NORM_STYLES = ("cast_then_scale", "scale_then_cast", "one_plus_scale")


class LayerRope(NamedTuple):
  """One layer's RoPE (`ModelConfig.rope_layers`)."""

  theta: float  # base
  scaled: bool  # `rope_type` / `rope_params` scale its frequencies (else plain RoPE)
  uses_rope: bool  # it rotates q/k at all (False: a NoPE layer; theta/scaled unused)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Architecture hyper-parameters shared by all families.

  `layer_windows[i]` is the attention window of layer i (0 = global causal attention),
  so alternating local/global layers (Gemma 2, GPT-Neo) are data, not code paths. So is
  each layer's RoPE, read together by `rope_layers()` (one `LayerRope` per layer):
  `layer_rope_thetas[i]` its base (Gemma 3's local and global bases), `layer_rope_scaled[i]`
  whether `rope_type`/`rope_params` scale its frequencies, `layer_uses_rope[i]` whether it
  rotates q/k at all (SmolLM3's NoPE layers); each empty = `rope_theta`, scaled, rotating on
  every layer. `partial_rotary_factor` (the rotated share of a head) is the same on all.
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
  # Scaling parameters of `rope_type` (longrope: its per-frequency factors as tuples).
  rope_params: tuple[tuple[str, float | tuple[float, ...]], ...] = ()
  partial_rotary_factor: float = 1.0  # RoPE rotates the first `rotary_dim` dims of a head
  # Per-layer RoPE (`rope_layers()`): each () = the same on every layer.
  layer_rope_thetas: tuple[float, ...] = ()  # the layer's RoPE base; () = rope_theta
  layer_rope_scaled: tuple[bool, ...] = ()  # rope_type/rope_params scale it; () = all
  layer_uses_rope: tuple[bool, ...] = ()  # it rotates q/k; () = all (if rope_type != none)
  attn_scale: float = 0.0  # multiplier of q·k; 0 means 1/sqrt(head_dim)
  attn_logit_softcap: float = 0.0  # 0 = off
  final_logit_softcap: float = 0.0
  qk_norm: str = "none"  # QK_NORMS: q/k RMSNorm before RoPE, per head or per projection
  qk_norm_style: str = "cast_then_scale"  # RMS_NORM_STYLES: how q/k norms apply weights
  # Mixture of experts (`moe`; Qwen3-MoE) in place of the dense MLP on every layer: each
  # token goes to its `num_experts_per_tok` most probable of `num_experts` SwiGLU experts
  # of width `moe_intermediate_size` (`intermediate_size` is then unused). 0 experts: dense.
  num_experts: int = 0
  num_experts_per_tok: int = 0
  moe_intermediate_size: int = 0
  norm_topk_prob: bool = False  # the top-k router probabilities are renormalised to sum 1
  router_aux_loss_coef: float = 0.0  # weight of the load-balancing loss (HF's config value)
  # HF's `output_router_logits`: its model adds the weighted load-balancing loss to the
  # loss it returns only when this is set (`train.loss.router_aux_coefficient`).
  router_aux_loss_in_hf_loss: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  # The HF config dict we were built from, re-emitted by `save_pretrained`.
  hf_config_json: str = dataclasses.field(default="{}", compare=False, repr=False)

  @property
  def is_moe(self) -> bool:
    """Its blocks route tokens to experts (`num_experts` > 0)."""
    return self.num_experts > 0

  @property
  def rope(self) -> dict[str, Any]:
    return dict(self.rope_params)

  @property
  def rotary_dim(self) -> int:
    """How many leading dims of each head RoPE rotates (HF: int(head_dim * factor))."""
    return int(self.head_dim * self.partial_rotary_factor)

  @property
  def hf_config(self) -> dict[str, Any]:
    return json.loads(self.hf_config_json)

  def rope_layers(self) -> tuple[LayerRope, ...]:
    """Every layer's RoPE (`LayerRope`), from the per-layer fields and their defaults. With
    `rope_type` "none" (learned positions) no layer rotates."""
    n = self.num_layers
    per_layer = {"layer_rope_thetas": self.layer_rope_thetas or (self.rope_theta,) * n,
                 "layer_rope_scaled": self.layer_rope_scaled or (True,) * n,
                 "layer_uses_rope": self.layer_uses_rope or (True,) * n}
    wrong = {name: len(v) for name, v in per_layer.items() if len(v) != n}
    if wrong:
      raise ValueError(f"{', '.join(f'{k} ({v})' for k, v in wrong.items())} must name all "
                       f"{n} layers")
    rotary = self.rope_type != "none"
    return tuple(LayerRope(float(theta), bool(scaled), rotary and bool(uses))
                 for theta, scaled, uses in zip(*per_layer.values()))


def unsupported(field: str, value: Any, why: str) -> ValueError:
  """The error for a config value the model code does not implement (raise it)."""
  return ValueError(f"config field {field!r} = {value!r} is not supported: {why}")


LAYER_TYPES = ("full_attention", "sliding_attention")  # HF `layer_types` values we run


def layer_types(hf) -> list[str]:
  """HF's `layer_types` (Qwen3, Gemma 3, SmolLM3), checked: one per layer, each in
  LAYER_TYPES."""
  types = list(hf.layer_types)
  if len(types) != hf.num_hidden_layers:
    raise unsupported("layer_types", types, f"names {len(types)} layers, not "
                      f"num_hidden_layers = {hf.num_hidden_layers}")
  for t in types:
    if t not in LAYER_TYPES:
      raise unsupported("layer_types", t, f"supported: {LAYER_TYPES}")
  return types


def windows_of_layer_types(hf) -> tuple[int, ...]:
  """Each layer's attention window as HF's eager masks read `layer_types`: `sliding_window`
  on the sliding layers (none where it is None: HF's config clears it when sliding is off),
  0 (global) elsewhere."""
  window = getattr(hf, "sliding_window", None)
  return tuple(int(window) if t == "sliding_attention" and window else 0
               for t in layer_types(hf))


def rope_fields(hf, raw, *, params: dict[str, Any] | None = None,
                partial_rotary: bool = False) -> dict[str, Any]:
  """`rope_theta`, `rope_type`, `rope_params` and `partial_rotary_factor` of an HF config with
  RoPE (`raw`: the dict as given, for `rope_theta` where the normalised config dropped it).

  `params`: the RoPE parameters to read where the config holds several (Gemma 3: one per
  layer type); default its `rope_parameters`. `partial_rotary`: the family's HF model
  rotates only the first `partial_rotary_factor` of each head (Phi-3); for the others a
  factor other than 1 is unsupported.
  """
  params = dict((getattr(hf, "rope_parameters", None) if params is None else params) or {})
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in SUPPORTED_ROPE_TYPES:
    raise unsupported("rope_scaling.rope_type", rope_type, f"supported: {SUPPORTED_ROPE_TYPES}")
  theta = params.get("rope_theta", raw.get("rope_theta", getattr(hf, "rope_theta", None)))
  if theta is None:
    theta = getattr(hf, "default_theta", 10000.0)
  partial = float(params.get("partial_rotary_factor", 1.0))
  if partial != 1.0 and not partial_rotary:
    raise unsupported("partial_rotary_factor", partial, f"only 1.0 for {hf.model_type}")
  rotary_dim = None
  if partial != 1.0 or rope_type == "longrope":
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
    rotary_dim = int(head_dim * partial)
    if rotary_dim <= 0 or rotary_dim % 2:
      raise unsupported("partial_rotary_factor", partial,
                        f"rotates {rotary_dim} of {head_dim} dims; needs an even number > 0")
  extra = {}
  if rope_type in ("linear", "dynamic"):
    extra["factor"] = float(params["factor"])
  elif rope_type == "llama3":
    for key in ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings"):
      if key not in params:
        raise ValueError(f"config field 'rope_scaling.{key}' is required for rope_type 'llama3'")
      extra[key] = float(params[key])
  elif rope_type == "longrope":
    extra = _longrope_params(hf, params, rotary_dim)
  return dict(rope_theta=float(theta), rope_type=rope_type,
              rope_params=tuple(sorted(extra.items())), partial_rotary_factor=partial)


def _longrope_params(hf, params: dict[str, Any], rotary_dim: int) -> dict[str, Any]:
  """LongRoPE's per-frequency factors, the length past which the long ones apply, and the
  factor the cos/sin tables are scaled by, as HF's `_compute_longrope_parameters` has them."""
  for key in ("short_factor", "long_factor", "original_max_position_embeddings"):
    if params.get(key) is None:
      raise ValueError(f"config field 'rope_scaling.{key}' is required for rope_type 'longrope'")
  for key in ("short_factor", "long_factor"):
    if len(params[key]) != rotary_dim // 2:
      raise unsupported(f"rope_scaling.{key}", f"{len(params[key])} values",
                        f"needs one per rotated frequency ({rotary_dim // 2})")
  original = int(params["original_max_position_embeddings"])
  # Without `factor` HF takes the context extension ratio (Phi-3 configs), and without
  # `attention_factor` the scaling LongRoPE's paper suggests for it.
  factor = params.get("factor")
  if factor is None:
    factor = hf.max_position_embeddings / original
  attention_factor = params.get("attention_factor")
  if attention_factor is None:
    attention_factor = (1.0 if factor <= 1.0 else
                        math.sqrt(1 + math.log(factor) / math.log(original)))
  return dict(short_factor=tuple(float(x) for x in params["short_factor"]),
              long_factor=tuple(float(x) for x in params["long_factor"]),
              original_max_position_embeddings=float(original),
              attention_factor=float(attention_factor))


def check_activation(field: str, act: str) -> str:
  """`act` if the model code implements it, else `unsupported(field, ...)`."""
  if act not in SUPPORTED_ACTIVATIONS:
    raise unsupported(field, act, f"supported: {SUPPORTED_ACTIVATIONS}")
  return act


def attn_scale(cfg: ModelConfig) -> float:
  return cfg.attn_scale or 1.0 / math.sqrt(cfg.head_dim)
