"""Loss normalization, per-example perplexity, and the jitted train step."""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memdyn_jax import models
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.train import loss as loss_lib
from memdyn_jax.train import optim
from memdyn_jax.train import step as step_lib
from memdyn_jax.train.config import TrainConfig

TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False)


def tiny_model(dtype=jnp.float32):
  return models.build_model(models.from_hf_config(TINY), dtype=dtype, param_dtype=jnp.float32,
                            seed=0)


def tiny_batch(n=8, t=16, seed=0):
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 64, (n, t)).astype(np.int32)
  attn = np.ones((n, t), np.int32)
  tgt = np.zeros((n, t), np.int32)
  for i in range(n):  # varied prompt / target / padding lengths
    p, end = 3 + i % 4, t - (i % 3)
    tgt[i, p:end] = 1
    attn[i, end:] = 0
  return dict(input_ids=ids, attention_mask=attn, target_mask=tgt)


def _ref_nll(logits, ids, tgt):
  logits = np.asarray(logits, np.float64)
  out = np.zeros(ids.shape[0])
  for b in range(ids.shape[0]):
    for t in range(1, ids.shape[1]):
      if tgt[b, t]:
        row = logits[b, t - 1]
        out[b] += np.log(np.exp(row - row.max()).sum()) + row.max() - row[ids[b, t]]
  return out


def test_loss_normalization_and_weights_match_reference():
  rng = np.random.RandomState(1)
  b = tiny_batch()
  logits = rng.randn(8, 16, 64).astype(np.float32)
  per_row = _ref_nll(logits, b["input_ids"], b["target_mask"])
  n_tok = b["target_mask"][:, 1:].sum()
  got = loss_lib.masked_mean_loss(logits, b["input_ids"], b["target_mask"])
  assert float(got) == pytest.approx(per_row.sum() / n_tok, rel=1e-5)
  w = rng.rand(8).astype(np.float32)
  got_w = loss_lib.masked_mean_loss(logits, b["input_ids"], b["target_mask"], w)
  # Weights scale rows; the denominator stays the unweighted token count.
  assert float(got_w) == pytest.approx((w * per_row).sum() / n_tok, rel=1e-5)
  counts = b["target_mask"][:, 1:].sum(1)
  ppl = loss_lib.example_perplexity(logits, b["input_ids"], b["target_mask"])
  np.testing.assert_allclose(ppl, np.exp(per_row / counts), rtol=1e-5)
  # Position 0 is never predicted; a row with no target token has perplexity 1, loss 0.
  empty = np.zeros_like(b["target_mask"])
  empty[:, 0] = 1
  assert float(loss_lib.num_target_tokens(empty)) == 0
  assert float(loss_lib.masked_mean_loss(logits, b["input_ids"], empty)) == 0
  np.testing.assert_allclose(loss_lib.example_perplexity(logits, b["input_ids"], empty), 1.0)


def test_microbatch_layout_and_sharding():
  x = np.arange(24).reshape(8, 3)
  mb = step_lib.to_microbatches({"x": x, "w": np.arange(8)}, 4)
  assert mb["x"].shape == (4, 2, 3) and (mb["x"][1] == x[2:4]).all()
  assert (mb["w"][3] == [6, 7]).all()
  with pytest.raises(ValueError, match="micro-batches"):
    step_lib.to_microbatches({"x": x}, 3)
  mesh = sharding_lib.make_mesh()
  s = step_lib.microbatch_sharding(mesh, 3)
  arr = sharding_lib.put_global(mb["x"], s)
  np.testing.assert_array_equal(np.asarray(arr), mb["x"])
  assert s.spec[0] is None


