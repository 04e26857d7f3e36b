"""GPT-Neo (Ge et al. use GPT-Neo-2.7B): learned absolute positions, LayerNorm, biases,
`gelu_new` MLP, alternating global / local (windowed) attention, and *no* 1/sqrt(d)
scaling of attention scores.
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from memdyn_jax.models import layers
from memdyn_jax.models.transformer import CausalLM, attn_block_kwargs


class GPTNeoBlock(nnx.Module):

  def __init__(self, cfg, *, dtype, param_dtype, rngs: nnx.Rngs):
    norm = lambda: layers.LayerNorm(cfg.hidden_size, cfg.norm_eps, param_dtype=param_dtype,
                                    rngs=rngs)
    self.ln_1 = norm()
    self.attn = layers.Attention(**attn_block_kwargs(cfg, dtype, param_dtype), rngs=rngs)
    self.ln_2 = norm()
    self.mlp = layers.PlainMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act,
                               dtype=dtype, param_dtype=param_dtype, rngs=rngs)

  def __call__(self, h, **attn_kwargs):
    attn_out, kv = self.attn(self.ln_1(h), **attn_kwargs)
    h = h + attn_out
    h = h + self.mlp(self.ln_2(h))
    return h, kv


class GPTNeoForCausalLM(CausalLM):

  def init_extra(self, rngs):
    self.position_embedding = layers.make_param(
        rngs, layers.normal_init(0.02), (self.cfg.max_position_embeddings, self.cfg.hidden_size),
        ("positions", "embed"), self.param_dtype)

  def make_block(self, rngs):
    return GPTNeoBlock(self.cfg, dtype=self.dtype, param_dtype=self.param_dtype, rngs=rngs)

  def make_final_norm(self, rngs):
    return layers.LayerNorm(self.cfg.hidden_size, self.cfg.norm_eps, param_dtype=self.param_dtype,
                            rngs=rngs)

  def embed_tokens(self, input_ids, positions):
    tok = super().embed_tokens(input_ids, positions)
    pos = jnp.take(self.position_embedding[...], positions, axis=0).astype(self.dtype)
    return tok + pos
