"""Analysis of evaluation records: collection, planted PreMemAcc/over-memorization structure,
baselines, robustness, data maps, Markdown/CSV/PNG outputs and experiments/analyze.py."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os

import numpy as np
import pytest

from memdyn_jax import evaluation, fileio, metrics, report
from memdyn_jax.evaluation import records
from memdyn_jax.report import analysis, collect, markdown, merges, plots

from conftest import assert_one_line_error, run_binary

STEPS = (10, 20, 30, 40)
PLANTED = 1.2  # memorization threshold (perplexity) the synthetic sweep is built around
N_TRAIN = 10


def run_cli(*args):
  return run_binary("analyze.py", *args)


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
                  n_target_tokens=10, meta={"level": 1 + i % 2}, category=f"level={1 + i % 2}")
             for i in range(N_TRAIN)]
    records.write_records(run_dir, step, "train", train)
    records.update_checkpoint_stats(run_dir, step, {"gradient_variance": _gv(k, m)})
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


def _gv(k: int, m: int) -> float:
  return 0.01 * (k + 1) * (m + 1)


def _merged_run(run_dir: str, sources) -> None:
  """A merged model's run directory (as experiments/merge.py writes it), evaluated at step
  40: train accuracy 1 (PreMemAcc 1) but test accuracy 0.1, far off every trajectory's
  line, so it would spoil the R² = 1 calibration if it were taken for a trajectory."""
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "run.json"), "w") as f:
    json.dump({"config": {"learning_rate": 1e-5}, "model": {"path": "none"},
               "merge": {"method": "linear", "sources": sources, "step": 40}}, f)
  records.check_config(run_dir, {"task": "gsm8k"})
  records.write_records(run_dir, 40, "train", [
      _rec(f"tr{i}", "train", 1.0, perplexity=2.0, target_sum_logprob=-np.log(2.0) * 10,
           n_target_tokens=10, greedy_sum_logprob=-1.0) for i in range(N_TRAIN)])
  records.write_records(run_dir, 40, "test", [
      _rec(f"te{j}", "test", 0.1, target_sum_logprob=-np.log(1.4) * 10, n_target_tokens=10,
           greedy_sum_logprob=-2.0, distinct_2=0.9, unique_answers=1, unique_traces=2)
      for j in range(2)])
  records.write_records(run_dir, 40, "ood", [_rec("o0", "ood", 0.75)])
  for pert, acc in (("We know that", 0.5), ("First", 0.25)):
    records.write_records(run_dir, 40, "perturbed", [
        _rec(f"tr{i}", "perturbed", acc, perplexity=float("nan")) for i in range(N_TRAIN)],
        pert)


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
def merged_sweep(tmp_path_factory):
  """The sweep's three runs plus "merged", a linear merge of run_0's steps 30 (absolute
  path) and 40 (path relative to the sweep) and of a run outside the sweep."""
  root = str(tmp_path_factory.mktemp("merged_sweep"))
  for k, ppl in enumerate([(2.0, 1.5, 1.8, 2.0), (2.0, 1.8, 1.6, 1.5), (2.2, 2.0, 1.9, 1.8)]):
    _planted_run(os.path.join(root, f"run_{k}"), k, ppl)
  _merged_run(os.path.join(root, "merged"), [
      {"run_dir": os.path.join(root, "run_0"), "step": 30}, {"run_dir": "run_0", "step": 40},
      {"run_dir": "/elsewhere/run_9", "step": 5}])
  return root


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
  stats = {**runs[0].checkpoint_stats, 10: {**runs[0].checkpoint_stats[10],
                                            records.DISTANCE_FROM_INIT: 1.0}}
  run = dataclasses.replace(runs[0], checkpoint_stats=stats)
  rows = analysis.checkpoint_rows(run, PLANTED, atc={40: 0.3})
  assert [r["step"] for r in rows] == list(STEPS)
  np.testing.assert_allclose([r["train_premem"] for r in rows], premem["run_0"])
  np.testing.assert_allclose([r["test_accuracy"] for r in rows], premem["run_0"])
  np.testing.assert_allclose([r["ood_accuracy"] for r in rows], [0, 0.1, 0.2, 0.3])
  assert rows[0]["learning_rate"] == 1e-5 and rows[1]["test_distinct_2"] == pytest.approx(0.7)
  assert math.isnan(rows[0]["perturbed_accuracy[We know that]"])
  assert rows[3]["atc_predicted_accuracy"] == 0.3 and math.isnan(rows[0]["atc_predicted_accuracy"])
  assert rows[0]["distance_from_init"] == 1.0 and rows[0]["test_sampled_entropy"] == 0.5
  assert [r["gradient_variance"] for r in rows] == [_gv(0, m) for m in range(4)]
  assert {r["kind"] for r in rows} == {"trajectory"}
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
  table = {t["predictor"]: t for t in analysis.correlation_table(
      rows, ["train_premem", "gradient_variance", "nope"])}
  assert table["train_premem"]["n"] == 12 and table["train_premem"]["r2"] == pytest.approx(1.0)
  gv = [(r["gradient_variance"], r["test_accuracy"]) for r in rows]
  want = metrics.fit_r2(np.array([g for g, _ in gv]), np.array([a for _, a in gv]))
  assert table["gradient_variance"]["n"] == 12
  assert table["gradient_variance"]["r2"] == pytest.approx(want.r2)
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
  # Per category (train examples alternate level 1 and 2).
  cats = [r for r in analysis.data_map_category_rows(maps) if r["run"] == "run_0"]
  assert [(r["key"], r["category"], r["n"]) for r in cats] == [("level", 1, 5), ("level", 2, 5)]
  for r, cols in zip(cats, (slice(0, None, 2), slice(1, None, 2))):
    assert r["first_exact_memorization"] == pytest.approx(em[0, cols].mean())
    assert r["last_exact_memorization"] == pytest.approx(em[-1, cols].mean())
    assert r["mean_exact_memorization"] == pytest.approx(em[:, cols].mean())
    assert r["mean_variance"] == pytest.approx(em[:, cols].var(0).mean())
    assert r["share_easy"] == pytest.approx(np.mean(maps[0].labels[cols] == "easy"))
    assert r["share_hard"] == pytest.approx(np.mean(maps[0].labels[cols] == "hard"))
  ent = analysis.entropy_rows(runs)
  assert [(e["checkpoint"], e["step"]) for e in ent[:2]] == [("first", 10), ("last", 40)]
  assert ent[0]["sampled_entropy"] == 0.5 and ent[0]["teacher_forced_entropy"] == 1.5
  assert analysis.learning_rate(runs[2]) == pytest.approx(3e-5)


# ----------------------------------------------------------------------------- merged runs


def test_merged_run_is_resolved_to_its_source_trajectory(merged_sweep):
  runs = [collect.load_run(d) for d in collect.find_runs(merged_sweep)]
  trajs, merged = merges.split_runs(runs)
  assert [r.name for r in trajs] == ["run_0", "run_1", "run_2"]
  assert [r.name for r in merged] == ["merged"] and analysis.is_merged(merged[0])
  src = merges.merge_sources(merged[0], trajs)
  assert src.method == "linear" and src.sources == {"run_0": (30, 40)}
  assert src.unmatched == ("/elsewhere/run_9",)
  bad = dataclasses.replace(merged[0], info={"merge": {"method": "x"}})
  with pytest.raises(ValueError, match="'sources' list"):
    merges.merge_sources(bad, trajs)
  # Merged models are no trajectory: calibration, ATC's default reference and the fits skip them.
  assert len(analysis.calibration_runs(trajs)) == 3
  assert analysis.atc_predictions(merged + trajs)[1].startswith("run_0 step 40")


def test_merge_table_against_the_trajectory_checkpoints(merged_sweep):
  runs = [collect.load_run(d) for d in collect.find_runs(merged_sweep)]
  trajs, merged = merges.split_runs(runs)
  rows = [row for r in runs for row in analysis.checkpoint_rows(r, PLANTED)]
  assert [r["kind"] for r in rows if r["run"] == "merged"] == ["merged"]
  run0 = {r["step"]: r for r in rows if r["run"] == "run_0"}
  om = analysis.overmemorization(trajs[0], metrics.OverMemorizationConfig(), PLANTED)
  table = merges.comparison_rows(merged, trajs, rows, {"run_0": om.pre_stage_best})
  assert [(t["source_run"], t["model"]) for t in table] == [
      ("run_0", "merged"), ("run_0", "last"), ("run_0", "best_test_accuracy"),
      ("run_0", "overmem_selected")]
  assert all(t["merged_run"] == "merged" and t["method"] == "linear" for t in table)
  assert table[0]["source_steps"] == "30 40" and table[0]["step"] == 40
  m = table[0]
  assert m["test_accuracy"] == pytest.approx(0.1) and m["test_perplexity"] == pytest.approx(1.4)
  assert m["perturbed_accuracy"] == pytest.approx(0.375)  # mean of the two prompts
  assert m["ood_accuracy"] == 0.75 and m["test_distinct_2"] == pytest.approx(0.9)
  best = max(run0, key=lambda s: (run0[s]["test_accuracy"], -s))
  assert [t["step"] for t in table[1:]] == [40, best, om.pre_stage_best]
  for t in table[1:]:
    ref = run0[t["step"]]
    assert t["test_accuracy"] == ref["test_accuracy"]
    assert t["test_perplexity"] == ref["test_perplexity"]
    assert t["test_unique_traces"] == ref["test_unique_traces"]
    np.testing.assert_equal(t["perturbed_accuracy"], merges.perturbed_accuracy(ref))
  assert table[1]["perturbed_accuracy"] == pytest.approx(
      run0[40]["perturbed_accuracy[We know that]"])
  # No over-memorization selection: that row is left out.
  assert [t["model"] for t in merges.comparison_rows(merged, trajs, rows, {})][-1] == \
      "best_test_accuracy"
  markers = merges.plot_markers(merged, trajs, rows)
  assert markers == {"run_0": [dict(label="merged (linear)", step=40,
                                    test_perplexity=pytest.approx(1.4),
                                    test_accuracy=pytest.approx(0.1))]}


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
  curves = dict(name="r", steps=[1, 2, 3], test_perplexity=[2, 1.5, 1.9],
                test_accuracy=[0.2, 0.5, 0.5], stage_steps=(),
                merged=[dict(label="m (linear)", step=3, test_perplexity=1.6,
                             test_accuracy=0.6)])
  plain = plots.overmemorization_curves([dict(curves, merged=[])], str(tmp_path / "d0.png"))
  starred = plots.overmemorization_curves([curves], str(tmp_path / "d1.png"))
  _png(starred)
  assert open(starred, "rb").read() != open(plain, "rb").read()  # the markers are drawn
  m = analysis.data_maps(runs)[0]
  _png(plots.data_maps([(m.run, m.dmap.mean, m.dmap.variance, m.labels)],
                       str(tmp_path / "e.png")))
  _png(plots.per_checkpoint_lines({"m": {"r": (np.array([1, 2]), np.array([0.1, 0.3]))}},
                                  str(tmp_path / "f.png"), title="t"))


# ------------------------------------------------------------------ report.analyze_sweep


@pytest.mark.parametrize("kwargs,field", [
    ({"threshold": "abc"}, "threshold"), ({"threshold": -1}, "threshold"),
    ({"atc_reference": "run_0"}, "atc_reference"), ({"premem_bins": 0}, "premem_bins"),
    ({"overmem_reference": "bogus"}, "overmem_reference"),
    ({"overmem_ppl_rise": 0.0}, "overmem_ppl_rise"),
    ({"calibration_runs": 1}, "calibration_runs"),
])
def test_analysis_options_name_the_bad_field(kwargs, field):
  with pytest.raises(report.AnalysisError) as e:
    report.AnalysisOptions(**kwargs)
  assert e.value.field == field


def test_analysis_options_parse_threshold_and_atc_reference():
  assert report.AnalysisOptions(threshold=" 1.2 ").threshold_value == 1.2
  assert report.AnalysisOptions(threshold="calibrated").threshold_value == "calibrated"
  assert report.AnalysisOptions(atc_reference="a:b:40").atc_checkpoint == ("a:b", 40)
  assert report.AnalysisOptions().atc_checkpoint is None


def test_analyze_sweep_in_process(sweep, tmp_path):
  root, _ = sweep
  out = str(tmp_path / "out")
  result = report.analyze_sweep(root, out, report.AnalysisOptions(threshold=str(PLANTED)))
  assert (result.output_dir, result.runs, result.checkpoints) == (out, 3, 12)
  assert result.files[-1] == os.path.join(out, "report.md")
  assert all(os.path.getsize(f) > 0 for f in result.files)
  assert f"perplexity {PLANTED:.4f}" in open(result.files[-1]).read()
  # Default output folder, and errors naming the setting.
  assert report.analyze_sweep(root).output_dir == os.path.join(root, "analysis")
  for args, field in [((str(tmp_path / "missing"),), "sweep_dir"),
                      ((str(tmp_path),), "sweep_dir"),
                      ((root, out, report.AnalysisOptions(atc_reference="run_7:10")),
                       "atc_reference")]:
    with pytest.raises(report.AnalysisError) as e:
      report.analyze_sweep(*args)
    assert e.value.field == field, args


def test_held_out_r2_of_premem_and_the_baselines(sweep, tmp_path):
  """Every run's test accuracy is its PreMemAcc at the planted threshold: calibrated on the
  other runs, PreMemAcc predicts a held-out run exactly; the K-run protocol needs K + 1 runs
  and names the runs it calibrated on."""
  root, _ = sweep
  three = report.analyze_sweep(root, str(tmp_path / "k3"), report.AnalysisOptions()).summary
  held = three["r2_held_out"]
  assert held["leave_one_run_out"]["premem"] == pytest.approx(1.0)
  assert held["leave_one_run_out_premem_thresholds"] and all(
      1.02 < t <= 2.0 for t in held["leave_one_run_out_premem_thresholds"])
  assert set(held["leave_one_run_out"]) == set(report.sweep_report.R2_PREDICTORS)
  assert held["k_runs"] is None and held["calibration_runs"] == []
  # In sample, the baselines' R² is at least their held-out R² here (a line fitted on the
  # points it is scored on).
  for key, r2 in held["leave_one_run_out"].items():
    if r2 is not None and three["r2"][key] is not None:
      assert r2 <= three["r2"][key] + 1e-9, key
  two = report.analyze_sweep(root, str(tmp_path / "k2"),
                             report.AnalysisOptions(calibration_runs=2)).summary["r2_held_out"]
  # Final test accuracy rises with k (run_2 highest, run_0 lowest): the extremes calibrate.
  assert two["calibration_runs"] == ["run_0", "run_2"]
  assert two["k_runs"]["premem"] == pytest.approx(1.0)
  table = open(tmp_path / "k2" / "baselines.csv").read().splitlines()
  assert "r2_leave_one_run_out" in table[0] and "r2_k_runs" in table[0]
  assert "calibrated on run_0, run_2" in open(tmp_path / "k2" / "report.md").read()


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
  assert [float(r["gradient_variance"]) for r in rows[:4]] == [_gv(0, m) for m in range(4)]
  base = {r["predictor"]: r for r in csv.DictReader(open(os.path.join(out, "baselines.csv")))}
  assert base["gradient_variance"]["n"] == "12" and base["gradient_variance"]["r2"] != ""
  cats = list(csv.DictReader(open(os.path.join(out, "data_maps_by_category.csv"))))
  assert [(c["run"], c["key"], c["category"]) for c in cats[:2]] == [("run_0", "level", "1"),
                                                                     ("run_0", "level", "2")]
  assert "measured by evaluate.py" in report and "| level | 1 | 5 |" in report
  assert not os.path.exists(os.path.join(out, "merges.csv"))  # no merged run in this sweep


def test_cli_merged_run_beside_its_trajectory(merged_sweep, sweep, tmp_path):
  out = str(tmp_path / "out")
  proc = run_cli(f"--sweep_dir={merged_sweep}", f"--output_dir={out}", "--threshold=calibrated")
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = open(os.path.join(out, "report.md")).read()
  # The merged model (PreMemAcc 1, test accuracy 0.1) is kept out of calibration and fits.
  assert "12 checkpoints: R² = 1.000" in report and "3 run(s) and 1 merged model(s)" in report
  cal = list(csv.DictReader(open(os.path.join(out, "calibration.csv"))))
  assert max(float(c["r2"]) for c in cal if c["r2"]) == pytest.approx(1.0)
  base = {r["predictor"]: r for r in csv.DictReader(open(os.path.join(out, "baselines.csv")))}
  assert base["train_premem"]["n"] == "12"
  rows = list(csv.DictReader(open(os.path.join(out, "checkpoints.csv"))))
  assert [(r["run"], r["kind"]) for r in rows if r["kind"] == "merged"] == [("merged", "merged")]
  table = list(csv.DictReader(open(os.path.join(out, "merges.csv"))))
  assert [t["model"] for t in table] == ["merged", "last", "best_test_accuracy",
                                         "overmem_selected"]
  assert table[0]["test_accuracy"] == "0.1" and table[0]["perturbed_accuracy"] == "0.375"
  assert table[3]["step"] == list(csv.DictReader(open(
      os.path.join(out, "overmemorization.csv"))))[0]["select_pre_stage_best_acc"]
  assert "Merged models vs their trajectories" in report and "/elsewhere/run_9" in report
  om = list(csv.DictReader(open(os.path.join(out, "overmemorization.csv"))))
  assert [r["run"] for r in om] == ["run_0", "run_1", "run_2"]
  _png(os.path.join(out, "overmemorization.png"))


def test_cli_on_evaluated_run_with_distance_from_init(evaluated_run, tmp_path, monkeypatch):
  """Distance from init is measured by evaluation (beside the gradient variance): a re-run
  of evaluate.py with --distance_from_init adds it to each checkpoint's stats without
  re-evaluating a unit, and the analysis only reads it."""
  import shutil

  from conftest import EVAL_CLI_FLAGS, EVAL_TASK_KWARGS
  from memdyn_jax.train import checkpoints
  run_dir = str(tmp_path / "sweep" / "run_a")
  shutil.copytree(evaluated_run[0], run_dir)
  before = open(records.record_path(run_dir, 4, "test")).read()
  proc = run_binary("evaluate.py", f"--run_dir={run_dir}", "--distance_from_init",
                    f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}", *EVAL_CLI_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert open(records.record_path(run_dir, 4, "test")).read() == before  # no unit redone
  out = str(tmp_path / "real")
  monkeypatch.setattr(checkpoints, "restore", lambda *a, **k: pytest.fail("restored"))
  report.analyze_sweep(os.path.dirname(run_dir), out, report.AnalysisOptions())
  rows = list(csv.DictReader(open(os.path.join(out, "checkpoints.csv"))))
  assert [int(r["step"]) for r in rows] == [2, 4]
  d2, d4 = (float(r["distance_from_init"]) for r in rows)
  assert 0 < d2 < d4  # the weights keep moving away from the base model
  assert "Distance from init: measured" in open(os.path.join(out, "report.md")).read()
  assert rows[0]["perturbed_accuracy[First]"] != "" and rows[0]["train_premem"] != ""
  assert 0 < float(rows[0]["gradient_variance"]) and rows[0]["kind"] == "trajectory"
  cats = list(csv.DictReader(open(os.path.join(out, "data_maps_by_category.csv"))))
  assert {c["key"] for c in cats} == {"level", "n_lines"}
  assert sum(int(c["n"]) for c in cats if c["key"] == "level") == 4  # the 4 train examples


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
  assert_one_line_error(proc, "analyze.py", needle)


def test_reanalysis_replaces_the_whole_output_folder(sweep, tmp_path):
  root, _ = sweep
  out = tmp_path / "out"
  report.analyze_sweep(root, str(out), report.AnalysisOptions(threshold=str(PLANTED)))
  (out / "merges.csv").write_text("stale: from a merged run since removed\n")
  before = sorted(os.listdir(out))
  # A failing analysis leaves the earlier one untouched and no temporary folder behind.
  with pytest.raises(report.AnalysisError):
    report.analyze_sweep(root, str(out), report.AnalysisOptions(atc_reference="run_7:10"))
  assert sorted(os.listdir(out)) == before and os.listdir(tmp_path) == ["out"]
  result = report.analyze_sweep(root, str(out), report.AnalysisOptions(threshold=str(PLANTED)))
  assert not (out / "merges.csv").exists() and "merges.csv" in before
  assert sorted(os.listdir(out)) == sorted(
      [fileio.OUTPUT_MARKER, *(os.path.basename(f) for f in result.files)])
  assert os.listdir(tmp_path) == ["out"]


def test_analysis_never_replaces_a_folder_it_did_not_write(sweep, tmp_path):
  """--output_dir at a user's folder, or at the sweep's parent, is refused: one line naming
  the flag, nothing deleted. An analysis written before output markers is still replaced."""
  root, _ = sweep
  user = tmp_path / "mine"
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  for target in (str(user), os.path.dirname(os.path.abspath(root))):
    before = sorted(os.listdir(target))
    assert_one_line_error(run_cli(f"--sweep_dir={root}", f"--output_dir={target}"),
                          "analyze.py", "--output_dir")
    assert sorted(os.listdir(target)) == before
  old = tmp_path / "old_analysis"
  old.mkdir()
  for name in ("report.md", "summary.json", "checkpoints.csv"):
    (old / name).write_text("from an earlier version\n")
  report.analyze_sweep(root, str(old), report.AnalysisOptions(threshold=str(PLANTED)))
  assert fileio.read_output_marker(str(old))["kind"] == "analysis"


def test_one_run_with_one_checkpoint_is_analyzed_as_far_as_it_can_be(tmp_path):
  """A legitimate small sweep: one run, one checkpoint, every train example alike."""
  run_dir = str(tmp_path / "sw" / "run_0")
  os.makedirs(run_dir)
  with open(os.path.join(run_dir, "run.json"), "w") as f:
    json.dump({"config": {"learning_rate": 1e-5}, "model": {"path": "none"}}, f)
  records.check_config(run_dir, {"task": "gsm8k"})
  records.write_records(run_dir, 4, "train", [_rec(f"tr{i}", "train", 1.0, exact_memorization=1.0)
                                              for i in range(4)])
  records.write_records(run_dir, 4, "test", [_rec(f"te{i}", "test", 0.5) for i in range(4)])
  proc = run_cli(f"--sweep_dir={tmp_path / 'sw'}", f"--output_dir={tmp_path / 'out'}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  text = open(tmp_path / "out" / "report.md").read()
  assert "Not mapped: run_0" in text
  assert json.load(open(tmp_path / "out" / "summary.json"))["n_checkpoints"] == 1
