"""A tiny embedded model and a tiny quickstart run end to end (CI's copy of the pipeline)."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from memdyn_jax.studies import embedded, quickstart
from memdyn_jax import models

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
  mixed = count(embedded.corpus_texts(embedded.EmbeddedSpec(corpus_docs=80,
                                                            task_format_fraction=0.5)))
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
  info = embedded.verify(path)  # every file's sha256 matches the manifest
  assert info["pretrain_steps"] > 0 and info["final_loss"] < 7.0 and info["tokens_per_s"] > 0
  assert set(info["probes"]) >= {"arithmetic", "copy_numbers", "work_accuracy",
                                 "task_accuracy", "task_accuracy_band"}
  assert set(info["sha256"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
  tok = models.load_tokenizer(path)
  cfg = models.load_config(path)
  assert cfg.hidden_size == 32 and cfg.vocab_size == len(tok)
  mtime = os.path.getmtime(os.path.join(path, embedded.MANIFEST_FILE))
  assert embedded.model_dir(TINY, cache_dir=str(cache_dir)) == path  # cache hit, no rebuild
  assert os.path.getmtime(os.path.join(path, embedded.MANIFEST_FILE)) == mtime


def test_preempted_build_is_not_installed_and_keeps_its_work(tmp_path, monkeypatch):
  from memdyn_jax.train import loop

  def preempted_train(cfg, data, model_path, output_dir, **kwargs):
    return loop.TrainResult(run_dir=output_dir, step=3, total_steps=10, losses=(1.0,) * 3,
                            preempted=True, model=None)

  monkeypatch.setattr(loop, "train", preempted_train)
  spec = dataclasses.replace(TINY, corpus_docs=60)
  with pytest.raises(embedded.EmbeddedBaseError, match="step 3 of 10"):
    embedded.model_dir(spec, cache_dir=str(tmp_path), progress=False)
  root = tmp_path / "embedded" / spec.key()
  assert not (root / "model").exists()
  # The work directory stays for the re-run to continue; another spec is refused there.
  assert (root / "work" / "tokenizer").exists() and (root / "work" / "init").exists()
  with pytest.raises(embedded.EmbeddedBaseError, match="another spec"):
    embedded.build(TINY, str(tmp_path / "other"), work_dir=str(root / "work"), progress=False)


def test_build_never_adopts_or_replaces_a_folder_of_something_else(tmp_path):
  """The work directory is removed on success and the output replaced: neither may be a
  user's folder. Both refusals come before any build work; nothing is deleted."""
  from memdyn_jax import fileio

  user = tmp_path / "mine"
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  with pytest.raises(embedded.EmbeddedBaseError, match="work_dir .*no spec.json"):
    embedded.build(TINY, str(tmp_path / "out"), work_dir=str(user), progress=False)
  with pytest.raises(fileio.NotReplaceableError, match="nothing was deleted"):
    embedded.build(TINY, str(user), work_dir=str(tmp_path / "work"), progress=False)
  assert os.listdir(user) == ["notes.txt"] and not (tmp_path / "work").exists()
  proc = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "experiments", "build_embedded.py"),
       f"--output_dir={user}"], capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
      l for l in proc.stderr.strip().splitlines() if l.startswith("build_embedded.py: error: "
                                                                  "--output_dir: ")]
  assert os.listdir(user) == ["notes.txt"]
  # A base built before output markers existed is still a built base: replaceable.
  assert embedded._is_built_base(embedded.ASSET_DIR) and not embedded._is_built_base(str(user))


