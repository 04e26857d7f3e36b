"""Analysis of evaluation records: collection, planted PreMemAcc/over-memorization structure,
baselines, robustness, data maps, Markdown/CSV/PNG outputs and experiments/analyze.py."""
from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from memdyn_jax import evaluation, metrics, records
from memdyn_jax.report import analysis, collect, markdown, plots

from conftest import REPO_ROOT

ANALYZE = str(REPO_ROOT / "experiments" / "analyze.py")
STEPS = (10, 20, 30, 40)
PLANTED = 1.2  # memorization threshold (perplexity) the synthetic sweep is built around
N_TRAIN = 10


def run_cli(*args, timeout=120):
  return subprocess.run([sys.executable, ANALYZE, *args], cwd=REPO_ROOT, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _rec(example_id, split, accuracy, **kw):
  base = dict(n_samples=5, n_unparseable=0, perplexity=2.0, exact_memorization=0.5,
              mean_entropy=1.0)
  base.update(kw)
  return evaluation.ExampleRecord(example_id, split, float(accuracy), **base).to_dict()


def _planted_run(run_dir: str, k: int, test_ppl) -> np.ndarray:
  """Writes one run whose test accuracy equals its train PreMemAcc at PLANTED; returns
  the planted (C,) PreMemAcc."""
  rng = np.random.RandomState(k)
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "run.json"), "w") as f:
    json.dump({"config": {"learning_rate": 1e-5 * (k + 1)}, "model": {"path": "none"}}, f)
  records.check_config(run_dir, {"task": "gsm8k"})
  c = len(STEPS)
  # Non-decreasing accuracy; memorized (ppl 1.02, far below PLANTED) from a random step on,
  # else ppl 2.0 (far above): every threshold in (1.02, 2.0] gives the same PreMemAcc.
  acc = np.minimum(1.0, rng.uniform(0, 0.5, N_TRAIN)[None] + 0.15 * (k + 1) * np.arange(c)[:, None])
  mem_step = rng.randint(0, c + 1, N_TRAIN)
  ppl = np.where(np.arange(c)[:, None] >= mem_step[None], 1.02, 2.0)
  em = np.clip(np.linspace(0.1, 0.9, N_TRAIN)[None] + 0.05 * np.arange(c)[:, None], 0, 1)
  premem = metrics.dataset_premem_accuracy(acc, ppl, PLANTED)
  for m, step in enumerate(STEPS):
    train = [_rec(f"tr{i}", "train", acc[m, i], perplexity=ppl[m, i],
                  exact_memorization=em[m, i], greedy_sum_logprob=-1.0 - i - m,
                  greedy_correct=float(i % 2), target_sum_logprob=-np.log(ppl[m, i]) * 10,
                  n_target_tokens=10) for i in range(N_TRAIN)]
    records.write_records(run_dir, step, "train", train)
    # Two test examples, both at the planted accuracy; token-level perplexity test_ppl[m].
    test = [_rec(f"te{j}", "test", premem[m], target_sum_logprob=-np.log(test_ppl[m]) * 10,
                 n_target_tokens=10, greedy_sum_logprob=-2.0 - j, greedy_correct=1.0,
                 sampled_entropy=0.5, mean_entropy=1.5, distinct_1=0.5, distinct_2=0.6 + 0.1 * m,
                 unique_answers=2, unique_traces=3) for j in range(2)]
    records.write_records(run_dir, step, "test", test)
    records.write_records(run_dir, step, "ood", [_rec("o0", "ood", 0.1 * m)])
  # Perturbed prompts at the last step: accuracy equals the example's PreMemAcc.
  pm_last = metrics.premem_accuracy(acc, ppl, PLANTED)[-1]
  records.write_records(run_dir, STEPS[-1], "perturbed",
                        [_rec(f"tr{i}", "perturbed", pm_last[i], perplexity=float("nan"))
                         for i in range(N_TRAIN)], "We know that")
  return premem


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
  """A 3-run sweep: run_0's test perplexity dips then rises (an over-memorization stage at
  steps 30-40); the others' falls steadily."""
  root = str(tmp_path_factory.mktemp("sweep"))
  premem = {}
  for k, ppl in enumerate([(2.0, 1.5, 1.8, 2.0), (2.0, 1.8, 1.6, 1.5), (2.2, 2.0, 1.9, 1.8)]):
    premem[f"run_{k}"] = _planted_run(os.path.join(root, f"run_{k}"), k, ppl)
  os.makedirs(os.path.join(root, "not_a_run"))
  return root, premem


