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
    calibration_runs: K, runs the held-out R² calibrates on (Kang et al. App. A.1: e.g.
      3, spread in test accuracy and memorization); the others are scored.
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
  calibration_runs: int = 3

  def __post_init__(self):
    object.__setattr__(self, "threshold", str(self.threshold).strip())
    if self.premem_bins < 1:
      raise AnalysisError("premem_bins", "must be >= 1")
    if self.calibration_runs < 2:
      raise AnalysisError("calibration_runs", "must be >= 2")
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
ANALYSIS_OUTPUT = "analysis"  # the output-marker kind of analyze_sweep's folders


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
      ("atc_reference"); an existing output folder that is not an earlier analysis of
      this sweep ("output_dir": never deleted).
  """
  from memdyn_jax import metrics
  from memdyn_jax.evaluation import records
  from memdyn_jax.report import analysis, collect, markdown, merges, sections

  name = options.eval_name
  if not os.path.isdir(sweep_dir):
    raise AnalysisError("sweep_dir", f"{sweep_dir}: no such directory")
  try:
    run_dirs = collect.find_runs(sweep_dir, name=name)
    runs = [collect.load_run(d, name=name) for d in run_dirs]
  except (FileNotFoundError, ValueError) as e:  # a malformed record file: names path:line
    raise AnalysisError("sweep_dir", str(e)) from e
  trajs, merged = merges.split_runs(runs)
  try:
    merge_info = [merges.merge_sources(m, trajs) for m in merged]
  except ValueError as e:
    raise AnalysisError("sweep_dir", str(e)) from e
  final = os.path.abspath(output_dir or os.path.join(sweep_dir, "analysis"))

  # Written into a fresh folder that then replaces `final` whole: no output of an earlier
  # analysis (e.g. merges.csv of a merged run since removed) survives beside this one.
  def write_all(out: str):
    task = (records.read_config(run_dirs[0], name=name) or {}).get("task")
    sheet = sections.Sheet(out, markdown.Report(
        f"Memorization dynamics: {len(trajs)} run(s) "
        + (f"and {len(merged)} merged model(s) " if merged else "")
        + f"in {os.path.abspath(sweep_dir)}"))
    base_ppl = analysis.base_train_perplexity(trajs)
    threshold, cal, cal_note = _threshold(trajs, options, task, base_ppl)
    try:
      atc, atc_note = analysis.atc_predictions(runs, options.atc_checkpoint)
    except ValueError as e:
      raise AnalysisError("atc_reference", str(e)) from e
    rows = sections.checkpoint_table(sheet, runs, threshold, atc, options.threshold)
    traj_rows = [row for row in rows if row["kind"] == "trajectory"]
    sections.premem_vs_test(sheet, trajs, threshold, cal, cal_note)
    held = analysis.held_out_scores(trajs, traj_rows, R2_PREDICTORS, options.calibration_runs,
                                    base_ppl, threshold)
    base_rows = sections.baselines(sheet, traj_rows, R2_PREDICTORS, atc_note, held)
    config = metrics.OverMemorizationConfig(
        min_ppl_rise=options.overmem_ppl_rise, max_acc_drop=options.overmem_acc_drop,
        reference=options.overmem_reference, min_stage_len=options.overmem_min_stage_len)
    selected, run_summaries = sections.overmemorization(sheet, trajs, merged, rows, config,
                                                        threshold)
    merge_rows = sections.merged_models(sheet, merged, trajs, rows, selected, merge_info)
    sections.robustness(sheet, trajs, threshold, options.premem_bins)
    sections.data_maps(sheet, trajs)
    sections.entropy(sheet, trajs)
    sections.diversity_and_ood(sheet, trajs, rows, traj_rows, DIVERSITY_COLUMNS)
    sections.train_perplexity_distributions(sheet, trajs, base_ppl, threshold)
    summary = {
        "premem_threshold_perplexity": float(threshold), "threshold_source": options.threshold,
        "calibrated_threshold_perplexity": None if cal is None else float(cal.threshold),
        "base": analysis.base_summary(trajs, rows, threshold),
        "base_memorized_fraction": analysis.finite_or_none(
            analysis.memorized_fraction(base_ppl, threshold)),
        "r2": {key: analysis.finite_or_none(next(
            row["r2"] for row in base_rows if row["predictor"] == col))
               for key, col in R2_PREDICTORS.items()},
        "r2_held_out": analysis.held_out_summary(held),
        "n_checkpoints": len(traj_rows), "runs": run_summaries,
        "merges": merges.summary_rows(merge_rows)}
    sheet.written.append(markdown.write_json(os.path.join(out, SUMMARY_FILE), summary))
    sheet.written.append(sheet.report.write(os.path.join(out, "report.md")))
    return [os.path.relpath(p, out) for p in sheet.written], rows, summary

  try:
    written, rows, summary = fileio.replace_dir(write_all, final, kind=ANALYSIS_OUTPUT,
                                                source=sweep_dir, also_replaces=_is_old_analysis)
  except fileio.NotReplaceableError as e:
    raise AnalysisError("output_dir", str(e)) from e
  written = [os.path.join(final, p) for p in written]
  return AnalysisResult(final, tuple(written), len(runs), len(rows), summary)


def _is_old_analysis(folder: str) -> bool:
  """An analysis folder written before output markers existed: files only, report.md and
  summary.json among them."""
  entries = os.listdir(folder)
  return ({"report.md", SUMMARY_FILE} <= set(entries)
          and all(os.path.isfile(os.path.join(folder, e)) for e in entries))


def _threshold(trajs, options: AnalysisOptions, task: str | None, base_ppl):
  """(PreMemAcc threshold, the calibration or None, why there is none) per `options`:
  calibrated on the trajectories (Kang et al. App. A.1), the task's default, or a number."""
  from memdyn_jax import metrics
  from memdyn_jax.report import analysis

  option = options.threshold_value
  cal, cal_note = None, ""
  if options.calibrate or option == "calibrated":
    try:  # merged models are not trajectories: calibration uses the trajectories only
      cal = metrics.calibrate_threshold(analysis.calibration_runs(trajs),
                                        analysis.default_candidates(), base_perplexity=base_ppl)
    except ValueError as e:
      cal_note = f"Threshold calibration not possible: {e}."
  if option == "calibrated":
    if cal is None:
      raise AnalysisError("threshold", f"cannot calibrate: {cal_note or 'no train+test records'}")
    return cal.threshold, cal, cal_note
  if option == "default":
    return analysis.default_threshold(task), cal, cal_note
  return float(option), cal, cal_note
