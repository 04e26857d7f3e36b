"""Logit parity with HF PyTorch (fp32, eager) on left-padded batches, for every family.

Configs exercise GQA/MHA, tied and untied embeddings, q/k/v biases, RoPE scaling types,
sliding/local windows shorter than the sequence, soft-capping, q/k norms (per head, per
projection), per-layer RoPE bases, layers without RoPE, partial rotary, fused HF
projections and routed experts (Qwen3-MoE; the CPU's dense expert path here, the sorted
ragged_dot dispatch in test_moe.py). The KV-cache path (prefill + one-token decode) must reproduce the same logits.
Each check prints its worst |logit difference| (`-s` or `-rP` shows it).
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from memdyn_jax import models, testing
from memdyn_jax.models import layers, transformer

CASES = {
    "llama": ("llama", {}),
    "llama_tied_mha_odd": ("llama", dict(num_attention_heads=3, num_key_value_heads=3,
                                         hidden_size=42, tie_word_embeddings=True)),
    "llama_attention_bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama3_scaled": ("llama3_scaled", {}),
    "llama_linear_rope": ("llama", dict(rope_scaling={"rope_type": "linear", "factor": 2.0})),
    # dynamic NTK only changes anything beyond max_position_embeddings
    "llama_dynamic_rope": ("llama", dict(max_position_embeddings=8,
                                         rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    # HF's Llama reads LongRoPE too (the sequences pass the original 8 positions)
    "llama_longrope": ("llama", dict(rope_scaling={
        "rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3],
        "long_factor": [1.0, 2.0, 4.0, 8.0], "original_max_position_embeddings": 8})),
    "mistral_sliding": ("mistral", {}),
    "qwen2": ("qwen2", {}),
    "qwen2_sliding_layers": ("qwen2", dict(use_sliding_window=True, sliding_window=4,
                                           max_window_layers=1)),
    "gemma2": ("gemma2", {}),
    "gemma2_no_softcap": ("gemma2", dict(attn_logit_softcapping=None, final_logit_softcapping=None,
                                         num_key_value_heads=4)),
    "gpt_neo": ("gpt_neo", {}),
    "gpt_neo_all_local": ("gpt_neo", dict(attention_types=[[["local"], 3]], num_layers=3,
                                          window_size=3)),
    "qwen3": ("qwen3", {}),
    "qwen3_tied_sliding": ("qwen3_tied_sliding", {}),
    "olmo2": ("olmo2", {}),
    "gemma3_text": ("gemma3_text", {}),
    # A final logit softcap (HF ignores Gemma 3's attn_logit_softcapping: so do we).
    "gemma3_text_softcap_mqa": ("gemma3_text", dict(attn_logit_softcapping=5.0,
                                                    final_logit_softcapping=3.0,
                                                    num_key_value_heads=1)),
    "smollm3": ("smollm3", {}),  # NoPE on layers 1 and 3
    # NoPE layers 1, 2 with (HF's default for use_sliding_window) windows; all biases.
    "smollm3_sliding_bias": ("smollm3", dict(use_sliding_window=True, sliding_window=4,
                                             no_rope_layers=[1, 0, 0, 1], attention_bias=True,
                                             mlp_bias=True, tie_word_embeddings=False)),
    "phi3": ("phi3", {}),  # fused qkv/gate_up, half-rotary heads, sliding window
    # long factors: the prefills (10 positions) pass 8 positions as the whole sequences do
    "phi3_longrope": ("phi3_longrope", {}),
    # short factors (the sequences stay within 64 positions), attention factor of 128 / 64
    "phi3_longrope_short": ("phi3_longrope", dict(original_max_position_embeddings=64)),
    "qwen3_moe": ("qwen3_moe", {}),  # top-2 of 8 experts, renormalised
    # top-3 not renormalised, a sliding window on every layer, all attention biases, tied
    "qwen3_moe_unnormed_sliding": ("qwen3_moe", dict(
        norm_topk_prob=False, num_experts_per_tok=3, use_sliding_window=True, sliding_window=4,
        attention_bias=True, tie_word_embeddings=True)),
}

BATCH, LENGTH, PADS = 3, 13, (0, 4, 9)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  name, overrides = CASES[request.param]
  hf_cfg = testing.hf_config(name, **overrides)
  hf = testing.make_hf_model(hf_cfg, seed=1)
  out = tmp_path_factory.mktemp(request.param)
  hf.save_pretrained(out)
  model, cfg = models.from_pretrained(str(out))
  return request.param, hf, model, cfg


def _worst(name, what, ours, ref, mask):
  """The largest |ours - ref| over real positions, printed for the test log."""
  worst = float(np.abs(ours - ref)[mask.astype(bool)].max())
  print(f"{name}: {what}: worst |logit diff| vs HF = {worst:.2e}")
  return worst


def _rope_depends_on_batch_length(cfg) -> bool:
  """Dynamic NTK and LongRoPE pick their frequencies by the batch's longest position (as HF
  does), so a row alone may get other ones than in its batch."""
  return cfg.rope_type == "dynamic" or (
      cfg.rope_type == "longrope" and cfg.rope["original_max_position_embeddings"] < LENGTH)


def _hf_logits(hf, ids, mask, positions):
  with torch.no_grad():
    return hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()


def test_logits_match_hf_left_padded(case):
  name, hf, model, cfg = case
  ids, mask, positions = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  ref = _hf_logits(hf, ids, mask, positions)
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert _worst(name, "forward", ours, ref, mask) <= 1e-4, name


def test_padding_never_changes_real_positions(case):
  name, hf, model, cfg = case
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  garbage = ids.copy()
  garbage[mask == 0] = 7  # different pad token ids must not matter
  a = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  b = np.asarray(model(jnp.asarray(garbage), jnp.asarray(mask)))
  real = mask.astype(bool)
  np.testing.assert_array_equal(a[real], b[real])
  if _rope_depends_on_batch_length(cfg):
    return
  # row 2 alone, unpadded, equals its padded version
  alone = np.asarray(model(jnp.asarray(ids[2:3, PADS[2]:])))
  np.testing.assert_allclose(alone[0], a[2, PADS[2]:], atol=1e-5)


def _rebuilt(model, cfg, **build_kwargs):
  """The same weights in a model built with other options (dtype, remat, attention)."""
  other = models.build_model(cfg, **build_kwargs)
  nnx.update(other, nnx.state(model))
  return other


def _use_cache_layout(monkeypatch, layout):
  """Per-layer caches (unrolled decode) up to a depth, one stacked cache (scanned) beyond."""
  if layout == "stacked":
    monkeypatch.setattr(transformer, "PER_LAYER_CACHE_MAX_LAYERS", 0)


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_kv_cache_prefill_and_decode_match_hf(case, layout, monkeypatch):
  name, hf, model, cfg = case
  if cfg.rope_type == "dynamic":
    pytest.skip("dynamic NTK rotates cached keys with the frequencies of their own step "
                "(as HF's cache does), so incremental != full forward by design")
  _use_cache_layout(monkeypatch, layout)
  ids, mask, positions = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  ref = _hf_logits(hf, ids, mask, positions)
  cache = model.init_cache(BATCH, LENGTH + 3)
  assert cache.per_layer == (layout == "per_layer")
  split = 10
  logits, cache = model.forward_with_cache(jnp.asarray(ids[:, :split]), jnp.asarray(mask[:, :split]),
                                           cache)
  outs = [np.asarray(logits)]
  for t in range(split, LENGTH):
    logits, cache = model.forward_with_cache(jnp.asarray(ids[:, t:t + 1]),
                                             jnp.asarray(mask[:, t:t + 1]), cache)
    outs.append(np.asarray(logits))
  ours = np.concatenate(outs, axis=1)
  assert _worst(name, f"KV cache ({layout}) prefill + decode", ours, ref, mask) <= 1e-4, name
  assert int(cache.index) == LENGTH
  np.testing.assert_array_equal(np.asarray(cache.next_pos), mask.sum(1))


@pytest.mark.parametrize("layout", ["per_layer", "stacked"])
def test_prefill_fills_the_cache_hidden_states_with_cache_fills(case, layout, monkeypatch):
  """`prefill` (attending over the prompt's own keys) = `hidden_states_with_cache` on an
  empty cache (attending over every slot): the same hidden states, the same cache slot by
  slot, and decoding on from it reproduces HF's logits."""
  name, hf, model, cfg = case
  if cfg.rope_type == "dynamic":
    pytest.skip("dynamic NTK: incremental != full forward by design (see above)")
  _use_cache_layout(monkeypatch, layout)
  ids, mask, positions = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  split, slots = 10, LENGTH + 3
  prompt, prompt_mask = jnp.asarray(ids[:, :split]), jnp.asarray(mask[:, :split])
  h_ref, cache_ref = model.hidden_states_with_cache(prompt, prompt_mask,
                                                    model.init_cache(BATCH, slots))
  h, cache = model.prefill(prompt, prompt_mask, slots)
  real = mask[:, :split].astype(bool)
  # rtol: Gemma's hidden states grow to O(10) (sqrt(hidden) embedding scale), where float32
  # reassociation alone moves them by ~1e-5.
  np.testing.assert_allclose(np.asarray(h)[real], np.asarray(h_ref)[real], atol=1e-5, rtol=1e-5)
  assert cache.per_layer == cache_ref.per_layer == (layout == "per_layer")
  for field in ("key_valid", "index", "next_pos"):
    np.testing.assert_array_equal(getattr(cache, field), getattr(cache_ref, field))
  # Keys/values of real slots (padding slots hold what fully masked rows compute: never read)
  valid = np.asarray(cache.key_valid)
  for which, slot_axis in (("k", -1), ("v", -2)):
    for ours, ref in zip(jax.tree.leaves(getattr(cache, which)),
                         jax.tree.leaves(getattr(cache_ref, which))):
      assert ours.shape == ref.shape and ours.dtype == ref.dtype
      ours, ref = (np.moveaxis(np.asarray(x), slot_axis, -1) for x in (ours, ref))
      keep = valid[:, None, None, :] if ours.ndim == 4 else valid[None, :, None, None, :]
      np.testing.assert_allclose(np.where(keep, ours, 0), np.where(keep, ref, 0), atol=1e-5)
  outs = [np.asarray(model.logits_from_hidden(h))]
  for t in range(split, LENGTH):
    logits, cache = model.forward_with_cache(jnp.asarray(ids[:, t:t + 1]),
                                             jnp.asarray(mask[:, t:t + 1]), cache)
    outs.append(np.asarray(logits))
  ref = _hf_logits(hf, ids, mask, positions)
  ours = np.concatenate(outs, axis=1)
  assert _worst(name, f"sampler prefill ({layout}) + decode", ours, ref, mask) <= 1e-4, name
  with pytest.raises(ValueError, match="does not fit"):
    model.prefill(prompt, prompt_mask, split - 1)


def test_bf16_forward_is_sane(case):
  name, hf, model, cfg = case
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  f32 = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  bf16_model = _rebuilt(model, cfg, dtype=jnp.bfloat16, param_dtype=jnp.float32)
  bf16 = np.asarray(bf16_model(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.isfinite(bf16[real]).all()
  # bf16 activations: agreement to a few percent of the logit scale, same argmax mostly
  scale = np.abs(f32[real]).max()
  assert np.abs(bf16 - f32)[real].max() <= 0.1 * scale + 0.05
  agree = (bf16.argmax(-1) == f32.argmax(-1))[real].mean()
  assert agree >= 0.8


def test_dot_product_attention_impl_matches_reference(case):
  """`jax.nn.dot_product_attention` (what selects cuDNN flash on GPUs; "xla" is the one the
  CPU runs, and what "auto" picks here) gives the reference logits; soft-capped models
  (Gemma 2) fall back to the reference path by design."""
  impl = "xla"
  name, hf, model, cfg = case
  fused = _rebuilt(model, cfg, attention_impl=impl)
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, BATCH, LENGTH, PADS)
  ref = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  out = np.asarray(fused(jnp.asarray(ids), jnp.asarray(mask)))
  real = mask.astype(bool)
  assert np.abs(out - ref)[real].max() <= 1e-5, name
  cache = fused.init_cache(BATCH, LENGTH)
  logits, _ = fused.forward_with_cache(jnp.asarray(ids), jnp.asarray(mask), cache)
  assert np.abs(np.asarray(logits) - ref)[real].max() <= 1e-5, name


def test_unknown_attention_impl_is_an_error(case):
  _, _, _, cfg = case
  with pytest.raises(ValueError, match="attention_impl"):
    models.build_model(cfg, attention_impl="flash9000")


def test_matmul_is_a_contraction_over_the_kernels_input_axes():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 5)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(4, 5, 6, 7)), jnp.float32)
  ref = np.einsum("btij,ijkl->btkl", np.asarray(x, np.float64), np.asarray(kernel, np.float64))
  np.testing.assert_allclose(np.asarray(layers.matmul(x, kernel, 2)), ref, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="input axes"):
    layers.matmul(x, kernel, 1)


