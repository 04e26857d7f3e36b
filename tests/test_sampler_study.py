"""Sampler studies on a tiny synthetic setup: the MBC study through the library (both judges,
sampling-frequency histogram, table, resume) and the reweighting study through
experiments/mbc.py (OOD and perturbed units), plus the binary's one-line errors."""
from __future__ import annotations

import csv
import json
import os

import numpy as np
import pytest

from memdyn_jax.evaluation import judge as judge_lib
from memdyn_jax.studies import sampler_study
from memdyn_jax.evaluation.sampling import SamplingParams
from memdyn_jax.tasks import synthetic_arith as sa
from memdyn_jax.train import task_run
from memdyn_jax.train.config import TrainConfig

from conftest import assert_one_line_error, run_binary

TASK_KWARGS = {"seed": 0, "n_train": 24, "n_test": 6, "n_ood": 4, "max_steps": 1}
# 6 steps x 6 examples = 36 draws over 24 examples: uniform draws each once or twice.
TRAIN = TrainConfig(learning_rate=1e-2, max_steps=6, global_batch_size=6, warmup_steps=1,
                    mbc_refresh_steps=2, max_length=256, overlength="truncate")
SAMPLING = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=12)


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  from memdyn_jax import testing
  task = sa.SyntheticArithTask(**TASK_KWARGS)
  # A window long enough for the default judge prompt with two responses.
  return testing.save_tiny_task_model(str(tmp_path_factory.mktemp("study") / "base"), task,
                                      max_position_embeddings=1024)


def _csv(path):
  with open(path, newline="") as f:
    return list(csv.DictReader(f))


def test_study_config_presets_and_checks():
  mbc = sampler_study.study_config("mbc")
  assert mbc.samplers == ("uniform", "mbc") and mbc.judge == "auto" and not mbc.ood
  with pytest.raises(ValueError, match="^mitigations: checkpoint selection and merging need"):
    sampler_study.study_config("reweight")  # no checkpoint cadence
  rw = sampler_study.study_config("reweight", ood=None, n_eval_train=5,
                                  train=TrainConfig(save_every_steps=2))
  assert rw.samplers == ("uniform", "memorization_reweight") and rw.ood
  assert rw.perturbations == ("First", "We know that") and rw.n_eval_train == 5
  assert rw.mitigations == ("selection", "merge")
  with pytest.raises(ValueError, match="^n_validation:"):
    sampler_study.study_config("reweight", n_eval=0, train=TrainConfig(save_every_steps=2))
  three = sampler_study.study_config("mbc", samplers=["uniform", "mbc",
                                                      "memorization_reweight"])
  assert len(three.samplers) == 3
  sft = type("T", (), {"name": "sft"})()
  arith = sa.SyntheticArithTask()
  assert sampler_study.judges_for(mbc, arith) == ("reference",)
  assert sampler_study.judges_for(mbc, sft) == ("local",)
  assert sampler_study.judges_for(rw, arith) == ()
  for kwargs, field in [({"samplers": ["uniform", "bogus"]}, "samplers"),
                        ({"samplers": ["mbc"]}, "samplers"),
                        ({"baseline": "memorization_reweight"}, "baseline"),
                        ({"judge": "gpt4"}, "judge"), ({"confidence": 1.0}, "confidence"),
                        ({"mitigations": ["prune"]}, "mitigations")]:
    with pytest.raises(ValueError, match=f"^{field}:"):
      sampler_study.study_config("mbc", **kwargs)


def test_draw_count_stats():
  s = sampler_study.draw_count_stats(np.array([0, 2, 4, 2]))
  assert s == {"draws_min": 0.0, "draws_max": 4.0, "draws_std": pytest.approx(np.sqrt(2)),
               "frac_never_drawn": 0.25}


