"""From gathered records to the quantities of the papers, per checkpoint and per sweep.

All metrics come from `memdyn_jax.metrics`; this module only lines records up:
  * per checkpoint: dataset accuracies, target perplexity (token-level), train PreMemAcc
    (Kang et al. Sec. 4), exact memorization, entropies (Ge et al. Table 1), diversity
    (Ruan et al.), OOD and perturbed accuracy, ATC prediction (Kang et al. App. B.3);
  * per sweep: threshold calibration and R² of test accuracy on train PreMemAcc, baseline
    correlations, over-memorization stages and checkpoint selection, robustness by
    PreMemAcc bin, data maps (overall and per example category).
Merged checkpoints (runs whose run.json has "merge") are compared with their source
trajectories in `memdyn_jax.report.merges`; only trajectories enter the sweep-level fits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import numpy as np

from memdyn_jax import metrics
from memdyn_jax.evaluation import records as records_lib
from memdyn_jax.report.collect import RunRecords, SplitMatrix

TRAIN, TEST, OOD = "train", "test", "ood"
MERGE_KEY = "merge"  # run.json key of a merged model (experiments/merge.py)


def is_merged(run: RunRecords) -> bool:
  """Whether the run is a merged model (run.json has "merge"), not a trajectory."""
  return bool(run.info.get(MERGE_KEY))


def learning_rate(run: RunRecords) -> float:
  """The run's peak learning rate from run.json (NaN when absent)."""
  return float(run.info.get("config", {}).get("learning_rate", math.nan))


def train_premem(run: RunRecords, threshold: float) -> tuple[np.ndarray, np.ndarray] | None:
  """(steps, per-example PreMemAcc (C, N)) over the run's train checkpoints, or None."""
  train = run.units.get(TRAIN)
  if train is None or not train.example_ids:
    return None
  ppl = metrics.unscored_as_never_memorized(train.fields["perplexity"])
  return train.steps, metrics.premem_accuracy(train.fields["accuracy"], ppl, threshold)


def _by_step(unit: SplitMatrix | None, values: np.ndarray | None) -> dict[int, float]:
  if unit is None or values is None:
    return {}
  return {int(s): float(v) for s, v in zip(unit.steps, values)}


def checkpoint_rows(run: RunRecords, threshold: float,
                    atc: Mapping[int, float] | None = None) -> list[dict[str, Any]]:
  """One row per checkpoint of the run with every dataset-level quantity (NaN if absent).

  Args:
    run: the run's records.
    threshold: PreMemAcc memorization threshold (perplexity units).
    atc: step -> ATC predicted accuracy.

  Gradient variance and distance from init come from the checkpoints' stats (recorded by
  evaluation).
  """
  cols: dict[str, dict[int, float]] = {}
  train, test, ood = (run.units.get(u) for u in (TRAIN, TEST, OOD))
  stat = lambda key: {s: float(v[key]) for s, v in run.checkpoint_stats.items()
                      if v.get(key) is not None}
  gv, distance = stat(records_lib.GRADIENT_VARIANCE), stat(records_lib.DISTANCE_FROM_INIT)
  pm = train_premem(run, threshold)
  if pm is not None:
    cols["train_premem"] = _by_step(train, pm[1].mean(axis=1))
  for prefix, unit in (("train", train), ("test", test), ("ood", ood)):
    if unit is None:
      continue
    cols[f"{prefix}_accuracy"] = _by_step(unit, unit.mean("accuracy"))
    cols[f"{prefix}_perplexity"] = _by_step(unit, unit.corpus_perplexity())
    cols[f"{prefix}_exact_memorization"] = _by_step(unit, unit.mean("exact_memorization"))
    cols[f"{prefix}_greedy_accuracy"] = _by_step(unit, unit.mean("greedy_correct"))
    cols[f"{prefix}_unparseable_rate"] = _by_step(
        unit, unit.fields["n_unparseable"].sum(1) / np.maximum(unit.fields["n_samples"].sum(1), 1))
  if test is not None:
    for field, col in (("mean_entropy", "test_tf_entropy"),
                       ("sampled_entropy", "test_sampled_entropy"),
                       ("distinct_1", "test_distinct_1"), ("distinct_2", "test_distinct_2"),
                       ("unique_answers", "test_unique_answers"),
                       ("unique_traces", "test_unique_traces")):
      cols[col] = _by_step(test, test.mean(field))
  for unit_name in run.perturbations():
    _, pert = records_lib.parse_unit_name(unit_name)
    unit = run.units[unit_name]
    cols[f"perturbed_accuracy[{pert}]"] = _by_step(unit, unit.mean("accuracy"))
  if atc:
    cols["atc_predicted_accuracy"] = dict(atc)
  if distance:
    cols[records_lib.DISTANCE_FROM_INIT] = distance
  if gv:
    cols[records_lib.GRADIENT_VARIANCE] = gv
  lr = learning_rate(run)
  kind = "merged" if is_merged(run) else "trajectory"
  rows = []
  for step in run.steps():
    row = {"run": run.name, "kind": kind, "learning_rate": lr, "step": int(step)}
    row.update({c: values.get(int(step), math.nan) for c, values in cols.items()})
    rows.append(row)
  return rows


