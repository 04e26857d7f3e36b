"""Gemma 3 text models (`gemma3_text`: Gemma-3-1B; the larger sizes' checkpoints are
multimodal `gemma3`, not read here, though their text decoders are this architecture, as
the `gemma3-12b` preset plans it): Gemma 2's block and embedding scaling, plus an
RMSNorm(1 + w) over each head's q and k before RoPE, and a RoPE per layer type:
sliding-window (local) layers rotate with `rope_local_base_freq`, unscaled; global ones with
`rope_theta` and the configured scaling (`rope_scaling`, e.g. linear x8). By default 5 local
layers to 1 global (`layer_types`), no soft-capping, `query_pre_attn_scalar`.

Soft-capping as HF computes it: `final_logit_softcapping` caps the logits when set;
`attn_logit_softcapping` is read by HF's config but never applied (transformers 5.25's
`Gemma3Attention` passes no `softcap` to its attention function, eager or fused), so it
changes nothing here either (tests/models/test_parity.py sets it and matches HF).
"""
from __future__ import annotations

from typing import Any

from memdyn_jax.models.config import layer_types, rope_fields, unsupported
from memdyn_jax.models.families import gemma2
from memdyn_jax.models.registry import Family



def config_fields(hf, raw) -> dict[str, Any]:
  if getattr(hf, "use_bidirectional_attention", False):
    raise unsupported("use_bidirectional_attention", True, "causal attention only")
  types = layer_types(hf)
  # HF 5.x keeps one RoPE per layer type ({"sliding_attention": {...}, "full_attention":
  # {...}}, from rope_local_base_freq, rope_theta and rope_scaling). The global one carries
  # the scaling; a local one must be plain (ModelConfig scales with one rope_type).
  ropes = hf.rope_parameters
  local = ropes["sliding_attention"]
  if local.get("rope_type", "default") != "default":
    raise unsupported("rope_parameters.sliding_attention.rope_type", local["rope_type"],
                      "local layers rotate unscaled")
  if local.get("partial_rotary_factor", 1.0) != 1.0:
    raise unsupported("partial_rotary_factor", local["partial_rotary_factor"], "only 1.0")
  rope = rope_fields(hf, raw, params=ropes["full_attention"])
  thetas = tuple(float(local["rope_theta"]) if t == "sliding_attention" else rope["rope_theta"]
                 for t in types)
  return dict(gemma2.config_fields(hf, raw, rope=rope),
              attn_logit_softcap=0.0,  # HF's Gemma 3 never applies it (module docstring)
              qk_norm="head", qk_norm_style="one_plus_scale", layer_rope_thetas=thetas,
              layer_rope_scaled=tuple(t == "full_attention" for t in types))


FAMILY = Family(
    name="gemma3_text",
    model_types={"gemma3_text": "Gemma3ForCausalLM"},
    config_fields=config_fields,
    key_rules=gemma2.key_rules,  # Gemma 2's tensor names, with self_attn.{q,k}_norm
    model_class=gemma2.Gemma2ForCausalLM,
    # The 5 local : 1 global pattern with a window shorter than the test sequences, local
    # and global RoPE bases far apart and a scaled global RoPE (so a layer given the other
    # layer type's RoPE shows in the logits), query_pre_attn_scalar, GQA.
    tiny_configs={
        "gemma3_text": dict(vocab_size=211, hidden_size=48, intermediate_size=80,
                            num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                            head_dim=16, max_position_embeddings=128, sliding_window=5,
                            query_pre_attn_scalar=24, rope_theta=10000.0,
                            rope_local_base_freq=20.0,
                            rope_scaling={"rope_type": "linear", "factor": 4.0}),
    },
)
