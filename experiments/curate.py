"""Data curation study (Kang et al. Sec. 5.2): PreMemAcc-guided collection (Algorithm 1)
against i.i.d., IFD and heuristic additions, at equal data size per round.

  python experiments/curate.py --model=/path/to/hf_model --task=synthetic_arith \
      --output_dir=runs/curation --n_train=256 --n_test=128 --iterations=5

Every round fine-tunes the base model (preset `curation_default`, TrainConfig flags
override it) on the current set, measures test accuracy and adds
`--additions_per_iteration` generated examples (default: the set doubles over the study).
New examples come from `--generator`: synthetic_arith makes fresh problems of the source's
template ("fresh") or rewords it ("rephrase"); GSM8K/MATH read a jsonl of rephrasings
(`--rephrasings`, rows {"id": example id, "question": ..., optional "target", "answer"})
or prompt a local model (`--rephrase_model`).

Writes to --output_dir: curve.csv (test accuracy vs training examples per method and
round), efficiency.csv (examples each baseline needs to reach PreMemAcc curation's final
accuracy, interpolated, and the ratio), sample_efficiency.png and report.md. Everything is
resumable: a re-run skips finished rounds. Exit status: 0 done, 2 bad flags or inputs.
"""
from __future__ import annotations

import os

from absl import flags

from memdyn_jax import cli
from memdyn_jax.studies import curation
from memdyn_jax.evaluation import run as run_evaluation
from memdyn_jax.cli import UsageError
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError

PROG = "curate.py"
GENERATORS = ("auto", "fresh", "rephrase", "jsonl", "model")

flags.DEFINE_string("model", None, "Base model: local HF directory, hub id, or 'embedded'.")
_TASK_FLAGS = cli.define_task_flags(skip=("split", "max_examples"))
flags.DEFINE_integer("n_train", 0, "D_train: the first N train examples (0 = all).")
flags.DEFINE_integer("n_test", 0, "Test examples evaluated after every round (first N; 0 = all).")
flags.DEFINE_integer("n_ifd", 0, "Test examples the IFD model is fine-tuned on (0 = all).")
flags.DEFINE_list("methods", list(curation.METHODS), f"Any of {list(curation.METHODS)}.")
flags.DEFINE_integer("iterations", 5, "Rounds of data collection (n).")
flags.DEFINE_float("threshold", 0.75, "PreMemAcc threshold t: sources are examples below it.")
flags.DEFINE_integer("additions_per_iteration", 0,
                     "New examples per round, every method (0 = n_train // iterations).")
flags.DEFINE_float("keep_fraction", None, "Share of D_train IFD/heuristic draw from "
                   "(default: GSM8K 0.5, MATH 0.75, else 0.5).")
flags.DEFINE_float("memorization_perplexity", None,
                   "PreMemAcc memorization threshold p in perplexity (default: the task's).")
flags.DEFINE_float("ifd_epochs", 2.0, "Epochs of the IFD model on the test split.")
flags.DEFINE_integer("curation_seed", 0, "Seed of the source draws and generators.")
flags.DEFINE_enum("generator", "auto", GENERATORS,
                  "auto: synthetic_arith -> fresh; else jsonl with --rephrasings, model with "
                  "--rephrase_model.")
flags.DEFINE_string("rephrasings", None, "jsonl of rephrasings keyed by example id.")
flags.DEFINE_string("rephrase_model", None, "Local model prompted to rephrase questions.")
flags.DEFINE_string("rephrase_prompt", curation.REPHRASE_PROMPT,
                    "Rephrasing prompt, with a {question} field.")
flags.DEFINE_string("preset", "curation_default", "TrainConfig preset (TrainConfig flags "
                    "override it).")
# Sampling as experiments/evaluate.py's flags (same names and defaults; --sample_seed is its
# --seed), read into a run_evaluation.EvalSettings.
_SAMPLING_FLAGS = cli.define_dataclass_flags(
    EvalSettings, only=(*run_evaluation.SAMPLING_FIELDS, "batch_size"),
    rename={"seed": "sample_seed"}, help_format="{doc}")