@pytest.fixture(scope="module")
def runs(sweep):
  root, _ = sweep
  return [collect.load_run(d) for d in collect.find_runs(root)]


# ----------------------------------------------------------------------------- collect


def test_find_and_load_runs(sweep, runs, tmp_path):
  root, _ = sweep
  assert [r.name for r in runs] == ["run_0", "run_1", "run_2"]
  assert collect.find_runs(os.path.join(root, "run_1")) == [os.path.join(root, "run_1")]
  with pytest.raises(FileNotFoundError, match="no such directory"):
    collect.find_runs(str(tmp_path / "missing"))
  with pytest.raises(FileNotFoundError, match="no run directory"):
    collect.find_runs(str(tmp_path))
  with pytest.raises(FileNotFoundError, match="run.json"):
    collect.load_run(str(tmp_path))
  r = runs[0]
  assert set(r.units) == {"train", "test", "ood", "perturbed@We%20know%20that"}
  assert r.perturbations() == ["perturbed@We%20know%20that"]
  assert r.steps().tolist() == list(STEPS)
  assert r.common_steps("train", "perturbed@We%20know%20that").tolist() == [40]
  assert r.common_steps("train", "nope").tolist() == []
  train = r.units["train"]
  assert train.example_ids == tuple(f"tr{i}" for i in range(N_TRAIN))
  assert train.fields["accuracy"].shape == (4, N_TRAIN)
  np.testing.assert_allclose(r.units["test"].corpus_perplexity(), [2.0, 1.5, 1.8, 2.0])
  assert train.at([40, 10]).steps.tolist() == [40, 10]
  assert np.isnan(r.units["perturbed@We%20know%20that"].mean("perplexity")).all()


# ----------------------------------------------------------------------------- analysis


def test_checkpoint_rows_carry_planted_quantities(sweep, runs):
  _, premem = sweep
  rows = analysis.checkpoint_rows(runs[0], PLANTED, atc={40: 0.3}, distance={10: 1.0})
  assert [r["step"] for r in rows] == list(STEPS)
  np.testing.assert_allclose([r["train_premem"] for r in rows], premem["run_0"])
  np.testing.assert_allclose([r["test_accuracy"] for r in rows], premem["run_0"])
  np.testing.assert_allclose([r["ood_accuracy"] for r in rows], [0, 0.1, 0.2, 0.3])
  assert rows[0]["learning_rate"] == 1e-5 and rows[1]["test_distinct_2"] == pytest.approx(0.7)
  assert math.isnan(rows[0]["perturbed_accuracy[We know that]"])
  assert rows[3]["atc_predicted_accuracy"] == 0.3 and math.isnan(rows[0]["atc_predicted_accuracy"])
  assert rows[0]["distance_from_init"] == 1.0 and rows[0]["test_sampled_entropy"] == 0.5
  steps, x, y = analysis.premem_points(runs[0], PLANTED)
  assert steps.tolist() == list(STEPS)
  np.testing.assert_allclose(x, y)


def test_calibration_recovers_planted_threshold(runs):
  cal = metrics.calibrate_threshold(analysis.calibration_runs(runs),
                                    analysis.default_candidates())
  assert 1.02 < cal.threshold <= 2.0  # every such threshold reproduces the planted split
  assert cal.r2[cal.best_index] == pytest.approx(1.0)
  assert analysis.default_threshold("math") == pytest.approx(1.2, abs=2e-3)
  assert analysis.default_threshold("gsm8k") == pytest.approx(1.105, abs=1e-3)


def test_correlation_table(runs):
  rows = [row for r in runs for row in analysis.checkpoint_rows(r, PLANTED)]
  table = {t["predictor"]: t for t in analysis.correlation_table(rows, ["train_premem", "nope"])}
  assert table["train_premem"]["n"] == 12 and table["train_premem"]["r2"] == pytest.approx(1.0)
  assert table["nope"]["n"] == 0 and math.isnan(table["nope"]["r2"])


def test_overmemorization_stage_and_selection(runs):
  cfg = metrics.OverMemorizationConfig(min_ppl_rise=0.1, max_acc_drop=0.02)
  om = analysis.overmemorization(runs[0], cfg, PLANTED)
  assert om.detection.stage_steps == ((30, 40),)
  assert om.pre_stage_best in (10, 20) and om.max_premem == 40
  assert analysis.overmemorization(runs[1], cfg, PLANTED).detection.stages == ()