def test_shipped_base_loads_matches_manifest_and_probe_band():
  manifest = embedded.verify(embedded.ASSET_DIR)
  assert embedded.spec_of(manifest) == embedded.EmbeddedSpec()
  assert embedded.model_dir() == embedded.ASSET_DIR
  size = sum(os.path.getsize(os.path.join(embedded.ASSET_DIR, f))
             for f in os.listdir(embedded.ASSET_DIR))
  assert size <= 10 * 2**20
  model, _ = models.from_pretrained(embedded.ASSET_DIR)
  tok = models.load_tokenizer(embedded.ASSET_DIR)
  task = embedded.EmbeddedSpec().task()
  tests = task.load("test")[:manifest["probes"]["n"]]
  acc = embedded._greedy_accuracy(model, tok, [task.format_prompt(e.question) for e in tests],
                                  [e.answer for e in tests], task.extract_answer, 160, task.stop)
  lo, hi = manifest["probes"]["task_accuracy_band"]
  assert lo <= acc <= hi


def test_corrupt_base_file_is_named(tmp_path):
  import shutil
  copy = tmp_path / "base"
  shutil.copytree(embedded.ASSET_DIR, copy)
  with open(copy / "config.json", "a") as f:
    f.write(" ")
  with pytest.raises(embedded.EmbeddedBaseError, match="config.json: sha256"):
    embedded.verify(str(copy))


def test_build_binary_end_to_end_at_tiny_size(tmp_path):
  out = tmp_path / "base"
  proc = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "experiments", "build_embedded.py"),
       f"--output_dir={out}", "--corpus_docs=120", "--hidden_size=32", "--num_layers=1",
       "--num_heads=2", "--num_kv_heads=2", "--intermediate_size=64", "--seq_len=64",
       "--probe_examples=8", "--save_every_steps=4"],
      capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-2000:]
  manifest = embedded.verify(str(out))
  assert manifest["build_command"].startswith("python experiments/build_embedded.py")
  assert manifest["spec"]["num_layers"] == 1 and not (tmp_path / "base.build").exists()


def _run_quickstart(out, workers=2):
  # One LR x one epoch count + the small-data run (half the data here): every stage runs,
  # compiles stay few.
  config = quickstart.QuickstartConfig(
      output_dir=str(out), n_train=16, learning_rates=(3e-3,), epochs=(1,), small_data_epochs=2,
      small_data_fraction=0.5,
      evals_per_run=2, n_eval=4, n_eval_train=8, n_samples=1, batch_size=8,
      max_length=160, max_new_tokens=32, eval_batch_size=4, workers=workers)
  return quickstart.run_study(config, spec=TINY)


def test_tiny_quickstart_runs_the_standard_pipeline(tmp_path, monkeypatch, cache_dir):
  from memdyn_jax import report
  monkeypatch.setenv("MEMDYN_CACHE", str(cache_dir))
  out = tmp_path / "qs"
  text = open(_run_quickstart(out)).read()
  assert "PreMemAcc" in text and "| lr0.003_ep1_frac1 |" in text and "## Targets" in text
  summary = json.loads((out / "summary.json").read_text())
  for key in ("base_test_accuracy", "test_accuracy_standard_error", "runs",
              "premem_threshold_perplexity", "base_memorized_fraction", "r2", "r2_held_out",
              "merge", "wall_seconds"):
    assert key in summary, key
  assert set(summary["r2"]) == {"premem", "train_accuracy", "train_perplexity",
                                "gradient_variance", "distance_from_init", "atc"}
  # Two runs: too few to hold one out and still calibrate on the rest.
  assert summary["r2_held_out"]["leave_one_run_out"] is None
  assert "Held out (Kang et al. App. A.1" in text
  assert set(summary["runs"]) == {"lr0.003_ep1_frac1", "lr0.003_ep2_frac0.5"}
  for run in summary["runs"].values():
    assert {"final_test_accuracy", "final_train_accuracy", "memorized_fraction",
            "overmemorization_flagged", "test_perplexity_rise"} <= set(run)
  assert summary["wall_seconds"]["total"] > 0
  # The sweep layout: sweep.json, run directories with eval/ records, analysis/.
  assert (out / "sweep.json").exists() and (out / "analysis" / "report.md").exists()
  assert (out / "analysis" / "train_perplexity_distributions.png").stat().st_size > 0
  assert summary["workers"] == 2 and summary["cell_seconds"]["train"] > 0
  # A re-run reuses every run and evaluation: the same figures.
  _run_quickstart(out)
  again = json.loads((out / "summary.json").read_text())
  drop = lambda d: {k: v for k, v in d.items()
                    if k not in ("wall_seconds", "cell_seconds", "workers")}
  assert drop(again) == drop(summary)
  # The runs computed in this process instead of two workers: the same figures.
  _run_quickstart(tmp_path / "one_worker", workers=1)
  one = json.loads((tmp_path / "one_worker" / "summary.json").read_text())
  assert {k for k in one["settings"] if one["settings"][k] != summary["settings"][k]} == {
      "workers"}
  assert drop({**one, "settings": None}) == drop({**summary, "settings": None})
  assert report.analyze_sweep(str(out), str(tmp_path / "again")).summary["runs"] == \
      summary["runs"]