def premem_points(run: RunRecords, threshold: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
  """(steps, train PreMemAcc, test accuracy) at checkpoints having both, or None."""
  steps = run.common_steps(TRAIN, TEST)
  pm = train_premem(run, threshold)
  if pm is None or not steps.size:
    return None
  pm_by = dict(zip(pm[0].tolist(), pm[1].mean(axis=1)))
  test = run.units[TEST].at(steps)
  return steps, np.asarray([pm_by[int(s)] for s in steps]), test.mean("accuracy")


def calibration_runs(runs: Sequence[RunRecords]) -> list[metrics.CalibrationRun]:
  """CalibrationRun per run over the checkpoints with both train and test records
  (PreMemAcc's running max then runs over exactly those checkpoints)."""
  out = []
  for run in runs:
    steps = run.common_steps(TRAIN, TEST)
    if not steps.size or not run.units[TRAIN].example_ids:
      continue
    train = run.units[TRAIN].at(steps)
    ppl = metrics.unscored_as_never_memorized(train.fields["perplexity"])
    out.append(metrics.CalibrationRun(train.fields["accuracy"], ppl,
                                      run.units[TEST].at(steps).mean("accuracy")))
  return out


def default_candidates(num: int = 41) -> np.ndarray:
  """Perplexity thresholds spaced evenly on the log(log(ppl)) scale from -4.5 to 0.5
  (ppl 1.011 to 5.2), bracketing Kang et al.'s -2.3 (GSM8K) and -1.7 (MATH)."""
  return metrics.loglog_to_perplexity(np.linspace(-4.5, 0.5, num))


def default_threshold(task_name: str | None) -> float:
  """The task's PreMemAcc threshold (`Task.memorization_threshold`: Kang et al.'s
  reference values); GSM8K's for an unknown or unnamed task."""
  from memdyn_jax import tasks
  return tasks.memorization_threshold(task_name)


def atc_predictions(runs: Sequence[RunRecords], reference: tuple[str, int] | None = None
                    ) -> tuple[dict[str, dict[int, float]], str]:
  """ATC predicted accuracy per (run, step) (Kang et al. App. B.3).

  The threshold comes from a reference checkpoint's test greedy-response log-likelihoods
  and its test accuracy; each checkpoint's prediction is the fraction of its train
  examples whose greedy log-likelihood exceeds it.

  Args:
    runs: the sweep.
    reference: (run name, step); default the last checkpoint of the first trajectory (not
      a merged model) that has test greedy scores.

  Returns:
    ({run: {step: prediction}}, description of the reference or of why none was made).
  """
  def has_scores(run, step=None):
    test = run.units.get(TEST)
    if test is None or np.isnan(test.fields.get("greedy_sum_logprob", np.array([[np.nan]]))).all():
      return False
    return step is None or int(step) in test.steps.tolist()

  ref_run = None
  if reference is not None:
    ref_run = next((r for r in runs if r.name == reference[0]), None)
    if ref_run is None or not has_scores(ref_run, reference[1]):
      raise ValueError(f"ATC reference {reference[0]}:{reference[1]} has no test greedy "
                       "scores")
    ref_step = int(reference[1])
  else:
    ref_run = next((r for r in runs if has_scores(r) and not is_merged(r)), None)
    if ref_run is None:
      return {}, "no test greedy scores (evaluate with --greedy)"
    ref_step = int(ref_run.units[TEST].steps[-1])
  test = ref_run.units[TEST].at([ref_step])
  scores = test.fields["greedy_sum_logprob"][0]
  t = metrics.atc_threshold(scores[~np.isnan(scores)], test.mean("accuracy")[0])
  out: dict[str, dict[int, float]] = {}
  for run in runs:
    train = run.units.get(TRAIN)
    if train is None or "greedy_sum_logprob" not in train.fields:
      continue
    preds = {}
    for i, step in enumerate(train.steps):
      s = train.fields["greedy_sum_logprob"][i]
      if (~np.isnan(s)).any():
        preds[int(step)] = metrics.atc_predicted_accuracy(s[~np.isnan(s)], t)
    out[run.name] = preds
  return out, f"{ref_run.name} step {ref_step} (threshold {t:.3f} nats)"


def correlation_table(rows: Sequence[Mapping[str, Any]], predictors: Sequence[str],
                      target: str = "test_accuracy") -> list[dict[str, Any]]:
  """Pooled over checkpoints: line fit of `target` on each predictor (rows with both).

  Returns:
    One row per predictor: predictor, n, r2, pearson_r, slope (NaN when < 2 points or a
    constant input).
  """
  out = []
  for p in predictors:
    pts = [(r.get(p, math.nan), r.get(target, math.nan)) for r in rows]
    pts = np.asarray([(x, y) for x, y in pts if np.isfinite(x) and np.isfinite(y)])
    fit = None
    if len(pts) >= 2:
      fit = metrics.fit_r2(pts[:, 0], pts[:, 1])
    out.append({"predictor": p, "n": int(len(pts)),
                "r2": fit.r2 if fit else math.nan,
                "pearson_r": fit.pearson_r if fit else math.nan,
                "slope": fit.slope if fit else math.nan})
  return out


HELD_OUT_PROTOCOLS = ("leave_one_run_out", "k_runs")


@dataclasses.dataclass(frozen=True)
class HeldOut:
  """Held-out R² of every predictor (`metrics.held_out`), per protocol.

  Attributes:
    runs: the trajectories scored (those with train and test records), in order.
    calibration_runs: the K-run protocol's calibration runs (`choose_calibration_runs`);
      () when there are not K + 1 runs.
    scores: protocol (HELD_OUT_PROTOCOLS) -> predictor key -> score; a protocol the runs
      cannot support is absent.
    notes: why a protocol is absent.
  """

  runs: tuple[str, ...]
  calibration_runs: tuple[str, ...]
  scores: dict[str, dict[str, metrics.HeldOutScore]]
  notes: tuple[str, ...]


def held_out_scores(trajs: Sequence[RunRecords], traj_rows: Sequence[Mapping[str, Any]],
                    predictors: Mapping[str, str], k: int, base_ppl, threshold: float
                    ) -> HeldOut:
  """Each predictor (key -> its column in `traj_rows`; key "premem" is PreMemAcc, whose
  threshold is calibrated inside every fold) scored on runs its fit never saw: leave one
  run out, and Kang et al.'s K calibration runs (chosen by final test accuracy and the
  share of train targets memorized at `threshold`) with the rest held out."""
  named = [(run.name, cal) for run in trajs for cal in calibration_runs([run])]
  names = tuple(name for name, _ in named)
  cal_runs = [cal for _, cal in named]
  folds, notes, chosen = {}, [], ()
  if len(names) >= 3:
    folds["leave_one_run_out"] = metrics.leave_one_run_out(len(names))
  else:
    notes.append(f"leave-one-run-out needs 3 runs with train and test records ({len(names)})")
  if len(names) > k:
    chosen = metrics.choose_calibration_runs(
        [float(c.test_acc[-1]) for c in cal_runs],
        [metrics.memorized_fraction(c.train_perplexity[-1], threshold) for c in cal_runs], k)
    folds["k_runs"] = metrics.k_run_fold(chosen, len(names))
  else:
    notes.append(f"{k}-run calibration needs {k + 1} runs with train and test records "
                 f"({len(names)})")
  by_run = {name: sorted((r for r in traj_rows if r["run"] == name), key=lambda r: r["step"])
            for name in names}
  column = lambda col: [np.array([float(r.get(col, math.nan)) for r in by_run[n]])
                        for n in names]
  test = column("test_accuracy")
  xs = {key: column(col) for key, col in predictors.items() if key != "premem"}
  scores = {}
  for protocol, protocol_folds in folds.items():
    scores[protocol] = {
        key: (metrics.premem_held_out(cal_runs, default_candidates(), protocol_folds,
                                      base_perplexity=base_ppl) if key == "premem"
              else metrics.line_held_out(xs[key], test, protocol_folds))
        for key in predictors}
  return HeldOut(names, tuple(names[i] for i in chosen), scores, tuple(notes))


def held_out_summary(held: HeldOut) -> dict[str, Any]:
  """summary.json's held-out R²: per protocol, predictor key -> R² (None if undefined),
  PreMemAcc's thresholds per fold, and the calibration runs."""
  out: dict[str, Any] = {"calibration_runs": list(held.calibration_runs)}
  for protocol in HELD_OUT_PROTOCOLS:
    scores = held.scores.get(protocol)
    out[protocol] = None if scores is None else {
        key: finite_or_none(score.r2) for key, score in scores.items()}
    if scores is not None and "premem" in scores:
      out[f"{protocol}_premem_thresholds"] = list(scores["premem"].thresholds)
  return out


@dataclasses.dataclass(frozen=True)
class OverMemRun:
  """Over-memorization analysis of one run.

  Attributes:
    run: run name.
    steps, test_perplexity, test_accuracy: (C,) per checkpoint with test records.
    detection: detector output.
    pre_stage_best: step chosen by "pre_stage_best_acc".
    max_premem: step chosen by "max_train_premem" (None without train records).
  """

  run: str
  steps: np.ndarray
  test_perplexity: np.ndarray
  test_accuracy: np.ndarray
  detection: metrics.OverMemorization
  pre_stage_best: int
  max_premem: int | None


def overmemorization(run: RunRecords, config: metrics.OverMemorizationConfig,
                     threshold: float) -> OverMemRun | None:
  """Detects over-memorization stages on the run's test curves (Ruan et al.)."""
  test = run.units.get(TEST)
  if test is None or not test.example_ids:
    return None
  ppl, acc = test.corpus_perplexity(), test.mean("accuracy")
  ok = np.isfinite(ppl) & np.isfinite(acc)
  if not ok.any():
    return None
  steps, ppl, acc = test.steps[ok], ppl[ok], acc[ok]
  det = metrics.detect_overmemorization(ppl, acc, steps, config)
  best = metrics.select_checkpoint("pre_stage_best_acc", test_acc=acc, detection=det)
  pts = premem_points(run, threshold)
  max_pm = None
  if pts is not None:
    max_pm = int(pts[0][metrics.select_checkpoint("max_train_premem", train_premem=pts[1])])
  return OverMemRun(run.name, steps, ppl, acc, det, int(steps[best]), max_pm)


def robustness(runs: Sequence[RunRecords], threshold: float
               ) -> tuple[np.ndarray, dict[str, np.ndarray]] | None:
  """Per-example PreMemAcc and accuracy under each prompt variant (Kang et al. Fig. 7).

  For each run, at its last checkpoint having train and perturbed records: per train
  example its PreMemAcc and its accuracy on the original prompt and every perturbation,
  pooled over runs.

  Returns:
    (premem (M,), {"original": (M,), perturbation: (M,), ...}) or None without records.
  """
  premem_all, accs = [], {}
  for run in runs:
    perts = run.perturbations()
    pm = train_premem(run, threshold)
    if not perts or pm is None:
      continue
    steps = run.common_steps(TRAIN, *perts)
    if not steps.size:
      continue
    step = int(steps[-1])
    train = run.units[TRAIN]
    row = train.steps.tolist().index(step)
    premem_all.append(pm[1][row])
    accs.setdefault("original", []).append(train.fields["accuracy"][row])
    for u in perts:
      unit = run.units[u]
      pos = {e: j for j, e in enumerate(unit.example_ids)}
      acc_row = unit.fields["accuracy"][unit.steps.tolist().index(step)]
      label = records_lib.parse_unit_name(u)[1]
      accs.setdefault(label, []).append(
          np.asarray([acc_row[pos[e]] if e in pos else np.nan for e in train.example_ids]))
  if not premem_all:
    return None
  return np.concatenate(premem_all), {k: np.concatenate(v) for k, v in accs.items()}


def bin_index(values: np.ndarray, num_bins: int) -> np.ndarray:
  """Equal-width bins of [0, 1]: index in 0..num_bins-1 (1.0 falls in the last bin)."""
  if num_bins < 1:
    raise ValueError(f"num_bins must be >= 1, got {num_bins}")
  return np.clip((np.asarray(values, np.float64) * num_bins).astype(int), 0, num_bins - 1)


def robustness_table(premem: np.ndarray, accs: Mapping[str, np.ndarray],
                     num_bins: int) -> list[dict[str, Any]]:
  """Mean accuracy per PreMemAcc bin for each prompt variant."""
  idx = bin_index(premem, num_bins)
  rows = []
  for b in range(num_bins):
    sel = idx == b
    row = {"premem_bin": f"[{b / num_bins:.2f}, {(b + 1) / num_bins:.2f}"
                         + ("]" if b == num_bins - 1 else ")"), "n": int(sel.sum())}
    for label, acc in accs.items():
      vals = acc[sel][~np.isnan(acc[sel])]
      row[f"accuracy[{label}]"] = float(vals.mean()) if vals.size else math.nan
    rows.append(row)
  return rows


@dataclasses.dataclass(frozen=True, eq=False)
class RunDataMap:
  """Ge et al. data map of one run's train examples.

  Attributes:
    run: run name.
    dmap: per-example mean and variance of exact memorization.
    labels: per-example region (easy / hard / other).
    thresholds: the region cut-offs.
    memorization: (C, N) exact memorization it was computed from.
    meta: per example, its category metadata (may be empty dicts).
  """

  run: str
  dmap: metrics.DataMap
  labels: np.ndarray
  thresholds: metrics.DataMapThresholds
  memorization: np.ndarray | None = None
  meta: tuple[Mapping[str, Any], ...] = ()


def data_maps(runs: Sequence[RunRecords], skipped: list[str] | None = None
              ) -> list[RunDataMap]:
  """Data maps of train exact memorization across checkpoints, with quantile regions
  (pass trajectories: a merged model has no checkpoints to vary over). A run whose examples
  all have the same mean memorization (tiny or untrained runs) has no quantile regions: it
  is left out, with the reason appended to `skipped` when given."""
  out = []
  for run in runs:
    train = run.units.get(TRAIN)
    if train is None or not train.example_ids or len(train.steps) < 1:
      continue
    em = train.fields["exact_memorization"]
    keep = ~np.isnan(em).any(axis=0)
    if not keep.any():
      continue
    dmap = metrics.data_map(em[:, keep])
    try:
      th = metrics.quantile_thresholds(dmap)
    except ValueError:  # no spread between the quantiles: nothing to split into regions
      if skipped is not None:
        skipped.append(f"{run.name}: its {dmap.mean.size} train examples' mean exact "
                       f"memorization has no spread between the thirds, so no regions")
      continue
    meta = tuple(m for m, k in zip(train.meta, keep) if k) if train.meta else ()
    out.append(RunDataMap(run.name, dmap, metrics.partition(dmap, th), th, em[:, keep], meta))
  return out


def data_map_rows(maps: Sequence[RunDataMap]) -> list[dict[str, Any]]:
  """Per run: region counts and mean coordinates."""
  rows = []
  for m in maps:
    row = {"run": m.run, "n": int(m.labels.size)}
    for lab in (metrics.EASY, metrics.HARD, metrics.OTHER):
      sel = m.labels == lab
      row[f"n_{lab}"] = int(sel.sum())
      row[f"mean_{lab}"] = float(m.dmap.mean[sel].mean()) if sel.any() else math.nan
    row["mean_variance"] = float(m.dmap.variance.mean())
    rows.append(row)
  return rows


def data_map_category_rows(maps: Sequence[RunDataMap]) -> list[dict[str, Any]]:
  """Ge et al. per-category summaries of each run's data map.

  For every metadata key that all of a run's examples carry (`evaluation.example_meta`:
  MATH subject and level, synthetic_arith level and trace lines, GSM8K solution lines, sft
  category), one row per value: count, mean exact memorization at the first and last
  checkpoints, mean over the category's examples of their mean and variance across
  checkpoints, and the share of easy- and hard-to-memorize examples.
  """
  rows = []
  for m in maps:
    if m.memorization is None or not m.meta:
      continue
    for key in m.meta[0]:
      values = [meta.get(key) for meta in m.meta]
      if any(v is None for v in values):
        continue
      if len({type(v) for v in values}) > 1:  # sortable within one type only
        values = [str(v) for v in values]
      summary = metrics.summarize_by_category(m.memorization, values, m.labels)
      for value, c in summary.items():
        rows.append({"run": m.run, "key": key, "category": value, "n": c.count,
                     "first_exact_memorization": c.first, "last_exact_memorization": c.last,
                     "mean_exact_memorization": c.mean, "mean_variance": c.variance,
                     "share_easy": c.frac_easy, "share_hard": c.frac_hard})
  return rows


def entropy_rows(runs: Sequence[RunRecords], split: str = TEST) -> list[dict[str, Any]]:
  """Ge et al. Table 1: mean entropy under nucleus sampling vs teacher forcing, at the
  first and last checkpoints of each run."""
  rows = []
  for run in runs:
    unit = run.units.get(split)
    if unit is None:
      continue
    for label, i in (("first", 0), ("last", len(unit.steps) - 1)):
      rows.append({"run": run.name, "checkpoint": label, "step": int(unit.steps[i]),
                   "sampled_entropy": float(unit.mean("sampled_entropy")[i]),
                   "teacher_forced_entropy": float(unit.mean("mean_entropy")[i])})
  return rows


BASE_STEP = 0  # evaluate.py --include_base records the base model as step 0


def base_train_perplexity(runs: Sequence[RunRecords]) -> np.ndarray | None:
  """Train-target perplexities of the base model (step 0 records of any trajectory), or None."""
  values = []
  for run in runs:
    train = run.units.get(TRAIN)
    if train is not None and train.example_ids and BASE_STEP in train.steps.tolist():
      values.append(metrics.unscored_as_never_memorized(
          train.at([BASE_STEP]).fields["perplexity"][0]))
  return np.concatenate(values) if values else None


def last_train_perplexity(run: RunRecords) -> np.ndarray | None:
  """Train-target perplexities at the run's last train checkpoint, or None."""
  train = run.units.get(TRAIN)
  if train is None or not train.example_ids or not train.steps.size:
    return None
  return metrics.unscored_as_never_memorized(train.fields["perplexity"][-1])


def memorized_fraction(perplexity: np.ndarray | None, threshold: float) -> float:
  """`metrics.memorized_fraction` of some targets' perplexities; NaN for none."""
  return math.nan if perplexity is None else metrics.memorized_fraction(perplexity, threshold)


def finite_or_none(x) -> float | None:
  return float(x) if x is not None and np.isfinite(x) else None


def base_summary(runs: Sequence[RunRecords], rows: Sequence[Mapping[str, Any]],
                 threshold: float) -> dict[str, Any] | None:
  """The base model's figures (step 0 rows), or None when no run evaluated it."""
  base_rows = [r for r in rows if r["kind"] == "trajectory" and r["step"] == BASE_STEP]
  if not base_rows:
    return None
  row = base_rows[0]
  return {"run": row["run"], "test_accuracy": finite_or_none(row.get("test_accuracy")),
          "test_perplexity": finite_or_none(row.get("test_perplexity")),
          "train_accuracy": finite_or_none(row.get("train_accuracy")),
          "memorized_fraction": finite_or_none(
              memorized_fraction(base_train_perplexity(runs), threshold))}


def run_summary(run: RunRecords, rows: Sequence[Mapping[str, Any]], om: "OverMemRun | None",
                threshold: float) -> dict[str, Any]:
  """One trajectory's headline figures: final accuracies, memorized share of train targets at
  its last checkpoint, over-memorization flag and the final test-perplexity rise over its
  minimum."""
  mine = [r for r in rows if r["run"] == run.name]
  last = mine[-1] if mine else {}
  out = {"final_step": last.get("step"),
         "final_test_accuracy": finite_or_none(last.get("test_accuracy")),
         "final_train_accuracy": finite_or_none(last.get("train_accuracy")),
         "final_test_perplexity": finite_or_none(last.get("test_perplexity")),
         "memorized_fraction": finite_or_none(
             memorized_fraction(last_train_perplexity(run), threshold)),
         "overmemorization_flagged": False, "test_perplexity_rise": None,
         "best_test_accuracy": None}
  if om is not None:
    out.update(overmemorization_flagged=bool(om.detection.stage_steps),
               test_perplexity_rise=finite_or_none(
                   om.test_perplexity[-1] / np.min(om.test_perplexity) - 1.0),
               best_test_accuracy=finite_or_none(np.max(om.test_accuracy)))
  return out
