"""OLMo 2: norms after attention and after the MLP, inside the residual branch
(h + norm(attn(h)), h + norm(mlp(h)); no pre-norms), and an RMSNorm over the whole q and
k projections (all heads at once) before RoPE. Its RMSNorms multiply by the weight in
float32 and cast after (`layers.rms_norm` style "scale_then_cast"). Llama's tensor names
otherwise.
"""
from __future__ import annotations

from typing import Any

from flax import nnx

from memdyn_jax.models import layers
from memdyn_jax.models.config import ModelConfig
from memdyn_jax.models.families import llama
from memdyn_jax.models.registry import Family, KeyRule
from memdyn_jax.models.transformer import CausalLM, attn_block_kwargs


class Olmo2Block(nnx.Module):

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: layers.rms_norm("scale_then_cast", cfg.hidden_size, cfg.norm_eps,
                                   param_dtype=param_dtype, rngs=rngs)
    self.self_attn = layers.Attention(**attn_block_kwargs(cfg, dtype, param_dtype), rngs=rngs)
    self.post_attention_layernorm = norm()
    self.mlp = layers.GatedMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.post_feedforward_layernorm = norm()

  def __call__(self, h, **attn_kwargs):
    attn_out, kv = self.self_attn(h, **attn_kwargs)
    h = h + self.post_attention_layernorm(attn_out)
    h = h + self.post_feedforward_layernorm(self.mlp(h))
    return h, kv


class Olmo2ForCausalLM(CausalLM):

  def make_block(self, rngs):
    return Olmo2Block(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  def make_final_norm(self, rngs):
    return layers.rms_norm("scale_then_cast", self.cfg.hidden_size, self.cfg.norm_eps,
                           param_dtype=self.param_dtype, rngs=rngs)


def config_fields(hf, raw) -> dict[str, Any]:
  """Global attention only (HF's OLMo 2 has no window); `attention_bias` adds q/k/v and
  o_proj biases; the MLP never has biases."""
  bias = bool(getattr(hf, "attention_bias", False))
  fields = llama.decoder_fields(hf, raw, windows=(0,) * hf.num_hidden_layers, qkv_bias=bias,
                                out_bias=bias)
  return dict(fields, mlp_bias=False, qk_norm="projection", qk_norm_style="scale_then_cast")


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
  """Llama's tensor names with the post-attention and post-MLP norms (and q/k norms)."""
  return llama.key_rules(cfg, ("post_attention_layernorm", "post_feedforward_layernorm"))


FAMILY = Family(
    name="olmo2",
    model_types={"olmo2": "Olmo2ForCausalLM"},
    config_fields=config_fields,
    key_rules=key_rules,
    model_class=Olmo2ForCausalLM,
    # GQA (the projection norms of q and k then differ in size), untied embeddings.
    tiny_configs={
        "olmo2": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      rope_theta=500000.0, tie_word_embeddings=False, pad_token_id=1,
                      eos_token_id=2),
    },
)
