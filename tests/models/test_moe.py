"""The mixture of experts (`models.moe`, family qwen3_moe) against HF PyTorch: routing, both
expert computations (sorted ragged_dot dispatch, dense), the load-balancing loss, HF's fused
expert checkpoints, the config fields we refuse, and active parameters / FLOPs.

(Logit parity of the whole model on the default path is in test_parity.py; sharding in
test_sharding.py; the train step with the loss in tests/train/test_loss_step.py.)
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from memdyn_jax import models, testing
from memdyn_jax.models import flops, hf_io, moe, registry
from memdyn_jax.models.families import qwen3_moe

BATCH, LENGTH, PADS = 3, 13, (0, 4, 9)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """(hf model, our model, config) of the tiny qwen3_moe config."""
  out = tmp_path_factory.mktemp("qwen3_moe")
  hf = testing.make_hf_model(testing.hf_config("qwen3_moe"), seed=1)
  hf.save_pretrained(out)
  model, cfg = models.from_pretrained(str(out))
  return hf, model, cfg


def _hf_forward(hf, ids, mask, positions):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions, dtype=torch.long), output_router_logits=True)


def _our_moe_from_hf(block, cfg, impl):
  """A `SparseMoE` holding the weights of HF's `Qwen3MoeSparseMoeBlock` `block`."""
  ours = moe.SparseMoE(cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts,
                       cfg.num_experts_per_tok, norm_topk_prob=cfg.norm_topk_prob,
                       act=cfg.hidden_act, impl=impl, rngs=nnx.Rngs(0))
  gate_up = block.experts.gate_up_proj.detach().numpy()  # (E, 2I, H)
  inner = cfg.moe_intermediate_size
  ours.router.kernel[...] = jnp.asarray(block.gate.weight.detach().numpy().T)
  ours.gate_proj[...] = jnp.asarray(np.swapaxes(gate_up[:, :inner], 1, 2))
  ours.up_proj[...] = jnp.asarray(np.swapaxes(gate_up[:, inner:], 1, 2))
  ours.down_proj[...] = jnp.asarray(np.swapaxes(block.experts.down_proj.detach().numpy(), 1, 2))
  return ours


@pytest.mark.parametrize("norm_topk_prob", [True, False])
@pytest.mark.parametrize("impl", ["ragged", "dense"])
def test_sparse_block_routes_and_computes_as_hf(tiny, impl, norm_topk_prob):
  """One MoE layer on random hidden states: HF's router picks the same experts with the same
  weights, and both expert computations give HF's `Qwen3MoeSparseMoeBlock` output."""
  hf, _, cfg = tiny
  block = hf.model.layers[1].mlp
  block.gate.norm_topk_prob = norm_topk_prob
  x = torch.randn(4, 7, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
  with torch.no_grad():
    _, hf_weights, hf_ids = block.gate(x.reshape(-1, cfg.hidden_size))
    ref = block(x).numpy()
  block.gate.norm_topk_prob = cfg.norm_topk_prob
  ours = _our_moe_from_hf(block, cfg, impl)
  ours.norm_topk_prob = norm_topk_prob
  _, weights, ids = ours.route(jnp.asarray(x.numpy()))
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1, cfg.num_experts_per_tok),
                                hf_ids.numpy())
  np.testing.assert_allclose(np.asarray(weights).reshape(-1, cfg.num_experts_per_tok),
                             hf_weights.numpy(), atol=1e-6)
  out, stats = ours(jnp.asarray(x.numpy()))
  assert stats is None
  worst, scale = float(np.abs(np.asarray(out) - ref).max()), float(np.abs(ref).max())
  print(f"qwen3_moe layer ({impl}, norm_topk_prob={norm_topk_prob}): worst |diff| vs HF = "
        f"{worst:.2e} (outputs up to {scale:.2e})")
  assert worst <= 1e-5 * scale


