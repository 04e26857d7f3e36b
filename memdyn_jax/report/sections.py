"""The sections of a sweep's report, one function each, in report order.

`sweep_report.analyze_sweep` calls them; each adds its heading, tables and figures to a
`Sheet` (the Markdown report and the list of files written) and returns what a later
section or summary.json needs.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from memdyn_jax import metrics
from memdyn_jax.evaluation import records
from memdyn_jax.report import analysis, markdown, merges, plots
from memdyn_jax.report.collect import RunRecords


@dataclasses.dataclass
class Sheet:
  """The output folder, its Markdown report, and every file written so far."""

  out: str
  report: markdown.Report
  written: list[str] = dataclasses.field(default_factory=list)

  def csv(self, filename: str, rows: Sequence[Mapping[str, Any]]) -> None:
    self.written.append(markdown.write_csv(os.path.join(self.out, filename), rows))

  def figure(self, path: str, caption: str) -> None:
    """Records a plot written to `path` and shows it in the report."""
    self.written.append(path)
    self.report.image(path, caption, self.out)

  def path(self, filename: str) -> str:
    return os.path.join(self.out, filename)


def checkpoint_table(sheet: Sheet, runs: Sequence[RunRecords], threshold: float,
                     atc: Mapping[str, Mapping[int, float]], threshold_source: str
                     ) -> list[dict[str, Any]]:
  """checkpoints.csv and its table: one row per (run, checkpoint), merged models included."""
  rows = []
  for r in runs:
    rows += analysis.checkpoint_rows(r, threshold, atc.get(r.name))
  sheet.csv("checkpoints.csv", rows)
  sheet.report.paragraph(f"PreMemAcc threshold: perplexity {threshold:.4f} "
                         f"(log log = {np.log(np.log(threshold)):.2f}; {threshold_source}).")
  sheet.report.heading("Per checkpoint")
  sheet.report.table(rows, ["run", "kind", "learning_rate", "step", "train_accuracy",
                            "train_premem", "train_perplexity", "test_accuracy",
                            "test_perplexity", "test_exact_memorization", "ood_accuracy"])
  return rows


def premem_vs_test(sheet: Sheet, trajs: Sequence[RunRecords], threshold: float, cal,
                   cal_note: str) -> None:
  """Test accuracy against train PreMemAcc (Kang et al.): the scatter, its fit, and the
  threshold calibration curve when there is one."""
  sheet.report.heading("Test accuracy vs train pre-memorization accuracy (Kang et al.)")
  points = {}
  for r in trajs:
    pts = analysis.premem_points(r, threshold)
    if pts is not None:
      points[r.name] = (pts[1], pts[2])
  if points:
    xs = np.concatenate([p[0] for p in points.values()])
    ys = np.concatenate([p[1] for p in points.values()])
    fit = metrics.fit_r2(xs, ys) if xs.size >= 2 else None
    path = plots.premem_scatter(
        points, sheet.path("premem_scatter.png"), threshold=threshold,
        **({} if fit is None else dict(slope=fit.slope, intercept=fit.intercept, r2=fit.r2)))
    sheet.report.paragraph(f"{xs.size} checkpoints: " + (
        f"R² = {fit.r2:.3f}, Pearson r = {fit.pearson_r:.3f}, slope {fit.slope:.3f}, "
        f"R² of y = x: {metrics.r2_identity(xs, ys):.3f}." if fit else "too few points."))
    sheet.figure(path, "PreMemAcc scatter")
  else:
    sheet.report.paragraph("No checkpoint has both train and test records.")
  if cal is not None:
    sheet.csv("calibration.csv", [
        {"threshold_ppl": float(c), "threshold_loglog": float(np.log(np.log(c))),
         "r2": float(v)} for c, v in zip(cal.candidates, cal.r2)])
    path = plots.calibration_curve(cal.candidates, cal.r2, cal.threshold,
                                   sheet.path("calibration_curve.png"))
    sheet.report.paragraph(f"Calibrated threshold: perplexity {cal.threshold:.4f} (log log "
                           f"{np.log(np.log(cal.threshold)):.2f}), R² = "
                           f"{float(cal.r2[cal.best_index]):.3f}.")
    sheet.figure(path, "calibration curve")
  elif cal_note:
    sheet.report.paragraph(cal_note)


def baselines(sheet: Sheet, traj_rows: Sequence[Mapping[str, Any]],
              predictors: Mapping[str, str], atc_note: str,
              held: analysis.HeldOut) -> list[dict[str, Any]]:
  """PreMemAcc against the App. B baselines: how well each predicts test accuracy, in
  sample (pooled fit over all checkpoints) and held out (`analysis.held_out_scores`)."""
  sheet.report.heading("PreMemAcc vs baselines (Kang et al. Fig. 5, App. B)")
  base_rows = analysis.correlation_table(traj_rows, list(predictors.values()))
  for row, key in zip(base_rows, predictors):
    for protocol in analysis.HELD_OUT_PROTOCOLS:
      score = held.scores.get(protocol, {}).get(key)
      row[f"r2_{protocol}"] = math.nan if score is None else score.r2
  sheet.csv("baselines.csv", base_rows)
  sheet.report.table(base_rows)
  sheet.report.paragraph(
      "Held out: each predictor's line (and PreMemAcc's threshold) is fitted on some runs "
      "and scored on the others' checkpoints (1 - SS_res/SS_tot over the held-out points; "
      "negative = worse than their mean). r2_leave_one_run_out: each run predicted from "
      "all the others. r2_k_runs: Kang et al.'s protocol (App. A.1), calibrated on "
      + (f"{', '.join(held.calibration_runs)} — the runs at evenly spaced ranks of final "
         "test accuracy (the lowest and highest among them), the middle one swapped for "
         "the most different memorized share if they lack spread — and scored on the "
         f"other {len(held.runs) - len(held.calibration_runs)}."
         if held.calibration_runs else "K runs (not possible here).")
      + "".join(f" {note}." for note in held.notes))
  recorded = lambda key: any(np.isfinite(row.get(key, np.nan)) for row in traj_rows)
  sheet.report.paragraph(
      f"ATC reference: {atc_note}. Distance from init: "
      + ("measured by evaluate.py (Kang et al. App. B.2)."
         if recorded(records.DISTANCE_FROM_INIT)
         else "not measured (evaluate.py --distance_from_init).")
      + " Gradient variance: "
      + ("measured by evaluate.py over train minibatches (Kang et al. App. B.1)."
         if recorded(records.GRADIENT_VARIANCE)
         else "not measured (evaluate.py --grad_variance)."))
  sheet.report.table(traj_rows, ["run", "step", "test_accuracy", "train_premem",
                                 "atc_predicted_accuracy", records.DISTANCE_FROM_INIT,
                                 records.GRADIENT_VARIANCE])
  return base_rows


def overmemorization(sheet: Sheet, trajs: Sequence[RunRecords], merged: Sequence[RunRecords],
                     rows: Sequence[Mapping[str, Any]], config: metrics.OverMemorizationConfig,
                     threshold: float) -> tuple[dict[str, Any], dict[str, Any]]:
  """Over-memorization stages and checkpoint selection (Ruan et al.); returns (the selected
  checkpoint per run, each run's summary)."""
  sheet.report.heading("Over-memorization (Ruan et al.)")
  om_rows, om_curves, selected, run_summaries = [], [], {}, {}
  markers = merges.plot_markers(merged, trajs, rows)
  for r in trajs:
    om = analysis.overmemorization(r, config, threshold)
    run_summaries[r.name] = analysis.run_summary(r, rows, om, threshold)
    if om is None:
      continue
    selected[om.run] = om.pre_stage_best
    onset = om.detection.onset
    om_rows.append({
        "run": om.run,
        "stages (steps)": "; ".join(f"{a}-{b}" for a, b in om.detection.stage_steps) or "none",
        "onset_step": int(om.steps[onset]) if onset is not None else "none",
        "select_pre_stage_best_acc": om.pre_stage_best,
        "select_max_train_premem": om.max_premem if om.max_premem is not None else "–",
        "best_test_accuracy": float(om.test_accuracy.max()),
        "min_test_perplexity": float(om.test_perplexity.min())})
    om_curves.append(dict(name=om.run, steps=om.steps, test_perplexity=om.test_perplexity,
                          test_accuracy=om.test_accuracy, stage_steps=om.detection.stage_steps,
                          merged=markers.get(om.run, [])))
  sheet.csv("overmemorization.csv", om_rows)
  sheet.report.paragraph(f"Stage: test perplexity >= (1 + {config.min_ppl_rise}) x its "
                         f"{config.reference} minimum while test accuracy >= its "
                         f"{config.reference} best - {config.max_acc_drop}.")
  sheet.report.table(om_rows)
  if om_curves:
    sheet.figure(plots.overmemorization_curves(om_curves, sheet.path("overmemorization.png")),
                 "over-memorization curves")
  return selected, run_summaries


def merged_models(sheet: Sheet, merged: Sequence[RunRecords], trajs: Sequence[RunRecords],
                  rows: Sequence[Mapping[str, Any]], selected: Mapping[str, Any],
                  merge_info) -> list[dict[str, Any]]:
  """Each merged model beside its source trajectory's checkpoints (Ruan et al.)."""
  if not merged:
    return []
  merge_rows = merges.comparison_rows(merged, trajs, rows, selected)
  sheet.report.heading("Merged models vs their trajectories (Ruan et al.)")
  sheet.csv("merges.csv", merge_rows)
  sheet.report.paragraph("Each merged model beside its source trajectory's last checkpoint, "
                         "its best-test-accuracy checkpoint and the checkpoint the "
                         "over-memorization rule selects (best test accuracy before the first "
                         "stage). Perturbed accuracy is the mean over the perturbed prompts.")
  sheet.report.table(merge_rows, ["merged_run", "method", "source_run", "source_steps", "model",
                                  "step", *merges.COMPARED])
  missing = [f"{m.run}: {', '.join(m.unmatched)}" for m in merge_info if m.unmatched]
  if missing:
    sheet.report.paragraph("Merge sources not in this sweep: " + "; ".join(missing) + ".")
  return merge_rows


def robustness(sheet: Sheet, trajs: Sequence[RunRecords], threshold: float, bins: int) -> None:
  """Perturbed-prompt accuracy by PreMemAcc bin (Kang et al. Fig. 7)."""
  sheet.report.heading("Robustness to prompt perturbations by PreMemAcc (Kang et al. Fig. 7)")
  rob = analysis.robustness(trajs, threshold)
  if rob is None:
    sheet.report.paragraph("No perturbed records (evaluate with --splits=...,perturbed).")
    return
  rob_rows = analysis.robustness_table(rob[0], rob[1], bins)
  sheet.csv("robustness.csv", rob_rows)
  path = plots.robustness_violins(rob[0], rob[1], bins, sheet.path("robustness_violins.png"))
  sheet.report.table(rob_rows)
  sheet.figure(path, "robustness violins")


def data_maps(sheet: Sheet, trajs: Sequence[RunRecords]) -> None:
  """Data maps of train exact memorization, overall and per category (Ge et al.)."""
  sheet.report.heading("Data maps of train exact memorization (Ge et al.)")
  no_map: list[str] = []
  maps = analysis.data_maps(trajs, skipped=no_map)
  if no_map:
    sheet.report.paragraph("Not mapped: " + "; ".join(no_map) + ".")
  map_rows = analysis.data_map_rows(maps)
  sheet.csv("data_maps.csv", map_rows)
  sheet.report.table(map_rows)
  cat_rows = analysis.data_map_category_rows(maps)
  sheet.csv("data_maps_by_category.csv", cat_rows)
  sheet.report.paragraph("Per example category (Ge et al. Fig. 7): exact memorization at the "
                         "first and last checkpoints, mean and variance across checkpoints, "
                         "and the share of easy- and hard-to-memorize examples.")
  sheet.report.table(cat_rows)
  if maps:
    path = plots.data_maps([(m.run, m.dmap.mean, m.dmap.variance, m.labels) for m in maps],
                           sheet.path("data_maps.png"))
    sheet.report.paragraph("Regions by data quantiles: easy = mean in the top third and "
                           "variance below the median; hard = mean in the bottom third, same "
                           "variance cut.")
    sheet.figure(path, "data maps")


def entropy(sheet: Sheet, trajs: Sequence[RunRecords]) -> None:
  """Nucleus-sampling vs teacher-forced entropy on the test split (Ge et al. Table 1)."""
  sheet.report.heading("Entropy: nucleus sampling vs teacher forcing, test split "
                       "(Ge et al. Table 1)")
  ent_rows = analysis.entropy_rows(trajs)
  sheet.csv("entropy.csv", ent_rows)
  sheet.report.table(ent_rows)


def diversity_and_ood(sheet: Sheet, trajs: Sequence[RunRecords],
                      rows: Sequence[Mapping[str, Any]], traj_rows: Sequence[Mapping[str, Any]],
                      columns: Sequence[str]) -> None:
  """Sample diversity and OOD accuracy per checkpoint (Ruan et al.)."""
  sheet.report.heading("Diversity of samples and OOD accuracy per checkpoint (Ruan et al.)")
  series = {}
  for col in columns:
    by_run = {}
    for r in trajs:
      pts = [(row["step"], row.get(col, np.nan)) for row in rows if row["run"] == r.name]
      pts = [(s, v) for s, v in pts if np.isfinite(v)]
      if pts:
        by_run[r.name] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    if by_run:
      series[col] = by_run
  sheet.report.table(traj_rows, ["run", "step", "test_distinct_1", "test_distinct_2",
                                 "test_unique_answers", "test_unique_traces",
                                 "test_sampled_entropy", "ood_accuracy"])
  if series:
    sheet.figure(plots.per_checkpoint_lines(series, sheet.path("diversity_ood.png")),
                 "diversity and OOD")


def train_perplexity_distributions(sheet: Sheet, trajs: Sequence[RunRecords], base_ppl,
                                   threshold: float) -> None:
  """Memorization as a mode of its own: train-target perplexities of the base model and of
  each run's last checkpoint."""
  sheet.report.heading("Train-target perplexity: base model and each run's last checkpoint")
  dists = {} if base_ppl is None else {"base model": base_ppl}
  for r in trajs:
    last = analysis.last_train_perplexity(r)
    if last is not None:
      dists[f"{r.name} (last)"] = last
  if dists:
    sheet.figure(plots.perplexity_distributions(
        dists, sheet.path("train_perplexity_distributions.png"), threshold=threshold),
        "train-target perplexity distributions")
