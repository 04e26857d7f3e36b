"""Sampling: greedy equals HF `generate`, cached decode equals a full forward, processors
equal HF's warpers (per row, B > 1), draws follow the truncated distributions, seeds
reproduce, stop strings / stop tokens end completions, and programs compile once.

Run as a script (`python tests/test_sampling.py CKPT`), this module is the subprocess worker
of the sharded test: XLA flags must be set before jax starts.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

if __name__ != "__main__":  # the worker imports jax itself, after its flags are set
  import jax
  import jax.numpy as jnp
  import torch
  from transformers.generation import logits_process as hf_lp

  from memdyn_jax.evaluation import sampling
  from memdyn_jax import testing
  from memdyn_jax.evaluation.sampling import SamplingParams

PROMPTS = ["Question: How many apples are left?\nAnswer:", "Q: one?\nAnswer:",
           "Weng earns $12 an hour for babysitting.\nAnswer:"]


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt_neo", "smollm3", "phi3"])
def family(request, tmp_path_factory):
  return testing.hf_and_jax_model(request.param, tmp_path_factory.mktemp(request.param))


def _prompts(vocab: int):
  """Three left-padded prompts of 9, 6 and 4 tokens."""
  ids, mask, _ = testing.left_padded_batch(vocab, 3, 9, (0, 3, 5), seed=2)
  return ids.astype(np.int32), mask


def _hf_generate(hf, ids, mask, max_new, **kw):
  with torch.no_grad():
    out = hf.generate(input_ids=torch.tensor(ids, dtype=torch.long),
                      attention_mask=torch.tensor(mask), do_sample=False,
                      max_new_tokens=max_new, pad_token_id=0, **kw)
  return out[:, ids.shape[1]:].numpy()


def test_greedy_matches_hf_generate(family):
  hf, model, cfg = family
  ids, mask = _prompts(cfg.vocab_size)
  # 12 new tokens run past the local windows (5) of Gemma 2 and GPT-Neo.
  params = SamplingParams(temperature=0, max_new_tokens=12, stop_token_ids=())
  out = sampling.generate(model, ids, mask, params, pad_id=0)
  np.testing.assert_array_equal(out.tokens, _hf_generate(hf, ids, mask, 12, eos_token_id=None))
  assert (out.lengths == 12).all() and (out.finish_reason == sampling.FINISH_LENGTH).all()

  # A token row 0 emits mid-way becomes the stop token: rows end there and pad afterwards.
  stop = int(out.tokens[0, 4])
  stopped = sampling.generate(model, ids, mask, SamplingParams(
      temperature=0, max_new_tokens=12, stop_token_ids=(stop,)), pad_id=0)
  ref = _hf_generate(hf, ids, mask, 12, eos_token_id=stop)
  np.testing.assert_array_equal(stopped.tokens[:, :ref.shape[1]], ref)
  assert (stopped.tokens[:, ref.shape[1]:] == 0).all()
  first = list(out.tokens[0]).index(stop)
  assert stopped.lengths[0] == first + 1
  assert stopped.finish_reason[0] == sampling.FINISH_STOP_TOKEN

  if cfg.model_type == "llama":  # HF applies the penalty in greedy mode too
    pen = sampling.generate(model, ids, mask, SamplingParams(
        temperature=0, max_new_tokens=12, stop_token_ids=(), repetition_penalty=1.5), pad_id=0)
    ref = _hf_generate(hf, ids, mask, 12, eos_token_id=None, repetition_penalty=1.5)
    np.testing.assert_array_equal(pen.tokens, ref)
    assert (pen.tokens != out.tokens).any()


def test_cached_decode_equals_full_forward(family):
  _, model, cfg = family
  ids, mask = _prompts(cfg.vocab_size)
  params = SamplingParams(temperature=1.0, max_new_tokens=12, stop_token_ids=(), seed=3)
  out = sampling.generate(model, ids, mask, params)
  full_ids = np.concatenate([ids, out.tokens], axis=1)
  full_mask = np.concatenate([mask, np.ones_like(out.tokens)], axis=1)
  logp = jax.nn.log_softmax(model(jnp.asarray(full_ids), jnp.asarray(full_mask)), axis=-1)
  logp = np.asarray(logp)[:, ids.shape[1] - 1:-1]  # the steps that predicted each new token
  ref_lp = np.take_along_axis(logp, out.tokens[..., None], -1)[..., 0]
  ref_ent = -(np.exp(logp) * logp).sum(-1)
  assert np.abs(out.logprobs - ref_lp).max() <= 1e-4
  assert np.abs(out.entropies - ref_ent).max() <= 1e-4


# ----------------------------------------------------------------------------- processors


def _hf_process(logits, params: "SamplingParams", input_ids=None):
  scores = torch.tensor(logits, dtype=torch.float32)
  ids = torch.tensor(input_ids, dtype=torch.long) if input_ids is not None else None
  chain = []
  if params.repetition_penalty != 1:
    chain.append(hf_lp.RepetitionPenaltyLogitsProcessor(params.repetition_penalty))
  if params.temperature not in (0, 1):
    chain.append(hf_lp.TemperatureLogitsWarper(params.temperature))
  if params.top_k:
    chain.append(hf_lp.TopKLogitsWarper(params.top_k))
  if params.top_p < 1:
    chain.append(hf_lp.TopPLogitsWarper(params.top_p))
  if params.min_p:
    chain.append(hf_lp.MinPLogitsWarper(params.min_p))
  for proc in chain:
    scores = proc(ids, scores)
  return scores.numpy()


@pytest.mark.parametrize("kw,vocab,scale", [
    (dict(temperature=0.7), 300, 3.0),
    (dict(top_k=5), 300, 3.0),
    (dict(top_p=0.8), 300, 3.0),  # nucleus found among the top candidates
    (dict(top_p=0.95), 600, 0.1),  # flat rows: the full-sort fallback
    (dict(min_p=0.1), 300, 3.0),
    (dict(temperature=1.3, top_k=20, top_p=0.9, min_p=0.05), 300, 3.0),
])
def test_processors_match_hf_warpers(kw, vocab, scale):
  logits = np.random.RandomState(0).normal(size=(4, vocab)).astype(np.float32) * scale
  params = SamplingParams(**kw)
  ours = np.asarray(sampling.process_logits(logits, params))
  ref = _hf_process(logits, params)
  np.testing.assert_array_equal(np.isfinite(ours), np.isfinite(ref))
  kept = np.isfinite(ref)
  if kw.keys() - {"temperature"}:  # truncating: every row loses tokens, each its own
    assert 1 <= kept.sum(1).min() and kept.sum(1).max() < vocab
    assert len({row.tobytes() for row in kept}) == len(kept)
  np.testing.assert_allclose(ours[kept], ref[kept], rtol=1e-6)


def test_repetition_penalty_matches_hf():
  rng = np.random.RandomState(1)
  logits = rng.normal(size=(3, 40)).astype(np.float32) * 2  # both signs
  input_ids = rng.randint(0, 40, (3, 7))
  seen = np.zeros((3, 40), bool)
  np.put_along_axis(seen, input_ids, True, axis=1)
  params = SamplingParams(temperature=0, repetition_penalty=1.3)
  ours = np.asarray(sampling.process_logits(logits, params, jnp.asarray(seen)))
  np.testing.assert_allclose(ours, _hf_process(logits, params, input_ids), rtol=1e-6)
  with pytest.raises(ValueError, match="needs `seen`"):
    sampling.process_logits(logits, params)


def _reference_distribution(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
  """Per-row numpy reference of the truncated, renormalised distribution."""
  out = []
  for row in logits / temperature:
    keep = np.ones_like(row, bool)
    if top_k:
      keep &= row >= np.sort(row)[-top_k]
    p = np.where(keep, np.exp(row - row[keep].max()), 0)
    p /= p.sum()
    if top_p < 1:
      order = np.argsort(-p)
      before = np.cumsum(p[order]) - p[order]
      keep[order[before >= top_p]] = False
      p = np.where(keep, p, 0) / p[keep].sum()
    if min_p:
      keep &= p >= min_p * p.max()
      p = np.where(keep, p, 0) / p[keep].sum()
    out.append(p)
  return np.stack(out)


@pytest.mark.parametrize("kw", [dict(), dict(temperature=0.5), dict(top_k=3), dict(top_p=0.7),
                                dict(min_p=0.3), dict(temperature=1.5, top_k=6, top_p=0.9)])
def test_draws_follow_each_rows_truncated_distribution(kw):
  rows, vocab, draws = 3, 10, 20_000
  logits = np.random.RandomState(2).normal(size=(rows, vocab)).astype(np.float32) * 1.5
  keys = jax.random.split(jax.random.key(0), rows * draws)
  tokens = np.asarray(sampling.sample_logits(jnp.repeat(logits, draws, axis=0), keys,
                                             SamplingParams(**kw))).reshape(rows, draws)
  ref = _reference_distribution(logits, **kw)
  for r in range(rows):
    freq = np.bincount(tokens[r], minlength=vocab) / draws
    assert (freq[ref[r] == 0] == 0).all(), (r, freq, ref[r])
    assert 0.5 * np.abs(freq - ref[r]).sum() < 0.02, (r, freq, ref[r])


def test_greedy_sample_logits_is_argmax():
  logits = np.random.RandomState(3).normal(size=(5, 17)).astype(np.float32)
  tokens = sampling.sample_logits(logits, jax.random.split(jax.random.key(0), 5),
                                  SamplingParams(temperature=0))
  np.testing.assert_array_equal(tokens, logits.argmax(-1))


def test_bad_params_raise():
  for kw, match in [(dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"), (dict(n=0), "n must"),
                    (dict(temperature=-1.0), "temperature"), (dict(top_k=-1), "top_k"),
                    (dict(min_p=2.0), "min_p"), (dict(repetition_penalty=0.0), "repetition"),
                    (dict(max_new_tokens=0), "max_new_tokens"), (dict(stop=("",)), "stop")]:
    with pytest.raises(ValueError, match=match):
      SamplingParams(**kw)
  params = SamplingParams(stop="\n\n", stop_token_ids=[2, 3])
  assert params.stop == ("\n\n",) and params.stop_token_ids == (2, 3)
  hash(params)  # hashable: usable as a static jit argument


# ----------------------------------------------------------------------------- array level


def test_generate_errors_filler_rows_and_stop_fn(family):
  _, model, cfg = family
  ids, mask = _prompts(cfg.vocab_size)
  with pytest.raises(ValueError, match="context window"):
    sampling.generate(model, ids, mask, SamplingParams(max_new_tokens=cfg.max_position_embeddings))
  with pytest.raises(ValueError, match="share one"):
    sampling.generate(model, ids, mask[:, 1:], SamplingParams())
  mask = mask.copy()
  mask[2] = 0  # a filler row
  calls = []

  def stop_fn(tokens, lengths):  # host callback: stop every row once it has 3 tokens
    calls.append(tokens.shape)
    return lengths >= 3

  params = SamplingParams(temperature=1.0, n=2, max_new_tokens=12, stop_token_ids=())
  out = sampling.generate(model, ids, mask, params, stop_fn=stop_fn, check_every=4, pad_id=0)
  assert out.tokens.shape == (6, 12) and calls == [(6, 4)]  # one chunk, then early exit
  assert out.lengths.tolist() == [4, 4, 4, 4, 0, 0]
  assert out.finish_reason[:4].tolist() == [sampling.FINISH_STOP_STRING] * 4
  assert (out.tokens[:, 4:] == 0).all() and (out.tokens[4:] == 0).all()
  assert (out.logprobs[:, 4:] == 0).all() and (out.logprobs[:4, :4] < 0).all()


# ----------------------------------------------------------------------------- text level


@pytest.fixture(scope="module")
def text_models(tmp_path_factory, tokenizer_no_bos):
  """Two checkpoints of one tiny Llama whose vocabulary is the test tokenizer's."""
  dirs = [tmp_path_factory.mktemp(f"text{seed}") for seed in (0, 1)]
  return testing.tiny_jax_models("llama", dirs, vocab_size=len(tokenizer_no_bos))


