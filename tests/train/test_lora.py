"""LoRA adapters: parity at init, only adapters train, merge equals base + scale · A @ B."""
from __future__ import annotations

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from memdyn_jax import models, sharding
from memdyn_jax.models import layers
from memdyn_jax.train import lora

_LLAMA = dict(model_type="llama", vocab_size=64, hidden_size=16, intermediate_size=24,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=32, tie_word_embeddings=False)
_GPT_NEO = dict(model_type="gpt_neo", vocab_size=64, hidden_size=16, num_layers=2, num_heads=4,
                attention_types=[[["global", "local"], 1]], window_size=4,
                max_position_embeddings=32, bos_token_id=1, eos_token_id=2)


@functools.lru_cache(maxsize=None)
def _built(hf_json: str, seed: int):
  return models.build_model(models.from_hf_config(json.loads(hf_json)), seed=seed)


def _model(hf=_LLAMA, seed=0):
  # A fresh copy of a cached build: building (and its compiles) dominates test time.
  return nnx.clone(_built(json.dumps(hf, sort_keys=True), seed))


@nnx.jit
def _forward(model, ids):
  # Jitted so repeated calls on one model structure compile once (eager scan recompiles).
  return model(ids)


def _ids(batch=2, length=7, vocab=64, seed=0):
  return jnp.asarray(np.random.RandomState(seed).randint(0, vocab, (batch, length)))


def _randomize_b(model, seed=1):
  """Non-zero B so the adapters change the output (as after some training)."""
  rng = np.random.default_rng(seed)  # numpy: a jax.random op per shape compiles slowly
  state = nnx.state(model, lora.LoraParam)
  state = jax.tree.map(lambda x: x + 0.1 * rng.standard_normal(x.shape).astype(x.dtype), state)
  nnx.update(model, state)


def _flat(model, filt):
  return {k: np.asarray(v[...]) for k, v in nnx.to_flat_state(nnx.state(model, filt))}


def _loss(model, ids):
  logits = model(ids[:, :-1])
  return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()


def test_config_scale_and_validation():
  assert lora.LoraConfig().scale == 2.0
  assert lora.LoraConfig(rank=4, alpha=8.0).scale == 2.0
  for bad in (dict(rank=0), dict(dropout=1.0), dict(dropout=-0.1), dict(target_modules=()),
              dict(target_modules="q_proj")):
    with pytest.raises(ValueError):
      lora.LoraConfig(**bad)


