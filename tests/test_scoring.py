"""Scoring: log-probs equal HF PyTorch, padding never leaks, the tokenization boundary is the
trainer's, length buckets bound compilations, and a sharded batch scores like one device.

Run as a script (`python tests/test_scoring.py WORKER_ARGS`), this module is the subprocess
worker of the sharded test: XLA flags must be set before jax starts.
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

  from memdyn_jax import sharding as sharding_lib
  from memdyn_jax import testing
  from memdyn_jax.evaluation import scoring
  from memdyn_jax.tasks import DataError, encode_example

PROMPTS = ["Question: How many apples are left?\nAnswer:", "Q: one?\nAnswer:",
           "Weng earns $12 an hour for babysitting. How much did she earn?\nAnswer:",
           "Betty is saving money.\nAnswer:", "Natalia sold clips.\nAnswer:"]
TARGETS = [" There are 7 apples left.\nDone.", " 1", " Weng earns 12/60 = $0.2 per minute.",
           " The answer is 5.", " Natalia sold 48/2 = 24 clips in May. 48+24 = 72.\n#### 72"]


@pytest.fixture(scope="module", params=["llama", "gemma2", "gpt_neo"])
def family(request, tmp_path_factory):
  return testing.hf_and_jax_model(request.param, tmp_path_factory.mktemp(request.param))


def _mixed_batch(vocab: int):
  """Rows: full, right-padded, left-padded; targets on the tail of each row."""
  rng = np.random.RandomState(0)
  ids = rng.randint(3, vocab, (3, 11)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 8:] = 0
  mask[2, :4] = 0
  ids[mask == 0] = 0
  target = np.zeros_like(ids)
  target[0, 5:] = 1
  target[1, 3:] = 1  # includes right padding: must be ignored
  target[2, 4:] = 1  # includes the first real token: it has no prediction
  return ids, mask, target


def _hf_logits(hf, ids, mask):
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  with torch.no_grad():
    out = hf(input_ids=torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions, dtype=torch.long))
  return out.logits.double().numpy()


def test_score_matches_hf_log_softmax(family):
  hf, model, cfg = family
  ids, mask, target = _mixed_batch(cfg.vocab_size)
  out = jax.tree.map(np.asarray, scoring.score(model, ids, mask, target))
  logits = _hf_logits(hf, ids, mask)
  logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  ref_lp = np.take_along_axis(logp[:, :-1], ids[:, 1:, None], -1)[..., 0]
  ref_ent = -(np.exp(logp) * logp).sum(-1)[:, :-1]
  ref_hit = logits[:, :-1].argmax(-1) == ids[:, 1:]

  predicted = np.zeros_like(mask, bool)
  predicted[:, 1:] = (mask[:, 1:] == 1) & (mask[:, :-1] == 1)
  scored = predicted & (target == 1)
  np.testing.assert_array_equal(out.predicted_mask, predicted)
  np.testing.assert_array_equal(out.target_mask, scored)
  assert scored[2, 4] == 0 and not scored[1, 8:].any()
  m = scored[:, 1:]
  assert np.abs(out.token_logprobs[:, 1:] - ref_lp)[m].max() <= 1e-4
  assert (out.token_logprobs[~scored] == 0).all()
  p = predicted[:, 1:]
  assert np.abs(out.entropy[:, 1:] - ref_ent)[p].max() <= 1e-4
  np.testing.assert_array_equal(out.argmax_correct[:, 1:][p], ref_hit[p])
  # Reductions against the HF numbers.
  n = m.sum(1)
  mean = (ref_lp * m).sum(1) / n
  np.testing.assert_array_equal(out.n_target, n)
  np.testing.assert_allclose(out.mean_logprob, mean, atol=1e-4)
  np.testing.assert_allclose(out.perplexity, np.exp(-mean), rtol=1e-4)
  np.testing.assert_allclose(out.exact_memorization, (ref_hit & m).sum(1) / n)
  np.testing.assert_allclose(out.exact_memorization_full, (ref_hit & p).sum(1) / p.sum(1))


def test_batched_equals_unbatched(family):
  _, model, cfg = family
  ids, mask, target = _mixed_batch(cfg.vocab_size)
  batched = jax.tree.map(np.asarray, scoring.score(model, ids, mask, target))
  for r in (1, 2):  # the padded rows
    real = mask[r] == 1
    one = jax.tree.map(np.asarray, scoring.score(model, ids[r:r + 1, real], mask[r:r + 1, real],
                                                 target[r:r + 1, real]))
    for field in ("sum_logprob", "mean_logprob", "perplexity", "exact_memorization",
                  "exact_memorization_full", "mean_entropy", "n_target"):
      np.testing.assert_allclose(getattr(one, field)[0], getattr(batched, field)[r], rtol=1e-5,
                                 atol=1e-5, err_msg=field)
    np.testing.assert_allclose(one.token_logprobs[0], batched.token_logprobs[r, real], atol=1e-5)


def test_score_logits_reductions_and_empty_targets():
  # V = 3; logits make token 1 the argmax everywhere.
  logits = jnp.log(jnp.asarray([[[0.2, 0.5, 0.3]] * 4] * 2))
  ids = np.asarray([[0, 1, 2, 1], [0, 0, 1, 2]])
  mask = np.asarray([[1, 1, 1, 1], [0, 1, 1, 1]])  # row 1 left-padded
  target = np.asarray([[0, 0, 1, 1], [0, 1, 0, 0]])  # row 1 targets only its first token
  out = jax.tree.map(np.asarray, scoring.score_logits(logits, ids, mask, target))
  np.testing.assert_allclose(out.token_logprobs[0], [0, 0, np.log(0.3), np.log(0.5)], rtol=1e-6)
  assert out.n_target.tolist() == [2, 0]
  np.testing.assert_allclose(out.mean_logprob[0], (np.log(0.3) + np.log(0.5)) / 2, rtol=1e-6)
  np.testing.assert_allclose(out.perplexity[0], 1 / np.sqrt(0.15), rtol=1e-6)
  assert out.exact_memorization[0] == 0.5  # token 1 hit, token 2 missed
  np.testing.assert_allclose(out.exact_memorization_full, [2 / 3, 1 / 2])
  # No scorable target: NaN, never a perfect score.
  assert np.isnan(out.mean_logprob[1]) and np.isnan(out.perplexity[1])
  assert np.isnan(out.exact_memorization[1]) and out.sum_logprob[1] == 0
  np.testing.assert_allclose(out.entropy[0, 1:], -(np.log([0.2, 0.5, 0.3]) * [0.2, 0.5, 0.3]).sum(),
                             rtol=1e-6)


def test_token_statistics_keeps_argmax_first_index_ties():
  logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0]] * 3 + [[2.0, 2.0, 2.0, 2.0]])
  labels = jnp.asarray([1, 2, 3, 0])
  logprob, entropy, hit = map(np.asarray, scoring.token_statistics(logits, labels))
  np.testing.assert_array_equal(hit, np.asarray(jnp.argmax(logits, -1) == labels))
  assert hit.tolist() == [True, False, False, True]
  ref = np.asarray(jax.nn.log_softmax(logits))
  np.testing.assert_allclose(logprob, ref[np.arange(4), labels], rtol=1e-6)
  np.testing.assert_allclose(entropy, -(np.exp(ref) * ref).sum(-1), rtol=1e-6)
  np.testing.assert_allclose(entropy[3], np.log(4), rtol=1e-6)


def test_sequence_chunk_divides_the_length_within_the_budget():
  assert scoring.sequence_chunk(16, 256, 49152, 16 << 20) == 4  # 12.6 MB of logits a chunk
  assert scoring.sequence_chunk(3, 11, 100, 1 << 30) == 11  # all of it fits
  assert scoring.sequence_chunk(3, 12, 100, 5 * 1200) == 4  # 5 fit, 4 divides 12
  assert scoring.sequence_chunk(64, 7, 10**6, 1) == 1
  with pytest.raises(ValueError, match="must all be positive"):
    scoring.sequence_chunk(0, 256, 49152)
  with pytest.raises(ValueError, match="must all be positive"):
    scoring.sequence_chunk(16, 256, 49152, chunk_bytes=0)


@pytest.mark.parametrize("chunk_bytes", [1, 1 << 30])  # one position a chunk; one chunk
def test_score_model_over_chunks_equals_score_logits(family, chunk_bytes):
  _, model, cfg = family
  ids, mask, target = _mixed_batch(cfg.vocab_size)
  full = scoring.score_logits(model(jnp.asarray(ids), jnp.asarray(mask)), ids, mask, target)
  chunked = jax.jit(lambda i, m, t: scoring.score_model(model, i, m, t, chunk_bytes=chunk_bytes))(
      ids, mask, target)
  for name, want in vars(full).items():
    got = getattr(chunked, name)
    if want.dtype == bool or want.dtype == jnp.int32:
      np.testing.assert_array_equal(got, want, err_msg=name)
    else:
      np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=name)


def test_score_rejects_mismatched_shapes(family):
  _, model, _ = family
  with pytest.raises(ValueError, match="share one"):
    scoring.score(model, np.zeros((2, 5)), np.ones((2, 5)), np.ones((2, 4)))
  with pytest.raises(ValueError, match="share one"):
    scoring.score_model(model, jnp.zeros((2, 5), jnp.int32), jnp.ones((2, 5), jnp.int32),
                        jnp.ones((5,), jnp.int32))


def test_length_buckets():
  assert scoring.default_length_buckets(100) == (16, 24, 32, 48, 64, 96, 100)
  assert scoring.default_length_buckets(64) == (16, 24, 32, 48, 64)
  assert scoring.default_length_buckets(10) == (10,)
  assert scoring.bucket_length(33, (16, 32, 48)) == 48
  assert scoring.bucket_length(16, (16, 32)) == 16
  with pytest.raises(ValueError, match="exceeds the largest"):
    scoring.bucket_length(49, (16, 32, 48))


def test_host_helpers_without_a_mesh():
  x = np.arange(6).reshape(2, 3)
  assert sharding_lib.data_shards(None) == 1 and sharding_lib.put_batch(x, None) is x
  host = sharding_lib.to_host({"a": jnp.ones((2,)), "b": (jnp.zeros((1, 2), jnp.int32),)})
  assert isinstance(host["a"], np.ndarray) and host["b"][0].dtype == np.int32
  with sharding_lib.mesh_context(None):
    pass


# ----------------------------------------------------------------------------- text level


@pytest.fixture(scope="module")
def text_model(tmp_path_factory, tokenizer_bos):
  """Two checkpoints of one tiny Llama whose vocabulary is the test tokenizer's."""
  dirs = [tmp_path_factory.mktemp(f"text{seed}") for seed in (0, 1)]
  return testing.tiny_jax_models("llama", dirs, vocab_size=len(tokenizer_bos))