def test_sorted_dispatch_logits_match_hf_forward_and_kv_cache(tiny):
  """The whole model with the ragged_dot experts (the TPU/GPU path; CPU runs the dense ones
  by default): HF's logits on a left-padded batch, forward and prefill + decode."""
  hf, model, cfg = tiny
  moe.set_moe_impl(model, "ragged")
  try:
    ids, mask, positions = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
    ref = _hf_forward(hf, ids, mask, positions).logits.numpy()
    real = mask.astype(bool)
    ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    forward = float(np.abs(ours - ref)[real].max())
    cache = model.init_cache(BATCH, LENGTH + 2)
    logits, cache = model.forward_with_cache(jnp.asarray(ids[:, :9]), jnp.asarray(mask[:, :9]),
                                             cache)
    outs = [np.asarray(logits)]
    for t in range(9, LENGTH):
      logits, cache = model.forward_with_cache(jnp.asarray(ids[:, t:t + 1]),
                                               jnp.asarray(mask[:, t:t + 1]), cache)
      outs.append(np.asarray(logits))
    cached = float(np.abs(np.concatenate(outs, axis=1) - ref)[real].max())
  finally:
    moe.set_moe_impl(model, "auto")
  print(f"qwen3_moe (ragged): worst |logit diff| vs HF = {forward:.2e} forward, "
        f"{cached:.2e} KV cache")
  assert forward <= 1e-4 and cached <= 1e-4


def test_auto_picks_ragged_on_accelerators_dense_on_cpu():
  assert moe.choose_moe_impl("auto", "cpu") == "dense"
  assert moe.choose_moe_impl("auto", "tpu") == moe.choose_moe_impl("auto", "gpu") == "ragged"
  assert moe.choose_moe_impl("dense", "tpu") == "dense"
  with pytest.raises(ValueError, match="moe impl"):
    moe.choose_moe_impl("sparse", "cpu")


@pytest.mark.parametrize("with_mask", [True, False])
def test_load_balancing_loss_matches_hf(tiny, with_mask):
  """HF's `aux_loss` (`load_balancing_loss_func` over every layer's router logits, padding
  excluded by the attention mask) = ours from the router statistics of the same forward."""
  hf, model, cfg = tiny
  ids, mask, positions = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  if not with_mask:
    mask = np.ones_like(mask)
    positions = np.broadcast_to(np.arange(LENGTH), ids.shape)
  ref = float(_hf_forward(hf, ids, mask, positions).aux_loss)
  logits, stats = model.logits_and_router_stats(jnp.asarray(ids), jnp.asarray(mask))
  assert stats.expert_counts.shape == (cfg.num_layers, cfg.num_experts)
  ours = float(moe.load_balancing_loss(stats, cfg.num_experts))
  print(f"qwen3_moe load-balancing loss (mask={with_mask}): ours {ours:.7f}, HF {ref:.7f}")
  assert ours == pytest.approx(ref, rel=1e-5)
  np.testing.assert_array_equal(np.asarray(logits),
                                np.asarray(model(jnp.asarray(ids), jnp.asarray(mask))))
  # every real token's k slots are counted on every layer
  np.testing.assert_allclose(np.asarray(stats.expert_counts).sum(-1),
                             mask.sum() * cfg.num_experts_per_tok)


def test_models_without_routers_have_no_router_stats():
  cfg = models.from_hf_config(dict(testing.TINY_CONFIGS["qwen3"], model_type="qwen3"))
  model = models.build_model(cfg)
  ids = jnp.ones((1, 4), jnp.int32)
  logits, stats = model.logits_and_router_stats(ids)
  assert stats is None
  np.testing.assert_array_equal(logits, model(ids))