flags.DEFINE_string("output_dir", None, "Study folder (runs, states, curve, report).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
cli.define_train_config_flags()
FLAGS = flags.FLAGS


def check_flags() -> None:
  for name in ("model", "task", "output_dir"):
    if not getattr(FLAGS, name):
      raise UsageError(f"--{name} is required")
  bad = [m for m in FLAGS.methods if m not in curation.METHODS]
  if bad or not FLAGS.methods:
    raise UsageError(f"--methods: unknown method(s) {bad}; choose from {list(curation.METHODS)}")
  for name in ("n_train", "n_test", "n_ifd", "additions_per_iteration"):
    if getattr(FLAGS, name) < 0:
      raise UsageError(f"--{name}: must be >= 0")
  if "{question}" not in FLAGS.rephrase_prompt:
    raise UsageError("--rephrase_prompt: needs a {question} field")


def sampling_settings() -> EvalSettings:
  """The sampling flags (the other EvalSettings fields keep their defaults)."""
  try:
    return EvalSettings(**cli.dataclass_kwargs_from_flags(EvalSettings, _SAMPLING_FLAGS))
  except EvalSettingsError as e:
    raise cli.usage_error(e, _SAMPLING_FLAGS) from None


def sampling_params(settings: EvalSettings):
  """--task's default sampling with the sampling flags applied."""
  try:
    return run_evaluation.sampling_params(FLAGS.task, settings)
  except EvalSettingsError as e:
    raise cli.usage_error(e, _SAMPLING_FLAGS) from None


def curation_config(method: str) -> curation.CurationConfig:
  try:
    return curation.CurationConfig(
        method=method, iterations=FLAGS.iterations, threshold=FLAGS.threshold,
        additions_per_iteration=FLAGS.additions_per_iteration,
        keep_fraction=FLAGS.keep_fraction,
        memorization_perplexity=FLAGS.memorization_perplexity, ifd_epochs=FLAGS.ifd_epochs,
        seed=FLAGS.curation_seed)
  except curation.CurationConfigError as e:
    raise cli.usage_error(e, {"seed": "curation_seed"}) from None


def load_setup(spec, model_dir: str, sampling: EvalSettings, params):
  """The study's data, model and settings (`spec`: the task flags' TaskSpec)."""
  from memdyn_jax import tasks
  try:
    task = tasks.get_task(spec.name, **spec.kwargs)
    train = task.load("train", spec.path)
    test = task.load("test", spec.path)
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise UsageError(f"--task/--task_path: {str(e).splitlines()[0]}") from None
  train = train[:FLAGS.n_train or None]
  if "heuristic" in FLAGS.methods:
    try:
      curation.heuristic_difficulty(task.name, train[0])
    except ValueError as e:
      raise UsageError(f"--methods: {e}") from None
  return curation.CurationSetup(
      task=task, model_path=model_dir, train_examples=tuple(train),
      test_examples=tuple(test[:FLAGS.n_test or None]), sampling=params,
      ifd_examples=tuple(test[:FLAGS.n_ifd or None]),
      train_config=cli.train_config_from_flags(FLAGS.preset),
      eval_batch_size=sampling.batch_size)


def make_generator(task):
  kind = FLAGS.generator
  if kind == "auto":
    if task.name == "synthetic_arith":
      kind = "fresh"
    elif FLAGS.rephrasings:
      kind = "jsonl"
    elif FLAGS.rephrase_model:
      kind = "model"
    else:
      raise UsageError(f"--rephrasings or --rephrase_model is required for task "
                       f"{task.name!r} (nothing here may use the network)")
  if kind in ("fresh", "rephrase"):
    if task.name != "synthetic_arith":
      raise UsageError(f"--generator={kind} is for synthetic_arith, not {task.name!r}")
    return curation.SyntheticArithGenerator(task, mode=kind)
  if kind == "jsonl":
    if not FLAGS.rephrasings:
      raise UsageError("--rephrasings is required with --generator=jsonl")
    try:
      return curation.JsonlRephrasings(FLAGS.rephrasings)
    except ValueError as e:  # DataError names the file and line
      raise UsageError(f"--rephrasings: {str(e).splitlines()[0]}") from None
  if not FLAGS.rephrase_model:
    raise UsageError("--rephrase_model is required with --generator=model")
  from memdyn_jax import models
  path = cli.resolve_model(FLAGS.rephrase_model, flag="--rephrase_model")
  model, _ = models.from_pretrained(path)
  return curation.ModelRephraser(model, models.load_tokenizer(path),
                                 prompt_format=FLAGS.rephrase_prompt,
                                 batch_size=FLAGS.batch_size)


def write_outputs(out: str, results, setup) -> str:
  from memdyn_jax.report import markdown, plots

  curve = curation.curve_rows(results)
  efficiency = curation.efficiency_rows(results)
  markdown.write_csv(os.path.join(out, "curve.csv"), curve)
  if efficiency:
    markdown.write_csv(os.path.join(out, "efficiency.csv"), efficiency)
  png = plots.sample_efficiency({r.method: r.curve() for r in results},
                                os.path.join(out, "sample_efficiency.png"),
                                title=f"{setup.task.name}: test accuracy vs training examples")
  report = markdown.Report(f"Data curation on {setup.task.name} (Kang et al. Sec. 5.2)")
  report.paragraph(
      f"{len(setup.train_examples)} original training examples, {FLAGS.iterations} rounds "
      f"of additions, {len(setup.test_examples)} test examples; every round fine-tunes the "
      "base model afresh on the current set.")
  report.image(png, "sample efficiency", out)
  report.heading("Test accuracy vs training examples")
  report.table(curve)
  report.heading("Data efficiency at matched accuracy")
  if efficiency:
    report.paragraph("Examples each baseline needs (linear interpolation along its curve) "
                     "to reach the accuracy PreMemAcc curation ends with; ratio = baseline "
                     "/ PreMemAcc. NaN = never reached: the ratio is above the lower bound.")
    report.table(efficiency)
  else:
    report.paragraph("Not computed: run the 'premem' method with at least one baseline.")
  return report.write(os.path.join(out, "report.md"))


def run() -> int:
  check_flags()
  sampling = sampling_settings()
  spec = cli.task_spec_from_flags(_TASK_FLAGS)
  configs = [curation_config(m) for m in dict.fromkeys(FLAGS.methods)]
  from memdyn_jax.train import task_run
  try:
    task_run.check_task_name(spec.name)  # fail fast, before loading a model
  except task_run.TaskRunError as e:
    raise cli.usage_error(e) from None
  params = sampling_params(sampling)
  model_dir = cli.resolve_model(FLAGS.model)
  setup = load_setup(spec, model_dir, sampling, params)
  generator = make_generator(setup.task)
  os.makedirs(FLAGS.output_dir, exist_ok=True)
  results = []
  for cfg in configs:
    try:
      results.append(curation.run_curation(
          setup, cfg, generator, FLAGS.output_dir, progress=FLAGS.progress,
          log=lambda m: print(f"{PROG}: {m}", flush=True)))
    except ValueError as e:  # CurationError, DataError, mismatched runs: one line
      raise UsageError(f"method {cfg.method!r}: {str(e).splitlines()[0]}") from None
  report = write_outputs(FLAGS.output_dir, results, setup)
  print(f"{PROG}: report written to {report}")
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
