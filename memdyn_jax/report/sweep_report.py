"""The analysis of a sweep's evaluation records: CSV + Markdown tables and PNG plots.

`analyze_sweep(sweep_dir, output_dir, options)` is experiments/analyze.py's work (the
binary only parses flags into `AnalysisOptions`); the sweep runs it in-process. Written to
`output_dir`:

  report.md                 every table below, with the figures
  checkpoints.csv           per (run, checkpoint): accuracies, perplexities, train PreMemAcc,
                            exact memorization, entropies, diversity, OOD / perturbed
                            accuracy, ATC prediction, distance from init, gradient variance
  calibration.csv, calibration_curve.png, premem_scatter.png
                            R² of test accuracy on train PreMemAcc per threshold (Kang et al.)
  baselines.csv             correlation with test accuracy of PreMemAcc and the baselines
  overmemorization.csv, overmemorization.png
                            stages and checkpoint selection (Ruan et al.); merged models
                            starred on their source trajectory's curves
  merges.csv                merged models (run.json "merge") vs their source trajectory's
                            last, best-test-accuracy and over-memorization-selected
                            checkpoints
  robustness.csv, robustness_violins.png
                            perturbed accuracy by PreMemAcc bin (Kang et al. Fig. 7)
  data_maps.csv, data_maps_by_category.csv, data_maps.png, entropy.csv, diversity_ood.png
                            (Ge et al.; Ruan et al.)

Merged models appear in checkpoints.csv (kind "merged") and merges.csv only: calibration,
fits, robustness, data maps and entropy use the training trajectories.
"""
from __future__ import annotations

import dataclasses
import os

from memdyn_jax import fileio
from memdyn_jax.errors import FieldError

THRESHOLD_NAMES = ("default", "calibrated")
OVERMEM_REFERENCES = ("running", "overall")
DIVERSITY_COLUMNS = ("test_distinct_2", "test_unique_answers", "test_unique_traces",
                     "ood_accuracy")


class AnalysisError(FieldError):
  """A bad analysis option or input; `field` names it (and the analyze.py flag)."""


@dataclasses.dataclass(frozen=True)
class AnalysisOptions:
  """How a sweep is analyzed (experiments/analyze.py's flags, whose help texts are the
  descriptions below).

  Attributes:
    eval_name: records folder name inside each run directory.
    threshold: PreMemAcc threshold in perplexity units, 'default' (Kang et al.'s for the
      task: GSM8K ppl 1.105, MATH 1.200) or 'calibrated' (max R² over the sweep).
    calibrate: sweep thresholds for the R² calibration curve.
    overmem_ppl_rise: X, the relative test-perplexity rise over its minimum.
    overmem_acc_drop: Y, the tolerated test-accuracy drop from its best.
    overmem_reference: over-memorization references: 'running' or 'overall' (whole-run)
      min/max.
    overmem_min_stage_len: shortest over-memorization stage (checkpoints).
    premem_bins: PreMemAcc bins of the robustness plot.
    atc_reference: ATC reference checkpoint RUN:STEP (default: last checkpoint of the
      first run with greedy test scores).
  """
  eval_name: str = "eval"
  threshold: str = "default"
  calibrate: bool = True
  overmem_ppl_rise: float = 0.10
  overmem_acc_drop: float = 0.02
  overmem_reference: str = "running"
  overmem_min_stage_len: int = 1
  premem_bins: int = 5
  atc_reference: str = ""

  def __post_init__(self):
    object.__setattr__(self, "threshold", str(self.threshold).strip())
    if self.premem_bins < 1:
      raise AnalysisError("premem_bins", "must be >= 1")
    if self.overmem_min_stage_len < 1:
      raise AnalysisError("overmem_min_stage_len", "must be >= 1")
    if not self.overmem_ppl_rise > 0:
      raise AnalysisError("overmem_ppl_rise", "must be > 0")
    if self.overmem_acc_drop < 0:
      raise AnalysisError("overmem_acc_drop", "must be >= 0")
    if self.overmem_reference not in OVERMEM_REFERENCES:
      raise AnalysisError("overmem_reference", f"must be one of {list(OVERMEM_REFERENCES)}, "
                          f"got {self.overmem_reference!r}")
    _ = (self.threshold_value, self.atc_checkpoint)  # raise AnalysisError on a bad value

  @property
  def threshold_value(self) -> float | str:
    """The threshold in perplexity units, or "default" / "calibrated"."""
    if self.threshold in THRESHOLD_NAMES:
      return self.threshold
    try:
      t = float(self.threshold)
    except ValueError:
      raise AnalysisError("threshold", f"expected a number, 'default' or 'calibrated', got "
                          f"{self.threshold!r}") from None
    if not t > 0:
      raise AnalysisError("threshold", f"must be > 0 (perplexity units), got {t}")
    return t

  @property
  def atc_checkpoint(self) -> tuple[str, int] | None:
    """(run name, step) of `atc_reference`, or None."""
    if not self.atc_reference:
      return None
    run, sep, step = self.atc_reference.rpartition(":")
    if not sep or not run or not step.isdigit():
      raise AnalysisError("atc_reference", f"expected RUN:STEP, got {self.atc_reference!r}")
    return run, int(step)


