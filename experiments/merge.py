r"""Merges checkpoints of one trajectory or of several runs into a run directory, optionally
evaluated like any trained checkpoint (Ruan et al.: merging against over-memorization).

  # uniform soup of epochs 3-6 of a run, then the usual evaluation
  python experiments/merge.py --checkpoints=runs/lr2e-05_ep6_frac1:epochs=3-6 \
      --method=linear --output_dir=runs/soup_lr2e-05_ep3-6 --evaluate --num_train=256

  # TIES of two runs' last checkpoints relative to their base model
  python experiments/merge.py --checkpoints=runs/a:last,runs/b:last --method=ties \
      --density=0.5 --lambda=1.0 --output_dir=runs/ties_ab

--checkpoints: RUN_DIR:STEP, RUN_DIR:A-B (steps in [A, B]), RUN_DIR:all, RUN_DIR:last or
RUN_DIR:epochs=A-B, comma-separated. --base (task_arithmetic, ties, dare_*; optional t=0
end of slerp): an HF directory or RUN_DIR:STEP; default the first run's base model.
--method: linear (without --weights: the uniform soup), greedy_soup (add a checkpoint only
if accuracy on --validation_split improves), slerp (--t), task_arithmetic (--lambda,
--weights), ties and dare_ties (--density, --lambda, --weights), dare_linear; see
memdyn_jax/merging/methods.py for the formulas. Merging reads one tensor of each checkpoint
at a time; slerp, ties and dare_* merge the decoder's stacked blocks one layer at a time, as
mergekit does (README, "Sweeps and merging": where the results differ from mergekit's).

The output (`memdyn_jax.merging.run.merge_for_evaluation`) is laid out like a training
run: run.json with a "merge" field, an orbax checkpoint that
memdyn_jax.train.checkpoints.restore and experiments/evaluate.py read, and an HF export in
hf/ (with --tokenizer's files, default the base model's). A re-run with the same flags
skips the merge. --evaluate evaluates it with experiments/evaluate.py's flags and defaults
(--eval_seed is evaluate.py's --seed). Exit
status: 0 done, 2 bad flags or inputs.
"""
from __future__ import annotations

import json

from absl import flags

from memdyn_jax import cli, merging
from memdyn_jax.cli import UsageError
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
from memdyn_jax.merging import MergeConfig, MergeConfigError
from memdyn_jax.merging import run as merged_run

PROG = "merge.py"

flags.DEFINE_list("checkpoints", [], "Checkpoints to merge: RUN_DIR:STEP|A-B|all|last|"
                  "epochs=A-B, comma-separated.")
flags.DEFINE_string("base", None, "Base model: HF directory or RUN_DIR:STEP (default: the "
                    "first run's base model, for the methods that need one).")
flags.DEFINE_enum("method", "linear", list(merged_run.METHODS), "Merge method.")
flags.DEFINE_list("weights", None, "One weight per checkpoint (default: all 1; not slerp).")
flags.DEFINE_string("t", None, "slerp: t in [0, 1], or a JSON object {tensor regex: t} "
                    f"('' matches every tensor) (default: {merging.DEFAULT_T}).")
flags.DEFINE_float("lambda", None, "Task-vector scale of task_arithmetic/ties/dare_* "
                   f"(default: {merging.DEFAULT_LAMBDA}).")
flags.DEFINE_float("density", None, "Fraction of each task vector kept (ties, dare_*; "
                   "required by them).")
flags.DEFINE_integer("seed", 0, "DARE mask seed.")
flags.DEFINE_enum("normalize", "auto", ["auto", "true", "false"],
                  "Divide by the weight sum (auto: the method's default, true for linear, "
                  "ties and dare_ties, false for task_arithmetic and dare_linear).")
flags.DEFINE_string("output_dir", None, "Merged run directory to write.")
flags.DEFINE_string("validation_split", None, "greedy_soup: split scoring the soups.")
flags.DEFINE_integer("validation_examples", 0, "greedy_soup: first N examples of the "
                     "validation split (0 = all).")