def test_sample_is_reproducible_and_independent_of_batching(text_models, tokenizer_no_bos):
  model, tok = text_models[0], tokenizer_no_bos
  params = SamplingParams(temperature=1.0, n=3, max_new_tokens=8, seed=7, stop_token_ids=())
  ids = lambda res: [[c.token_ids for c in per_prompt] for per_prompt in res]
  first = sample_ids = ids(sampling.sample(model, tok, PROMPTS, params, batch_size=2))
  assert ids(sampling.sample(model, tok, PROMPTS, params, batch_size=2)) == first
  # Other batch composition and padding (all prompts in one batch): same samples.
  assert ids(sampling.sample(model, tok, PROMPTS, params, batch_size=4)) == first
  # The n samples of a prompt use independent keys; another seed gives other samples.
  assert all(len(set(per_prompt)) > 1 for per_prompt in sample_ids)
  other = ids(sampling.sample(model, tok, PROMPTS, SamplingParams(
      temperature=1.0, n=3, max_new_tokens=8, seed=8, stop_token_ids=()), batch_size=2))
  assert other != first


def test_stop_strings_and_stop_tokens(text_models, tokenizer_no_bos):
  model, tok = text_models[0], tokenizer_no_bos
  greedy = dict(temperature=0, max_new_tokens=16)
  free = sampling.sample(model, tok, PROMPTS[:1], SamplingParams(**greedy, stop_token_ids=()))[0][0]
  assert free.finish_reason == "length" and len(free.token_ids) == 16
  assert free.text == tok.decode(list(free.token_ids), skip_special_tokens=True)
  assert len(free.text) >= 8, free.text

  stop = free.text[4:7]
  cut = free.text.find(stop)
  done = sampling.sample(model, tok, PROMPTS[:1], SamplingParams(**greedy, stop=(stop, "never!")),
                         check_every=4)[0][0]
  assert done.text == free.text[:cut] and done.finish_reason == "stop_string"
  n = len(done.token_ids)
  assert done.token_ids == free.token_ids[:n]
  assert stop in tok.decode(list(done.token_ids))
  assert stop not in tok.decode(list(done.token_ids[:-1]))
  np.testing.assert_allclose(done.logprobs, free.logprobs[:n], atol=1e-5)

  stop_id = free.token_ids[5]
  k = free.token_ids.index(stop_id)
  ended = sampling.sample(model, tok, PROMPTS[:1],
                          SamplingParams(**greedy, stop_token_ids=(stop_id,)))[0][0]
  assert ended.finish_reason == "stop_token" and ended.token_ids == free.token_ids[:k + 1]
  assert ended.text == tok.decode(list(free.token_ids[:k]), skip_special_tokens=True)
  # Default stop token: the tokenizer's EOS.
  default = sampling.sample(model, tok, PROMPTS[:1], SamplingParams(**greedy))[0][0]
  assert tok.eos_token_id not in default.token_ids[:-1]


