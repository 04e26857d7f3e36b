"""A tiny embedded model and a tiny quickstart run end to end (CI's copy of the pipeline)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memdyn_jax import embedded, models, quickstart

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Small enough to pre-train in seconds; the pipeline, not the numbers, is under test.
TINY = embedded.EmbeddedSpec(hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=2,
                             intermediate_size=64, corpus_docs=200, seq_len=64, batch_size=8,
                             pretrain_epochs=1.0)


def test_work_format_keeps_arithmetic_drops_task_surface():
  trace = ("The 2 bags hold 2*6=<<2*6=12>>12 pens.\nSo Max has 12+24=<<12+24=36>>36 pens.\n"
           "#### 36\nDone.")
  text = embedded.work_format("Max has 24 pens. How many?", trace)
  assert text == "Problem: Max has 24 pens. How many?\nWork: 2*6=12; 12+24=36\nResult: 36"


def test_corpus_texts_formats():
  count = lambda texts: (sum(t.startswith("Problem: ") for t in texts),
                         sum("\nAnswer:" in t for t in texts))
  work = embedded.corpus_texts(embedded.EmbeddedSpec(corpus_docs=80, task_format_fraction=0.0))
  assert not any("<<" in t for t in work if t.startswith("Problem: "))
  assert count(work)[0] > 10 and count(work)[1] == 0
  task = embedded.corpus_texts(embedded.EmbeddedSpec(corpus_docs=80, task_format_fraction=1.0))
  assert count(task) == (0, count(work)[0])  # same problems, the other format
  mixed = count(embedded.corpus_texts(embedded.EmbeddedSpec(corpus_docs=80)))
  assert mixed[0] > 0 and mixed[1] > 0
  with pytest.raises(ValueError, match="task_format_fraction"):
    embedded.corpus_texts(embedded.EmbeddedSpec(corpus_docs=6, task_format_fraction=2.0))


def test_spec_key_and_scaled(monkeypatch):
  assert TINY.key() != embedded.EmbeddedSpec().key()
  key = TINY.key()
  monkeypatch.setattr(embedded, "BUILD_VERSION", embedded.BUILD_VERSION + 1)
  assert TINY.key() != key  # a new build version never reuses an old cache
  assert TINY.scaled(1) is TINY
  big = embedded.EmbeddedSpec().scaled(2)
  assert big.hidden_size == 256 and big.num_layers == 6
  with pytest.raises(ValueError):
    TINY.scaled(0)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  """One cache for the module: the quickstart test reuses the tiny build."""
  return tmp_path_factory.mktemp("memdyn_cache")


def test_tiny_build_is_cached_and_loadable(cache_dir):
  path = embedded.model_dir(TINY, cache_dir=str(cache_dir), progress=False)
  with open(os.path.join(path, "embedded.json")) as f:
    info = json.load(f)
  assert info["pretrain_steps"] > 0 and info["final_loss"] < 7.0 and info["tokens_per_s"] > 0
  tok = models.load_tokenizer(path)
  cfg = models.load_config(path)
  assert cfg.hidden_size == 32 and cfg.vocab_size == len(tok)
  mtime = os.path.getmtime(os.path.join(path, "embedded.json"))
  assert embedded.model_dir(TINY, cache_dir=str(cache_dir)) == path  # cache hit, no rebuild
  assert os.path.getmtime(os.path.join(path, "embedded.json")) == mtime


def test_preempted_build_is_not_cached(tmp_path, monkeypatch):
  from memdyn_jax.train import loop

  def preempted_train(cfg, data, model_path, output_dir, **kwargs):
    return loop.TrainResult(run_dir=output_dir, step=3, total_steps=10, losses=(1.0,) * 3,
                            preempted=True, model=None)

  monkeypatch.setattr(loop, "train", preempted_train)
  spec = dataclasses.replace(TINY, corpus_docs=60)
  with pytest.raises(RuntimeError, match="step 3 of 10"):
    embedded.model_dir(spec, cache_dir=str(tmp_path), progress=False)
  root = tmp_path / "embedded" / spec.key()
  assert not (root / "model").exists() and not list(root.glob("build-*"))


def _run_quickstart(out):
  # One LR x one epoch count + the half-data run: every stage runs, compiles stay few.
  config = quickstart.QuickstartConfig(
      output_dir=str(out), n_train=16, learning_rates=(3e-3,), epochs=(1,), half_data_epochs=1,
      evals_per_run=2, n_eval=4, n_eval_train=4, n_eval_extra=2, n_samples=1, batch_size=8,
      max_length=160, eval_batch_size=4)
  return quickstart.run_study(config, spec=TINY)


def test_tiny_quickstart(tmp_path, monkeypatch, cache_dir):
  monkeypatch.setenv("MEMDYN_CACHE", str(cache_dir))
  out = tmp_path / "qs"
  text = open(_run_quickstart(out)).read()
  assert "PreMemAcc" in text and "| lr0.003_ep1 |" in text and "| lr0.003_ep1_half |" in text
  assert "Base model before fine-tuning (the start of every run): test accuracy" in text
  for name in ("summary.csv", "runs.csv", "premem_vs_test.png", "dynamics.png", "stages.txt"):
    assert (out / name).stat().st_size > 0, name
  assert len((out / "runs.csv").read_text().splitlines()) == 1 + 2
  # A re-run reuses every run and evaluation: records do not grow.
  n_records = len((out / "records.jsonl").read_text().splitlines())
  _run_quickstart(out)
  assert len((out / "records.jsonl").read_text().splitlines()) == n_records


def test_eval_steps_spread_over_the_run_last_included():
  steps = list(range(4, 164, 4))  # 40 checkpoints
  picks = quickstart.eval_steps(steps, 4)
  assert len(picks) == 4 and picks == sorted(picks) and picks[-1] == steps[-1]
  assert picks[0] <= steps[len(steps) // 2 - 1]  # the first one in the first half
  assert quickstart.eval_steps(steps, 0) == steps == quickstart.eval_steps(steps, 40)
  assert quickstart.eval_steps([8, 16], 4) == [8, 16]


def test_spread_verdict_reads_runs_against_noise_and_base():
  wide = quickstart.spread_verdict([0.1, 0.5], 0.1, noise=0.05)
  assert "well beyond that noise" in wide and "+0.000 to +0.400" in wide
  flat = quickstart.spread_verdict([0.06, 0.1], 0.07, noise=0.025)
  assert "no run ends far from the base model" in flat
  # Weak spread, but the runs sit well above the base: noise, not a flat sweep.
  weak = quickstart.spread_verdict([0.3, 0.36], 0.1, noise=0.025)
  assert "separates runs only weakly" in weak and "base model scores 0.100" in weak
  assert "The base model" not in quickstart.spread_verdict([0.3, 0.36], None, noise=0.025)
  with pytest.raises(ValueError, match="at least one run"):
    quickstart.spread_verdict([], 0.1, noise=0.025)
  with pytest.raises(ValueError, match="must be > 0"):
    quickstart.spread_verdict([0.1], 0.1, noise=0.0)


def test_quickstart_config_and_binary_reject_bad_settings(tmp_path):
  with pytest.raises(quickstart.QuickstartError, match="epochs"):
    quickstart.QuickstartConfig(epochs=())
  with pytest.raises(quickstart.QuickstartError, match="scale"):
    quickstart.QuickstartConfig(scale=0)
  proc = subprocess.run([sys.executable, os.path.join(_ROOT, "experiments", "quickstart.py"),
                         f"--output_dir={tmp_path}", "--n_eval=0"],
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == "quickstart.py: error: --n_eval: must be >= 1"


def test_pretraining_rows_keep_documents_whole(cache_dir):
  tok = models.load_tokenizer(embedded.model_dir(TINY, cache_dir=str(cache_dir), progress=False))
  spec = dataclasses.replace(TINY, corpus_docs=120, seq_len=256)  # every document fits a row
  docs = [[tok.bos_token_id, *tok.encode(t, add_special_tokens=False), tok.eos_token_id]
          for t in embedded.corpus_texts(spec)]
  whole = embedded.pretraining_data(spec, tok)
  ids, mask = whole.input_ids, whole.attention_mask.astype(bool)
  assert (whole.target_mask == mask & (np.arange(ids.shape[1]) > 0)).all()
  # Every row is whole documents (BOS first): none is cut across rows.
  rows = [list(r[m]) for r, m in zip(ids, mask)]
  assert all(len(d) <= spec.seq_len for d in docs)
  assert all(any(_contains(r, d) for r in rows) for d in docs[:40])
  assert all(r[0] == tok.bos_token_id for r in rows)
  assert sum(len(r) for r in rows) == sum(len(d) for d in docs)
  stream = embedded.pretraining_data(dataclasses.replace(spec, packing="stream"), tok)
  assert stream.attention_mask[:-1].all() and stream.attention_mask.sum() == mask.sum()
  with pytest.raises(ValueError, match="packing"):
    embedded.pretraining_data(dataclasses.replace(spec, packing="bins"), tok)


def _contains(row, doc):
  n = len(doc)
  return any(row[i:i + n] == doc for i in range(len(row) - n + 1))