def test_mbc_study_end_to_end_and_resume(base_model, tmp_path):
  from memdyn_jax.train import checkpoints

  task = sa.SyntheticArithTask(**TASK_KWARGS)
  cfg = sampler_study.study_config("mbc", train=TRAIN, sampling=SAMPLING, n_eval=0,
                                   n_eval_train=6, judge="both", eval_batch_size=8)
  spec = task_run.TaskSpec("synthetic_arith", TASK_KWARGS)
  out = str(tmp_path / "study")
  messages = []
  kwargs = dict(progress=False, log=messages.append)
  result = sampler_study.run_study(cfg, spec, base_model, out, **kwargs)
  assert messages[0] == f"uniform: trained 6 steps ({out}/runs/uniform)"

  # Equal budget: same steps and draws; draw counts are the checkpoints' and sum to 36.
  freq = _csv(result.files["sampling_frequency_csv"])
  assert len(freq) == 24 and list(freq[0]) == ["row", "example_id", "uniform", "mbc"]
  train_ids = [e.id for e in task.load("train")]
  assert [r["example_id"] for r in freq] == train_ids
  for sampler in cfg.samplers:
    counts = np.array([int(r[sampler]) for r in freq])
    run_dir = os.path.join(out, "runs", sampler)
    assert counts.sum() == 36
    np.testing.assert_array_equal(counts, checkpoints.read_meta(run_dir, 6)["draw_counts"])
  uniform = np.array([int(r["uniform"]) for r in freq])
  assert set(uniform) == {1, 2} and (uniform == 2).sum() == 12  # 1.5 epochs without replacement
  assert os.path.getsize(result.files["sampling_frequency_png"]) > 1000

  rows = {r["sampler"]: r for r in result.rows}
  assert set(rows) == {"uniform", "mbc"}
  for r in rows.values():
    assert r["steps"] == 6 and r["examples_drawn"] == 36
    for key in ("test_perplexity", "test_exact_memorization", "test_entropy",
                "train_exact_memorization", "test_accuracy"):
      assert np.isfinite(r[key]), key
    assert r["test_perplexity"] > 1.0 and 0 <= r["test_exact_memorization"] <= 1
  assert rows["uniform"]["frac_never_drawn"] == 0.0

  # Judges: mbc (A) against uniform (B) on the 6 held-out prompts.
  assert set(result.judged) == {"reference", "local"}
  for name, by_sampler in result.judged.items():
    r = by_sampler["mbc"]
    assert r.n == 6 and "uniform" not in by_sampler
    assert rows["mbc"][f"{name}_judge_win_rate"] == r.win_rate
  local = _csv(result.files["judge_local_csv"])
  assert len(local) == 6 and {r["system_a"] for r in local} == {"mbc"}
  for r in local:
    fwd, swp = float(r["score_forward"]), float(r["score_swapped"])
    assert float(r["score"]) == pytest.approx(0.5 * (fwd - swp))
    assert int(r["verdict"]) == judge_lib.verdicts([float(r["score"])], 0.1)[0]
  reference = _csv(result.files["judge_reference_csv"])
  assert all(float(r["score"]) in (-1.0, 0.0, 1.0) for r in reference)
  # The reference verdicts are the task's grades of the records' first samples.
  recs = {s: {json.loads(line)["example_id"]: json.loads(line) for line in
              open(os.path.join(out, "runs", s, sampler_study.EVAL_NAME, "step_00000006",
                                "test.jsonl"))} for s in cfg.samplers}
  for r in reference:
    ex = next(e for e in task.load("test") if e.id == r["example_id"])
    grade = lambda s, ex=ex: float(task.grade(recs[s][ex.id]["texts"][0], ex.answer))
    assert float(r["score"]) == grade("mbc") - grade("uniform")

  report = open(result.report).read()
  assert "| uniform |" in report and "| mbc |" in report
  assert "test_perplexity" in report and "![sampling frequency](sampling_frequency.png)" in report
  assert "Pairwise judge: reference" in report and "mbc vs uniform" in report
  summary = json.load(open(result.files["summary_json"]))
  assert summary["config"]["samplers"] == ["uniform", "mbc"]

  # Re-running resumes: nothing is retrained or re-evaluated, the outputs are the same.
  record = os.path.join(out, "runs", "mbc", sampler_study.EVAL_NAME, "step_00000006",
                        "test.jsonl")
  mtime = os.path.getmtime(record)
  again = sampler_study.run_study(cfg, spec, base_model, out, **kwargs)
  assert os.path.getmtime(record) == mtime
  assert again.rows == result.rows
  assert checkpoints.list_steps(os.path.join(out, "runs", "uniform")) == [6]


def _run_cli(*args, timeout=600):
  return run_binary("mbc.py", *args, timeout=timeout)


