"""The TPU splash-attention path, checked on CPU: which impl runs where (backend given, as a
pure function), the splash masks against our reference mask, and logits / gradients of the
kernel in Pallas interpret mode against the reference einsum path (also under a mesh)."""
from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memdyn_jax.models import presets as model_presets
from memdyn_jax import models, testing
from memdyn_jax.models import layers, splash

SEQ = 128  # the smallest length splash tiles (one 128 block)
PADS = (0, 37)


def _choose(impl, backend, *, q_len=SEQ, kv_len=SEQ, softcap=0.0, kv_cache=False, **kw):
  return layers.choose_attention(impl, backend=backend, q_len=q_len, kv_len=kv_len,
                                 softcap=softcap, kv_cache=kv_cache, **kw)


# ----------------------------------------------------------------------------- selection


@pytest.mark.parametrize("impl,backend,softcap,expected", [
    ("reference", "tpu", 0.0, "reference"),
    ("auto", "tpu", 0.0, "splash"),
    ("auto", "tpu", 30.0, "splash"),  # splash caps logits itself
    ("auto", "gpu", 0.0, "auto"),  # jax picks cuDNN flash where it applies
    ("auto", "gpu", 30.0, "reference"),
    ("auto", "cpu", 0.0, "reference"),  # the einsums tuned for XLA:CPU
    ("xla", "tpu", 0.0, "xla"),  # an explicit request is honoured
    ("cudnn", "gpu", 30.0, "reference"),
    ("splash", "tpu", 30.0, "splash"),
])
def test_choice_by_backend_and_softcap(impl, backend, softcap, expected):
  choice = _choose(impl, backend, softcap=softcap)
  assert choice.impl == expected
  assert not choice.interpret
  if expected == "reference" and backend == "cpu":
    assert "CPU" in choice.reason
  elif expected == "reference" and impl != "reference":
    assert "soft-capping" in choice.reason
  elif expected in ("splash", "auto", "xla", "reference"):
    assert choice.reason == ""


def test_splash_off_tpu_runs_in_interpret_mode_and_says_so():
  choice = _choose("splash", "cpu")
  assert (choice.impl, choice.interpret) == ("splash", True)
  assert "interpret" in choice.reason


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(q_len=1, kv_len=256, kv_cache=True), "decode"),
    (dict(q_len=256, kv_len=256, kv_cache=True), "KV-cache"),
    (dict(q_len=200, kv_len=200), "multiple of 128"),
    (dict(windows_known=False), "window"),
])
def test_splash_falls_back_with_a_reason(kwargs, fragment):
  for softcap, fallback in ((0.0, "xla"), (50.0, "reference")):
    choice = _choose("auto", "tpu", softcap=softcap, **kwargs)
    assert choice.impl == fallback
    assert fragment in choice.reason and choice.reason.startswith("splash: ")
    if softcap:
      assert "soft-capping" in choice.reason
    assert _choose("splash", "tpu", softcap=softcap, **kwargs) == (
        layers.AttentionChoice("splash", fallback, choice.reason))


def test_choice_for_preset_configs():
  gemma = model_presets.preset_config("gemma2-9b")
  llama = model_presets.preset_config("llama3-8b")
  assert layers.attention_choice_for_config(gemma, "auto", backend="tpu",
                                            seq_len=1024).describe() == "splash"
  decode = layers.attention_choice_for_config(gemma, "auto", backend="tpu", seq_len=1024,
                                              phase="decode")
  assert decode.impl == "reference" and "decode" in decode.reason
  assert layers.attention_choice_for_config(llama, "auto", backend="gpu",
                                            seq_len=1024).impl == "auto"
  assert layers.attention_choice_for_config(llama, "auto", backend="tpu", seq_len=1024,
                                            phase="prefill").impl == "xla"
  with pytest.raises(ValueError, match="phase"):
    layers.attention_choice_for_config(llama, "auto", backend="tpu", seq_len=8, phase="train")


def test_unknown_impl_and_dense_mask_splash_are_errors():
  with pytest.raises(ValueError, match="not in"):
    _choose("flash9000", "tpu")
  x = jnp.zeros((1, 2, 2, 4))
  with pytest.raises(ValueError, match="dense mask"):
    layers.dot_attention(x, x, x, jnp.ones((1, 2, 2), bool), scale=1.0, impl="splash")


