"""Qwen3 (dense): Llama's block with an RMSNorm over each head's q and k before RoPE, no
q/k/v bias by default (`attention_bias` adds q/k/v and o_proj biases), and sliding windows
on the layers `layer_types` marks (from `use_sliding_window` / `max_window_layers`).
"""
from __future__ import annotations

from typing import Any

from memdyn_jax.models.config import windows_of_layer_types
from memdyn_jax.models.families import llama
from memdyn_jax.models.registry import Family

def config_fields(hf, raw) -> dict[str, Any]:
  bias = bool(getattr(hf, "attention_bias", False))
  # HF's config sets `sliding_window` None unless `use_sliding_window`, and marks the layers
  # from `max_window_layers` on sliding.
  return dict(llama.decoder_fields(hf, raw, windows=windows_of_layer_types(hf),
                                   qkv_bias=bias, out_bias=bias),
              qk_norm="head", qk_norm_style="cast_then_scale")


FAMILY = Family(
    name="qwen3",
    model_types={"qwen3": "Qwen3ForCausalLM"},
    config_fields=config_fields,
    key_rules=llama.key_rules,  # Llama's tensor names, with self_attn.{q,k}_norm
    model_class=llama.LlamaForCausalLM,
    # GQA with an explicit head_dim (Qwen3's is not hidden / heads), untied and tied
    # embeddings, and a window shorter than the test sequences on the layers from
    # max_window_layers on.
    tiny_configs={
        "qwen3": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                      max_position_embeddings=128, rope_theta=1e6, tie_word_embeddings=False),
        "qwen3_tied_sliding": dict(model_type="qwen3", vocab_size=211, hidden_size=48,
                                   intermediate_size=80, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=3, head_dim=8,
                                   max_position_embeddings=128, tie_word_embeddings=True,
                                   use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1),
    },
)