@pytest.mark.parametrize("tok_name", ["tokenizer_bos", "tokenizer_no_bos"])
def test_score_texts_uses_the_training_convention(text_model, tok_name, request):
  tok = request.getfixturevalue(tok_name)
  model = text_model[0]
  records = scoring.score_texts(model, tok, PROMPTS, TARGETS, batch_size=2, return_tokens=True)
  assert [r.index for r in records] == list(range(len(PROMPTS)))
  # Reference: the trainer's encoding of each pair, right-padded into one batch.
  encoded = [encode_example(tok, p, t, max_length=None) for p, t in zip(PROMPTS, TARGETS)]
  width = max(len(ids) for ids, _ in encoded)
  ids, mask, tmask = (np.zeros((len(encoded), width), np.int32) for _ in range(3))
  for r, (row, row_target) in enumerate(encoded):
    ids[r, :len(row)], mask[r, :len(row)], tmask[r, :len(row)] = row, 1, row_target
  ref = jax.tree.map(np.asarray, scoring.score(model, ids, mask, tmask))
  for r, (rec, target) in enumerate(zip(records, TARGETS)):
    # Boundary: everything before tok(target) is prompt (BOS included), and every target
    # token -- the first one too -- is scored.
    n_target = len(tok(target, add_special_tokens=False)["input_ids"])
    assert rec.n_prompt_tokens == mask[r].sum() - n_target
    assert rec.n_target_tokens == n_target == len(rec.token_logprobs)
    np.testing.assert_allclose(rec.sum_logprob, ref.sum_logprob[r], rtol=1e-5)
    np.testing.assert_allclose(rec.token_logprobs, ref.token_logprobs[r][tmask[r] == 1], atol=1e-5)
    assert rec.exact_memorization == pytest.approx(ref.exact_memorization[r])
    assert rec.exact_memorization_full == pytest.approx(ref.exact_memorization_full[r])
  eos = scoring.score_texts(model, tok, PROMPTS[:2], TARGETS[:2], batch_size=2, append_eos=True)
  assert eos[0].n_target_tokens == records[0].n_target_tokens + 1


