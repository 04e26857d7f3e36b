"""The model FLOP count: matmul FLOPs of the decoder, the LM head and attention, for MFU
figures (benchmarks, `memdyn_jax.plan`). Counts multiply-adds as 2 FLOPs, as MFU is
conventionally quoted (PaLM, App. B); norms, rotary embeddings and softmax are left out."""
from __future__ import annotations

from memdyn_jax.models.config import ModelConfig


def decoder_flops_per_token(cfg: ModelConfig) -> int:
  """Matmul FLOPs of one token through the decoder layers: the q, k, v, o projections and
  the gated MLP's three matrices; in a mixture of experts the router and the three matrices
  of the `num_experts_per_tok` experts the token reaches (the model's FLOPs: the dense
  expert path, `models.moe`, computes every expert). Attention scores and the LM head are
  counted apart (`attention_flops`, `lm_head_flops_per_token`) since not every position
  pays for them."""
  h, d = cfg.hidden_size, cfg.head_dim
  if cfg.is_moe:
    mlp = 2 * h * cfg.num_experts + 6 * h * cfg.moe_intermediate_size * cfg.num_experts_per_tok
  else:
    mlp = 6 * h * cfg.intermediate_size
  per_layer = 2 * h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + mlp
  return cfg.num_layers * per_layer


def lm_head_flops_per_token(cfg: ModelConfig) -> int:
  """Matmul FLOPs of one position's logits."""
  return 2 * cfg.hidden_size * cfg.vocab_size


def attention_flops(cfg: ModelConfig, query_key_pairs: float) -> float:
  """FLOPs of attention (scores q.k and the weighted sum of values) over `query_key_pairs`
  (query, key) pairs in every layer: T * (T + 1) / 2 for a causal pass over T tokens, the
  context length for one decode step."""
  return cfg.num_layers * 4 * cfg.num_heads * cfg.head_dim * query_key_pairs


def forward_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one causal forward pass over `batch` sequences of `seq_len` tokens, the
  LM head at every position."""
  per_sequence = (seq_len * (decoder_flops_per_token(cfg) + lm_head_flops_per_token(cfg))
                  + attention_flops(cfg, seq_len * (seq_len + 1) / 2))
  return batch * per_sequence


def train_flops(cfg: ModelConfig, batch: int, seq_len: int) -> float:
  """Model FLOPs of one training step (forward + backward = 3 forwards), the figure MFU
  divides by: recomputation under remat is not counted (that would be hardware FLOPs)."""
  return 3 * forward_flops(cfg, batch, seq_len)