def test_fallback_is_logged_once(caplog):
  layers._LOGGED_CHOICES.clear()
  q = jnp.ones((1, 3, 2, 4))
  kw = dict(q_slots=jnp.arange(3), k_slots=jnp.arange(3), key_valid=jnp.ones((1, 3), bool),
            window=0, scale=0.5, impl="splash")
  with caplog.at_level(logging.INFO, logger=layers.__name__):
    layers.attention(q, q, q, **kw)
    layers.attention(q, q, q, **kw)
  lines = [r for r in caplog.records if "attention_impl='splash'" in r.getMessage()]
  assert len(lines) == 1 and lines[0].levelno == logging.WARNING
  assert "multiple of 128" in lines[0].getMessage()


# ----------------------------------------------------------------------------- masks


@pytest.mark.parametrize("window", [0, 1, 5, SEQ - 1, SEQ, 4 * SEQ])
def test_splash_mask_is_the_reference_mask(window):
  slots = jnp.arange(SEQ)
  ref = np.asarray(layers.attention_mask(slots, slots, jnp.ones((1, SEQ), bool),
                                         jnp.int32(window)))[0]
  (effective,) = splash.distinct_windows((window,), SEQ)
  dense = splash.splash_mask(SEQ, SEQ, effective, num_heads=2)[:, :, :]
  assert dense.shape == (2, SEQ, SEQ)
  np.testing.assert_array_equal(dense[0], ref)
  np.testing.assert_array_equal(dense[1], ref)


@pytest.mark.parametrize("window", [0, 7])
def test_segment_ids_give_the_reference_padding_mask_on_real_rows(window):
  valid = np.ones((2, SEQ), bool)
  valid[0, :PADS[1]] = False  # left padding
  valid[1, SEQ - 20:] = False  # right padding
  slots = jnp.arange(SEQ)
  ref = np.asarray(layers.attention_mask(slots, slots, jnp.asarray(valid), jnp.int32(window)))
  static = splash.splash_mask(SEQ, SEQ, window, num_heads=1)[0, :, :]
  for row, ref_row in zip(valid, ref):
    seg = row.astype(np.int32)
    ours = static & (seg[:, None] == seg[None, :])
    np.testing.assert_array_equal(ours[row], ref_row[row])
    assert ours.any(axis=1).all()  # no empty softmax row, padding rows included


def test_distinct_windows():
  assert splash.distinct_windows((4096, 0, 4096, 0), 1024) == (0,)
  assert splash.distinct_windows((4096, 0, 4096, 0), 8192) == (0, 4096)
  assert splash.distinct_windows((5, -1, 3), 128) == (0, 3, 5)
  assert splash.block_size(1024, 1024) == 512 and splash.block_size(384, 384) == 128
  assert splash.block_size(100, 100) is None


# ----------------------------------------------------------------------------- numerics


def _qkv(b=2, heads=4, kv_heads=2, d=16, seed=0):
  rng = np.random.default_rng(seed)
  q = rng.normal(size=(b, SEQ, heads, d)).astype(np.float32)
  k, v = (rng.normal(size=(b, SEQ, kv_heads, d)).astype(np.float32) for _ in range(2))
  valid = np.ones((b, SEQ), bool)
  for i, n in enumerate(PADS[:b]):
    valid[i, :n] = False
  return jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(valid)


@pytest.mark.parametrize("softcap", [0.0, 2.0])
def test_splash_layer_matches_reference_with_traced_windows(softcap):
  """GQA, padding, query scaling, soft-capping, and a window picked per layer under scan."""
  q, k, v, valid = _qkv()
  slots = jnp.arange(SEQ)
  layer_windows = (0, 9, 0, 130)

  def run(impl):
    def body(_, window):
      out = layers.attention(q, k, v, q_slots=slots, k_slots=slots, key_valid=valid,
                             window=window, scale=0.3, softcap=softcap, impl=impl,
                             layer_windows=layer_windows)
      return None, out
    return jax.jit(lambda: jax.lax.scan(body, None, jnp.asarray(layer_windows))[1])()

  ref, ours = np.asarray(run("reference")), np.asarray(run("splash"))
  real = np.asarray(valid)
  assert np.abs(ours - ref)[:, real].max() <= 1e-5
  assert np.abs(ref[0] - ref[1]).max() > 1e-3  # the windows did differ


