"""The quickstart study: memorization dynamics on the embedded default, offline on a CPU
(experiments/quickstart.py is its flag parsing).

It is the standard pipeline on a small grid, nothing of its own:
1. the shipped embedded base model (`memdyn_jax.studies.embedded`; `rebuild_base` builds it again);
2. a sweep (`memdyn_jax.studies.sweep`) on `synthetic_arith`: every learning rate x every epoch
   count, plus one long small-data run at the largest rate, each trained and then
   evaluated by the run evaluation of experiments/evaluate.py (`run_evaluation`: samples at T = 0.8, target-trace
   perplexity, greedy scores for ATC, gradient variance, OOD and perturbed prompts) at
   `evals_per_run` checkpoints; the first run also evaluates the base model as its step 0;
3. the analysis of experiments/analyze.py (`report.analyze_sweep`: calibrated PreMemAcc vs
   baselines, over-memorization, data maps, distributions of train-target perplexity);
4. a uniform merge (experiments/merge.py's `merged_run`) of the evaluated checkpoints of the
   most over-memorized run, evaluated like any run, and the analysis again with it;
5. report.md (the findings read off summary.json, then links into analysis/) and
   summary.json beside it.

Deterministic for a seed on one machine. A re-run reuses every finished run, evaluation and
merge.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Mapping

from memdyn_jax.errors import FieldError


# Kang et al. calibrate the PreMemAcc threshold per task (App. A.1); their GSM8K value calls
# most of this task's templated traces memorized before any is solved.
ANALYSIS_OPTIONS = {"threshold": "calibrated"}


class QuickstartError(FieldError):
  """A bad quickstart setting; `field` names it (and the quickstart binary's flag)."""


@dataclasses.dataclass(frozen=True)
class QuickstartConfig:
  """The quickstart study's settings (experiments/quickstart.py's flags, whose help texts
  are the descriptions below).

  Attributes:
    output_dir: the sweep directory: runs, merged run, analysis/, report.md, summary.json.
    scale: model/corpus/data scale factor; 1 = the shipped base, >1 builds a bigger one.
    rebuild_base: pre-train the embedded base from scratch (into the cache) instead of
      loading the shipped one (~35 minutes on a 2-core CPU).
    seed: seed of data order and sampling.
    n_train: training problems (per scale unit).
    learning_rates: fine-tuning learning rates.
    epochs: fine-tuning epoch counts (a grid with the learning rates).
    small_data_fraction: share of the n_train problems the extra small-data run trains on.
    small_data_epochs: epochs of that run (at the largest learning rate: Ruan et al.'s
      over-memorization comes with long training at a large one); 0 = no such run.
    checkpoint_every_epochs: checkpoint cadence in epochs.
    evals_per_run: checkpoints evaluated per run (spread over the run, denser late, last
      included; 0 = every checkpoint); training saves only those of its cadence.
    batch_size: global batch size.
    max_length: longest fine-tuning example in tokens.
    batch_length_multiple: trailing padding shared by a batch is cut to a multiple of this.
    group_by_length: batches of similar length, from chunks of this many batches (0 = off).
    n_eval: test examples evaluated per checkpoint: test accuracy is the
      regression target, so its sampling noise caps every R² of the report.
    n_eval_train: train examples (of those a run trains on) evaluated per checkpoint.
    n_samples: samples per example for accuracy (T = 0.8).
    max_new_tokens: generation budget.
    eval_batch_size: prompts per sampling/scoring program.
    workers: processes the runs are trained and evaluated in, each taking the next run when
      free (the figures do not depend on it; 1 = this process).
  """
  output_dir: str = "/tmp/memdyn_quickstart"
  scale: int = 1
  rebuild_base: bool = False
  seed: int = 0
  n_train: int = 256
  learning_rates: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
  epochs: tuple[float, ...] = (1.0, 3.0, 8.0)
  small_data_fraction: float = 0.125
  small_data_epochs: float = 96.0
  checkpoint_every_epochs: float = 0.5
  evals_per_run: int = 3
  batch_size: int = 16
  max_length: int = 256
  batch_length_multiple: int = 32
  group_by_length: int = 4
  n_eval: int = 128
  n_eval_train: int = 32
  n_samples: int = 1
  max_new_tokens: int = 128
  eval_batch_size: int = 64
  workers: int = 2

  def __post_init__(self):
    object.__setattr__(self, "learning_rates", tuple(float(x) for x in self.learning_rates))
    object.__setattr__(self, "epochs", tuple(float(x) for x in self.epochs))
    if self.scale < 1:
      raise QuickstartError("scale", "must be >= 1")
    if not self.learning_rates or min(self.learning_rates) <= 0:
      raise QuickstartError("learning_rates", "needs at least one, all > 0")
    if not self.epochs or min(self.epochs) <= 0:
      raise QuickstartError("epochs", "needs at least one, all > 0")
    for name in ("n_train", "n_eval", "n_eval_train", "n_samples", "batch_size",
                 "max_new_tokens", "eval_batch_size", "workers"):
      if getattr(self, name) < 1:
        raise QuickstartError(name, "must be >= 1")
    for name in ("small_data_epochs", "evals_per_run"):
      if getattr(self, name) < 0:
        raise QuickstartError(name, "must be >= 0")
    if not 0 < self.small_data_fraction <= 1:
      raise QuickstartError("small_data_fraction", "must be in (0, 1]")
    if not self.checkpoint_every_epochs > 0:
      raise QuickstartError("checkpoint_every_epochs", "must be > 0")


PERTURBATIONS = ("First", "We know that")
MERGE_PREFIX = "merge_"


def make_sweep(config: QuickstartConfig, base_dir: str, spec):
  """The quickstart's sweep: its grid over the base at `base_dir`, evaluated as evaluate.py
  would with the quickstart's sizes."""
  from memdyn_jax.studies import sweep
  from memdyn_jax.evaluation.run import EvalSettings
  from memdyn_jax.train.task_run import TaskSpec

  task = spec.task()
  task_spec = TaskSpec("synthetic_arith", {"seed": task.seed, "max_steps": spec.task_max_steps,
                                           "max_value": spec.task_max_value},
                       max_examples=config.n_train * config.scale)
  overrides = dict(
      global_batch_size=config.batch_size, optimizer="adamw", weight_decay=0.0,
      schedule="linear", warmup_ratio=0.05, max_grad_norm=1.0, seed=config.seed,
      max_length=config.max_length, batch_length_multiple=config.batch_length_multiple,
      group_by_length=config.group_by_length, save_every_epochs=config.checkpoint_every_epochs,
      # Only the checkpoints the evaluation reads are written (the same spread picks):
      # the small-data run would otherwise save one per step, ~15 s of the minutes here.
      checkpoints_to_save=config.evals_per_run, log_every_steps=1)
  extra = ()
  if config.small_data_epochs > 0:
    lr = max(config.learning_rates)
    extra = ({"learning_rate": lr, "num_epochs": config.small_data_epochs,
              "data_fraction": config.small_data_fraction},)
  grid = sweep.Grid(learning_rates=config.learning_rates, epochs=config.epochs,
                    overrides=overrides, extra_runs=extra)
  evaluation = EvalSettings(
      # OOD is left to experiments/evaluate.py: at n_eval it doubled the quickstart's minutes.
      splits=("train", "test", "perturbed"), num_train=config.n_eval_train,
      max_eval=config.n_eval, subset_seed=config.seed, perturbations=PERTURBATIONS,
      temperature=0.8, top_p=0.95, max_new_tokens=config.max_new_tokens,
      n_samples=config.n_samples, seed=config.seed, batch_size=config.eval_batch_size,
      grad_variance_batch_size=max(1, min(8, config.n_eval_train // 5)),
      checkpoints_per_run=config.evals_per_run,
      # One of the paper's baselines, measured while each checkpoint is loaded anyway.
      distance_from_init=True)
  return sweep.make_sweep(config.output_dir, base_dir, task_spec, grid, evaluation)


def merge_source(summary: Mapping[str, Any]) -> tuple[str | None, str]:
  """The run to merge (Ruan et al.'s mitigation) and why: the flagged run whose test
  perplexity ends furthest above its minimum, else the unflagged run with the largest such
  rise; None when no run's test perplexity rose."""
  rises = {name: r["test_perplexity_rise"] for name, r in summary["runs"].items()
           if r.get("test_perplexity_rise") is not None}
  flagged = {n: v for n, v in rises.items() if summary["runs"][n]["overmemorization_flagged"]}
  pool = flagged or {n: v for n, v in rises.items() if v > 0}
  if not pool:
    return None, "no run's test perplexity rose above its minimum"
  name = max(pool, key=pool.get)
  why = ("flagged as over-memorizing, the largest test-perplexity rise" if flagged else
         "no run is flagged; this one has the largest test-perplexity rise")
  return name, why


def accuracy_standard_error(accuracy: float, n: int) -> float:
  """Binomial standard error of one checkpoint's accuracy over n examples (p clipped to
  [0.05, 0.95] so an extreme point does not claim no noise)."""
  p = min(max(accuracy, 0.05), 0.95)
  return math.sqrt(p * (1 - p) / n)


def analyze(sweep):
  """`sweep.analyze` with `ANALYSIS_OPTIONS`; when the sweep cannot calibrate a threshold
  (a tiny grid with no spread), with Kang et al.'s task threshold instead (the report
  states which was used)."""
  from memdyn_jax import report
  from memdyn_jax.studies import sweep as sweep_lib
  try:
    return sweep_lib.analyze(sweep, **ANALYSIS_OPTIONS)
  except report.AnalysisError as e:
    if e.field != "threshold":
      raise
    return sweep_lib.analyze(sweep, **{**ANALYSIS_OPTIONS, "threshold": "default"})


def run_study(config: QuickstartConfig, spec=None) -> str:
  """Runs the study of `config`; `spec` overrides the embedded model (tests use a tiny one).

  Returns:
    The path of report.md.

  Raises:
    sweep.SweepStopped: SIGTERM / SIGINT stopped a run after it saved; a re-run continues.
  """
  from memdyn_jax.train import checkpoints
  from memdyn_jax.studies import embedded
  from memdyn_jax.merging import run as merged_run
  from memdyn_jax import merging, models
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.studies import sweep as sweep_lib

  clock = time.time()
  wall: dict[str, float] = {}

  def lap(stage: str) -> None:
    nonlocal clock
    now = time.time()
    wall[stage] = wall.get(stage, 0.0) + (now - clock)
    clock = now
    print(f"[{sum(wall.values()):6.1f}s] {stage}", flush=True)

  start = time.time()
  spec = spec or embedded.EmbeddedSpec(seed=config.seed).scaled(config.scale)
  base_dir = embedded.model_dir(spec, rebuild=config.rebuild_base)
  base_manifest = embedded.shipped_manifest(base_dir)
  lap("base_model")

  sweep = make_sweep(config, base_dir, spec)
  sweep_lib.write_sweep(sweep)
  import jax
  cells: dict[str, float] = {"train": 0.0, "evaluate": 0.0}
  for outcome in sweep_lib.run_parallel(sweep, sweep.cells, config.workers,
                                        compile_cache_dir=jax.config.jax_compilation_cache_dir):
    if outcome.error:
      raise RuntimeError(f"quickstart run {outcome.name}: {outcome.error}")
    if outcome.stop_signal is not None:
      raise sweep_lib.SweepStopped(outcome.name, outcome.stop_signal)
    cells["train"] += outcome.train_seconds
    cells["evaluate"] += outcome.eval_seconds
  lap("runs")
  # The base model, once, as step 0 of the first run (evaluate.py --include_base).
  run_evaluation.evaluate(sweep.cells[0].run_dir,
                          dataclasses.replace(sweep.evaluation, include_base=True),
                          steps=[], progress=False)
  lap("evaluate_base")

  result = analyze(sweep)
  lap("analyze")
  source, why = merge_source(result.summary)
  if source is not None:
    cell = next(c for c in sweep.cells if c.name == source)
    steps = run_evaluation.spread_steps(checkpoints.list_steps(cell.run_dir),
                                        config.evals_per_run)
    merged_dir = os.path.join(sweep.sweep_dir, MERGE_PREFIX + source)
    merged_run.merge_to_run_dir(
        merged_dir, "linear", [merged_run.CheckpointRef(cell.run_dir, s) for s in steps],
        config=merging.MergeConfig(method="linear"),
        tokenizer=models.load_tokenizer(base_dir), log=lambda m: None)
    run_evaluation.evaluate(merged_dir, sweep.evaluation, progress=False)
    lap("merge")
    result = analyze(sweep)
    lap("analyze")
  wall["total"] = time.time() - start

  summary = quickstart_summary(config, result.summary, base_manifest, source, why, wall,
                               cells)
  out = sweep.sweep_dir
  from memdyn_jax.report import markdown
  markdown.write_json(os.path.join(out, "summary.json"), summary)
  report = os.path.join(out, "report.md")
  from memdyn_jax import fileio
  fileio.atomic_write_text(report, narrative(config, summary, spec) + "\n")
  print("stage wall seconds: " + json.dumps({k: round(v, 1) for k, v in wall.items()})
        + f" (runs: {config.workers} worker(s); their cells' train / evaluate seconds summed: "
        + json.dumps({k: round(v, 1) for k, v in cells.items()}) + ")", flush=True)
  return report


def quickstart_summary(config: QuickstartConfig, analysis: Mapping[str, Any],
                       base_manifest: Mapping[str, Any], merge_run: str | None, merge_why: str,
                       wall: Mapping[str, float],
                       cell_seconds: Mapping[str, float] | None = None) -> dict[str, Any]:
  """summary.json: the analysis's figures plus the base model's, the merge, and timings."""
  base = analysis.get("base") or {}
  runs = analysis["runs"]
  finals = [r["final_test_accuracy"] for r in runs.values()
            if r["final_test_accuracy"] is not None]
  mean_acc = sum(finals) / len(finals) if finals else 0.5
  merge = None
  for row in analysis.get("merges", []):
    if row["source_run"] == merge_run:
      merge = {"source_run": merge_run, "why": merge_why, "merged_run": row["merged_run"],
               "source_steps": row["source_steps"], "test_perplexity": row["test_perplexity"],
               "source_test_perplexity": row["source_test_perplexity"],
               "test_accuracy": row["test_accuracy"],
               "source_test_accuracy": row["source_test_accuracy"]}
  return {
      "base_test_accuracy": base.get("test_accuracy"),
      "base_test_perplexity": base.get("test_perplexity"),
      "base_memorized_fraction": analysis.get("base_memorized_fraction"),
      "test_accuracy_standard_error": accuracy_standard_error(
          mean_acc, config.n_eval * config.n_samples),
      "final_test_accuracy_spread": (max(finals) - min(finals)) if finals else None,
      "best_gain_over_base": (max(finals) - base["test_accuracy"]
                              if finals and base.get("test_accuracy") is not None else None),
      "premem_threshold_perplexity": analysis["premem_threshold_perplexity"],
      "threshold_source": analysis.get("threshold_source"),
      "r2": analysis["r2"], "r2_held_out": analysis.get("r2_held_out"),
      "runs": runs, "merge": merge,
      "base_model": {k: base_manifest.get(k) for k in ("spec_key", "num_params", "tokens_seen",
                                                       "final_loss", "probes")},
      "settings": dataclasses.asdict(config) | {"output_dir": None},
      "wall_seconds": {k: round(v, 1) for k, v in wall.items()},
      # Per-run training / evaluation seconds summed over the runs (workers overlap them).
      "cell_seconds": {k: round(v, 1) for k, v in (cell_seconds or {}).items()},
      "workers": config.workers,
  }


def _fmt(x, digits: int = 3) -> str:
  return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{digits}f}"


def held_out_sentence(held: Mapping[str, Any] | None) -> str:
  """The report's held-out R² (`report.analysis.held_out_summary`), one sentence."""
  if not held:
    return "No held-out R² (an analysis from before it was reported)."
  parts = []
  calibrated_on = ", ".join(held["calibration_runs"]) or "K runs"
  for protocol, label in (("leave_one_run_out", "each run predicted from the others"),
                          ("k_runs", f"calibrated on {calibrated_on}, scored on the others")):
    scores = held.get(protocol)
    parts.append(f"{label}: " + ("not possible with these runs" if scores is None else
                                 ", ".join(f"{k} {_fmt(v)}" for k, v in scores.items())))
  return "Held out (Kang et al. App. A.1: fitted on some runs, scored on others) — " + \
      "; ".join(parts) + "."


def targets(summary: Mapping[str, Any]) -> list[tuple[str, bool | None]]:
  """The quickstart's targets (README) read off summary.json: (statement, met); met is None
  when the figure is missing."""
  r2 = summary["r2"]
  runs = summary["runs"].values()
  base_r2 = [v for k, v in r2.items() if k != "premem" and v is not None]
  premem = r2.get("premem")
  spread, gain, se = (summary["final_test_accuracy_spread"], summary["best_gain_over_base"],
                      summary["test_accuracy_standard_error"])
  memorizing = [r for r in runs if (r["memorized_fraction"] or 0) >= 0.8
                and r["final_train_accuracy"] is not None and r["final_test_accuracy"] is not None
                and r["final_test_accuracy"] < r["final_train_accuracy"] - 0.1]
  merge = summary.get("merge")
  out = [
      ("final test accuracy spans >= 0.30 across runs",
       None if spread is None else spread >= 0.30),
      ("the best run beats the base by >= 0.25", None if gain is None else gain >= 0.25),
      ("one checkpoint's test-accuracy standard error <= 0.03", se <= 0.03),
      ("PreMemAcc R² >= 0.8", None if premem is None else premem >= 0.8),
      ("PreMemAcc R² ahead of every baseline by >= 0.05",
       None if premem is None or not base_r2 else premem >= max(base_r2) + 0.05),
      ("a run memorizes >= 80% of its train targets with test accuracy well below train",
       bool(memorizing)),
      ("over-memorization is flagged in at least one run",
       any(r["overmemorization_flagged"] for r in runs)),
      ("merging that run's checkpoints lowers its test perplexity",
       None if merge is None or merge["test_perplexity"] is None
       else merge["test_perplexity"] < merge["source_test_perplexity"]),
      ("at the base model <= 5% of train targets count as memorized",
       None if summary["base_memorized_fraction"] is None
       else summary["base_memorized_fraction"] <= 0.05),
  ]
  return out


def narrative(config: QuickstartConfig, summary: Mapping[str, Any], spec) -> str:
  """The top of report.md: what ran, what it shows, and which targets it meets."""
  base = summary["base_model"]
  probes = base.get("probes") or {}
  lines = ["# memdyn_jax quickstart", "",
           f"Embedded base model `{base['spec_key']}`: {base['num_params']:,} parameters, "
           f"pre-trained on {base['tokens_seen']:,} tokens (final loss {_fmt(base['final_loss'])})."
           f" Before fine-tuning it solves {_fmt(probes.get('work_accuracy'))} of test problems "
           f"in its pre-training format but {_fmt(probes.get('task_accuracy'))} in the task's "
           "answer format: fine-tuning teaches the format, and with it the traces.", "",
           f"Fine-tuning: {config.n_train * config.scale} `synthetic_arith` problems "
           f"(1-{spec.task_max_steps} events); learning rates "
           f"{', '.join(f'{x:g}' for x in config.learning_rates)} x epochs "
           f"{', '.join(f'{x:g}' for x in config.epochs)}"
           + (f", plus a {config.small_data_epochs:g}-epoch run on "
              f"{config.small_data_fraction * 100:g}% of the data" if config.small_data_epochs
              else "")
           + f". Each run is evaluated at {config.evals_per_run or 'every'} checkpoints on "
           f"{config.n_eval} test and {config.n_eval_train} train problems "
           f"({config.n_samples} sample(s) at T = 0.8).", "",
           "## Findings", ""]
  runs = summary["runs"]
  finals = {n: r["final_test_accuracy"] for n, r in runs.items()}
  lines.append(
      f"**Fine-tuning moves test accuracy.** The base model scores "
      f"{_fmt(summary['base_test_accuracy'])}; the runs end at "
      f"{_fmt(min(finals.values()))}-{_fmt(max(finals.values()))} (spread "
      f"{_fmt(summary['final_test_accuracy_spread'])}, best gain over the base "
      f"{_fmt(summary['best_gain_over_base'])}); one checkpoint's test accuracy has a standard "
      f"error of about {_fmt(summary['test_accuracy_standard_error'])}.")
  lines += ["", "| run | final train acc | final test acc | memorized share of train | "
                "test ppl rise from min | over-memorization |", "|---|---|---|---|---|---|"]
  for name, r in runs.items():
    lines.append(f"| {name} | {_fmt(r['final_train_accuracy'])} | "
                 f"{_fmt(r['final_test_accuracy'])} | {_fmt(r['memorized_fraction'], 2)} | "
                 f"{_fmt(r['test_perplexity_rise'])} | "
                 f"{'flagged' if r['overmemorization_flagged'] else '-'} |")
  r2 = summary["r2"]
  lines += ["", f"**PreMemAcc (Kang et al.).** Threshold: perplexity "
                f"{_fmt(summary['premem_threshold_perplexity'], 4)} "
                + ("(calibrated on the sweep, never calling more than 5% of the base model's "
                   "train targets memorized; " if summary.get("threshold_source") == "calibrated"
                   else "(Kang et al.'s task default: this sweep has too little spread to "
                   "calibrate one; ") +
                f"at the base {_fmt(summary['base_memorized_fraction'], 2)} are). R² of "
                "test accuracy on each predictor over every evaluated checkpoint (in sample: "
                "the threshold and lines are fitted on the points scored): "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in r2.items()) + ". "
                + held_out_sentence(summary.get("r2_held_out"))]
  merge = summary.get("merge")
  if merge:
    lines += ["", f"**Over-memorization (Ruan et al.).** Merged {merge['source_run']} "
                  f"({merge['why']}; checkpoints {merge['source_steps']}): test perplexity "
                  f"{_fmt(merge['test_perplexity'])} vs {_fmt(merge['source_test_perplexity'])} "
                  f"at its last checkpoint, test accuracy {_fmt(merge['test_accuracy'])} vs "
                  f"{_fmt(merge['source_test_accuracy'])}."]
  lines += ["", "## Targets", ""]
  for statement, met in targets(summary):
    lines.append(f"- {'met' if met else 'NOT met' if met is False else 'not measured'}: "
                 f"{statement}")
  lines += ["", "## Figures and tables", "",
            "![PreMemAcc scatter](analysis/premem_scatter.png)", "",
            "![train-target perplexity](analysis/train_perplexity_distributions.png)", "",
            "![over-memorization](analysis/overmemorization.png)", "",
            "The full analysis (every table, calibration curve, data maps, robustness, "
            "entropy, diversity): [analysis/report.md](analysis/report.md). Per-checkpoint "
            "figures: analysis/checkpoints.csv. Stage timings: summary.json `wall_seconds`."]
  return "\n".join(lines)
