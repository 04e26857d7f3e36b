"""The model FLOP count (MFU's numerator) against a hand count."""
from memdyn_jax import models
from memdyn_jax.models import flops


def test_flops_of_a_tiny_llama_by_hand():
  cfg = models.from_hf_config(dict(model_type="llama", vocab_size=100, hidden_size=16,
                                   intermediate_size=24, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=2))
  # q, o: 16x16 each; k, v: 16x8 each; gate, up, down: 16x24 each; 2 FLOPs per weight.
  per_layer = 2 * (2 * 16 * 16 + 2 * 16 * 8 + 3 * 16 * 24)
  assert flops.decoder_flops_per_token(cfg) == 3 * per_layer
  assert flops.lm_head_flops_per_token(cfg) == 2 * 16 * 100
  # scores and weighted values: 2 matmuls of 2 FLOPs per (query, key) pair per head dim.
  assert flops.attention_flops(cfg, 10) == 3 * 4 * 4 * 4 * 10
  t = 5
  forward = t * (3 * per_layer + 3200) + flops.attention_flops(cfg, t * (t + 1) / 2)
  assert flops.forward_flops(cfg, 2, t) == 2 * forward
  assert flops.train_flops(cfg, 2, t) == 3 * 2 * forward
