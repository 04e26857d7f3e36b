"""Evaluation: records module, per-example records, experiments/evaluate.py end to end
(record schema, compiled-program reuse across checkpoints, resumability, bad flags).

A changed evaluation config and mismatched task arguments are refused at library level
(test_config_is_recorded_then_compared, test_trained_examples_follow_examples_json)."""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re

import pytest

from memdyn_jax import evaluation, fileio
from memdyn_jax.train import checkpoints
from memdyn_jax.evaluation import records
from memdyn_jax.tasks import Example
from memdyn_jax.tasks import synthetic_arith as sa

from conftest import EVAL_CLI_FLAGS, EVAL_TASK_KWARGS, assert_one_line_error, run_binary


def run_cli(*args, **kwargs):
  return run_binary("evaluate.py", *args, **kwargs)


# ----------------------------------------------------------------------------- records.py


def test_unit_names_round_trip_and_reject_bad_splits():
  for split, pert in [("train", None), ("perturbed", "We know that"), ("p", "a/b@c%")]:
    stem = records.unit_name(split, pert)
    assert "/" not in stem and records.parse_unit_name(stem) == (split, pert)
  assert records.unit_name("test", "") == "test"
  for bad in ("", "a@b", "a/b"):
    with pytest.raises(ValueError, match="split"):
      records.unit_name(bad)


def test_write_list_load_records_atomically(tmp_path):
  run = str(tmp_path / "run_x")
  assert records.list_done(run) == set() and records.load_records(run) == []
  path = records.write_records(run, 7, "perturbed", [{"example_id": "a", "accuracy": 0.5}],
                               "We know that")
  records.write_records(run, 3, "train", [{"example_id": "a", "accuracy": float("nan")},
                                          {"example_id": "b", "accuracy": float("inf")}])
  assert path == records.record_path(run, 7, "perturbed", "We know that")
  assert os.path.basename(path) == "perturbed@We%20know%20that.jsonl"
  assert records.list_done(run) == {(7, "perturbed", "We know that"), (3, "train", None)}
  assert records.is_done(run, 3, "train") and not records.is_done(run, 3, "test")
  rows = records.load_records(run)
  assert [(r["step"], r["example_id"]) for r in rows] == [(3, "a"), (3, "b"), (7, "a")]
  assert rows[0]["run"] == "run_x" and math.isnan(rows[0]["accuracy"])
  # Strict JSON on disk (non-finite floats as null), NaN again on reading; +inf too.
  for f in (path, records.record_path(run, 3, "train")):
    for line in open(f):
      json.loads(line, parse_constant=lambda c, f=f: pytest.fail(f"{f}: {c} token"))
  assert '"accuracy": null' in open(records.record_path(run, 3, "train")).read()
  assert math.isnan(rows[1]["accuracy"]) and rows[2]["perturbation"] == "We know that"
  assert rows[0]["perturbation"] is None  # Text fields keep their real None.
  # Nothing temporary is left behind, and an empty unit is refused (it would read as done).
  assert not [f for _, _, fs in os.walk(run) for f in fs if f.startswith(".tmp-")]
  with pytest.raises(ValueError, match="no records"):
    records.write_records(run, 3, "test", [])
  # A stray temporary file (a killed writer) is not listed as done.
  open(os.path.join(os.path.dirname(path), ".tmp-xtest.jsonl"), "w").close()
  assert len(records.list_done(run)) == 2


def test_atomic_write_failure_keeps_old_file(tmp_path, monkeypatch):
  path = str(tmp_path / "f.json")
  fileio.atomic_write_text(path, "old")

  def boom(*a):
    raise OSError("disk full")

  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(OSError):
    fileio.atomic_write_text(path, "new")
  assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.json"]


def test_atomic_open_writes_bytes_whole_or_not_at_all(tmp_path):
  path = str(tmp_path / "w.bin")
  with fileio.atomic_open(path, "wb") as f:
    f.write(b"\x00\x01")
    assert not os.path.exists(path)  # nothing at the path until the block completes
  assert open(path, "rb").read() == b"\x00\x01"
  with pytest.raises(RuntimeError, match="cut"):
    with fileio.atomic_open(path, "wb") as f:
      f.write(b"partial")
      raise RuntimeError("cut")
  assert open(path, "rb").read() == b"\x00\x01" and os.listdir(tmp_path) == ["w.bin"]
  with pytest.raises(ValueError, match="mode"):
    with fileio.atomic_open(path, "a"):
      pass