def test_atc_predictions_by_hand(runs):
  preds, note = analysis.atc_predictions(runs, ("run_0", 40))
  # Reference test scores (-2, -3) with accuracy premem[-1] of run_0.
  ref_acc = runs[0].units["test"].at([40]).mean("accuracy")[0]
  t = metrics.atc_threshold([-2.0, -3.0], ref_acc)
  want = metrics.atc_predicted_accuracy([-1.0 - i - 3 for i in range(N_TRAIN)], t)
  assert preds["run_1"][40] == want and "run_0 step 40" in note
  default, _ = analysis.atc_predictions(runs)  # default reference: last step of run_0
  assert default == preds
  with pytest.raises(ValueError, match="no test greedy scores"):
    analysis.atc_predictions(runs, ("run_0", 99))


def test_robustness_bins(sweep, runs):
  premem, accs = analysis.robustness(runs, PLANTED)
  assert premem.shape == (3 * N_TRAIN,) and set(accs) == {"original", "We know that"}
  np.testing.assert_allclose(accs["We know that"], premem)
  np.testing.assert_array_equal(analysis.bin_index([0, 0.19, 0.2, 0.99, 1.0], 5),
                                [0, 0, 1, 4, 4])
  with pytest.raises(ValueError, match="num_bins"):
    analysis.bin_index([0.5], 0)
  table = analysis.robustness_table(np.array([0.1, 0.9, 1.0]),
                                    {"p": np.array([0.0, 1.0, np.nan])}, 2)
  assert [r["n"] for r in table] == [1, 2] and table[1]["premem_bin"] == "[0.50, 1.00]"
  assert table[0]["accuracy[p]"] == 0.0 and table[1]["accuracy[p]"] == 1.0


def test_data_maps_and_entropy(runs):
  maps = analysis.data_maps(runs)
  assert [m.run for m in maps] == ["run_0", "run_1", "run_2"]
  em = np.clip(np.linspace(0.1, 0.9, N_TRAIN)[None] + 0.05 * np.arange(4)[:, None], 0, 1)
  np.testing.assert_allclose(maps[0].dmap.mean, em.mean(0))
  np.testing.assert_allclose(maps[0].dmap.variance, em.var(0))
  rows = analysis.data_map_rows(maps)
  assert rows[0]["n"] == N_TRAIN and rows[0]["n_easy"] + rows[0]["n_hard"] + rows[0][
      "n_other"] == N_TRAIN
  ent = analysis.entropy_rows(runs)
  assert [(e["checkpoint"], e["step"]) for e in ent[:2]] == [("first", 10), ("last", 40)]
  assert ent[0]["sampled_entropy"] == 0.5 and ent[0]["teacher_forced_entropy"] == 1.5
  assert analysis.learning_rate(runs[2]) == pytest.approx(3e-5)


# ----------------------------------------------------------------------------- markdown, plots


def test_markdown_and_csv(tmp_path):
  assert markdown.format_value(float("nan")) == "–" and markdown.format_value(0.12345) == "0.123"
  assert markdown.format_value(1e7) == "1e+07" and markdown.format_value(float("inf")) == "inf"
  assert markdown.format_value(3) == "3" and markdown.format_value(None) == ""
  rows = [{"a": 1, "b": 0.5}, {"a": "x|y", "c": float("nan")}]
  assert markdown.columns_of(rows) == ["a", "b", "c"]
  text = markdown.table(rows)
  assert text.splitlines()[0] == "| a | b | c |" and "x\\|y" in text and "| – |" in text
  assert markdown.table([]) == "_(no rows)_"
  path = markdown.write_csv(str(tmp_path / "t.csv"), rows)
  assert list(csv.DictReader(open(path))) == [{"a": "1", "b": "0.5", "c": ""},
                                              {"a": "x|y", "b": "", "c": ""}]
  rep = markdown.Report("T")
  rep.heading("H")
  rep.paragraph("p")
  rep.table(rows, ["a"])
  rep.image(str(tmp_path / "img" / "f.png"), "alt", str(tmp_path))
  rep.write(str(tmp_path / "r.md"))
  assert "## H" in rep.text() and "![alt](img/f.png)" in open(tmp_path / "r.md").read()


