"""SmolLM3: Llama's blocks and tensor names, without RoPE on the layers `no_rope_layers`
marks 0 (by default every `no_rope_layer_interval`-th: NoPE layers), and a sliding window on
the layers `layer_types` marks sliding (by default, with `use_sliding_window`, the NoPE
ones). `attention_bias` covers o_proj too.

Which layers rotate is `ModelConfig.layer_uses_rope`: data scanned with the layers, so the
model is Llama's.
"""
from __future__ import annotations

from typing import Any

from memdyn_jax.models.config import unsupported, windows_of_layer_types
from memdyn_jax.models.families import llama
from memdyn_jax.models.registry import Family


def config_fields(hf, raw) -> dict[str, Any]:
  n = hf.num_hidden_layers
  flags = list(hf.no_rope_layers)  # 1: the layer applies RoPE (HF lists at least n)
  if len(flags) < n:
    raise unsupported("no_rope_layers", flags, f"lists {len(flags)} layers of {n}")
  # HF's eager masks follow `layer_types` (its config derives them from use_sliding_window).
  windows = windows_of_layer_types(hf)
  bias = bool(getattr(hf, "attention_bias", False))
  fields = llama.decoder_fields(hf, raw, windows=windows, qkv_bias=bias, out_bias=bias,
                                check_pretraining_tp=False)
  return dict(fields, layer_uses_rope=tuple(bool(f) for f in flags[:n]))


FAMILY = Family(
    name="smollm3",
    model_types={"smollm3": "SmolLM3ForCausalLM"},
    config_fields=config_fields,
    key_rules=llama.key_rules,
    model_class=llama.LlamaForCausalLM,
    # NoPE on every second layer (HF's default interval is 4), GQA, tied embeddings (the
    # default); the parity tests add sliding windows and biases.
    tiny_configs={
        "smollm3": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=4,
                        num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                        no_rope_layer_interval=2, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2),
    },
)