def test_checkpoint_stats_are_strict_json(tmp_path):
  import numpy as np
  run = str(tmp_path / "run")
  path = records.update_checkpoint_stats(run, 4, {records.GRADIENT_VARIANCE: np.float64("nan"),
                                                  "n": np.int64(3)})
  json.loads(open(path).read(), parse_constant=lambda c: pytest.fail(f"{c} token"))
  stats = records.read_checkpoint_stats(run, 4)
  assert math.isnan(stats[records.GRADIENT_VARIANCE]) and stats["n"] == 3
  path_inf = records.update_checkpoint_stats(run, 6, {records.DISTANCE_FROM_INIT: float("inf")})
  assert json.load(open(path_inf)) == {records.DISTANCE_FROM_INIT: None}
  # Files written before strict JSON (NaN tokens) still read.
  open(path, "w").write('{"gradient_variance": NaN}')
  assert math.isnan(records.read_checkpoint_stats(run, 4)[records.GRADIENT_VARIANCE])


def test_read_jsonl_names_bad_line(tmp_path):
  path = tmp_path / "x.jsonl"
  path.write_text('{"a": 1}\n\n{bad\n')
  with pytest.raises(ValueError, match=r"x.jsonl:3"):
    records.read_jsonl(str(path))


def test_config_is_recorded_then_compared(tmp_path):
  run = str(tmp_path / "run")
  assert records.read_config(run) is None
  records.check_config(run, {"task": "gsm8k", "sampling": {"n": 5}, "steps": (1, 2)})
  records.check_config(run, {"task": "gsm8k", "sampling": {"n": 5}, "steps": [1, 2]})
  assert records.read_config(run)["steps"] == [1, 2]
  with pytest.raises(records.EvalConfigMismatchError, match=r"sampling.*'n': 5.*'n': 4"):
    records.check_config(run, {"task": "gsm8k", "sampling": {"n": 4}, "steps": [1, 2]})
  records.check_config(run, {"task": "math"}, name="eval_math")  # another folder: fine


def test_a_config_recorded_without_the_stop_it_ran_with_is_read_and_rewritten_with_it(tmp_path):
  """Before default_sampling stated the task's stop strings, eval/config.json recorded
  `"stop": []` although the evaluation applied the task's: such a record matches the same
  settings now, and is rewritten to state the stop; another stop is still refused."""
  run = str(tmp_path / "run")
  records.check_config(run, {"task": "gsm8k", "sampling": {"n": 5, "stop": []}})
  now = {"task": "gsm8k", "sampling": {"n": 5, "stop": ["\nDone."]}}
  records.check_config(run, now, task_stop=("\nDone.",))
  assert records.read_config(run) == now
  with pytest.raises(records.EvalConfigMismatchError, match="stop"):
    records.check_config(run, {"task": "gsm8k", "sampling": {"n": 5, "stop": []}},
                         task_stop=("\nDone.",))


def test_checkpoint_stats_merge_keys_and_are_not_units(tmp_path):
  run = str(tmp_path / "run")
  assert records.read_checkpoint_stats(run, 3) == {} and records.load_checkpoint_stats(run) == {}
  records.write_records(run, 3, "train", [{"example_id": "a", "accuracy": 1.0}])
  path = records.update_checkpoint_stats(run, 3, {"gradient_variance": 0.5, "x": 1})
  records.update_checkpoint_stats(run, 3, {"gradient_variance": 0.25})
  records.update_checkpoint_stats(run, 7, {"gradient_variance": 1.0})
  assert path == os.path.join(records.eval_dir(run), "step_00000003", "checkpoint.json")
  assert records.read_checkpoint_stats(run, 3) == {"gradient_variance": 0.25, "x": 1}
  assert records.load_checkpoint_stats(run) == {3: {"gradient_variance": 0.25, "x": 1},
                                                7: {"gradient_variance": 1.0}}
  assert records.list_done(run) == {(3, "train", None)}  # a stats file is no record unit
  open(path, "w").write("{bad")
  with pytest.raises(ValueError, match="checkpoint.json: malformed"):
    records.read_checkpoint_stats(run, 3)


# ----------------------------------------------------------------------------- evaluation.py


def test_default_sampling_is_kang_per_task_with_overrides():
  g = evaluation.default_sampling("gsm8k")
  assert (g.temperature, g.top_p, g.max_new_tokens, g.n) == (0.8, 0.95, 512, 5)
  m = evaluation.default_sampling("math", top_p=None, n=2)
  assert (m.temperature, m.top_p, m.max_new_tokens, m.n) == (0.8, 1.0, 1024, 2)
  assert evaluation.default_sampling("sft").max_new_tokens == 512  # falls back to GSM8K's
  with pytest.raises(ValueError, match="top_p"):
    evaluation.default_sampling("gsm8k", top_p=1.5)