def test_cache_layout_puts_slots_where_the_cache_attends_from():
  k = jnp.arange(2 * 3 * 4 * 5, dtype=jnp.float32).reshape(2, 3, 4, 5)  # (B, T, K, D)
  ck, cv = layers.to_cache_layout(k, k + 1)
  assert ck.shape == (2, 4, 5, 3) and cv.shape == (2, 4, 3, 5)
  np.testing.assert_array_equal(ck[1, 2, 3, 0], k[1, 0, 2, 3])
  np.testing.assert_array_equal(cv[1, 2, 0, 3], k[1, 0, 2, 3] + 1)
  cache = transformer.KVCache(k=(ck,), v=(cv,), key_valid=jnp.ones((2, 3), bool),
                              index=jnp.int32(3), next_pos=jnp.full((2,), 3, jnp.int32))
  assert cache.axes("k")[-1] == cache.axes("v")[-2] == "length"
  with pytest.raises(ValueError, match="'k' or 'v'"):
    cache.axes("q")


def test_partial_rotary_rotates_the_leading_dims_only():
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  positions = jnp.broadcast_to(jnp.arange(5), (2, 5))
  inv_freq = layers.rope_inv_freq(4, 100.0, "default", {}, 128)
  cos, sin = layers.rope_cos_sin(positions, inv_freq)
  assert cos.shape == (2, 5, 4)
  out = layers.apply_rope(x, cos, sin)
  np.testing.assert_array_equal(out[..., 4:], x[..., 4:])
  np.testing.assert_array_equal(out[..., :4], layers.apply_rope(x[..., :4], cos, sin))
  assert np.abs(np.asarray(out[..., :4] - x[..., :4])).max() > 0.1


