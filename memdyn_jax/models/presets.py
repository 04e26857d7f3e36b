"""Architectures of the papers' base models (and a few others), as their published HF
`config.json` values.

Only the architecture is here (no weights, nothing downloaded): enough to build an
abstract model for memory planning (`memdyn_jax.plan`). Values are copied from each
model's `config.json` on the Hugging Face hub; fields that do not change the computation
(`architectures`, `torch_dtype`, `initializer_range`, dropout rates, ...) are left out.
"""
from __future__ import annotations

import copy
from typing import Any

from memdyn_jax.models.config import ModelConfig
from memdyn_jax.models.registry import from_hf_config

# meta-llama/Meta-Llama-3-8B
_LLAMA3_8B = {
    "model_type": "llama",
    "vocab_size": 128256,
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-05,
    "rope_theta": 500000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
}

# google/gemma-2-9b
_GEMMA2_9B = {
    "model_type": "gemma2",
    "vocab_size": 256000,
    "hidden_size": 3584,
    "intermediate_size": 14336,
    "num_hidden_layers": 42,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 8192,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 4096,
    "attn_logit_softcapping": 50.0,
    "final_logit_softcapping": 30.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

# deepseek-ai/deepseek-math-7b-base (a Llama architecture with multi-head attention)
_DEEPSEEK_MATH_7B = {
    "model_type": "llama",
    "vocab_size": 102400,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 30,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "pretraining_tp": 1,
    "tie_word_embeddings": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}

# Qwen/Qwen2.5-7B
_QWEN25_7B = {
    "model_type": "qwen2",
    "vocab_size": 152064,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "sliding_window": 131072,
    "use_sliding_window": False,
    "max_window_layers": 28,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}

# EleutherAI/gpt-neo-2.7B
_GPT_NEO_27B = {
    "model_type": "gpt_neo",
    "vocab_size": 50257,
    "hidden_size": 2560,
    "intermediate_size": None,
    "num_layers": 32,
    "num_heads": 20,
    "attention_types": [[["global", "local"], 16]],
    "window_size": 256,
    "activation_function": "gelu_new",
    "max_position_embeddings": 2048,
    "layer_norm_epsilon": 1e-05,
    "bos_token_id": 50256,
    "eos_token_id": 50256,
}

# Qwen/Qwen3-8B
_QWEN3_8B = {
    "model_type": "qwen3",
    "vocab_size": 151936,
    "hidden_size": 4096,
    "intermediate_size": 12288,
    "num_hidden_layers": 36,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_scaling": None,
    "attention_bias": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 36,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

# google/gemma-3-12b-pt: the `text_config` of its config.json (model_type "gemma3", a
# multimodal checkpoint: the SigLIP vision tower and projector are not modelled here), with
# the top-level token ids.
_GEMMA3_12B = {
    "model_type": "gemma3_text",
    "vocab_size": 262208,
    "hidden_size": 3840,
    "intermediate_size": 15360,
    "num_hidden_layers": 48,
    "num_attention_heads": 16,
    "num_key_value_heads": 8,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "max_position_embeddings": 131072,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000,
    "rope_local_base_freq": 10000,
    "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
    "attention_bias": False,
    "query_pre_attn_scalar": 256,
    "sliding_window": 1024,
    "sliding_window_pattern": 6,
    "attn_logit_softcapping": None,
    "final_logit_softcapping": None,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "pad_token_id": 0,
}

# allenai/OLMo-2-1124-7B
_OLMO2_7B = {
    "model_type": "olmo2",
    "vocab_size": 100352,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "hidden_act": "silu",
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-06,
    "rope_theta": 500000,
    "rope_scaling": None,
    "attention_bias": False,
    "tie_word_embeddings": False,
    "eos_token_id": 100257,
    "pad_token_id": 100277,
}

# microsoft/Phi-4-mini-instruct (not a paper's model: a planning preset of the phi3 family).
# Values of its config.json (transformers 4.45.0) as a public test fixture quotes it in full
# for a 4-bit MLX conversion (its quantisation fields dropped here); one LongRoPE factor per
# rotated frequency (96 of 128 head dims: 48).
_PHI4_MINI = {
    "model_type": "phi3",
    "vocab_size": 200064,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "num_hidden_layers": 32,
    "num_attention_heads": 24,
    "num_key_value_heads": 8,
    "hidden_act": "silu",
    "max_position_embeddings": 131072,
    "original_max_position_embeddings": 4096,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "partial_rotary_factor": 0.75,
    "rope_scaling": {
        "type": "longrope",
        "long_factor": [
            1, 1.118320672, 1.250641126, 1.398617824, 1.564103225, 1.74916897, 1.956131817,
            2.187582649, 2.446418898, 2.735880826, 3.059592084, 3.421605075, 3.826451687,
            4.279200023, 4.785517845, 5.351743533, 5.984965424, 6.693110555, 7.485043894,
            8.370679318, 9.36110372, 10.4687158, 11.70738129, 13.09260651, 14.64173252,
            16.37415215, 18.31155283, 20.47818807, 22.90118105, 25.61086418, 28.64115884,
            32.03, 32.1, 32.13, 32.23, 32.6, 32.61, 32.64, 32.66, 32.7, 32.71, 32.93, 32.97,
            33.28, 33.49, 33.5, 44.16, 47.77],
        "short_factor": [1.0] * 48,
    },
    "sliding_window": 262144,
    "attention_bias": False,
    "mlp_bias": False,
    "tie_word_embeddings": True,
    "bos_token_id": 199999,
    "eos_token_id": 200020,
    "pad_token_id": 199999,
}

# Qwen/Qwen3-30B-A3B (not a paper's model: the smallest published Qwen3 MoE, a planning preset
# of the qwen3_moe family): 128 experts of width 768 on every layer, 8 per token.
_QWEN3_30B_A3B = {
    "model_type": "qwen3_moe",
    "vocab_size": 151936,
    "hidden_size": 2048,
    "intermediate_size": 6144,
    "moe_intermediate_size": 768,
    "num_hidden_layers": 48,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "hidden_act": "silu",
    "max_position_embeddings": 40960,
    "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0,
    "rope_scaling": None,
    "attention_bias": False,
    "sliding_window": None,
    "use_sliding_window": False,
    "max_window_layers": 48,
    "num_experts": 128,
    "num_experts_per_tok": 8,
    "norm_topk_prob": True,
    "decoder_sparse_step": 1,
    "mlp_only_layers": [],
    "output_router_logits": False,
    "router_aux_loss_coef": 0.001,
    "tie_word_embeddings": False,
    "bos_token_id": 151643,
    "eos_token_id": 151645,
}

HF_CONFIGS: dict[str, dict[str, Any]] = {
    "llama3-8b": _LLAMA3_8B,
    "gemma2-9b": _GEMMA2_9B,
    "deepseek-math-7b": _DEEPSEEK_MATH_7B,
    "qwen2.5-7b": _QWEN25_7B,
    "gpt-neo-2.7b": _GPT_NEO_27B,
    "qwen3-8b": _QWEN3_8B,
    "gemma3-12b": _GEMMA3_12B,
    "olmo2-7b": _OLMO2_7B,
    "phi4-mini": _PHI4_MINI,
    "qwen3-30b-a3b": _QWEN3_30B_A3B,
}

# Parameter counts the model cards / HF `num_parameters()` report: a check on the values.
# The newer cards give rounded sizes only, so their counts are computed from the config
# above (every weight matrix, norm and embedding), checked against what was published:
# - qwen3-8b: the card's "8.2B, non-embedding 6.95B" (6,946,075,648 + 2 x 622,329,856
#   untied embedding / LM head);
# - gemma3-12b: the text decoder only; its non-embedding part, 10,759,151,616, is the Gemma 3
#   technical report's 10,759M (Table 1; the 417M vision encoder is not counted), plus the
#   tied 262,208 x 3,840 embedding;
# - olmo2-7b: the card's "7B" (7.30B; q/k norms over the whole projections included);
# - phi4-mini: the card's "3.8B" (see below);
# - qwen3-30b-a3b: the card's "30.5B in total and 3.3B activated" (activated:
#   `registry.num_active_params`, 3,353,032,704: 8 of the 128 experts, embeddings included).
PUBLISHED_NUM_PARAMS: dict[str, int] = {
    "llama3-8b": 8_030_261_248,
    "gemma2-9b": 9_241_705_984,
    "deepseek-math-7b": 6_910_365_696,
    "qwen2.5-7b": 7_615_616_512,
    "gpt-neo-2.7b": 2_651_307_520,
    "qwen3-8b": 8_190_735_360,
    "gemma3-12b": 11_766_034_176,
    "olmo2-7b": 7_298_617_344,
    # The model card says 3.8B; this is the count of the config above (tied embeddings
    # 200064 x 3072, 32 layers of 100,669,440, the final norm), as HF's `num_parameters()`
    # of `Phi3ForCausalLM` built from it (on the meta device) gives it.
    "phi4-mini": 3_836_021_760,
    # As HF's `num_parameters()` of `Qwen3MoeForCausalLM` built from the config above (on
    # the meta device) gives it: untied 151936 x 2048 embedding and LM head, 48 layers of
    # attention, q/k norms, router and 128 experts of 3 x 2048 x 768.
    "qwen3-30b-a3b": 30_532_122_624,
}

# The hub ids of the presets' models: what a command's --model names (launch/ sizes their
# checkpoints from these architectures without downloading anything).
HUB_IDS: dict[str, str] = {
    "meta-llama/Meta-Llama-3-8B": "llama3-8b",
    "google/gemma-2-9b": "gemma2-9b",
    "deepseek-ai/deepseek-math-7b-base": "deepseek-math-7b",
    "Qwen/Qwen2.5-7B": "qwen2.5-7b",
    "EleutherAI/gpt-neo-2.7B": "gpt-neo-2.7b",
    "Qwen/Qwen3-8B": "qwen3-8b",
    "allenai/OLMo-2-1124-7B": "olmo2-7b",
    "microsoft/Phi-4-mini-instruct": "phi4-mini",
    "Qwen/Qwen3-30B-A3B": "qwen3-30b-a3b",
    # (google/gemma-3-12b-pt is a multimodal "gemma3" checkpoint, which from_pretrained does
    # not read: gemma3-12b is for planning its text decoder only.)
}


def preset_names() -> list[str]:
  """Names accepted by `preset_config` / `preset_hf_config`."""
  return sorted(HF_CONFIGS)


def preset_hf_config(name: str) -> dict[str, Any]:
  """A fresh copy of preset `name`'s HF `config.json` dict."""
  if name not in HF_CONFIGS:
    raise ValueError(f"unknown model preset {name!r}; known: {preset_names()}")
  return copy.deepcopy(HF_CONFIGS[name])


def preset_config(name: str) -> ModelConfig:
  """The `ModelConfig` of preset `name` (via `from_hf_config`, as a real checkpoint's is)."""
  return from_hf_config(preset_hf_config(name))