def test_every_sampling_knob_is_an_evaluation_setting_resolved_from_the_task():
  """EvalSettings carries every SamplingParams knob (evaluate.py's --top_k, --min_p,
  --repetition_penalty, --stop); unset ones are the task's, which `resolve_sampling` states;
  a bad value names its field, an unknown task names the known ones."""
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
  settings = EvalSettings(top_k=3, min_p=0.1, repetition_penalty=1.2, stop=["END"])
  params = run_evaluation.sampling_params("math", settings)
  assert (params.top_k, params.min_p, params.repetition_penalty, params.stop) == (
      3, 0.1, 1.2, ("END",))
  resolved = run_evaluation.resolve_sampling(EvalSettings(), "math")
  assert (resolved.temperature, resolved.top_p, resolved.top_k, resolved.min_p,
          resolved.repetition_penalty, resolved.max_new_tokens, resolved.n_samples,
          resolved.stop) == (0.8, 1.0, 0, 0.0, 1.0, 1024, 5, ("\nDone.",))
  assert run_evaluation.resolve_sampling(resolved, "math") == resolved
  assert run_evaluation.sampling_params("math", resolved) == run_evaluation.sampling_params(
      "math", EvalSettings())
  for bad, field in [(dict(top_k=-1), "top_k"), (dict(min_p=2.0), "min_p"),
                     (dict(repetition_penalty=0.0), "repetition_penalty"),
                     (dict(stop=("",)), "stop"), (dict(task="gsm8K"), "task")]:
    with pytest.raises(EvalSettingsError) as e:
      run_evaluation.sampling_params(bad.pop("task", "gsm8k"), EvalSettings(**bad))
    assert e.value.field == field


def test_subset_is_seeded_ordered_and_total_when_asked():
  xs = [Example(str(i), "q", "t", "1") for i in range(20)]
  a = evaluation.subset(xs, 5, seed=1)
  assert a == evaluation.subset(xs, 5, seed=1) and len(a) == 5
  assert [int(e.id) for e in a] == sorted(int(e.id) for e in a)
  assert a != evaluation.subset(xs, 5, seed=2)
  assert evaluation.subset(xs, 0) == xs and evaluation.subset(xs, 99) == xs


def test_trained_examples_follow_examples_json(tmp_path):
  task = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS)
  train = task.load("train")
  assert checkpoints.trained_examples(str(tmp_path), task) == train  # no listing: whole split
  (tmp_path / "examples.json").write_text(json.dumps(
      {"task": "synthetic_arith", "split": "train", "ids": [train[3].id, train[1].id]}))
  assert checkpoints.trained_examples(str(tmp_path), task) == [train[3], train[1]]
  other = sa.SyntheticArithTask(seed=0, n_train=2, n_test=4, n_ood=4, max_steps=1)
  (tmp_path / "examples.json").write_text(json.dumps(
      {"task": "synthetic_arith", "split": "train", "ids": [train[5].id]}))
  with pytest.raises(ValueError, match="not in task"):
    checkpoints.trained_examples(str(tmp_path), other)


def test_a_data_fraction_run_is_scored_on_the_rows_it_draws(tiny_run, tmp_path):
  """A run trained on a fixed subset (subset.json) has its train split (and the gradient
  variance) built from that subset only, so memorization and PreMemAcc cover seen examples;
  a damaged listing is one error naming the file."""
  import shutil
  from memdyn_jax.train import checkpoints
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
  run_dir, _ = tiny_run
  copy = str(tmp_path / "run")
  shutil.copytree(run_dir, copy)
  task = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS)
  trained = checkpoints.trained_examples(copy, task)
  assert checkpoints.drawn_examples(copy, trained) == trained  # no subset.json: all rows
  settings = EvalSettings(splits=("train",), num_train=0)
  checkpoints.write_subset(copy, 0.5, [4, 1, 2])
  assert checkpoints.drawn_examples(copy, trained) == [trained[4], trained[1], trained[2]]
  units, train = run_evaluation.build_units(copy, task, settings)
  assert [u.examples for u in units] == [tuple(train)]
  assert list(train) == [trained[4], trained[1], trained[2]]
  for row in (len(trained), -1):  # rows the run does not have
    checkpoints.write_subset(copy, 0.5, [0, row])
    with pytest.raises(EvalSettingsError, match=f"subset.json names row {row};") as e:
      run_evaluation.build_units(copy, task, settings)
    assert e.value.field == "run_dir"
  open(os.path.join(copy, checkpoints.SUBSET_FILE), "w").write("{")
  with pytest.raises(EvalSettingsError, match="not a subset listing"):
    run_evaluation.build_units(copy, task, settings)


