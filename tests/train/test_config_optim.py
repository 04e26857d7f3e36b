"""TrainConfig validation, presets, schedules (closed forms) and optimizer builders."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memdyn_jax.train import config as config_lib
from memdyn_jax.train import optim
from memdyn_jax.train.config import ConfigError, TrainConfig


def test_defaults_valid_and_json_round_trip():
  cfg = TrainConfig(lora_target_modules=["q_proj"])
  assert cfg.lora_target_modules == ("q_proj",)
  again = TrainConfig.from_dict(__import__("json").loads(cfg.to_json()))
  assert again == cfg
  assert cfg.diff(cfg.replace(learning_rate=1.0)) == {"learning_rate": (2e-5, 1.0)}


@pytest.mark.parametrize("field,value", [
    ("optimizer", "lion"), ("schedule", "step"), ("global_batch_size", 0),
    ("warmup_ratio", 1.5), ("data_fraction", 0.0), ("compute_dtype", "float16"),
    ("sampler", "random"), ("lora_dropout", 1.0), ("reweight_p", 1.0),
])
def test_bad_values_name_the_field(field, value):
  with pytest.raises(ConfigError) as e:
    TrainConfig(**{field: value})
  assert e.value.field == field


def test_micro_batch_must_divide_and_weight_decay_needs_adamw():
  with pytest.raises(ConfigError, match="micro_batch_size"):
    TrainConfig(global_batch_size=128, micro_batch_size=48)
  assert TrainConfig(global_batch_size=128, micro_batch_size=32).accumulation_steps == 4
  with pytest.raises(ConfigError, match="weight_decay"):
    TrainConfig(optimizer="adam", weight_decay=0.1)
  with pytest.raises(ConfigError, match="nope"):
    TrainConfig().replace(nope=1)


def test_total_steps_epochs_fraction_and_full_epoch_equivalent():
  cfg = TrainConfig(global_batch_size=128, num_epochs=3)
  assert cfg.total_steps(7473) == math.ceil(3 * 7473 / 128)
  half = cfg.replace(data_fraction=0.5, num_epochs=6)
  assert half.total_steps(7473) == math.ceil(6 * 3736 / 128)
  kang_half = half.replace(train_steps_as_full_epochs=3.0)
  assert kang_half.total_steps(7473) == cfg.total_steps(7473)
  assert cfg.replace(max_steps=7).total_steps(7473) == 7


def test_schedule_notes_say_when_batches_repeat_or_epochs_round():
  assert TrainConfig(global_batch_size=16, num_epochs=2).schedule_notes(64) == []
  notes = TrainConfig(global_batch_size=16, num_epochs=2).schedule_notes(25)
  assert notes == ["num_epochs 2 of 25 examples in batches of 16 rounds up to 4 steps = "
                   "2.56 epochs"]
  small = TrainConfig(global_batch_size=16, num_epochs=1).schedule_notes(8)
  assert small[0].startswith("global_batch_size 16 exceeds the 8 training examples")
  assert len(small) == 2  # and 1 step of 16 is 2 epochs of 8
  assert TrainConfig(global_batch_size=16, max_steps=3).schedule_notes(8) == [small[0]]


def test_schedule_notes_say_when_the_warmup_spans_the_run():
  """The walk's preset warmup of 20 steps in a 4-step run trained without ever reaching the
  peak rate, silently."""
  cfg = config_lib.get_preset("kang_llama3_gsm8k", global_batch_size=6, num_epochs=2)
  assert cfg.total_steps(12) == 4
  assert cfg.schedule_notes(12) == [
      "warmup_steps 20 spans the whole 4-step run: the learning rate rises to 1.5e-05 at "
      "most, never its peak learning_rate 2e-05 (lower the warmup)"]
  assert float(optim.make_schedule(cfg, 4)(3)) == pytest.approx(1.5e-5)  # what it says
  assert cfg.replace(warmup_steps=3).schedule_notes(12) == []  # the peak at the last step
  assert TrainConfig(global_batch_size=6, max_steps=2, warmup_ratio=0.5).schedule_notes(12) == []
  ratio = TrainConfig(global_batch_size=6, max_steps=1, warmup_ratio=0.5).schedule_notes(12)
  assert ratio[0].startswith("warmup_ratio 0.5 spans the whole 1-step run")


def test_presets_match_the_papers():
  g = config_lib.get_preset("kang_llama3_gsm8k")
  assert (g.optimizer, g.schedule, g.warmup_steps, g.global_batch_size, g.max_grad_norm,
          g.weight_decay) == ("adamw", "linear", 20, 128, 2.0, 0.01)
  m = config_lib.get_preset("kang_llama3_math")
  assert (m.global_batch_size, m.weight_decay) == (24, 0.0)
  gem = config_lib.get_preset("kang_gemma2_gsm8k")
  assert (gem.optimizer, gem.schedule, gem.warmup_ratio, gem.global_batch_size,
          gem.max_grad_norm) == ("adam", "cosine", 0.1, 32, 1.0)
  ge = config_lib.get_preset("ge_gptneo_sft")
  assert (ge.beta1, ge.beta2, ge.weight_decay, ge.warmup_steps, ge.num_epochs) == (
      0.9, 0.999, 0.0, 0, 15.0)
  assert {c.learning_rate for c in config_lib.preset_grid("ge_gptneo_sft")} == {1e-5, 5e-5}
  cur = config_lib.get_preset("curation_default")
  assert (cur.learning_rate, cur.num_epochs, cur.global_batch_size) == (2e-5, 3.0, 128)
  grid = config_lib.preset_grid("kang_llama3_gsm8k")
  assert len(grid) == 13
  assert {c.learning_rate for c in grid} == {5e-7, 2e-5, 5e-5, 2e-4}
  assert {c.num_epochs for c in grid if c.data_fraction == 1} == {1, 3, 6}
  quarter = [c for c in grid if c.data_fraction == 0.25]
  assert len(quarter) == 1 and quarter[0].num_epochs == 12
  # half / quarter runs train the steps of 3 full epochs.
  full3 = [c for c in grid if c.data_fraction == 1 and c.num_epochs == 3][0]
  assert quarter[0].total_steps(7473) == full3.total_steps(7473)
  assert config_lib.get_preset("kang_llama3_gsm8k", learning_rate=1.0).learning_rate == 1.0
  with pytest.raises(ConfigError, match="preset"):
    config_lib.get_preset("nope")
  assert config_lib.get_preset("none") == TrainConfig()


def _lr(schedule, step):
  return float(schedule(step))


def test_linear_schedule_closed_form():
  total, w, lr = 100, 20, 2e-5
  s = optim.make_schedule(TrainConfig(learning_rate=lr, schedule="linear", warmup_steps=w), total)
  for step in (0, 1, 10, 19):
    assert _lr(s, step) == pytest.approx(lr * step / w, rel=1e-6, abs=1e-12)
  for step in (20, 21, 50, 99, 100):
    assert _lr(s, step) == pytest.approx(lr * (total - step) / (total - w), rel=1e-6, abs=1e-12)
  no_warm = optim.make_schedule(TrainConfig(learning_rate=lr, schedule="linear"), total)
  assert _lr(no_warm, 0) == pytest.approx(lr)
  assert _lr(no_warm, 75) == pytest.approx(lr * 25 / 100)


def test_cosine_schedule_closed_form():
  total, lr = 200, 5e-5
  cfg = TrainConfig(learning_rate=lr, schedule="cosine", warmup_ratio=0.1, optimizer="adam")
  s = optim.make_schedule(cfg, total)
  w = 20
  assert cfg.warmup(total) == w
  for step in (0, 5, 19):
    assert _lr(s, step) == pytest.approx(lr * step / w, rel=1e-6, abs=1e-12)
  for step in (20, 60, 110, 199):
    expect = lr * 0.5 * (1 + math.cos(math.pi * (step - w) / (total - w)))
    assert _lr(s, step) == pytest.approx(expect, rel=1e-5, abs=1e-12)


def test_constant_schedule():
  s = optim.make_schedule(TrainConfig(learning_rate=1e-3, schedule="constant", warmup_steps=4), 50)
  assert [_lr(s, i) for i in (0, 2, 4, 49)] == pytest.approx([0, 5e-4, 1e-3, 1e-3])


def test_decay_mask_skips_biases_and_norms():
  params = {"blocks": {"mlp": {"kernel": jnp.ones((2, 3)), "bias": jnp.ones(3)},
                       "norm": {"scale": jnp.ones(3)}}}
  mask = optim.decay_mask(params)
  assert mask == {"blocks": {"mlp": {"kernel": True, "bias": False}, "norm": {"scale": False}}}


def test_adamw_matches_closed_form_with_clipping():
  cfg = TrainConfig(learning_rate=0.1, schedule="constant", weight_decay=0.5, max_grad_norm=1.0,
                    beta1=0.9, beta2=0.99, eps=1e-8)
  tx = optim.make_optimizer(cfg, 10)
  params = {"w": {"kernel": jnp.array([1.0, -2.0])}, "n": {"scale": jnp.array([3.0])}}
  grads = {"w": {"kernel": jnp.array([3.0, 0.0])}, "n": {"scale": jnp.array([4.0])}}
  updates, _ = tx.update(grads, tx.init(params), params)
  # Clip by the global norm 5 -> g/5; first Adam step: m̂/(sqrt(v̂)+eps) = sign(g).
  np.testing.assert_allclose(updates["w"]["kernel"], [-0.1 * (1 + 0.5 * 1.0), -0.1 * 0.5 * -2.0],
                             rtol=1e-5)
  np.testing.assert_allclose(updates["n"]["scale"], [-0.1], rtol=1e-5)  # no decay on scales


def test_sgd_and_adam_builders_and_global_norm():
  params = {"a": jnp.array([1.0, 1.0])}
  grads = {"a": jnp.array([0.5, -0.5])}
  sgd = optim.make_optimizer(TrainConfig(optimizer="sgd", beta1=0.0, learning_rate=1.0,
                                         schedule="constant", max_grad_norm=0), 3)
  up, _ = sgd.update(grads, sgd.init(params), params)
  np.testing.assert_allclose(up["a"], [-0.5, 0.5])
  adam = optim.make_optimizer(TrainConfig(optimizer="adam", learning_rate=1.0,
                                          schedule="constant", max_grad_norm=0), 3)
  up, _ = adam.update(grads, adam.init(params), params)
  np.testing.assert_allclose(up["a"], [-1.0, 1.0], rtol=1e-4)
  assert float(optim.global_norm({"x": jnp.array([3.0]), "y": jnp.array([[4.0]])})) == 5.0
  assert float(optim.global_norm({})) == 0.0


def test_field_types_cover_every_field():
  types = config_lib.field_types()
  assert types["lora_target_modules"] is tuple and types["learning_rate"] is float
  assert types["append_eos"] is bool and types["global_batch_size"] is int


def test_schedule_lives_in_the_optimizer_state():
  """Runs differing in learning rate or length lower to the same program (one compilation
  per sweep), and the state's schedule reproduces `make_schedule` step by step."""
  params = {"w": {"kernel": jnp.ones((3, 2))}}
  grads = {"w": {"kernel": jnp.full((3, 2), 0.5)}}

  def lowered(cfg, total):
    tx = optim.make_optimizer(cfg, total)
    return jax.jit(tx.update).lower(grads, tx.init(params), params).as_text()

  a = TrainConfig(learning_rate=1e-3, schedule="cosine", warmup_ratio=0.1, max_grad_norm=0)
  assert lowered(a, 100) == lowered(a.replace(learning_rate=4e-3), 37)
  assert lowered(a, 100) != lowered(a.replace(schedule="linear"), 100)
  sgd = TrainConfig(optimizer="sgd", beta1=0.0, learning_rate=0.5, schedule="linear",
                    warmup_steps=2, max_grad_norm=0)
  tx, schedule = optim.make_optimizer(sgd, 6), optim.make_schedule(sgd, 6)
  state = tx.init(params)
  for step in range(6):
    updates, state = tx.update(grads, state, params)
    np.testing.assert_allclose(updates["w"]["kernel"], -0.5 * _lr(schedule, step), rtol=1e-6)