def test_splash_layer_gradients_match_reference():
  """The kernel's backward (dq, dk, dv) through the per-layer window switch, with padding
  and soft-capping. Only real query rows carry loss: padding rows differ by design."""
  q, k, v, valid = _qkv()
  slots = jnp.arange(SEQ)
  weights = jax.random.normal(jax.random.key(1), q.shape)
  real = valid[:, :, None, None]

  def loss(q, k, v, impl):
    def body(total, window):
      out = layers.attention(q, k, v, q_slots=slots, k_slots=slots, key_valid=valid,
                             window=window, scale=0.3, softcap=2.0, impl=impl,
                             layer_windows=(0, 9))
      return total + jnp.sum(jnp.where(real, out * weights, 0.0)), None
    return jax.lax.scan(body, 0.0, jnp.asarray([0, 9]))[0]

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)), static_argnums=3)
  for r, o in zip(grad(q, k, v, "reference"), grad(q, k, v, "splash")):
    r, o = np.asarray(r), np.asarray(o)
    assert np.abs(o - r).max() <= 1e-5 * np.abs(r).max()


@functools.cache  # built once per module run: the logits and KV-cache tests share them
def _model_pair(name, **overrides):
  cfg = models.from_hf_config(testing.hf_config(name, max_position_embeddings=2 * SEQ,
                                                **overrides))
  ref = models.build_model(cfg, seed=3)
  fused = models.build_model(cfg, seed=3, attention_impl="splash")
  nnx.update(fused, nnx.state(ref))
  return cfg, ref, fused


@pytest.mark.parametrize("name", ["llama", "gemma2", "olmo2", "gemma3_text", "smollm3", "phi3"])
def test_splash_model_logits_match_reference(name):
  """llama: GQA; gemma2: soft-capping, query_pre_attn_scalar, sliding/global layers (one
  kernel per window, switched per layer); olmo2: q/k norms over the whole projection;
  gemma3_text: per-head q/k norms and a RoPE per layer type; smollm3: layers without RoPE;
  phi3: partial rotary, a window on every layer. Left-padded batch."""
  cfg, ref_model, splash_model = _model_pair(name)
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, 2, SEQ, PADS)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  ref = np.asarray(ref_model(ids, mask))
  ours = np.asarray(splash_model(ids, mask))
  real = np.asarray(mask).astype(bool)
  assert np.abs(ours - ref)[real].max() <= 1e-4, name


def test_kv_cache_calls_fall_back_and_match():
  cfg, ref_model, splash_model = _model_pair("llama")
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, 2, SEQ, PADS)
  ids, mask = jnp.asarray(ids), jnp.asarray(mask)
  ref = np.asarray(ref_model(ids, mask))
  cache = splash_model.init_cache(2, SEQ)
  split = SEQ - 2
  prefill, cache = splash_model.forward_with_cache(ids[:, :split], mask[:, :split], cache)
  outs = [np.asarray(prefill)]
  for t in range(split, SEQ):
    logits, cache = splash_model.forward_with_cache(ids[:, t:t + 1], mask[:, t:t + 1], cache)
    outs.append(np.asarray(logits))
  real = np.asarray(mask).astype(bool)
  assert np.abs(np.concatenate(outs, axis=1) - ref)[real].max() <= 1e-4


# ----------------------------------------------------------------------------- mesh


def _mesh_worker() -> None:
  """On 4 CPU devices: splash under a data=2 x tensor=2 mesh (shard_map) vs reference."""
  from memdyn_jax import sharding
  # One KV head for 4 query heads on tensor=2: the KV-head copy path; two windows: the switch.
  cfg, ref_model, splash_model = _model_pair("gemma2", num_key_value_heads=1)
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, 2, SEQ, PADS)
  ref = np.asarray(ref_model(jnp.asarray(ids), jnp.asarray(mask)))
  mesh = sharding.make_mesh(data=2, tensor=2)
  with jax.set_mesh(mesh):
    batch = sharding.host_local_to_global({"ids": ids, "mask": mask}, mesh)
    lowered = jax.jit(lambda m, i, a: m(i, a)).lower(splash_model, batch["ids"], batch["mask"])
    ours = lowered.compile()(splash_model, batch["ids"], batch["mask"])
  print(json.dumps({"max_diff": float(np.abs(np.asarray(ours) - ref)[mask.astype(bool)].max()),
                    "devices": len(ours.sharding.device_set),
                    "shard_map": "manual_computation" in lowered.as_text()}))


def test_splash_under_a_mesh_matches_reference():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["max_diff"] <= 1e-4, result
  assert result["devices"] == 4 and result["shard_map"], result


if __name__ == "__main__":
  _mesh_worker()