def test_example_meta_names_categories_of_every_task():
  synth = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS).load("train")[0]
  meta = evaluation.example_meta(synth)
  assert meta == {"level": synth.meta["level"], "n_lines": synth.meta["n_lines"]}
  assert evaluation.example_category(meta) == f"level={synth.meta['level']}"
  math_ex = Example("m", "q", "t", "1", meta={"level": 3, "level_raw": "Level 3",
                                              "subject": "algebra", "type": "Algebra"})
  meta = evaluation.example_meta(math_ex)
  assert meta == {"subject": "algebra", "level": 3}
  assert evaluation.example_category(meta) == "subject=algebra"
  # GSM8K has no meta: the solution's lines, not counting the "#### answer" line.
  gsm = Example("g", "q", "Natalia sold 24.\n\nShe sold 72.\n#### 72", "72")
  assert evaluation.example_meta(gsm) == {"n_lines": 2}
  sft = Example("s", "q", "r", "r", meta={"category": "", "messages": ({"role": "user"},)})
  assert evaluation.example_meta(sft) == {"n_lines": 1}  # an empty category is no category
  sft = Example("s", "q", "r", "r", meta={"category": "coding"})
  assert evaluation.example_category(evaluation.example_meta(sft)) == "category=coding"
  assert evaluation.example_category({}) == ""


def test_example_record_round_trip_and_summary():
  a = evaluation.ExampleRecord("e1", "test", 0.5, 2, 1, 1.5, 0.2, 3.0, answers=("4", None),
                               greedy_correct=1.0, sampled_entropy=1.0, category="level=2",
                               meta={"level": 2})
  b = evaluation.ExampleRecord("e2", "test", 1.0, 2, 0, 2.5, 0.4, 1.0, answers=("4", "4"))
  row = dict(a.to_dict(), run="r", step=3)
  back = evaluation.ExampleRecord.from_dict(json.loads(json.dumps(row)))
  assert json.dumps(back.to_dict()) == json.dumps(a.to_dict())  # NaN != NaN: compare text
  assert back.answers == ("4", None) and back.meta == {"level": 2}
  s = evaluation.summarize([a, b])
  assert s["accuracy"] == 0.75 and s["perplexity"] == 2.0 and s["unparseable_rate"] == 0.25
  assert s["greedy_correct"] == 1.0 and s["n_examples"] == 2  # NaN of b ignored
  assert math.isnan(s["distinct_1"])  # never computed: NaN, no warning
  with pytest.raises(ValueError, match="no records"):
    evaluation.summarize([])


# ----------------------------------------------------------------------------- end to end

SCHEMA = {"run", "step", "split", "perturbation", "example_id", "accuracy", "n_samples",
          "n_unparseable", "perplexity", "exact_memorization", "exact_memorization_full",
          "mean_entropy", "target_sum_logprob", "n_target_tokens", "sampled_entropy",
          "sampled_mean_logprob", "mean_sample_tokens", "distinct_1", "distinct_2",
          "unique_answers", "unique_traces", "greedy_correct", "greedy_unparseable",
          "greedy_sum_logprob", "greedy_mean_logprob", "greedy_n_tokens", "answers", "texts",
          "greedy_text", "category", "meta"}


def test_cli_writes_every_unit_with_the_schema(evaluated_run):
  run_dir, proc = evaluated_run
  assert records.list_done(run_dir) == {(s, u, p) for s in (2, 4) for u, p in
                                        [("train", None), ("test", None), ("perturbed", "First")]}
  config = records.read_config(run_dir)
  assert config["task"] == "synthetic_arith" and config["sampling"]["n"] == 2
  assert config["sampling"]["temperature"] == 0.8 and config["sampling"]["top_p"] == 0.95
  assert config["sampling"]["stop"] == ["\nDone."]  # the stop strings that were applied
  for (step, split, pert) in records.list_done(run_dir):
    rows = records.read_jsonl(records.record_path(run_dir, step, split, pert))
    assert len(rows) == 4
    for r in rows:
      assert set(r) == SCHEMA and r["run"] == "run_a" and r["step"] == step
      assert r["n_samples"] == 2 and len(r["answers"]) == 2 and 0 <= r["accuracy"] <= 1
      assert 0 < r["sampled_entropy"] and 1 <= r["mean_sample_tokens"] <= 8
      assert 0 < r["distinct_1"] <= 1 and 1 <= r["unique_traces"] <= 2
      if split == "perturbed":  # no greedy pass, no target scoring
        assert math.isnan(r["perplexity"]) and math.isnan(r["greedy_sum_logprob"])
      else:
        assert r["perplexity"] > 1 and 0 <= r["exact_memorization"] <= 1
        assert r["mean_entropy"] > 0 and r["n_target_tokens"] > 0
        assert r["greedy_correct"] in (0.0, 1.0) and r["greedy_sum_logprob"] < 0
        assert 1 <= r["greedy_n_tokens"] <= 8
      assert r["category"] == f"level={r['meta']['level']}"
      assert set(r["meta"]) == {"level", "n_lines"} and r["meta"]["n_lines"] >= 1
  # Gradient variance per checkpoint, with what it was measured on.
  for step in (2, 4):
    stats = records.read_checkpoint_stats(run_dir, step)
    assert stats["gradient_variance"] > 0
    assert stats["gradient_variance_settings"]["num_minibatches"] == 2
    assert stats["gradient_variance_settings"]["batch_size"] == 2
  assert (records.read_checkpoint_stats(run_dir, 2)["gradient_variance"]
          != records.read_checkpoint_stats(run_dir, 4)["gradient_variance"])
  train_ids = [r["example_id"] for r in records.read_jsonl(records.record_path(run_dir, 2,
                                                                               "train"))]
  assert train_ids == [r["example_id"] for r in records.read_jsonl(
      records.record_path(run_dir, 2, "perturbed", "First"))]