def _run_steps(cfg, batch, n_steps, dtype=jnp.float32):
  model = tiny_model(dtype)
  graphdef, trained, rngs, frozen = step_lib.split_model(model)
  tx = optim.make_optimizer(cfg, 50)
  opt_state = tx.init(trained)
  fn = step_lib.make_train_step(graphdef, tx)
  host = dict(batch, weights=np.ones(len(batch["input_ids"]), np.float32))
  mb = step_lib.to_microbatches(host, cfg.accumulation_steps)
  losses, norms = [], []
  for s in range(n_steps):
    trained, opt_state, rngs, m = fn(trained, opt_state, rngs, frozen, mb, jnp.int32(s))
    assert bool(m["finite"])
    losses.append(float(m["loss"]))
    norms.append(float(m["grad_norm"]))
  return losses, norms, graphdef, trained, rngs, frozen


def test_step_accumulation_is_exact_and_loss_falls():
  batch = tiny_batch()
  cfg = TrainConfig(learning_rate=1e-2, schedule="constant", global_batch_size=8,
                    max_grad_norm=1.0)
  l1, n1, graphdef, trained1, rngs, frozen = _run_steps(cfg, batch, 25)
  l4, n4, _, trained4, _, _ = _run_steps(cfg.replace(micro_batch_size=2), batch, 25)
  # Micro-batches of unequal token counts still give the global-batch mean.
  np.testing.assert_allclose(l1[:3], l4[:3], rtol=1e-5)
  np.testing.assert_allclose(n1[:3], n4[:3], rtol=1e-5)
  # The reported loss is the full-batch loss before the update.
  model0 = tiny_model()
  logits = model0(batch["input_ids"], batch["attention_mask"])
  ref = loss_lib.masked_mean_loss(logits, batch["input_ids"], batch["target_mask"])
  assert l1[0] == pytest.approx(float(ref), rel=1e-5)
  # A tiny set is memorized.
  assert l1[-1] < 0.3 * l1[0]
  # The perplexity function agrees with the loss module on the trained model.
  ppl = step_lib.make_perplexity_fn(graphdef)(trained1, rngs, frozen, batch["input_ids"],
                                              batch["attention_mask"], batch["target_mask"])
  model = nnx.merge(graphdef, trained1, rngs, frozen)
  ref_ppl = loss_lib.example_perplexity(model(batch["input_ids"], batch["attention_mask"]),
                                        batch["input_ids"], batch["target_mask"])
  np.testing.assert_allclose(ppl, ref_ppl, rtol=1e-5)


def test_bf16_compute_keeps_fp32_master_weights():
  batch = tiny_batch()
  cfg = TrainConfig(learning_rate=1e-2, schedule="constant", global_batch_size=8,
                    compute_dtype="bfloat16")
  losses, _, _, trained, _, _ = _run_steps(cfg, batch, 3, dtype=jnp.bfloat16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(trained))
  assert losses[-1] < losses[0]


def _moe_config(**overrides):
  from memdyn_jax import testing
  hf = dict(testing.TINY_CONFIGS["qwen3_moe"], model_type="qwen3_moe", vocab_size=64,
            **overrides)
  return models.from_hf_config(hf)


def test_router_aux_coefficient_follows_hf_unless_told():
  on = _moe_config()  # the tiny config sets output_router_logits: HF adds it (0.01)
  off = _moe_config(output_router_logits=False)
  assert loss_lib.router_aux_coefficient("hf", on) == 0.01
  assert loss_lib.router_aux_coefficient("hf", off) == 0.0
  assert loss_lib.router_aux_coefficient("on", off) == 0.01
  assert loss_lib.router_aux_coefficient("off", on) == 0.0
  assert loss_lib.router_aux_coefficient("on", models.from_hf_config(TINY)) == 0.0  # dense
  with pytest.raises(ValueError, match="router_aux_loss"):
    TrainConfig(router_aux_loss="always")