def test_score_texts_compiles_once_per_bucket(text_model, tokenizer_bos):
  compiles = []
  listener = lambda event, *_, **__: compiles.append(event) if "backend_compile" in event else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    # batch_size 3: shapes no other test compiled.
    kw = dict(batch_size=3, length_buckets=(16, 24, 32, 48))
    lengths = sorted((len(encode_example(tokenizer_bos, p, t, max_length=None)[0])
                      for p, t in zip(PROMPTS, TARGETS)), reverse=True)
    programs = {scoring.bucket_length(max(lengths[i:i + 3]), kw["length_buckets"])
                for i in range(0, len(lengths), 3)}
    first = scoring.score_texts(text_model[0], tokenizer_bos, PROMPTS, TARGETS, **kw)
    n_first = len(compiles)
    second = scoring.score_texts(text_model[1], tokenizer_bos, PROMPTS[::-1], TARGETS[::-1], **kw)
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  # One program per bucket used (batches are formed longest-first) ...
  assert n_first == len(programs)
  # ... and another checkpoint of the same architecture compiles nothing.
  assert len(compiles) == n_first
  assert [r.sum_logprob for r in first] != [r.sum_logprob for r in second[::-1]]


def test_score_texts_errors(text_model, tokenizer_bos):
  model = text_model[0]
  with pytest.raises(DataError, match="exceed max_length"):
    scoring.score_texts(model, tokenizer_bos, PROMPTS, TARGETS, max_length=12)
  kept = scoring.score_texts(model, tokenizer_bos, PROMPTS, TARGETS, max_length=24,
                             overlength="drop")
  assert 0 < len(kept) < len(PROMPTS) and all(r.n_prompt_tokens + r.n_target_tokens <= 24
                                               for r in kept)
  with pytest.raises(ValueError, match="max_position_embeddings"):
    scoring.score_texts(model, tokenizer_bos, PROMPTS, TARGETS, max_length=10_000)
  assert scoring.score_texts(model, tokenizer_bos, [], []) == []
  with pytest.raises(ValueError, match="batch_size"):
    scoring.score_texts(model, tokenizer_bos, PROMPTS, TARGETS, batch_size=0)