def test_cli_reuses_compiled_programs_across_checkpoints(evaluated_run):
  _, proc = evaluated_run
  times = {int(s): float(t) for s, t in
           re.findall(r"step (\d+): restored in [\d.]+s, \d+ unit\(s\) evaluated in ([\d.]+)s",
                      proc.stdout)}
  assert set(times) == {2, 4}, proc.stdout
  # Step 2 compiles every sampling/scoring program; step 4 only runs them.
  assert times[4] < times[2] / 3, times


def _library_inputs(run_dir: str):
  """(task, tokenizer, sampling params) of the evaluated run, as evaluate.py builds them."""
  from memdyn_jax import models
  task = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS)
  tok = models.load_tokenizer(json.load(open(os.path.join(run_dir, "run.json")))["model"]["path"],
                              padding_side="right")
  return task, tok, evaluation.default_sampling("synthetic_arith", n=2, max_new_tokens=8)


def test_rerun_skips_done_units_and_redoes_only_a_missing_one(evaluated_run):
  run_dir, _ = evaluated_run
  task, tok, params = _library_inputs(run_dir)
  unit = evaluation.EvalUnit("test", tuple(task.load("test")[:4]))
  # Library level: everything done, so nothing is restored or evaluated.
  assert evaluation.evaluate_units(run_dir, task, tok, [unit], params, batch_size=4,
                                   progress=False) == []
  with pytest.raises(ValueError, match="no checkpoint at step"):
    evaluation.evaluate_units(run_dir, task, tok, [unit], params, steps=[3], progress=False)
  # CLI level: only the removed unit is redone; seeded sampling reproduces it.
  path = records.record_path(run_dir, 4, "test")
  before = records.read_jsonl(path)
  os.remove(path)
  proc = run_cli(f"--run_dir={run_dir}", f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}",
                 *EVAL_CLI_FLAGS)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "step 4: restored" in proc.stdout and "step 2:" not in proc.stdout
  assert "1 unit(s)" in proc.stdout and "gradient variance" not in proc.stdout  # stored
  after = records.read_jsonl(path)
  assert [r["answers"] for r in after] == [r["answers"] for r in before]
  for a, b in zip(after, before):
    assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-4)


def test_gradient_variance_only_skips_done_and_redoes_changed_settings(evaluated_run):
  from memdyn_jax.evaluation.gradient_variance import GradientVarianceConfig

  run_dir, _ = evaluated_run
  task, tok, params = _library_inputs(run_dir)
  train = checkpoints.trained_examples(run_dir, task)
  kwargs = dict(steps=[4], progress=False, name="eval_gv", grad_variance_examples=train)
  cfg = GradientVarianceConfig(num_minibatches=2, batch_size=2)
  # No units: only the gradient variance is measured.
  done = evaluation.evaluate_units(run_dir, task, tok, [], params, grad_variance=cfg, **kwargs)
  assert [(t.step, t.units) for t in done] == [(4, 0)] and done[0].gradient_variance_s > 0
  first = records.read_checkpoint_stats(run_dir, 4, name="eval_gv")["gradient_variance"]
  assert evaluation.evaluate_units(run_dir, task, tok, [], params, grad_variance=cfg,
                                   **kwargs) == []
  other = GradientVarianceConfig(num_minibatches=3, batch_size=2)
  assert len(evaluation.evaluate_units(run_dir, task, tok, [], params, grad_variance=other,
                                       **kwargs)) == 1
  stats = records.read_checkpoint_stats(run_dir, 4, name="eval_gv")
  assert stats["gradient_variance_settings"]["num_minibatches"] == 3
  assert stats["gradient_variance"] != first
  with pytest.raises(ValueError, match="needs 3 minibatches of 8"):
    evaluation.evaluate_units(run_dir, task, tok, [], params,
                              grad_variance=GradientVarianceConfig(3, 8), **kwargs)