def _png(path):
  assert os.path.getsize(path) > 2000
  assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_every_plot_writes_a_png(tmp_path, runs):
  x = np.array([0.1, 0.5, 0.9])
  _png(plots.premem_scatter({"r": (x, x)}, str(tmp_path / "a.png"), slope=1.0, intercept=0.0,
                            r2=1.0, threshold=1.2))
  _png(plots.calibration_curve(np.array([1.1, 1.2, 1.5]), np.array([0.2, 0.9, np.nan]), 1.2,
                               str(tmp_path / "b.png")))
  _png(plots.robustness_violins(np.array([0.1, 0.15, 0.9, 0.95]),
                                {"orig": np.array([0.2, 0.4, 1.0, 1.0]),
                                 "p": np.array([0.0, 0.2, 0.8, np.nan])}, 2,
                                str(tmp_path / "c.png")))
  _png(plots.overmemorization_curves([dict(name="r", steps=[1, 2, 3],
                                           test_perplexity=[2, 1.5, 1.9],
                                           test_accuracy=[0.2, 0.5, 0.5],
                                           stage_steps=((3, 3),))], str(tmp_path / "d.png")))
  m = analysis.data_maps(runs)[0]
  _png(plots.data_maps([(m.run, m.dmap.mean, m.dmap.variance, m.labels)],
                       str(tmp_path / "e.png")))
  _png(plots.per_checkpoint_lines({"m": {"r": (np.array([1, 2]), np.array([0.1, 0.3]))}},
                                  str(tmp_path / "f.png"), title="t"))


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_tables_report_and_plots(sweep, tmp_path):
  root, _ = sweep
  out = str(tmp_path / "out")
  proc = run_cli(f"--sweep_dir={root}", f"--output_dir={out}", "--threshold=calibrated",
                 "--atc_reference=run_0:40")
  assert proc.returncode == 0, proc.stderr[-3000:]
  for f in ("checkpoints.csv", "calibration.csv", "baselines.csv", "overmemorization.csv",
            "robustness.csv", "data_maps.csv", "entropy.csv", "report.md"):
    assert os.path.getsize(os.path.join(out, f)) > 50, f
  for f in ("premem_scatter.png", "calibration_curve.png", "overmemorization.png",
            "robustness_violins.png", "data_maps.png", "diversity_ood.png"):
    _png(os.path.join(out, f))
  report = open(os.path.join(out, "report.md")).read()
  assert "12 checkpoints: R² = 1.000" in report and "![PreMemAcc scatter](premem_scatter.png)" \
      in report
  om = list(csv.DictReader(open(os.path.join(out, "overmemorization.csv"))))
  assert om[0]["run"] == "run_0" and om[0]["stages (steps)"] == "30-40"
  rows = list(csv.DictReader(open(os.path.join(out, "checkpoints.csv"))))
  assert len(rows) == 12 and all(0 <= float(r["atc_predicted_accuracy"]) <= 1 for r in rows)


def test_cli_on_evaluated_run_with_distance_from_init(evaluated_run, tmp_path, monkeypatch):
  run_dir, _ = evaluated_run
  out = str(tmp_path / "real")
  proc = run_cli(f"--sweep_dir={os.path.dirname(run_dir)}", f"--output_dir={out}",
                 "--distance_from_init")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(os.path.join(out, "checkpoints.csv"))))
  assert [int(r["step"]) for r in rows] == [2, 4]
  d2, d4 = (float(r["distance_from_init"]) for r in rows)
  assert 0 < d2 < d4  # the weights keep moving away from the base model
  assert rows[0]["perturbed_accuracy[First]"] != "" and rows[0]["train_premem"] != ""
  # Cached: a second call restores nothing.
  from memdyn_jax import checkpoints
  monkeypatch.setattr(checkpoints, "restore", lambda *a, **k: pytest.fail("restored"))
  assert analysis.distances_from_init(run_dir, [2, 4]) == pytest.approx({2: d2, 4: d4})


@pytest.mark.parametrize("args,needle", [
    ([], "--sweep_dir is required"),
    (["--sweep_dir=/nonexistent/sweep"], "--sweep_dir: /nonexistent/sweep"),
    (["--sweep_dir={tmp}"], "--sweep_dir"),
    (["--sweep_dir={sweep}", "--threshold=abc"], "--threshold"),
    (["--sweep_dir={sweep}", "--threshold=-1"], "--threshold"),
    (["--sweep_dir={sweep}", "--atc_reference=run_0"], "--atc_reference"),
    (["--sweep_dir={sweep}", "--premem_bins=0"], "--premem_bins"),
    (["--sweep_dir={sweep}", "--overmem_reference=bogus"], "overmem_reference"),
])
def test_bad_input_gives_one_line_error(args, needle, sweep, tmp_path):
  root, _ = sweep
  proc = run_cli(*[a.replace("{sweep}", root).replace("{tmp}", str(tmp_path)) for a in args])
  lines = [x for x in proc.stderr.splitlines() if x.strip()]
  assert proc.returncode == 2 and len(lines) == 1, proc.stderr
  assert lines[0].startswith("analyze.py: error:") and needle in lines[0]