def test_sample_errors(text_models, tokenizer_no_bos):
  model, tok = text_models[0], tokenizer_no_bos
  with pytest.raises(ValueError, match="window"):
    sampling.sample(model, tok, PROMPTS, SamplingParams(max_new_tokens=125))
  with pytest.raises(ValueError, match="empty"):
    sampling.sample(model, tok, ["", "x"], SamplingParams(max_new_tokens=4))
  assert sampling.sample(model, tok, [], SamplingParams()) == []


def test_sample_compiles_once_across_checkpoints(text_models, tokenizer_no_bos):
  params = SamplingParams(temperature=0.8, top_p=0.9, n=2, max_new_tokens=6, stop=("\n",))
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    sampling.sample(text_models[0], tokenizer_no_bos, PROMPTS, params, batch_size=3)
    n_first = len(compiles)
    sampling.sample(text_models[1], tokenizer_no_bos, PROMPTS[::-1], params, batch_size=3)
    # Another temperature is data, not a new program.
    sampling.sample(text_models[1], tokenizer_no_bos, PROMPTS, SamplingParams(
        temperature=1.1, top_p=0.5, n=2, max_new_tokens=6, stop=("\n",)), batch_size=3)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert 1 <= n_first <= 2  # one prefill and one decode program for the one bucket
  assert len(compiles) == n_first