def test_sharded_evaluation_matches_one_device(evaluated_run):
  """A 2x2x2 mesh over 8 forced host devices gives the 1-device records and gradient
  variance of the same checkpoint."""
  run_dir, _ = evaluated_run
  proc = run_cli(f"--run_dir={run_dir}", f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}",
                 *EVAL_CLI_FLAGS, "--steps=4", "--eval_name=eval_mesh", "--mesh_data=2",
                 "--mesh_fsdp=2", "--mesh_tensor=2", timeout=400,
                 env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8"})
  assert proc.returncode == 0, proc.stderr[-3000:]
  done = records.list_done(run_dir, name="eval_mesh")
  assert done == {(4, u, p) for u, p in [("train", None), ("test", None), ("perturbed", "First")]}
  for _, split, pert in done:
    ref = records.read_jsonl(records.record_path(run_dir, 4, split, pert))
    got = records.read_jsonl(records.record_path(run_dir, 4, split, pert, name="eval_mesh"))
    assert [r["example_id"] for r in got] == [r["example_id"] for r in ref]
    for a, b in zip(got, ref):
      assert a["answers"] == b["answers"] and a["accuracy"] == b["accuracy"]
      assert a["greedy_n_tokens"] == b["greedy_n_tokens"] and a["meta"] == b["meta"]
      for key in ("perplexity", "exact_memorization", "mean_entropy", "sampled_entropy",
                  "greedy_sum_logprob", "target_sum_logprob"):
        if isinstance(b[key], float) and math.isnan(b[key]):
          assert math.isnan(a[key]), key
        else:
          assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-4), key
  got = records.read_checkpoint_stats(run_dir, 4, name="eval_mesh")["gradient_variance"]
  assert got == pytest.approx(records.read_checkpoint_stats(run_dir, 4)["gradient_variance"],
                              rel=1e-3)


def test_run_evaluation_pending_steps_and_checks_when_all_is_done(evaluated_run):
  """run_evaluation with EVAL_CLI_FLAGS' settings: nothing pending; other gradient-variance
  settings, another split or a subset of steps change what is pending; the run's checkpoints
  and the recorded settings are checked even when nothing is pending."""
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError

  run_dir, _ = evaluated_run
  settings = EvalSettings(splits=("train", "test", "perturbed"), task_kwargs=EVAL_TASK_KWARGS,
                          num_train=4, max_eval=4, perturbations=("First",), max_new_tokens=8,
                          n_samples=2, batch_size=4, grad_variance_minibatches=2,
                          grad_variance_batch_size=2)
  assert run_evaluation.pending_steps(run_dir, settings) == []
  assert run_evaluation.evaluate(run_dir, settings, progress=False) == []
  other_gv = dataclasses.replace(settings, grad_variance_minibatches=3)
  assert run_evaluation.pending_steps(run_dir, other_gv) == [2, 4]
  assert run_evaluation.pending_steps(run_dir, other_gv, steps=[4]) == [4]
  assert run_evaluation.pending_steps(
      run_dir, dataclasses.replace(settings, splits=("test", "ood"))) == [2, 4]
  assert run_evaluation.pending_steps(
      run_dir, dataclasses.replace(settings, grad_variance=False, include_base=True)) == [0]
  for changed, steps, field in [(settings, [3], "steps"),
                                (dataclasses.replace(settings, num_train=3), None, "eval_name"),
                                (dataclasses.replace(settings, top_p=2.0), None, "top_p")]:
    with pytest.raises(EvalSettingsError) as e:
      run_evaluation.evaluate(run_dir, changed, steps=steps, progress=False)
    assert e.value.field == field


@pytest.mark.parametrize("args,needle", [
    # Rejected before any model code is imported.
    ([], "--run_dir is required"),
    (["--run_dir=/nonexistent/run"], "--run_dir: /nonexistent/run"),
    (["--run_dir={tmp}"], "--run_dir"),
    (["--run_dir={run}", "--splits=train,bogus"], "--splits"),
    (["--run_dir={run}", "--steps=x"], "--steps"),
    (["--run_dir={run}", "--batch_size=abc"], "batch_size"),
    (["--run_dir={run}", "--num_train=-1"], "--num_train"),
    # Rejected after reading the run (these import JAX: a few seconds each).
    (["--run_dir={run}", "--steps=3"], "--steps"),
    (["--run_dir={run}", "--top_p=2"], "--top_p"),
    (["--run_dir={run}", "--num_train=4", "--grad_variance_batch_size=4"],
     "--grad_variance_batch_size: 5 minibatches of 4 need 20 train examples"),
    (["--run_dir={run}", "--grad_variance_minibatches=1"], "--grad_variance_minibatches"),
    (["--run_dir={run}", "--eval_name=long", "--nograd_variance", "--noprogress",
      "--max_new_tokens=100000"],
     "--max_new_tokens: prompt"),
    (["--run_dir={run}", "--nograd_variance", "--mesh_data=3"],
     "--mesh_data/--mesh_fsdp/--mesh_tensor"),
])
def test_bad_input_gives_one_line_error(args, needle, evaluated_run, tmp_path):
  run_dir, _ = evaluated_run
  proc = run_cli(*[a.replace("{run}", run_dir).replace("{tmp}", str(tmp_path)) for a in args])
  assert_one_line_error(proc, "evaluate.py", needle)


