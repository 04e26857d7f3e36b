"""Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 (q/k/v bias), DeepSeek-Math.

Pre-norm blocks: h += attn(rmsnorm(h)); h += swiglu(rmsnorm(h)). RoPE variants and
sliding windows come from `ModelConfig`. The HF config readers and the key map here are
also those of the families with Llama's tensor names (Gemma 2 adds two norms).
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from memdyn_jax.models import layers
from memdyn_jax.models.config import ModelConfig, check_activation, rope_fields, unsupported
from memdyn_jax.models.registry import FLAT, LINEAR, Family, KeyRule
from memdyn_jax.models.transformer import CausalLM, attn_block_kwargs


class LlamaBlock(nnx.Module):

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: layers.RMSNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = norm()
    self.self_attn = layers.Attention(**attn_block_kwargs(cfg, dtype, param_dtype), rngs=rngs)
    self.post_attention_layernorm = norm()
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                               use_bias=cfg.mlp_bias, dtype=dtype, param_dtype=param_dtype,
                               rngs=rngs)

  def __call__(self, h, **attn_kwargs):
    attn_out, kv = self.self_attn(self.input_layernorm(h), **attn_kwargs)
    h = h + attn_out
    h = h + self.mlp(self.post_attention_layernorm(h))
    return h, kv


class LlamaForCausalLM(CausalLM):

  def make_block(self, rngs):
    return LlamaBlock(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  def make_final_norm(self, rngs):
    return layers.RMSNorm(self.cfg.hidden_size, self.cfg.norm_eps, param_dtype=self.param_dtype,
                          rngs=rngs)


# ----------------------------------------------------------------------------- HF config


def decoder_fields(hf, raw, *, windows: tuple[int, ...], qkv_bias: bool, out_bias: bool,
                   partial_rotary: bool = False, check_pretraining_tp: bool = True
                   ) -> dict[str, Any]:
  """`ModelConfig` fields of a Llama-style HF config, given its per-layer windows and
  attention biases (the parts its model types differ in). `partial_rotary`: the HF model
  reads `partial_rotary_factor` (`config.rope_fields`); `check_pretraining_tp` False for
  model types whose HF model has no `pretraining_tp` (SmolLM3-3B's config says 2)."""
  if check_pretraining_tp and getattr(hf, "pretraining_tp", 1) not in (1, None):
    raise unsupported("pretraining_tp", hf.pretraining_tp, "only 1")
  heads = hf.num_attention_heads
  return dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size,
      num_layers=hf.num_hidden_layers,
      num_heads=heads,
      num_kv_heads=getattr(hf, "num_key_value_heads", None) or heads,
      head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // heads,
      max_position_embeddings=hf.max_position_embeddings,
      norm_eps=float(hf.rms_norm_eps),
      hidden_act=check_activation("hidden_act", hf.hidden_act),
      layer_windows=windows,
      tie_word_embeddings=bool(hf.tie_word_embeddings),
      attention_bias=qkv_bias,
      attention_out_bias=out_bias,
      mlp_bias=bool(getattr(hf, "mlp_bias", False)),
      **rope_fields(hf, raw, partial_rotary=partial_rotary),
  )


def llama_fields(hf, raw) -> dict[str, Any]:
  """Llama: global attention only; `attention_bias` adds q/k/v and o_proj biases."""
  if raw.get("sliding_window"):
    raise unsupported("sliding_window", raw["sliding_window"], "Llama has no sliding window")
  bias = bool(getattr(hf, "attention_bias", False))
  return decoder_fields(hf, raw, windows=(0,) * hf.num_hidden_layers, qkv_bias=bias,
                        out_bias=bias)


def mistral_fields(hf, raw) -> dict[str, Any]:
  """Mistral: one sliding window (or none) for every layer."""
  window = getattr(hf, "sliding_window", None)
  bias = bool(getattr(hf, "attention_bias", False))
  return decoder_fields(hf, raw, windows=(int(window) if window else 0,) * hf.num_hidden_layers,
                        qkv_bias=bias, out_bias=bias)


