"""Gemma 2: sandwich norms (pre- and post-) with RMSNorm(1 + w), GeGLU (tanh GELU),
embeddings scaled by sqrt(hidden), `query_pre_attn_scalar`, attention and final-logit
soft-capping, alternating sliding-window / global layers.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from memdyn_jax.models import layers
from memdyn_jax.models.config import ModelConfig, check_activation, rope_fields
from memdyn_jax.models.families import llama
from memdyn_jax.models.registry import Family, KeyRule
from memdyn_jax.models.transformer import CausalLM, attn_block_kwargs


class Gemma2Block(nnx.Module):

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: layers.RMSNorm(cfg.hidden_size, cfg.norm_eps, offset=1.0,
                                  param_dtype=param_dtype, rngs=rngs)
    self.input_layernorm = norm()
    self.self_attn = layers.Attention(**attn_block_kwargs(cfg, dtype, param_dtype), rngs=rngs)
    self.post_attention_layernorm = norm()
    self.pre_feedforward_layernorm = norm()
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_feedforward_layernorm = norm()

  def __call__(self, h, **attn_kwargs):
    attn_out, kv = self.self_attn(self.input_layernorm(h), **attn_kwargs)
    h = h + self.post_attention_layernorm(attn_out)
    h = h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))
    return h, kv


class Gemma2ForCausalLM(CausalLM):

  def make_block(self, rngs):
    return Gemma2Block(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  def make_final_norm(self, rngs):
    return layers.RMSNorm(self.cfg.hidden_size, self.cfg.norm_eps, offset=1.0,
                          param_dtype=self.param_dtype, rngs=rngs)

  def embed_tokens(self, input_ids, positions):
    h = super().embed_tokens(input_ids, positions)
    # HF rounds the normaliser to the activation dtype before multiplying.
    return h * jnp.asarray(self.cfg.hidden_size ** 0.5, dtype=h.dtype)


def config_fields(hf, raw, *, rope: dict[str, Any] | None = None) -> dict[str, Any]:
  """`rope`: the RoPE fields, where the config holds them otherwise than Gemma 2's
  (Gemma 3); default `rope_fields(hf, raw)`."""
  types = hf.layer_types
  windows = tuple(int(hf.sliding_window) if t == "sliding_attention" and hf.sliding_window else 0
                  for t in types)
  act = getattr(hf, "hidden_activation", None) or hf.hidden_act
  return dict(
      vocab_size=hf.vocab_size,
      hidden_size=hf.hidden_size,
      intermediate_size=hf.intermediate_size,
      num_layers=hf.num_hidden_layers,
      num_heads=hf.num_attention_heads,
      num_kv_heads=hf.num_key_value_heads,
      head_dim=hf.head_dim,
      max_position_embeddings=hf.max_position_embeddings,
      norm_eps=float(hf.rms_norm_eps),
      hidden_act=check_activation("hidden_activation", act),
      layer_windows=windows,
      tie_word_embeddings=bool(getattr(hf, "tie_word_embeddings", True)),
      attention_bias=bool(getattr(hf, "attention_bias", False)),
      attention_out_bias=bool(getattr(hf, "attention_bias", False)),
      attn_scale=float(hf.query_pre_attn_scalar) ** -0.5,
      attn_logit_softcap=float(hf.attn_logit_softcapping or 0.0),
      final_logit_softcap=float(hf.final_logit_softcapping or 0.0),
      **(rope if rope is not None else rope_fields(hf, raw)),
  )


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
  """Llama's tensor names, with the norms around the MLP."""
  return llama.key_rules(
      cfg, llama.NORMS + ("pre_feedforward_layernorm", "post_feedforward_layernorm"))


FAMILY = Family(
    name="gemma2",
    model_types={"gemma2": "Gemma2ForCausalLM"},
    config_fields=config_fields,
    key_rules=key_rules,
    model_class=Gemma2ForCausalLM,
    # Sliding windows shorter than the test sequences, soft-capping, query_pre_attn_scalar.
    tiny_configs={
        "gemma2": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                       max_position_embeddings=128, sliding_window=5, query_pre_attn_scalar=24,
                       attn_logit_softcapping=5.0, final_logit_softcapping=3.0),
    },
)