def test_cli_run_without_checkpoints_is_an_error(tiny_run, tmp_path):
  run_dir, _ = tiny_run
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "run.json").write_text(open(os.path.join(run_dir, "run.json")).read())
  proc = run_cli(f"--run_dir={empty}")
  assert proc.returncode == 2 and "no complete checkpoint" in proc.stderr.strip()


def test_evaluation_defaults_to_the_task_the_run_was_trained_on(tiny_run, tmp_path):
  """No --task/--task_kwargs/--task_path: the run's examples.json gives all three; given
  task arguments that make other data under the same ids are refused by the data check."""
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
  run_dir, _ = tiny_run
  resolved = run_evaluation.for_run(run_dir, EvalSettings())
  assert (resolved.task, resolved.task_kwargs, resolved.task_path) == (
      "synthetic_arith", {"seed": 0, **EVAL_TASK_KWARGS}, None)
  # Explicit settings win; another task does not inherit the run's arguments.
  assert run_evaluation.for_run(run_dir, EvalSettings(task_kwargs={"n_train": 3})
                                ).task_kwargs == {"n_train": 3}
  assert run_evaluation.for_run(run_dir, EvalSettings(task="gsm8k")).task_kwargs == {}
  # A run trained from a local path records it (absolute) and is evaluated on it.
  listing = tmp_path / "run"
  listing.mkdir()
  from memdyn_jax.train import task_run
  task_run.write_examples_listing(str(listing), task_run.TaskSpec("gsm8k", path="data/gsm8k"),
                                  ["gsm8k/train/0"])
  resolved = run_evaluation.for_run(str(listing), EvalSettings())
  assert resolved.task_path == os.path.abspath("data/gsm8k") and resolved.task == "gsm8k"
  # Same ids, other content (another seed): refused, naming the fix.
  settings = EvalSettings(splits=("train",), task_kwargs={**EVAL_TASK_KWARGS, "seed": 1},
                          num_train=4, max_new_tokens=8, n_samples=1, batch_size=4,
                          grad_variance=False, eval_name="other_seed")
  with pytest.raises(EvalSettingsError, match="not the data the run was trained on") as e:
    run_evaluation.evaluate(run_dir, settings, progress=False)
  assert e.value.field == "task_kwargs"
  assert not os.path.exists(os.path.join(run_dir, "other_seed"))  # nothing written


def test_a_damaged_record_file_is_redone_and_never_read_short(tmp_path):
  run = str(tmp_path / "run")
  rows = [{"example_id": str(i), "accuracy": 1.0} for i in range(3)]
  path = records.write_records(run, 5, "test", rows)
  assert records.unit_state(run, 5, "test") == "done" and records.is_done(run, 5, "test")
  lines = open(path).read().splitlines(keepends=True)
  open(path, "w").writelines(lines[:2])  # a line lost after the write
  assert records.unit_state(run, 5, "test") == "damaged"
  assert not records.is_done(run, 5, "test") and records.list_done(run) == set()
  with pytest.raises(records.DamagedRecordsError, match=r"test.jsonl: .*3 rows.*evaluate.py"):
    records.load_records(run)
  os.remove(path)
  with pytest.raises(records.DamagedRecordsError, match="missing"):
    records.load_records(run)
  records.write_records(run, 5, "test", rows)  # what a re-run of evaluate.py does
  assert records.is_done(run, 5, "test") and len(records.load_records(run)) == 3
  # A file written but not yet listed (killed between the two writes) counts as not done.
  units = os.path.join(os.path.dirname(path), records.UNITS_FILE)
  os.remove(units)
  assert records.is_done(run, 5, "test")  # no units.json at all: an older evaluation
  records.write_records(run, 5, "train", rows)
  open(units, "w").write('{"train": {"rows": 3, "bytes": %d}}' % os.path.getsize(
      records.record_path(run, 5, "train")))
  assert records.unit_state(run, 5, "test") == "missing"