def test_spread_steps_spread_over_the_run_last_included():
  from memdyn_jax.evaluation.run import spread_steps
  steps = list(range(4, 164, 4))  # 40 checkpoints
  picks = spread_steps(steps, 4)
  assert len(picks) == 4 and picks == sorted(picks) and picks[-1] == steps[-1]
  assert picks[0] <= steps[len(steps) // 2 - 1]  # the first one in the first half
  assert spread_steps(steps, 0) == steps == spread_steps(steps, 40)
  assert spread_steps([8, 16], 4) == [8, 16]


def _summary(runs, **kw):
  base = dict(final_test_accuracy_spread=0.4, best_gain_over_base=0.3,
              test_accuracy_standard_error=0.02, base_memorized_fraction=0.0,
              r2={"premem": 0.9, "train_accuracy": 0.8, "atc": None}, merge=None)
  return {**base, "runs": runs, **kw}


def _run(rise, flagged, mem=0.0, train=0.5, test=0.4):
  return dict(test_perplexity_rise=rise, overmemorization_flagged=flagged,
              memorized_fraction=mem, final_train_accuracy=train, final_test_accuracy=test)


def test_merge_source_prefers_flagged_runs():
  runs = {"a": _run(0.3, False), "b": _run(0.15, True), "c": _run(None, False)}
  assert quickstart.merge_source(_summary(runs))[0] == "b"
  runs = {"a": _run(0.3, False), "b": _run(0.1, False)}
  name, why = quickstart.merge_source(_summary(runs))
  assert name == "a" and "no run is flagged" in why
  assert quickstart.merge_source(_summary({"a": _run(0.0, False)}))[0] is None


def test_targets_read_off_the_summary():
  runs = {"a": _run(0.3, True, mem=0.9, train=0.95, test=0.5), "b": _run(0.0, False)}
  met = dict(quickstart.targets(_summary(runs, merge={"test_perplexity": 1.1,
                                                      "source_test_perplexity": 1.2})))
  assert all(met.values()), met
  met = dict(quickstart.targets(_summary({"b": _run(0.0, False)},
                                         r2={"premem": 0.82, "train_accuracy": 0.8})))
  assert met["PreMemAcc R² ahead of every baseline by >= 0.05"] is False
  assert met["merging that run's checkpoints lowers its test perplexity"] is None
  assert met["over-memorization is flagged in at least one run"] is False
  assert quickstart.accuracy_standard_error(0.5, 256) == pytest.approx(0.03125)

def test_quickstart_config_and_binary_reject_bad_settings(tmp_path):
  with pytest.raises(quickstart.QuickstartError, match="epochs"):
    quickstart.QuickstartConfig(epochs=())
  with pytest.raises(quickstart.QuickstartError, match="scale"):
    quickstart.QuickstartConfig(scale=0)
  with pytest.raises(quickstart.QuickstartError, match="checkpoint_every_epochs"):
    quickstart.QuickstartConfig(checkpoint_every_epochs=0)
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