# ----------------------------------------------------------------------------- sharded


def test_sharded_generate_matches_one_device(tmp_path):
  ckpt = testing.save_tiny_hf_model("llama", str(tmp_path / "model"), seed=0,
                                    num_key_value_heads=2, vocab_size=212)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, ckpt], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8
  assert result["same_greedy"] and result["same_sampled"]
  assert result["max_logprob_diff"] <= 1e-4


def _worker(ckpt: str) -> None:
  import jax

  from memdyn_jax import models, sharding, testing
  from memdyn_jax.evaluation import sampling

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  single, cfg = models.from_pretrained(ckpt)
  sharded, _ = models.from_pretrained(ckpt, mesh=mesh)
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, 4, 9, (0, 3, 5, 1), seed=2)
  result = {"devices": jax.device_count()}
  diffs = []
  for name, params in [("greedy", sampling.SamplingParams(temperature=0, max_new_tokens=8)),
                       ("sampled", sampling.SamplingParams(temperature=1.0, top_k=50, n=2,
                                                           max_new_tokens=8, seed=1))]:
    ref = sampling.generate(single, ids, mask, params)
    got = sampling.generate(sharded, ids, mask, params, mesh=mesh)
    result[f"same_{name}"] = bool((ref.tokens == got.tokens).all()
                                  and (ref.lengths == got.lengths).all())
    diffs.append(float(np.abs(ref.logprobs - got.logprobs).max()))
  result["max_logprob_diff"] = max(diffs)
  print(json.dumps(result))


if __name__ == "__main__":
  _worker(sys.argv[1])