def test_moe_step_adds_the_load_balancing_loss():
  """A train step of a mixture of experts with the load-balancing term, 2 micro-batches:
  the metric is the mean of the micro-batches' losses (each that of its own forward, as
  HF's), the gradient that of loss + c * aux, and steps run (and learn) with it."""
  from memdyn_jax.models import moe
  coef = 0.5  # large, so its gradient shows
  cfg = TrainConfig(learning_rate=1e-2, schedule="constant", global_batch_size=8,
                    micro_batch_size=4, max_grad_norm=0.0)
  batch = tiny_batch()
  host = dict(batch, weights=np.ones(8, np.float32))
  mb = step_lib.to_microbatches(host, cfg.accumulation_steps)
  model = models.build_model(_moe_config(), seed=0)
  graphdef, trained, rngs, frozen = step_lib.split_model(model)
  tx = optim.make_optimizer(cfg, 50)
  step = step_lib.make_train_step(graphdef, tx, router_aux_loss_coef=coef, donate=False)
  trained1, _, _, m = step(trained, tx.init(trained), rngs, frozen, mb, jnp.int32(0))

  # the reference: per micro-batch, the loss and the aux loss of a plain forward
  def objective(model):
    lm, aux = 0.0, 0.0
    denom = loss_lib.num_target_tokens(batch["target_mask"])
    for a in range(cfg.accumulation_steps):
      logits, stats = model.logits_and_router_stats(mb["input_ids"][a], mb["attention_mask"][a])
      lm += loss_lib.weighted_nll_sum(logits, mb["input_ids"][a], mb["target_mask"][a]) / denom
      aux += moe.load_balancing_loss(stats, model.cfg.num_experts) / cfg.accumulation_steps
    return lm + coef * aux, (lm, aux)

  (_, (lm, aux)), grads = nnx.jit(nnx.value_and_grad(objective, has_aux=True))(model)
  assert float(m["loss"]) == pytest.approx(float(lm), rel=1e-5)
  assert float(m["router_aux_loss"]) == pytest.approx(float(aux), rel=1e-5)
  assert float(m["grad_norm"]) == pytest.approx(float(optim.global_norm(grads)), rel=1e-4)
  # the router's update differs from a step without the term
  plain = step_lib.make_train_step(graphdef, tx, donate=False)
  trained0, _, _, m0 = plain(trained, tx.init(trained), rngs, frozen, mb, jnp.int32(0))
  assert "router_aux_loss" not in m0 and float(m0["loss"]) == float(m["loss"])
  router = lambda t: np.asarray(t["blocks"]["mlp"]["router"]["kernel"][...])
  assert np.abs(router(trained1) - router(trained0)).max() > 0
  losses = [float(m["loss"])]
  opt_state = tx.init(trained1)
  for s in range(1, 4):
    trained1, opt_state, rngs, m = step(trained1, opt_state, rngs, frozen, mb, jnp.int32(s))
    assert bool(m["finite"])
    losses.append(float(m["loss"]))
  assert losses[-1] < losses[0]


def test_moe_training_run_logs_the_load_balancing_loss(tmp_path):
  """`train.loop.train` of a qwen3_moe checkpoint: the tiny config has HF add the loss
  (output_router_logits), so the run weighs it in and logs it; "off" logs none."""
  import json

  from memdyn_jax import testing
  from memdyn_jax.train import loop

  src = testing.save_tiny_hf_model("qwen3_moe", str(tmp_path / "moe"), vocab_size=64)
  b = tiny_batch()
  data = loop.TrainData(b["input_ids"], b["attention_mask"], b["target_mask"])
  cfg = TrainConfig(learning_rate=1e-2, schedule="constant", global_batch_size=4,
                    max_steps=2, micro_batch_size=2)
  for mode, logged in (("hf", True), ("off", False)):
    run = str(tmp_path / mode)
    result = loop.train(cfg.replace(router_aux_loss=mode), data, src, run, progress=False,
                        async_checkpoints=False)
    assert result.step == 2
    records = [json.loads(line) for line in open(os.path.join(run, "metrics.jsonl"))]
    assert [("router_aux_loss" in r) for r in records] == [logged] * 2
    if logged:
      assert all(r["router_aux_loss"] > 0.9 for r in records)  # ~1 when balanced