def test_router_ties_keep_the_lower_expert():
  """Equal router probabilities (a zero router): `jax.lax.top_k` takes the lowest expert
  indices, in order (the tie rule the module docstring states; torch.topk promises none)."""
  layer = moe.SparseMoE(8, 4, 6, 3, norm_topk_prob=True, act="silu", rngs=nnx.Rngs(0))
  layer.router.kernel[...] = jnp.zeros_like(layer.router.kernel[...])
  _, weights, ids = layer.route(jax.random.normal(jax.random.key(0), (2, 5, 8)))
  np.testing.assert_array_equal(np.asarray(ids), np.broadcast_to([0, 1, 2], (2, 5, 3)))
  np.testing.assert_allclose(np.asarray(weights), 1 / 3, rtol=1e-6)


def test_fused_expert_checkpoint_loads_and_saves_per_expert(tiny, tmp_path):
  """HF's in-memory layout (`save_original_format=False`: experts fused into 3-D
  gate_up_proj / down_proj tensors) loads into the same parameters as the per-expert
  layout; we write the per-expert layout, as HF's save_pretrained does by default."""
  hf, model, cfg = tiny
  hf.save_pretrained(tmp_path / "fused", save_original_format=False)
  names = hf_io.CheckpointReader(str(tmp_path / "fused")).keys()
  assert "model.layers.0.mlp.experts.gate_up_proj" in names
  assert not any(".experts.0." in n for n in names)
  fused, fused_cfg = models.from_pretrained(str(tmp_path / "fused"))
  assert fused_cfg == cfg
  for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(model)),
                                nnx.to_flat_state(nnx.state(fused))):
    assert p1 == p2
    np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]), err_msg=str(p1))
  models.save_pretrained(fused, cfg, str(tmp_path / "out"))
  written = hf_io.CheckpointReader(str(tmp_path / "out")).keys()
  assert "model.layers.1.mlp.experts.7.down_proj.weight" in written
  assert not any("gate_up_proj" in n for n in written)
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").state_dict()
  for k, v in hf.state_dict().items():
    torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
  config = json.load(open(os.path.join(tmp_path / "out", "config.json")))
  assert config["architectures"] == ["Qwen3MoeForCausalLM"]


@pytest.mark.parametrize("overrides,field", [
    (dict(mlp_only_layers=[1]), "mlp_only_layers"),
    (dict(decoder_sparse_step=2), "decoder_sparse_step"),
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_experts=0), "num_experts"),
])
def test_config_values_not_implemented_name_the_field(overrides, field):
  with pytest.raises(ValueError, match=f"config field '{field}'"):
    models.from_hf_config(testing.hf_config("qwen3_moe", **overrides))


def test_config_fields_and_layers_hf_leaves_sparse():
  # an mlp_only_layers entry past the last layer makes no layer dense (HF's rule)
  cfg = models.from_hf_config(testing.hf_config("qwen3_moe", mlp_only_layers=[5]))
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size) == (8, 2, 24)
  assert cfg.norm_topk_prob and cfg.router_aux_loss_in_hf_loss
  assert cfg.router_aux_loss_coef == 0.01 and cfg.qk_norm == "head"
  assert qwen3_moe.dense_layers(testing.hf_config("qwen3_moe", decoder_sparse_step=2)) == [0]


def test_active_parameters_and_flops_count_the_chosen_experts():
  cfg = models.from_hf_config(testing.hf_config("qwen3_moe"))
  h, i, e, k, v = 48, 24, 8, 2, 211
  q, kv = 4 * 16, 2 * 16
  attention = h * (2 * q + 2 * kv) + 2 * 16 + 2 * h  # projections, q/k norms, block norms
  per_layer = attention + h * e + e * 3 * h * i
  assert models.num_params(cfg) == 2 * (per_layer) + 2 * v * h + h
  active_layer = attention + h * e + k * 3 * h * i
  assert registry.num_active_params(cfg) == 2 * active_layer + 2 * v * h + h
  # matmul FLOPs per token: projections, router, the k chosen experts' three matrices
  assert flops.decoder_flops_per_token(cfg) == 2 * 2 * (h * (2 * q + 2 * kv) + h * e
                                                         + k * 3 * h * i)