def qwen2_fields(hf, raw) -> dict[str, Any]:
  """Qwen2: a window on the layers `layer_types` marks sliding; q/k/v biases always, no
  o_proj bias."""
  window = getattr(hf, "sliding_window", None)
  types = getattr(hf, "layer_types", None) or ["full_attention"] * hf.num_hidden_layers
  windows = tuple(int(window) if t == "sliding_attention" and window else 0 for t in types)
  return decoder_fields(hf, raw, windows=windows, qkv_bias=True, out_bias=False)


_FIELDS_OF_MODEL_TYPE = {"llama": llama_fields, "mistral": mistral_fields, "qwen2": qwen2_fields}


def config_fields(hf, raw) -> dict[str, Any]:
  return _FIELDS_OF_MODEL_TYPE[hf.model_type](hf, raw)


# ----------------------------------------------------------------------------- HF tensors

NORMS = ("input_layernorm", "post_attention_layernorm")


def key_rules(cfg: ModelConfig, norms: tuple[str, ...] = NORMS) -> list[KeyRule]:
  """HF `model.layers.{i}.…` tensors <-> our parameters; `norms`: the block's norm names."""
  p = "model.layers.{i}."
  rules = [KeyRule("model.embed_tokens.weight", "embedding"),
           KeyRule("model.norm.weight", "final_norm.scale")]
  rules += [KeyRule(p + f"{n}.weight", f"blocks.{n}.scale") for n in norms]
  for x in "qkv":
    rules.append(KeyRule(p + f"self_attn.{x}_proj.weight", f"blocks.self_attn.{x}_proj.kernel",
                         LINEAR))
    if cfg.attention_bias:
      rules.append(KeyRule(p + f"self_attn.{x}_proj.bias", f"blocks.self_attn.{x}_proj.bias", FLAT))
  rules.append(KeyRule(p + "self_attn.o_proj.weight", "blocks.self_attn.o_proj.kernel", LINEAR, 2))
  if cfg.qk_norm != "none":  # HF (head_dim,) per head, or (heads * head_dim,) per projection
    for x in "qk":
      rules.append(KeyRule(p + f"self_attn.{x}_norm.weight", f"blocks.self_attn.{x}_norm.scale",
                           FLAT))
  if cfg.attention_out_bias:
    rules.append(KeyRule(p + "self_attn.o_proj.bias", "blocks.self_attn.o_proj.bias"))
  for x in ("gate", "up", "down"):
    rules.append(KeyRule(p + f"mlp.{x}_proj.weight", f"blocks.mlp.{x}_proj.kernel", LINEAR))
    if cfg.mlp_bias:
      rules.append(KeyRule(p + f"mlp.{x}_proj.bias", f"blocks.mlp.{x}_proj.bias"))
  if not cfg.tie_word_embeddings:
    rules.append(KeyRule("lm_head.weight", "lm_head.kernel", LINEAR))
  return rules


# Tiny configs for tests: GQA, tied and untied embeddings, llama3 RoPE scaling, a sliding
# window shorter than the test sequences (Mistral), q/k/v biases (Qwen2).
TINY_CONFIGS = {
    "llama": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                  num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                  rope_theta=500.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
    "llama3_scaled": dict(model_type="llama", vocab_size=211, hidden_size=64,
                          intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=1, max_position_embeddings=128,
                          rope_theta=10000.0, tie_word_embeddings=True,
                          rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                        "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                        "original_max_position_embeddings": 16}),
    "mistral": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                    sliding_window=5, tie_word_embeddings=False),
    "qwen2": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                  num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=128,
                  tie_word_embeddings=True, rope_theta=1e6),
}

FAMILY = Family(
    name="llama",
    model_types={"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM"},
    config_fields=config_fields,
    key_rules=key_rules,
    model_class=LlamaForCausalLM,
    tiny_configs=TINY_CONFIGS,
)
