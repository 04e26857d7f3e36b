"""Llama family: Llama 2/3/3.1, Mistral, Qwen2/2.5 (q/k/v bias), DeepSeek-Math.

Pre-norm blocks: h += attn(rmsnorm(h)); h += swiglu(rmsnorm(h)). RoPE variants and
sliding windows come from `ModelConfig`.
"""
from __future__ import annotations

from flax import nnx

from memdyn_jax.models import layers
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