flags.DEFINE_bool("evaluate", False, "Evaluate the merged checkpoint (evaluate.py's flags).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
_EVAL_FLAGS = cli.define_dataclass_flags(
    EvalSettings, rename={"seed": "eval_seed"}, help_format="evaluate.py's flag: {doc}")
cli.define_mesh_flags()
FLAGS = flags.FLAGS

_CONFIG_FLAGS = {"method": "method", "weights": "weights", "t": "t", "lambda_": "lambda",
                 "density": "density", "seed": "seed", "normalize": "normalize"}


def _t_value():
  text = FLAGS.t
  if text is None:
    return None
  try:
    value = json.loads(text)
  except json.JSONDecodeError as e:
    raise UsageError(f"--t: expected a number or a JSON object, got {text!r}") from e
  return value if not isinstance(value, dict) else tuple(value.items())


def merge_config() -> MergeConfig | None:
  """The MergeConfig of the flags (None for greedy_soup)."""
  if FLAGS.method == merged_run.GREEDY_SOUP:
    given = [f"--{n}" for n in ("weights", "t", "lambda", "density") if FLAGS[n].value is not None]
    if given:
      raise UsageError(f"{given[0]}: greedy_soup takes none of --weights/--t/--lambda/--density")
    return None
  try:
    weights = None if FLAGS.weights is None else tuple(float(w) for w in FLAGS.weights)
  except ValueError as e:
    raise UsageError(f"--weights: not numbers: {FLAGS.weights}") from e
  try:
    return MergeConfig(FLAGS.method, weights=weights, t=_t_value(), lambda_=FLAGS["lambda"].value,
                       density=FLAGS.density, seed=FLAGS.seed,
                       normalize={"auto": None, "true": True, "false": False}[FLAGS.normalize])
  except MergeConfigError as e:
    raise cli.usage_error(e, _CONFIG_FLAGS) from e


def _flag_error(e) -> UsageError:
  return cli.usage_error(e, {**_EVAL_FLAGS, **_CONFIG_FLAGS, "run_dir": "output_dir"})


def run() -> int:
  if not FLAGS.checkpoints:
    raise UsageError("--checkpoints is required")
  if not FLAGS.output_dir:
    raise UsageError("--output_dir is required")
  cli.check_output_dir(FLAGS.output_dir)
  if FLAGS.method == merged_run.GREEDY_SOUP and not FLAGS.validation_split:
    raise UsageError("--validation_split is required by --method=greedy_soup")
  if FLAGS.validation_examples < 0:
    raise UsageError("--validation_examples: must be >= 0")
  config = merge_config()
  try:
    sources = merged_run.parse_checkpoints(FLAGS.checkpoints)
    base = merged_run.parse_base(FLAGS.base) if FLAGS.base else None
    settings = merged_run.evaluation_settings(sources[0].run_dir, EvalSettings(
        **cli.dataclass_kwargs_from_flags(EvalSettings, _EVAL_FLAGS)))
  except (merged_run.MergeInputError, EvalSettingsError) as e:
    raise _flag_error(e) from e

  from memdyn_jax.evaluation import run as run_evaluation
  mesh = cli.mesh_from_flags()
  log = lambda m: print(f"{PROG}: {m}", flush=True)
  try:
    outcome = merged_run.merge_for_evaluation(
        FLAGS.output_dir, FLAGS.method, sources, settings, config=config, base=base,
        validation_split=FLAGS.validation_split,
        validation_examples=FLAGS.validation_examples, mesh=mesh, log=log)
    if outcome.skipped:
      log(f"{FLAGS.output_dir} already holds this merge")
    if FLAGS.evaluate:
      timings = run_evaluation.evaluate(FLAGS.output_dir, settings, mesh=mesh,
                                        progress=FLAGS.progress, log=log)
      log(f"evaluated {len(timings)} checkpoint(s)"
          + ("" if timings else " (all records already present)"))
  except (merged_run.MergeInputError, MergeConfigError, EvalSettingsError) as e:
    raise _flag_error(e) from e
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
