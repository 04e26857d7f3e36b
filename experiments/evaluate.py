"""Evaluates every checkpoint of a training run on train/test/OOD/perturbed prompts.

  python experiments/evaluate.py --run_dir=runs/llama_gsm8k_lr2e-5 \
      --splits=train,test,perturbed --num_train=256

Per checkpoint and split, for every example: n samples graded by the task (accuracy,
unparseable count), the target trace's perplexity / exact memorization / teacher-forced
entropy, a greedy completion and its likelihood (ATC), the entropy of the sampled tokens'
distributions (Ge et al. Table 1) and the diversity of the n samples. Records go to
`<run_dir>/<eval_name>/step_<step>/<split>[@<perturbation>].jsonl`, each written
atomically; a re-run skips what is done. Sampling defaults are Kang et al.'s per task
(GSM8K: T=0.8, top-p 0.95, 512 new tokens, n=5; MATH: T=0.8, top-p 1, 1024 new tokens);
every knob is a flag.

Per checkpoint also the gradient variance (Kang et al. App. B.1: --grad_variance_minibatches
minibatches of --grad_variance_batch_size examples drawn from the train subset, one
compiled program reused across checkpoints), into `step_<step>/checkpoint.json`.
--mesh_data/--mesh_fsdp/--mesh_tensor place the model and batches as in training.

Splits: "train" (a seeded subset of the examples the run was trained on, --num_train),
"test", "ood" (tasks that have one), "perturbed" (the train subset with each
--perturbations preamble after the answer cue; no greedy pass, no target scoring).
Exit status: 0 done, 2 bad flags or inputs (one-line error naming the flag or path).
"""
from __future__ import annotations

import dataclasses
import json
import os

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError

PROG = "evaluate.py"
SPLITS = ("train", "test", "ood", "perturbed")

flags.DEFINE_string("run_dir", None, "Training run directory (holds run.json, checkpoints/).")
flags.DEFINE_list("steps", [], "Checkpoint steps to evaluate (default: all).")
flags.DEFINE_list("splits", ["train", "test"], f"Splits, any of {list(SPLITS)}.")
flags.DEFINE_string("task", None, "Task name (default: from the run's examples.json).")
flags.DEFINE_string("task_kwargs", "{}", "JSON keyword arguments for the task constructor "
                    "(must match training).")
flags.DEFINE_string("task_path", None, "Data file or directory for the task.")
flags.DEFINE_string("tokenizer", None, "Tokenizer directory (default: the run's base model).")
flags.DEFINE_integer("num_train", 256, "Train examples evaluated (seeded subset; 0 = all).")
flags.DEFINE_integer("max_eval", 0, "Cap on test/OOD examples (first N; 0 = all).")
flags.DEFINE_integer("subset_seed", 0, "Seed of the train subset.")
flags.DEFINE_list("perturbations", ["First", "We know that"],
                  "Answer preambles of the 'perturbed' split (Kang et al. Fig. 6).")
flags.DEFINE_float("temperature", None, "Sampling temperature (default: the task's).")
flags.DEFINE_float("top_p", None, "Nucleus mass (default: the task's).")
flags.DEFINE_integer("max_new_tokens", None, "Generation budget (default: the task's).")
flags.DEFINE_integer("n_samples", None, "Samples per prompt (default: the task's).")
flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.DEFINE_integer("batch_size", 16, "Prompts per compiled program.")
flags.DEFINE_bool("greedy", True, "Greedy completion + likelihood (ATC) on train/test/ood.")
flags.DEFINE_bool("keep_texts", False, "Store sample texts in the records.")
flags.DEFINE_bool("include_base", False, "Also evaluate the base model as step 0.")
flags.DEFINE_string("eval_name", "eval", "Records folder under --run_dir.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_bool("grad_variance", True, "Gradient variance per checkpoint over train "
                  "minibatches (Kang et al. App. B.1).")
flags.DEFINE_integer("grad_variance_minibatches", 5, "Minibatches of the gradient variance.")
flags.DEFINE_integer("grad_variance_batch_size", 8, "Train examples per gradient-variance "
                     "minibatch (drawn from the --num_train subset with --subset_seed).")
