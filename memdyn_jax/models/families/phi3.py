"""Phi-3 / Phi-3.5-mini / Phi-4-mini: Llama's blocks, with RoPE on the first
`partial_rotary_factor` of each head (Phi-4-mini: 0.75), `longrope` scaling, and one sliding
window on every layer where the config sets one.

HF's checkpoints fuse q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`; the key
map splits them into our separate projections on load and concatenates them back on save
(`KeyRule.fused`), so the model, its sharding rules and LoRA targets are Llama's.
"""
from __future__ import annotations

from typing import Any

from memdyn_jax.models.config import ModelConfig, unsupported
from memdyn_jax.models.families import llama
from memdyn_jax.models.registry import LINEAR, Family, KeyRule

ROPE_TYPES = ("default", "longrope")  # those HF's Phi3Config accepts


def config_fields(hf, raw) -> dict[str, Any]:
  window = getattr(hf, "sliding_window", None)
  windows = (int(window) if window else 0,) * hf.num_hidden_layers
  fields = llama.decoder_fields(hf, raw, windows=windows, qkv_bias=False, out_bias=False,
                                partial_rotary=True)
  if fields["rope_type"] not in ROPE_TYPES:
    raise unsupported("rope_scaling.rope_type", fields["rope_type"], f"Phi-3 reads {ROPE_TYPES}")
  # HF's Phi-3 has no biases, whatever `mlp_bias` a config carries (Phi-4-mini's: false).
  return dict(fields, mlp_bias=False)


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
  """Llama's tensor names, with the fused projections split by rows: qkv_proj = q (heads x
  head_dim) | k | v (kv heads x head_dim each); gate_up_proj = gate | up."""
  p = "model.layers.{i}."
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  inner = cfg.intermediate_size
  rules = [KeyRule("model.embed_tokens.weight", "embedding"),
           KeyRule("model.norm.weight", "final_norm.scale")]
  rules += [KeyRule(p + f"{n}.weight", f"blocks.{n}.scale") for n in llama.NORMS]
  rules += [KeyRule(p + "self_attn.qkv_proj.weight", f"blocks.self_attn.{x}_proj.kernel", LINEAR,
                    fused=(q, kv, kv), part=part) for part, x in enumerate("qkv")]
  rules.append(KeyRule(p + "self_attn.o_proj.weight", "blocks.self_attn.o_proj.kernel", LINEAR, 2))
  rules += [KeyRule(p + "mlp.gate_up_proj.weight", f"blocks.mlp.{x}_proj.kernel", LINEAR,
                    fused=(inner, inner), part=part) for part, x in enumerate(("gate", "up"))]
  rules.append(KeyRule(p + "mlp.down_proj.weight", "blocks.mlp.down_proj.kernel", LINEAR))
  if not cfg.tie_word_embeddings:
    rules.append(KeyRule("lm_head.weight", "lm_head.kernel", LINEAR))
  return rules


FAMILY = Family(
    name="phi3",
    model_types={"phi3": "Phi3ForCausalLM"},
    config_fields=config_fields,
    key_rules=key_rules,
    model_class=llama.LlamaForCausalLM,
    tiny_configs={
        # Half of each head rotated, a sliding window shorter than the test sequences, GQA.
        "phi3": dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=3,
                     num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=128,
                     rope_theta=500.0, partial_rotary_factor=0.5, sliding_window=5,
                     tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        # Phi-4-mini's shape of RoPE: 3/4 of each head, LongRoPE (long factors past 8
        # positions: the test sequences run past it), tied embeddings.
        "phi3_longrope": dict(
            model_type="phi3", vocab_size=211, hidden_size=64, intermediate_size=96,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=128, original_max_position_embeddings=8,
            partial_rotary_factor=0.75, tie_word_embeddings=True, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
            rope_scaling={"type": "longrope", "short_factor": [1.0, 1.05, 1.1, 1.2, 1.4, 1.7],
                          "long_factor": [1.0, 1.5, 2.0, 4.0, 8.0, 16.0]}),
    },
)