@dataclasses.dataclass(frozen=True)
class AnalysisResult:
  """What `analyze_sweep` wrote.

  Attributes:
    output_dir: the folder (absolute).
    files: every file written, report.md last.
    runs: run directories analyzed (trajectories and merged models).
    checkpoints: rows of checkpoints.csv.
    summary: the headline figures, as written to summary.json (`SUMMARY_KEYS`).
  """
  output_dir: str
  files: tuple[str, ...]
  runs: int
  checkpoints: int
  summary: dict = dataclasses.field(default_factory=dict)


# summary.json's R² keys -> the checkpoints.csv predictor they fit test accuracy on.
R2_PREDICTORS = {"premem": "train_premem", "train_accuracy": "train_accuracy",
                 "train_perplexity": "train_perplexity", "gradient_variance": "gradient_variance",
                 "distance_from_init": "distance_from_init", "atc": "atc_predicted_accuracy"}
SUMMARY_FILE = "summary.json"


def analyze_sweep(sweep_dir: str, output_dir: str | None = None,
                  options: AnalysisOptions = AnalysisOptions()) -> AnalysisResult:
  """Writes every table and plot of the sweep's evaluation records to `output_dir`.

  Args:
    sweep_dir: a folder of evaluated run directories, or one run directory.
    output_dir: where to write (default `<sweep_dir>/analysis`).
    options: thresholds, over-memorization criteria and optional baselines.

  Returns:
    The files written.

  Raises:
    AnalysisError: no such folder or no evaluated run in it, a malformed record file, a
      merged model whose sources cannot be read (field "sweep_dir"); a threshold that
      cannot be calibrated ("threshold"); an ATC reference that is not in the sweep
      ("atc_reference").
  """
  import numpy as np

  from memdyn_jax import metrics
  from memdyn_jax.evaluation import records
  from memdyn_jax.report import analysis, collect, markdown, merges, plots

  name = options.eval_name
  if not os.path.isdir(sweep_dir):
    raise AnalysisError("sweep_dir", f"{sweep_dir}: no such directory")
  try:
    run_dirs = collect.find_runs(sweep_dir, name=name)
    runs = [collect.load_run(d, name=name) for d in run_dirs]
  except (FileNotFoundError, ValueError) as e:  # a malformed record file: names path:line
    raise AnalysisError("sweep_dir", str(e)) from None
  trajs, merged = merges.split_runs(runs)
  try:
    merge_info = [merges.merge_sources(m, trajs) for m in merged]
  except ValueError as e:
    raise AnalysisError("sweep_dir", str(e)) from None
  final = os.path.abspath(output_dir or os.path.join(sweep_dir, "analysis"))

  # Written into a fresh folder that then replaces `final` whole: no output of an earlier
  # analysis (e.g. merges.csv of a merged run since removed) survives beside this one.
  def write_all(out: str):
    task = (records.read_config(run_dirs[0], name=name) or {}).get("task")
    report = markdown.Report(f"Memorization dynamics: {len(trajs)} run(s) "
                             + (f"and {len(merged)} merged model(s) " if merged else "")
                             + f"in {os.path.abspath(sweep_dir)}")
    written = []

    # -- threshold calibration (Kang et al. App. A.1) --------------------------------------
    threshold_option = options.threshold_value
    cal, cal_note = None, ""
    base_ppl = analysis.base_train_perplexity(trajs)
    if options.calibrate or threshold_option == "calibrated":
      cal_runs = analysis.calibration_runs(trajs)  # merged models are not trajectories
      try:
        cal = metrics.calibrate_threshold(cal_runs, analysis.default_candidates(),
                                          base_perplexity=base_ppl)
      except ValueError as e:
        cal_note = f"Threshold calibration not possible: {e}."
    if threshold_option == "calibrated":
      if cal is None:
        raise AnalysisError("threshold", f"cannot calibrate: "
                            f"{cal_note or 'no train+test records'}")
      threshold = cal.threshold
    elif threshold_option == "default":
      threshold = analysis.default_threshold(task)
    else:
      threshold = float(threshold_option)

    # -- the ATC baseline (gradient variance and distance from init are evaluation records)
    try:
      atc, atc_note = analysis.atc_predictions(runs, options.atc_checkpoint)
    except ValueError as e:
      raise AnalysisError("atc_reference", str(e)) from e

    # -- per-checkpoint table -----------------------------------------------------------
    rows = []
    for r in runs:
      rows += analysis.checkpoint_rows(r, threshold, atc.get(r.name))
    traj_rows = [row for row in rows if row["kind"] == "trajectory"]
    written.append(markdown.write_csv(os.path.join(out, "checkpoints.csv"), rows))
    report.paragraph(f"PreMemAcc threshold: perplexity {threshold:.4f} "
                     f"(log log = {np.log(np.log(threshold)):.2f}; {options.threshold}).")
    report.heading("Per checkpoint")
    report.table(rows, ["run", "kind", "learning_rate", "step", "train_accuracy",
                        "train_premem", "train_perplexity", "test_accuracy", "test_perplexity",
                        "test_exact_memorization", "ood_accuracy"])

    # -- PreMemAcc vs test accuracy ------------------------------------------------------
    report.heading("Test accuracy vs train pre-memorization accuracy (Kang et al.)")
    points = {}
    for r in trajs:
      pts = analysis.premem_points(r, threshold)
      if pts is not None:
        points[r.name] = (pts[1], pts[2])
    if points:
      xs = np.concatenate([p[0] for p in points.values()])
      ys = np.concatenate([p[1] for p in points.values()])
      fit = metrics.fit_r2(xs, ys) if xs.size >= 2 else None
      written.append(plots.premem_scatter(
          points, os.path.join(out, "premem_scatter.png"), threshold=threshold,
          **({} if fit is None else dict(slope=fit.slope, intercept=fit.intercept, r2=fit.r2))))
      report.paragraph(f"{xs.size} checkpoints: " + (
          f"R² = {fit.r2:.3f}, Pearson r = {fit.pearson_r:.3f}, slope {fit.slope:.3f}, "
          f"R² of y = x: {metrics.r2_identity(xs, ys):.3f}." if fit else "too few points."))
      report.image(written[-1], "PreMemAcc scatter", out)
    else:
      report.paragraph("No checkpoint has both train and test records.")
    if cal is not None:
      cal_rows = [{"threshold_ppl": float(c), "threshold_loglog": float(np.log(np.log(c))),
                   "r2": float(v)} for c, v in zip(cal.candidates, cal.r2)]
      written.append(markdown.write_csv(os.path.join(out, "calibration.csv"), cal_rows))
      written.append(plots.calibration_curve(cal.candidates, cal.r2, cal.threshold,
                                             os.path.join(out, "calibration_curve.png")))
      report.paragraph(f"Calibrated threshold: perplexity {cal.threshold:.4f} (log log "
                       f"{np.log(np.log(cal.threshold)):.2f}), R² = "
                       f"{float(cal.r2[cal.best_index]):.3f}.")
      report.image(written[-1], "calibration curve", out)
    elif cal_note:
      report.paragraph(cal_note)

    # -- baselines --------------------------------------------------------------------------
    report.heading("PreMemAcc vs baselines (Kang et al. Fig. 5, App. B)")
    base_rows = analysis.correlation_table(traj_rows, list(R2_PREDICTORS.values()))
    written.append(markdown.write_csv(os.path.join(out, "baselines.csv"), base_rows))
    report.table(base_rows)
    has_gv = any(np.isfinite(row.get(records.GRADIENT_VARIANCE, np.nan)) for row in traj_rows)
    has_distance = any(np.isfinite(row.get(records.DISTANCE_FROM_INIT, np.nan))
                       for row in traj_rows)
    report.paragraph(f"ATC reference: {atc_note}. Distance from init: "
                     + ("measured by evaluate.py (Kang et al. App. B.2)." if has_distance else
                        "not measured (evaluate.py --distance_from_init).")
                     + " Gradient variance: " + (
                         "measured by evaluate.py over train minibatches (Kang et al. App. B.1)."
                         if has_gv else "not measured (evaluate.py --grad_variance)."))
    report.table(traj_rows, ["run", "step", "test_accuracy", "train_premem",
                             "atc_predicted_accuracy", "distance_from_init",
                             records.GRADIENT_VARIANCE])

    # -- over-memorization --------------------------------------------------------------------
    report.heading("Over-memorization (Ruan et al.)")
    config = metrics.OverMemorizationConfig(
        min_ppl_rise=options.overmem_ppl_rise, max_acc_drop=options.overmem_acc_drop,
        reference=options.overmem_reference, min_stage_len=options.overmem_min_stage_len)
    om_rows, om_curves, selected, run_summaries = [], [], {}, {}
    markers = merges.plot_markers(merged, trajs, rows)
    for r in trajs:
      om = analysis.overmemorization(r, config, threshold)
      run_summaries[r.name] = analysis.run_summary(r, rows, om, threshold)
      if om is None:
        continue
      selected[om.run] = om.pre_stage_best
      om_rows.append({"run": om.run, "stages (steps)": "; ".join(
          f"{a}-{b}" for a, b in om.detection.stage_steps) or "none",
                      "onset_step": (int(om.steps[om.detection.onset])
                                     if om.detection.onset is not None else "none"),
                      "select_pre_stage_best_acc": om.pre_stage_best,
                      "select_max_train_premem": om.max_premem if om.max_premem is not None
                      else "–",
                      "best_test_accuracy": float(om.test_accuracy.max()),
                      "min_test_perplexity": float(om.test_perplexity.min())})
      om_curves.append(dict(name=om.run, steps=om.steps, test_perplexity=om.test_perplexity,
                            test_accuracy=om.test_accuracy, stage_steps=om.detection.stage_steps,
                            merged=markers.get(om.run, [])))
    written.append(markdown.write_csv(os.path.join(out, "overmemorization.csv"), om_rows))
    report.paragraph(f"Stage: test perplexity >= (1 + {config.min_ppl_rise}) x its "
                     f"{config.reference} minimum while test accuracy >= its {config.reference} "
                     f"best - {config.max_acc_drop}.")
    report.table(om_rows)
    if om_curves:
      written.append(plots.overmemorization_curves(om_curves,
                                                   os.path.join(out, "overmemorization.png")))
      report.image(written[-1], "over-memorization curves", out)

    # -- merged models ----------------------------------------------------------------------
    merge_rows = merges.comparison_rows(merged, trajs, rows, selected) if merged else []
    if merged:
      report.heading("Merged models vs their trajectories (Ruan et al.)")
      written.append(markdown.write_csv(os.path.join(out, "merges.csv"), merge_rows))
      report.paragraph("Each merged model beside its source trajectory's last checkpoint, its "
                       "best-test-accuracy checkpoint and the checkpoint the over-memorization "
                       "rule selects (best test accuracy before the first stage). Perturbed "
                       "accuracy is the mean over the perturbed prompts.")
      report.table(merge_rows, ["merged_run", "method", "source_run", "source_steps", "model",
                                "step", *merges.COMPARED])
      missing = [f"{m.run}: {', '.join(m.unmatched)}" for m in merge_info if m.unmatched]
      if missing:
        report.paragraph("Merge sources not in this sweep: " + "; ".join(missing) + ".")

    # -- robustness -----------------------------------------------------------------------------
    report.heading("Robustness to prompt perturbations by PreMemAcc (Kang et al. Fig. 7)")
    rob = analysis.robustness(trajs, threshold)
    if rob is None:
      report.paragraph("No perturbed records (evaluate with --splits=...,perturbed).")
    else:
      rob_rows = analysis.robustness_table(rob[0], rob[1], options.premem_bins)
      written.append(markdown.write_csv(os.path.join(out, "robustness.csv"), rob_rows))
      written.append(plots.robustness_violins(rob[0], rob[1], options.premem_bins,
                                              os.path.join(out, "robustness_violins.png")))
      report.table(rob_rows)
      report.image(written[-1], "robustness violins", out)

    # -- data maps ------------------------------------------------------------------------------
    report.heading("Data maps of train exact memorization (Ge et al.)")
    no_map: list[str] = []
    maps = analysis.data_maps(trajs, skipped=no_map)
    if no_map:
      report.paragraph("Not mapped: " + "; ".join(no_map) + ".")
    map_rows = analysis.data_map_rows(maps)
    written.append(markdown.write_csv(os.path.join(out, "data_maps.csv"), map_rows))
    report.table(map_rows)
    cat_rows = analysis.data_map_category_rows(maps)
    written.append(markdown.write_csv(os.path.join(out, "data_maps_by_category.csv"), cat_rows))
    report.paragraph("Per example category (Ge et al. Fig. 7): exact memorization at the first "
                     "and last checkpoints, mean and variance across checkpoints, and the share "
                     "of easy- and hard-to-memorize examples.")
    report.table(cat_rows)
    if maps:
      written.append(plots.data_maps([(m.run, m.dmap.mean, m.dmap.variance, m.labels)
                                      for m in maps], os.path.join(out, "data_maps.png")))
      report.paragraph("Regions by data quantiles: easy = mean in the top third and variance "
                       "below the median; hard = mean in the bottom third, same variance cut.")
      report.image(written[-1], "data maps", out)

    # -- entropy ------------------------------------------------------------------------------
    report.heading("Entropy: nucleus sampling vs teacher forcing, test split (Ge et al. Table 1)")
    ent_rows = analysis.entropy_rows(trajs)
    written.append(markdown.write_csv(os.path.join(out, "entropy.csv"), ent_rows))
    report.table(ent_rows)

    # -- diversity and OOD ------------------------------------------------------------------
    report.heading("Diversity of samples and OOD accuracy per checkpoint (Ruan et al.)")
    series = {}
    for col in DIVERSITY_COLUMNS:
      by_run = {}
      for r in trajs:
        pts = [(row["step"], row.get(col, np.nan)) for row in rows if row["run"] == r.name]
        pts = [(s, v) for s, v in pts if np.isfinite(v)]
        if pts:
          by_run[r.name] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
      if by_run:
        series[col] = by_run
    report.table(traj_rows, ["run", "step", "test_distinct_1", "test_distinct_2",
                             "test_unique_answers", "test_unique_traces", "test_sampled_entropy",
                             "ood_accuracy"])
    if series:
      written.append(plots.per_checkpoint_lines(series, os.path.join(out, "diversity_ood.png")))
      report.image(written[-1], "diversity and OOD", out)

    # -- memorization as a mode of its own: train-target perplexity distributions -----------
    report.heading("Train-target perplexity: base model and each run's last checkpoint")
    dists = {} if base_ppl is None else {"base model": base_ppl}
    for r in trajs:
      last = analysis.last_train_perplexity(r)
      if last is not None:
        dists[f"{r.name} (last)"] = last
    if dists:
      written.append(plots.perplexity_distributions(
          dists, os.path.join(out, "train_perplexity_distributions.png"), threshold=threshold))
      report.image(written[-1], "train-target perplexity distributions", out)

    summary = {
        "premem_threshold_perplexity": float(threshold), "threshold_source": options.threshold,
        "calibrated_threshold_perplexity": None if cal is None else float(cal.threshold),
        "base": analysis.base_summary(trajs, rows, threshold),
        "base_memorized_fraction": analysis.finite_or_none(
            analysis.memorized_fraction(base_ppl, threshold)),
        "r2": {key: analysis.finite_or_none(next(
            row["r2"] for row in base_rows if row["predictor"] == col))
               for key, col in R2_PREDICTORS.items()},
        "n_checkpoints": len(traj_rows), "runs": run_summaries,
        "merges": merges.summary_rows(merge_rows)}
    written.append(markdown.write_json(os.path.join(out, SUMMARY_FILE), summary))
    written.append(report.write(os.path.join(out, "report.md")))
    return [os.path.relpath(p, out) for p in written], rows, summary

  written, rows, summary = fileio.replace_dir(write_all, final)
  written = [os.path.join(final, p) for p in written]
  return AnalysisResult(final, tuple(written), len(runs), len(rows), summary)