flags.DEFINE_integer("mesh_data", -1, "Mesh 'data' axis size (-1 = remaining devices).")
flags.DEFINE_integer("mesh_fsdp", 1, "Mesh 'fsdp' axis size.")
flags.DEFINE_integer("mesh_tensor", 1, "Mesh 'tensor' axis size.")
FLAGS = flags.FLAGS




def _ints(name: str, values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--{name}: not integers: {values}") from None


def check_flags() -> None:
  """Checks what needs no I/O beyond the run directory."""
  if not FLAGS.run_dir:
    raise UsageError("--run_dir is required")
  if not os.path.isdir(FLAGS.run_dir):
    raise UsageError(f"--run_dir: {FLAGS.run_dir}: no such directory")
  if not os.path.exists(os.path.join(FLAGS.run_dir, "run.json")):
    raise UsageError(f"--run_dir: {FLAGS.run_dir} is not a training run directory (no run.json)")
  bad = [s for s in FLAGS.splits if s not in SPLITS]
  if bad or not FLAGS.splits:
    raise UsageError(f"--splits: unknown split(s) {bad}; choose from {list(SPLITS)}")
  for name in ("num_train", "max_eval"):
    if getattr(FLAGS, name) < 0:
      raise UsageError(f"--{name}: must be >= 0")
  if FLAGS.batch_size < 1:
    raise UsageError("--batch_size: must be >= 1")
  if "perturbed" in FLAGS.splits and not [p for p in FLAGS.perturbations if p.strip()]:
    raise UsageError("--perturbations: the 'perturbed' split needs at least one preamble")
  if not FLAGS.eval_name or os.sep in FLAGS.eval_name:
    raise UsageError(f"--eval_name: must be a plain folder name, got {FLAGS.eval_name!r}")
  if FLAGS.grad_variance:
    if FLAGS.grad_variance_minibatches < 2:
      raise UsageError("--grad_variance_minibatches: must be >= 2")
    if FLAGS.grad_variance_batch_size < 1:
      raise UsageError("--grad_variance_batch_size: must be >= 1")


def make_mesh():
  """The --mesh_* mesh; --batch_size must split over its data shards."""
  from memdyn_jax import scoring, sharding
  try:
    mesh = sharding.make_mesh(FLAGS.mesh_data, FLAGS.mesh_fsdp, FLAGS.mesh_tensor)
  except ValueError as e:
    raise UsageError(f"--mesh_data/--mesh_fsdp/--mesh_tensor: {e}") from None
  shards = scoring.data_shards(mesh)
  if FLAGS.batch_size % shards:
    raise UsageError(f"--batch_size: {FLAGS.batch_size} is not a multiple of the mesh's "
                     f"{shards} data shards (--mesh_data x --mesh_fsdp)")
  return mesh


def sampling_params(task_name: str):
  from memdyn_jax import evaluation
  try:
    return evaluation.default_sampling(
        task_name, temperature=FLAGS.temperature, top_p=FLAGS.top_p,
        max_new_tokens=FLAGS.max_new_tokens, n=FLAGS.n_samples, seed=FLAGS.seed)
  except ValueError as e:
    flag = {"n": "n_samples"}.get(str(e).split()[0], str(e).split()[0])
    raise UsageError(f"--{flag}: {e}") from None


def load_task(run_dir: str):
  from memdyn_jax import tasks
  listing = {}
  path = os.path.join(run_dir, "examples.json")
  if os.path.exists(path):
    with open(path) as f:
      listing = json.load(f)
  name = FLAGS.task or listing.get("task")
  if not name:
    raise UsageError(f"--task is required ({run_dir} has no examples.json naming it)")
  try:
    kwargs = json.loads(FLAGS.task_kwargs)
  except json.JSONDecodeError as e:
    raise UsageError(f"--task_kwargs: not JSON ({e})") from None
  try:
    return tasks.get_task(name, **kwargs)
  except (ValueError, TypeError) as e:
    raise UsageError(f"--task/--task_kwargs: {e}") from None


def build_units(run_dir: str, task):
  """The EvalUnits of --splits, and the train subset (None when not needed)."""
  from memdyn_jax import evaluation
  units = []
  train = None
  if {"train", "perturbed"} & set(FLAGS.splits) or FLAGS.grad_variance:
    try:
      train = evaluation.trained_examples(run_dir, task, path=FLAGS.task_path)
    except (ValueError, FileNotFoundError) as e:
      raise UsageError(f"--task_kwargs/--task_path: {e}") from None
    train = tuple(evaluation.subset(train, FLAGS.num_train, FLAGS.subset_seed))
  for split in FLAGS.splits:
    if split == "train":
      units.append(evaluation.EvalUnit("train", train, greedy=FLAGS.greedy))
    elif split == "perturbed":
      units += [evaluation.EvalUnit("perturbed", train, perturbation=p.strip(), greedy=False,
                                    score_targets=False)
                for p in FLAGS.perturbations if p.strip()]
    else:
      try:
        examples = task.load(split, FLAGS.task_path)
      except (ValueError, FileNotFoundError) as e:
        raise UsageError(f"--splits: task {task.name!r} cannot load split {split!r}: "
                         f"{str(e).splitlines()[0]}") from None
      if FLAGS.max_eval:
        examples = examples[:FLAGS.max_eval]
      units.append(evaluation.EvalUnit(split, tuple(examples), greedy=FLAGS.greedy))
  return units, train


def grad_variance_config():
  """The --grad_variance_* settings, or None when off."""
  if not FLAGS.grad_variance:
    return None
  from memdyn_jax.gradient_variance import GradientVarianceConfig
  return GradientVarianceConfig(num_minibatches=FLAGS.grad_variance_minibatches,
                                batch_size=FLAGS.grad_variance_batch_size,
                                seed=FLAGS.subset_seed)


def eval_config(task, params) -> dict:
  """What the records depend on; a re-run with another value is refused."""
  return {"task": task.name, "task_kwargs": json.loads(FLAGS.task_kwargs),
          "task_path": FLAGS.task_path, "sampling": dataclasses.asdict(params),
          "num_train": FLAGS.num_train, "max_eval": FLAGS.max_eval,
          "subset_seed": FLAGS.subset_seed, "greedy": FLAGS.greedy}


def run() -> int:
  check_flags()
  run_dir = os.path.abspath(FLAGS.run_dir)
  steps = _ints("steps", FLAGS.steps) or None
  from memdyn_jax import checkpoints, evaluation, models, records
  available = checkpoints.list_steps(run_dir)
  if not available:
    raise UsageError(f"--run_dir: {run_dir} has no complete checkpoint")
  if steps:
    bad = [s for s in steps if s not in available and not (s == 0 and FLAGS.include_base)]
    if bad:
      raise UsageError(f"--steps: no checkpoint at step(s) {bad}; steps: {available}")
  task = load_task(run_dir)
  params = sampling_params(task.name)
  units, train = build_units(run_dir, task)
  gv_config = grad_variance_config()
  if gv_config is not None:
    need = gv_config.num_minibatches * gv_config.batch_size
    if len(train) < need:
      raise UsageError(f"--grad_variance_batch_size: {gv_config.num_minibatches} minibatches of "
                       f"{gv_config.batch_size} need {need} train examples, the --num_train "
                       f"subset has {len(train)} (or --nograd_variance)")
  mesh = make_mesh()
  info = checkpoints.read_run_info(run_dir)
  tok_path = FLAGS.tokenizer or info["model"]["path"]
  try:
    tokenizer = models.load_tokenizer(tok_path, padding_side="right")
  except Exception as e:  # missing dir, no tokenizer files: one line
    raise UsageError(f"--tokenizer: cannot load a tokenizer from {tok_path}: "
                     f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
  try:
    records.check_config(run_dir, eval_config(task, params), name=FLAGS.eval_name)
  except records.EvalConfigMismatchError as e:
    raise UsageError(f"--eval_name: {e}") from None
  try:
    timings = evaluation.evaluate_run(
        run_dir, task, tokenizer, units, params, steps=steps, include_base=FLAGS.include_base,
        batch_size=FLAGS.batch_size, mesh=mesh, keep_texts=FLAGS.keep_texts,
        progress=FLAGS.progress, name=FLAGS.eval_name,
        log=lambda m: print(f"{PROG}: {m}", flush=True), grad_variance=gv_config,
        grad_variance_examples=train)
  except ValueError as e:
    message = str(e).splitlines()[0]
    flag = "max_new_tokens" if "max_new_tokens" in message else "run_dir"
    raise UsageError(f"--{flag}: {message}") from None
  total = len(timings)
  print(f"{PROG}: {run_dir}: evaluated {total} checkpoint(s)"
        + ("" if total else " (all records already present)"))
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