def test_checkpoint_scalars_and_tensorboard_events(evaluated_run):
  from memdyn_jax.evaluation import run as run_evaluation
  rows = []
  for step, accs, ppls in [(2, (1.0, 0.0), (1.5, 1.5)), (4, (1.0, 1.0), (1.01, 1.5))]:
    for i, (a, p) in enumerate(zip(accs, ppls)):
      rows.append({"step": step, "split": "train", "perturbation": None, "example_id": f"e{i}",
                   "accuracy": a, "perplexity": p, "exact_memorization": 0.5})
    rows.append({"step": step, "split": "test", "perturbation": None, "example_id": "t",
                 "accuracy": 0.25, "perplexity": float("nan"), "exact_memorization": 0.1})
  got = run_evaluation.checkpoint_scalars(rows, threshold=1.1)
  assert got[2]["train/accuracy"] == 0.5 and got[2]["train/memorized_fraction"] == 0.0
  # e0 memorized at step 4 keeps its pre-memorization accuracy 1.0; e1 solved: PreMemAcc 1.
  assert got[4]["train/memorized_fraction"] == 0.5 and got[4]["train/premem_accuracy"] == 1.0
  assert got[4]["test/accuracy"] == 0.25 and "test/perplexity" not in got[4]
  pytest.importorskip("tensorboardX")
  run_dir, _ = evaluated_run
  events = [f for f in os.listdir(os.path.join(run_dir, "tensorboard")) if f.endswith(".eval")]
  assert events, os.listdir(os.path.join(run_dir, "tensorboard"))


def test_progress_within_a_unit_counts_prompts_and_tokens(tiny_run):
  """The walk's bar sat still for 52 s inside a unit: each phase now reports its prompts
  done (of the unit's) and the tokens generated so far, batch by batch."""
  from memdyn_jax.evaluation.examples import evaluate_examples
  run_dir, _ = tiny_run
  task, tok, _ = _library_inputs(run_dir)
  model, _ = checkpoints.restore(run_dir, 4)
  params = evaluation.default_sampling("synthetic_arith", n=2, max_new_tokens=4)
  calls = []
  evaluate_examples(model, tok, task, task.load("test")[:3], "test", params=params,
                    batch_size=2, greedy=True, progress=lambda *a: calls.append(a))
  phases = [c[0] for c in calls]
  assert phases == ["sampling", "sampling", "greedy", "greedy", "scoring", "scoring"]
  assert [c[1:3] for c in calls] == [(2, 3), (3, 3), (2, 3), (3, 3), (0, 3), (3, 3)]
  sampled, greedy = calls[1][3], calls[3][3]
  assert 0 < calls[0][3] <= sampled <= 3 * 2 * 4 and 0 < greedy <= 3 * 4  # n=2, 4 tokens


def test_a_small_evaluation_sizes_the_gradient_variance_and_says_what_it_resumes(tiny_run,
                                                                                  tmp_path):
  """--num_train=4 failed on the default gradient variance (5 minibatches of 8): the
  default shape is sized to the subset, in one line, and a re-run finds it done; a resumed
  evaluation says how much was already done."""
  import shutil

  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.evaluation.run import EvalSettings
  run_dir = str(tmp_path / "run_a")
  shutil.copytree(tiny_run[0], run_dir, ignore=shutil.ignore_patterns(records.EVAL_DIR))
  settings = EvalSettings(splits=("test",), task_kwargs=EVAL_TASK_KWARGS, num_train=4,
                          max_eval=2, max_new_tokens=4, n_samples=1, batch_size=2,
                          greedy=False)
  assert run_evaluation.train_subset_size(run_dir, settings) == 4
  lines = []
  run_evaluation.evaluate(run_dir, settings, steps=[2], progress=False, log=lines.append)
  assert lines[0] == ("gradient variance over 4 minibatches of 1: the train subset has 4 "
                      "example(s), fewer than the default 5 minibatches of 8 "
                      "(--grad_variance_minibatches, --grad_variance_batch_size set it)")
  stats = records.read_checkpoint_stats(run_dir, 2)
  assert stats[records.GRADIENT_VARIANCE_SETTINGS]["num_minibatches"] == 4
  lines.clear()
  run_evaluation.evaluate(run_dir, settings, progress=False, log=lines.append)
  assert "resumed: 1 of 2 (checkpoint, unit) pairs already evaluated, 1 to go" in lines
  assert run_evaluation.pending_steps(run_dir, settings) == []  # the sized shape is found
  one = dataclasses.replace(settings, num_train=1)
  assert one.grad_variance_config(1) is None  # under 2 examples: none
  shaped = dataclasses.replace(settings, grad_variance_batch_size=4)  # set by hand: kept
  assert shaped.grad_variance_config(4).batch_size == 4