def test_reweight_study_through_the_binary(base_model, tmp_path):
  out = tmp_path / "reweight"
  proc = _run_cli(
      "--study=reweight", f"--model={base_model}", "--task=synthetic_arith",
      f"--task_kwargs={json.dumps(TASK_KWARGS)}", f"--output_dir={out}", "--n_eval=4",
      "--n_eval_train=4", "--n_ood=2", "--perturbations=First", "--max_new_tokens=12",
      "--eval_batch_size=8", "--noprogress", "--learning_rate=0.01", "--max_steps=4",
      "--global_batch_size=6", "--mbc_refresh_steps=2", "--reweight_p=1.5",
      "--max_length=256", "--overlength=truncate", "--save_every_steps=2",
      "--n_validation=2")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "report written to" in proc.stdout
  rows = {r["sampler"]: r for r in _csv(out / "results.csv")}
  assert set(rows) == {"uniform", "memorization_reweight", "uniform+selection",
                       "uniform+merge"}
  # Selection: the uniform run's checkpoint of lowest perplexity on the 2 test examples
  # after the 4 evaluated ones, evaluated on the same units as the samplers' runs.
  from memdyn_jax.evaluation import examples as example_eval
  test_ids = [e.id for e in sa.SyntheticArithTask(**TASK_KWARGS).load("test")]
  ppl = {}
  for step in (2, 4):
    recs = [json.loads(x) for x in open(out / "runs" / "uniform" / "selection_eval" /
                                        f"step_{step:08d}" / "validation.jsonl")]
    assert [r["example_id"] for r in recs] == test_ids[4:6]
    ppl[step] = example_eval.summarize(
        [example_eval.ExampleRecord.from_dict(r) for r in recs])["perplexity"]
  best = min(ppl, key=lambda k: (ppl[k], k))
  assert rows["uniform+selection"]["steps"] == str(best)
  assert rows["uniform+selection"]["checkpoint"].startswith(f"step {best}: lowest validation")
  assert rows["uniform+merge"]["checkpoint"] == "uniform average of its 2 checkpoints [2, 4]"
  merged = json.load(open(out / "merged" / "uniform" / "run.json"))["merge"]
  assert [s["step"] for s in merged["sources"]] == [2, 4]
  assert (out / "merged" / "uniform" / "study_eval" / "step_00000004" / "test.jsonl").exists()
  for r in rows.values():
    for key in ("test_accuracy", "test_perplexity", "robustness", "accuracy@First",
                "ood_accuracy"):
      assert r[key] != "", key
    assert float(r["robustness"]) == float(r["accuracy@First"])
  # Reweighting keeps the uniform order: identical draw counts.
  freq = _csv(out / "sampling_frequency.csv")
  assert all(r["uniform"] == r["memorization_reweight"] for r in freq)
  assert not (out / "judge_reference.csv").exists()  # the reweight study judges nothing
  report = (out / "report.md").read_text()
  assert "reweight" in report and "ood_accuracy" in report and "robustness" in report
  run = json.load(open(out / "runs" / "memorization_reweight" / "run.json"))
  assert run["config"]["sampler"] == "memorization_reweight"
  assert run["config"]["reweight_p"] == 1.5


@pytest.mark.parametrize("args,needle", [
    (["--task=synthetic_arith", "--output_dir=/tmp/x"], "--model is required"),
    (["--model=m", "--task=synthetic_arith", "--output_dir=/tmp/x", "--samplers=uniform,nope"],
     "--samplers:"),
    (["--model=m", "--task=synthetic_arith", "--output_dir=/tmp/x", "--learning_rate=-1"],
     "--learning_rate:"),
    (["--model=m", "--task=synthetic_arith", "--output_dir=/tmp/x", "--study=other"],
     "--study"),
    (["--model=m", "--task=nope", "--output_dir=/tmp/x"], "--task: unknown task 'nope'"),
    (["--model=m", "--task=synthetic_arith", "--output_dir=/tmp/x", "--study=reweight"],
     "--mitigations: checkpoint selection and merging need"),
    (["--model=/no/such/model", "--task=synthetic_arith", "--output_dir=/tmp/x",
      '--task_kwargs={"n_train": 4, "n_test": 2, "n_ood": 2}'], "--model:"),
])
def test_bad_flags_give_one_line_error(args, needle):
  assert_one_line_error(_run_cli(*args, timeout=120), "mbc.py", needle)
