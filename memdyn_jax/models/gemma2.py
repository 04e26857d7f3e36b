"""Gemma 2: sandwich norms (pre- and post-) with RMSNorm(1 + w), GeGLU (tanh GELU),
embeddings scaled by sqrt(hidden), `query_pre_attn_scalar`, attention and final-logit
soft-capping, alternating sliding-window / global layers.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memdyn_jax.models import layers
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