@pytest.mark.parametrize("hf,targets", [
    (_LLAMA, lora.DEFAULT_TARGETS),
    (_GPT_NEO, ("q_proj", "k_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
])
def test_zero_b_gives_identical_logits(hf, targets):
  model = _model(hf)
  ids = _ids()
  base = np.asarray(_forward(model, ids))
  lora.apply_lora(model, lora.LoraConfig(rank=4, target_modules=targets), nnx.Rngs(1))
  np.testing.assert_array_equal(np.asarray(_forward(model, ids)), base)
  model.train()  # with B = 0 dropout cannot change anything either
  np.testing.assert_array_equal(np.asarray(_forward(model, ids)), base)


def test_adapter_shapes_and_logical_axes_are_stacked():
  model = lora.apply_lora(_model(), lora.LoraConfig(rank=3), nnx.Rngs(0))
  q = model.blocks.self_attn.q_proj
  assert q.lora_a.shape == (2, 16, 3) and q.lora_b.shape == (2, 3, 4, 4)
  assert q.lora_a.get_metadata()["logical_axes"] == ("layers", "embed", None)
  assert q.lora_b.get_metadata()["logical_axes"] == ("layers", None, "heads", "head_dim")
  o = model.blocks.self_attn.o_proj  # two input axes
  assert o.lora_a.shape == (2, 4, 4, 3) and o.lora_b.shape == (2, 3, 16)
  assert o.lora_a.get_metadata()["logical_axes"] == ("layers", "heads", "head_dim", None)
  assert not hasattr(model.lm_head, "lora_a")  # not targeted by default
  assert isinstance(q.lora_a, lora.LoraParam) and isinstance(q.lora_a, nnx.Param)
  # Every adapter has a sharding rule, and a mesh can place the adapted model.
  mesh = sharding.make_mesh(data=-1)
  sharding.shard_model(model, mesh)
  assert _forward(model, _ids()).shape == (2, 7, 64)


def test_unadapted_top_level_dense_gets_unstacked_adapters():
  model = lora.apply_lora(_model(), lora.LoraConfig(rank=2, target_modules=("lm_head",)),
                          nnx.Rngs(0))
  assert model.lm_head.lora_a.shape == (16, 2)
  assert model.lm_head.lora_b.get_metadata()["logical_axes"] == (None, "vocab")
  assert not hasattr(model.blocks.self_attn.q_proj, "lora_a")


def test_unknown_target_module_lists_dense_names():
  model = _model()
  with pytest.raises(ValueError, match=r"\['foo_proj'\].*down_proj.*lm_head.*v_proj"):
    lora.apply_lora(model, lora.LoraConfig(target_modules=("q_proj", "foo_proj")), nnx.Rngs(0))
  assert not lora.has_lora(model)  # nothing half-applied
  with pytest.raises(ValueError, match="c_fc"):  # GPT-Neo has no gate/up/down projections
    lora.apply_lora(_model(_GPT_NEO), lora.LoraConfig(), nnx.Rngs(0))


def test_apply_twice_and_merge_without_adapters_are_errors():
  model = lora.apply_lora(_model(), lora.LoraConfig(), nnx.Rngs(0))
  with pytest.raises(ValueError, match="already"):
    lora.apply_lora(model, lora.LoraConfig(), nnx.Rngs(0))
  with pytest.raises(ValueError, match="no LoRA"):
    lora.merge_lora(_model())


def test_has_lora_and_trainable_filter():
  model = _model()
  assert not lora.has_lora(model) and lora.trainable_filter(model) is nnx.Param
  lora.apply_lora(model, lora.LoraConfig(), nnx.Rngs(0))
  assert lora.has_lora(model) and lora.trainable_filter(model) is lora.LoraParam
  lora.merge_lora(model)
  assert not lora.has_lora(model)


def test_only_adapters_are_updated():
  model = lora.apply_lora(_model(), lora.LoraConfig(rank=4), nnx.Rngs(0))
  frozen = nnx.All(nnx.Param, nnx.Not(lora.LoraParam))
  base_before = _flat(model, frozen)
  lora_before = _flat(model, lora.LoraParam)
  opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=lora.trainable_filter(model))
  ids = _ids(batch=4, length=9)

  @nnx.jit
  def step(model, opt, ids):
    loss, grads = nnx.value_and_grad(_loss, argnums=nnx.DiffState(0, lora.LoraParam))(model, ids)
    opt.update(model, grads)
    return loss, grads

  _, grads = step(model, opt, ids)
  grad_paths = {k for k, _ in nnx.to_flat_state(grads)}
  assert grad_paths == set(lora_before)  # gradients exist for adapters only
  losses = [float(step(model, opt, ids)[0]) for _ in range(3)]
  assert losses[-1] < losses[0]
  for k, v in _flat(model, frozen).items():
    np.testing.assert_array_equal(v, base_before[k], err_msg=str(k))
  after = _flat(model, lora.LoraParam)
  for k, v in after.items():
    assert not np.array_equal(v, lora_before[k]), k  # A moves once B is non-zero


def test_merged_kernel_equals_base_plus_scaled_ab():
  model = _model()
  base = _flat(model, nnx.Param)
  cfg = lora.LoraConfig(rank=4, alpha=6.0)
  lora.apply_lora(model, cfg, nnx.Rngs(2))
  _randomize_b(model)
  adapters = _flat(model, lora.LoraParam)
  one = lora.merged_kernel(model.blocks.self_attn.o_proj)  # two input axes, stacked
  lora.merge_lora(model)
  np.testing.assert_array_equal(np.asarray(one),
                                _flat(model, nnx.Param)[("blocks", "self_attn", "o_proj", "kernel")])
  merged = _flat(model, nnx.Param)
  assert set(merged) == set(base)  # adapters removed, structure as before
  for name in cfg.target_modules:
    group = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
    key = ("blocks", group, name, "kernel")
    a = adapters[("blocks", group, name, "lora_a")].astype(np.float64)
    b = adapters[("blocks", group, name, "lora_b")].astype(np.float64)
    delta = np.stack([np.tensordot(a[i], b[i], axes=1) for i in range(a.shape[0])])
    np.testing.assert_allclose(merged[key], base[key] + cfg.scale * delta, rtol=1e-6, atol=1e-6)
  for key in base:  # untargeted parameters unchanged
    if len(key) < 2 or key[-2] not in cfg.target_modules:
      np.testing.assert_array_equal(merged[key], base[key])


@pytest.mark.parametrize("hf,targets", [
    (_LLAMA, lora.DEFAULT_TARGETS + ("lm_head",)),
    (_GPT_NEO, ("q_proj", "v_proj", "o_proj", "c_fc", "c_proj")),
])
def test_merged_logits_equal_adapter_logits(hf, targets):
  model = _model(hf)
  ids = _ids()
  paths = {k: type(v) for k, v in nnx.to_flat_state(nnx.state(model))}
  lora.apply_lora(model, lora.LoraConfig(rank=4, target_modules=targets, dropout=0.3),
                  nnx.Rngs(3))
  _randomize_b(model)
  adapted = np.asarray(_forward(model, ids))  # eval mode: no dropout
  assert np.abs(adapted - np.asarray(_forward(_model(hf), ids))).max() > 1e-3  # adapters matter
  lora.merge_lora(model)
  np.testing.assert_allclose(np.asarray(_forward(model, ids)), adapted, atol=1e-5, rtol=0)
  # The merged model is a plain model: the same variables as before adaptation.
  assert {k: type(v) for k, v in nnx.to_flat_state(nnx.state(model))} == paths


def test_merged_model_exports_to_hf(tmp_path):
  cfg = models.from_hf_config(_LLAMA)
  model = models.build_model(cfg)
  lora.apply_lora(model, lora.LoraConfig(rank=2), nnx.Rngs(0))
  _randomize_b(model)
  ids = _ids()
  expected = np.asarray(_forward(model, ids))
  lora.merge_lora(model)
  models.save_pretrained(model, cfg, str(tmp_path))
  reloaded, _ = models.from_pretrained(str(tmp_path))
  np.testing.assert_allclose(np.asarray(_forward(reloaded, ids)), expected, atol=1e-5, rtol=0)


_DROPOUT_TARGETS = ("q_proj", "o_proj", "down_proj")  # fewer masks compile faster


def test_dropout_only_in_training_and_keyed():
  ids = _ids()
  cfg = lora.LoraConfig(rank=4, dropout=0.5, target_modules=_DROPOUT_TARGETS)
  model = lora.apply_lora(_model(), cfg, nnx.Rngs(0))
  _randomize_b(model)
  reference = lora.apply_lora(_model(), dataclasses.replace(cfg, dropout=0.0), nnx.Rngs(0))
  _randomize_b(reference)
  evaluated = np.asarray(_forward(model, ids))
  np.testing.assert_array_equal(evaluated, np.asarray(_forward(reference, ids)))  # eval by default
  model.train()
  lora.set_lora_dropout_key(model, jax.random.key(7))
  train_a = np.asarray(_forward(model, ids))
  assert not np.allclose(train_a, evaluated)
  np.testing.assert_array_equal(np.asarray(_forward(model, ids)), train_a)  # same key, same mask
  lora.set_lora_dropout_key(model, jax.random.key(8))
  assert not np.allclose(np.asarray(_forward(model, ids)), train_a)
  lora.set_lora_dropout_key(model, jax.random.key_data(jax.random.key(7)))  # raw keys too
  np.testing.assert_array_equal(np.asarray(_forward(model, ids)), train_a)
  keys = np.asarray(model.blocks.self_attn.q_proj.lora_dropout_key[...])
  assert keys.shape[0] == 2 and not np.array_equal(keys[0], keys[1])  # per-layer keys
  model.eval()
  np.testing.assert_array_equal(np.asarray(_forward(model, ids)), evaluated)


def test_dropout_key_set_inside_jit_changes_masks_per_step():
  cfg = lora.LoraConfig(rank=4, dropout=0.5, target_modules=_DROPOUT_TARGETS)
  model = lora.apply_lora(_model(), cfg, nnx.Rngs(0))
  _randomize_b(model)
  model.train()
  ids = _ids()

  @nnx.jit
  def forward(model, step):
    lora.set_lora_dropout_key(model, jax.random.fold_in(jax.random.key(0), step))
    return model(ids)

  out0, out1, out0_again = (np.asarray(forward(model, s)) for s in (0, 1, 0))
  assert not np.allclose(out0, out1)
  np.testing.assert_array_equal(out0, out0_again)


def test_dense_without_adapters_is_unchanged():
  dense = layers.Dense((4, 3), ("embed", "mlp"), rngs=nnx.Rngs(0))
  x = jnp.ones((2, 4))
  np.testing.assert_array_equal(np.asarray(dense(x)), np.asarray(x @ dense.kernel[...]))