# ----------------------------------------------------------------------------- sharded


def test_score_texts_sharded_matches_one_device(text_model, tokenizer_bos, tmp_path):
  tok_dir, ckpt = str(tmp_path / "tok"), str(tmp_path / "model")
  tokenizer_bos.save_pretrained(tok_dir)
  testing.save_tiny_hf_model("llama", ckpt, seed=0, vocab_size=len(tokenizer_bos),
                             num_key_value_heads=2)
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, __file__, ckpt, tok_dir], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["devices"] == 8 and result["input_shards"] == result["data_shards"] == 4
  assert result["max_diff"] <= 1e-4


def _worker(ckpt: str, tok_dir: str) -> None:
  import jax
  import transformers

  from memdyn_jax import models, sharding
  from memdyn_jax.evaluation import scoring

  tok = transformers.AutoTokenizer.from_pretrained(tok_dir)
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  single, _ = models.from_pretrained(ckpt)
  sharded, _ = models.from_pretrained(ckpt, mesh=mesh)
  ref = scoring.score_texts(single, tok, PROMPTS, TARGETS, batch_size=4, return_tokens=True)
  got = scoring.score_texts(sharded, tok, PROMPTS, TARGETS, batch_size=4, mesh=mesh,
                            return_tokens=True)
  placed = sharding.put_batch(np.zeros((4, 16), np.int32), mesh)
  diff = max(max(abs(a.sum_logprob - b.sum_logprob),
                 abs(a.exact_memorization - b.exact_memorization),
                 np.abs(a.token_logprobs - b.token_logprobs).max()) for a, b in zip(ref, got))
  print(json.dumps({"devices": jax.device_count(), "max_diff": float(diff),
                    "data_shards": sharding.data_shards(mesh),
                    "input_shards": len({str(s.index) for s in placed.addressable_shards})}))


if __name__ == "__main__":
  _worker(*sys.argv[1:3])