def test_a_layer_without_rope_gets_exactly_its_input():
  """A layer without RoPE picks the identity row of the stacked tables (as `_run_blocks` picks
  rows, by a traced index): its q/k come out bit for bit, also under partial rotary."""
  x = jax.random.normal(jax.random.key(0), (2, 5, 3, 8))
  for rotary in (8, 4):
    rope = layers.rope_cos_sin(jnp.broadcast_to(jnp.arange(5), (2, 5)),
                               layers.rope_inv_freq(rotary, 100.0, "default", {}, 128))
    stacked = tuple(jnp.stack(t) for t in zip(rope, layers.identity_rope(*rope)))
    rotate = jax.jit(lambda row, tables=stacked: layers.apply_rope(x, *(t[row] for t in tables)))
    np.testing.assert_array_equal(rotate(1), x)
    np.testing.assert_allclose(rotate(0), layers.apply_rope(x, *rope), atol=1e-6)
    assert np.abs(np.asarray(rotate(0) - x)).max() > 0.1


def test_longrope_takes_its_long_factors_past_the_original_length():
  params = dict(short_factor=(1.0, 2.0), long_factor=(4.0, 8.0),
                original_max_position_embeddings=16.0)
  base = 1.0 / (100.0 ** (np.arange(0, 4, 2) / 4))
  for seq_len, factors in ((16, (1.0, 2.0)), (17, (4.0, 8.0))):
    inv = layers.rope_inv_freq(4, 100.0, "longrope", params, 64, jnp.int32(seq_len))
    np.testing.assert_allclose(np.asarray(inv), base / np.asarray(factors), rtol=1e-6)
