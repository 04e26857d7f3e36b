"""GPT-Neo (Ge et al. use GPT-Neo-2.7B): learned absolute positions, LayerNorm, biases,
`gelu_new` MLP, alternating global / local (windowed) attention, and *no* 1/sqrt(d)
scaling of attention scores.
"""
from __future__ import annotations

from typing import Any

import jax.numpy as jnp
from flax import nnx

from memdyn_jax.models import layers
from memdyn_jax.models.config import ModelConfig, check_activation, unsupported
from memdyn_jax.models.registry import LINEAR, Family, KeyRule
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


def config_fields(hf, raw) -> dict[str, Any]:
  kinds = list(hf.attention_layers)
  if len(kinds) != hf.num_layers:
    raise unsupported("attention_types", raw.get("attention_types"),
                      f"expands to {len(kinds)} layers but num_layers = {hf.num_layers}")
  for t in kinds:
    if t not in ("global", "local"):
      raise unsupported("attention_types", t, "only 'global' and 'local'")
  windows = tuple(int(hf.window_size) if t == "local" else 0 for t in kinds)
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
      hidden_act=check_activation("activation_function", hf.activation_function),
      layer_windows=windows,
      tie_word_embeddings=True,
      attention_out_bias=True,
      mlp_bias=True,
      rope_type="none",
      attn_scale=1.0,  # GPT-Neo does not scale q·k by 1/sqrt(d)
  )


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
  p = "transformer.h.{i}."
  rules = [KeyRule("transformer.wte.weight", "embedding"),
           KeyRule("transformer.wpe.weight", "position_embedding"),
           KeyRule("transformer.ln_f.weight", "final_norm.scale"),
           KeyRule("transformer.ln_f.bias", "final_norm.bias")]
  for n in ("ln_1", "ln_2"):
    rules += [KeyRule(p + f"{n}.weight", f"blocks.{n}.scale"),
              KeyRule(p + f"{n}.bias", f"blocks.{n}.bias")]
  for x in "qkv":
    rules.append(KeyRule(p + f"attn.attention.{x}_proj.weight", f"blocks.attn.{x}_proj.kernel",
                         LINEAR))
  rules += [KeyRule(p + "attn.attention.out_proj.weight", "blocks.attn.o_proj.kernel", LINEAR, 2),
            KeyRule(p + "attn.attention.out_proj.bias", "blocks.attn.o_proj.bias")]
  for x in ("c_fc", "c_proj"):
    rules += [KeyRule(p + f"mlp.{x}.weight", f"blocks.mlp.{x}.kernel", LINEAR),
              KeyRule(p + f"mlp.{x}.bias", f"blocks.mlp.{x}.bias")]
  return rules


FAMILY = Family(
    name="gpt_neo",
    model_types={"gpt_neo": "GPTNeoForCausalLM"},
    config_fields=config_fields,
    key_rules=key_rules,
    model_class=GPTNeoForCausalLM,
    # The causal-mask buffers old checkpoints saved with each attention layer.
    ignored_keys=(r".*attn\.attention\.(masked_)?bias$",),
    # Alternating global/local layers with a window shorter than the test sequences.
    tiny_configs={
        "gpt_neo": dict(vocab_size=211, hidden_size=48, num_layers=4, num_heads=4,
                        attention_types=[[["global", "local"], 2]], window_size=5,
                        max_position_embeddings=128),
    },
)
