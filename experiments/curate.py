r"""Data curation study (Kang et al. Sec. 5.2): PreMemAcc-guided collection (Algorithm 1)
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

Writes to --output_dir (`memdyn_jax.studies.curation.run_seeds`): curve.csv, efficiency.csv
(examples each baseline needs to reach PreMemAcc curation's final accuracy, and the ratio),
sample_efficiency.png, summary.json and report.md; per seed with --seeds=0,1,... (mean
curves with bands on top). Resumable: a re-run skips finished rounds. Exit: 0 done, 2 bad input.
"""
from __future__ import annotations

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError
from memdyn_jax.evaluation import run as run_evaluation
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
from memdyn_jax.studies import curation

PROG = "curate.py"

flags.DEFINE_string("model", None, "Base model: local HF directory, hub id, or 'embedded'.")
_TASK_FLAGS = cli.define_task_flags(  # IFD scores targets without prompts: no chat template
    skip=("split", "max_examples", "chat_template", "system_prompt"))
flags.DEFINE_integer("n_train", 0, "D_train: the first N train examples (0 = all).")
flags.DEFINE_integer("n_test", 0, "Test examples evaluated after every round (first N; 0 = all).")
flags.DEFINE_integer("n_ifd", 0, "Test examples the IFD model is fine-tuned on (0 = all).")
flags.DEFINE_list("methods", list(curation.METHODS), f"Any of {list(curation.METHODS)}.")
flags.DEFINE_integer("iterations", 5, "Rounds of data collection (n).")
flags.DEFINE_float("premem_cutoff", 0.75, "PreMemAcc cutoff t: sources are examples below it.")
flags.DEFINE_integer("additions_per_iteration", 0,
                     "New examples per round, every method (0 = n_train // iterations).")
flags.DEFINE_float("keep_fraction", None, "Share of D_train IFD/heuristic draw from "
                   "(default: GSM8K 0.5, MATH 0.75, else 0.5).")
flags.DEFINE_float("memorization_perplexity", None,
                   "PreMemAcc memorization threshold p in perplexity (default: the task's).")
flags.DEFINE_float("ifd_epochs", 2.0, "Epochs of the IFD model on the test split.")
flags.DEFINE_list("seeds", ["0"], "Repetitions: each seed draws the sources, generates and "
                  "fine-tunes (overrides --seed); 2+ seeds write seed_<s>/ and bands.")
flags.DEFINE_enum("generator", "auto", ["auto", *curation.GENERATORS],
                  "auto: synthetic_arith -> fresh; else jsonl with --rephrasings, model with "
                  "--rephrase_model.")
flags.DEFINE_string("rephrasings", None, "jsonl of rephrasings keyed by example id.")
flags.DEFINE_string("rephrase_model", None, "Local model prompted to rephrase questions.")
flags.DEFINE_string("rephrase_prompt", curation.REPHRASE_PROMPT,
                    "Rephrasing prompt, with a {question} field.")
flags.DEFINE_string("preset", "curation_default", "TrainConfig preset (TrainConfig flags "
                    "override it).")
# Sampling as evaluate.py's flags (same names and defaults; --sample_seed is its --seed).
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
  cli.check_output_dir(FLAGS.output_dir)
  bad = [m for m in FLAGS.methods if m not in curation.METHODS]
  if bad or not FLAGS.methods:
    raise UsageError(f"--methods: unknown method(s) {bad}; choose from {list(curation.METHODS)}")
  for name in ("n_train", "n_test", "n_ifd", "additions_per_iteration"):
    if getattr(FLAGS, name) < 0:
      raise UsageError(f"--{name}: must be >= 0")
  if not FLAGS.seeds or len(set(FLAGS.seeds)) < len(FLAGS.seeds) or not all(
      x.lstrip("-").isdigit() for x in FLAGS.seeds):
    raise UsageError(f"--seeds: needs distinct integers, got {FLAGS.seeds}")
  if "{question}" not in FLAGS.rephrase_prompt:
    raise UsageError("--rephrase_prompt: needs a {question} field")


def sampling(task_name: str):
  """(EvalSettings of the sampling flags, --task's default sampling with them applied)."""
  try:
    settings = EvalSettings(**cli.dataclass_kwargs_from_flags(EvalSettings, _SAMPLING_FLAGS))
    return settings, run_evaluation.sampling_params(task_name, settings)
  except EvalSettingsError as e:
    raise cli.usage_error(e, _SAMPLING_FLAGS) from e


def curation_config(method: str) -> curation.CurationConfig:
  try:
    return curation.CurationConfig(
        method=method, iterations=FLAGS.iterations, premem_cutoff=FLAGS.premem_cutoff,
        additions_per_iteration=FLAGS.additions_per_iteration,
        keep_fraction=FLAGS.keep_fraction,
        memorization_perplexity=FLAGS.memorization_perplexity, ifd_epochs=FLAGS.ifd_epochs)
  except curation.CurationConfigError as e:
    raise cli.usage_error(e) from e


def generator_kind(task_name: str) -> str:
  """--generator, "auto" resolved for the task."""
  if FLAGS.generator != "auto":
    return FLAGS.generator
  from memdyn_jax.tasks import task_class
  if task_class(task_name).procedural:
    return "fresh"
  if FLAGS.rephrasings or FLAGS.rephrase_model:
    return "jsonl" if FLAGS.rephrasings else "model"
  raise UsageError(f"--rephrasings or --rephrase_model is required for task {task_name!r} "
                   "(nothing here may use the network)")


def run() -> int:
  from memdyn_jax.train import task_run
  check_flags()
  spec = cli.task_spec_from_flags(_TASK_FLAGS, FLAGS.model)
  configs = [curation_config(m) for m in dict.fromkeys(FLAGS.methods)]
  try:
    task_run.check_task_name(spec.name)  # fail fast, before loading a model
    settings, params = sampling(spec.name)
    kind = generator_kind(spec.name)
    model_dir = cli.resolve_model(FLAGS.model)
    setup = curation.load_setup(
        spec, model_dir, sampling=params, methods=FLAGS.methods, n_train=FLAGS.n_train,
        n_test=FLAGS.n_test, n_ifd=FLAGS.n_ifd, eval_batch_size=settings.batch_size,
        train_config=cli.train_config_from_flags(FLAGS.preset))
    generator = curation.make_generator(
        kind, setup.task, rephrasings=FLAGS.rephrasings, rephrase_model=FLAGS.rephrase_model,
        prompt_format=FLAGS.rephrase_prompt, batch_size=FLAGS.batch_size)
  except (task_run.TaskRunError, curation.CurationInputError) as e:
    raise cli.usage_error(e) from e
  try:
    _, report = curation.run_seeds(setup, configs, generator, FLAGS.output_dir,
                                   [int(x) for x in FLAGS.seeds], progress=FLAGS.progress,
                                   log=lambda m: print(f"{PROG}: {m}", flush=True))
  except curation.CurationError as e:
    raise UsageError(str(e)) from e
  print(f"{PROG}: report written to {report}")
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
