r"""Evaluates every checkpoint of a training run on train/test/OOD/perturbed prompts.

  python experiments/evaluate.py --run_dir=runs/llama_gsm8k_lr2e-5 \
      --splits=train,test,perturbed --num_train=256

Per checkpoint and split, for every example: n samples graded by the task (accuracy,
unparseable count), the target trace's perplexity / exact memorization / teacher-forced
entropy, a greedy completion and its likelihood (ATC), the entropy of the sampled tokens'
distributions (Ge et al. Table 1) and the diversity of the n samples. Records go to
`<run_dir>/<eval_name>/step_<step>/<split>[@<perturbation>].jsonl`, each written
atomically; a re-run skips what is done. Sampling defaults are Kang et al.'s per task
(GSM8K: T=0.8, top-p 0.95, 512 new tokens, n=5; MATH: T=0.8, top-p 1, 1024 new tokens),
stopping at the task's stop string ("\nDone."); every knob is a flag (--temperature,
--top_p, --top_k, --min_p, --repetition_penalty, --max_new_tokens, --n_samples, --stop,
--seed), and <eval_name>/config.json records the values used.

Per checkpoint also the gradient variance (Kang et al. App. B.1: --grad_variance_minibatches
minibatches of --grad_variance_batch_size examples drawn from the train subset, one
compiled program reused across checkpoints), into `step_<step>/checkpoint.json`. The
default 5 minibatches of 8 shrink to fit a smaller train subset (--num_train=4: 4 of 1),
said in one line. A re-run says how many (checkpoint, unit) pairs were already done; the
progress bar also shows the unit in progress (phase, prompts done, tokens/s).
--mesh_data/--mesh_fsdp/--mesh_tensor place the model and batches as in training.

Prompts are rendered as the run was trained (its chat template, few-shot examples) unless
--chat_template/--nochat_template, --num_fewshot, --fewshot_seed or --system_prompt say
otherwise; another prompt format needs its own --eval_name.

Splits: "train" (a seeded subset of the examples the run was trained on, --num_train),
"test", "ood" (tasks that have one), "perturbed" (the train subset with each
--perturbations preamble after the answer cue; no greedy pass, no target scoring).
Exit status: 0 done, 2 bad flags or inputs (one-line error naming the flag or path), 143 / 130
stopped by SIGTERM / SIGINT (Ctrl-C): after the records in progress once evaluating, at once
before (nothing to save), one line either way; a re-run continues. A signal once every
record is written changes nothing (exit 0).
"""
from __future__ import annotations

import os

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError

PROG = "evaluate.py"

flags.DEFINE_string("run_dir", None, "Training run directory (holds run.json, checkpoints/).")
flags.DEFINE_list("steps", [], "Checkpoint steps to evaluate (default: all).")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
# Every evaluation setting is a field of run_evaluation.EvalSettings, also read by the
# sweep and merge.py --evaluate under the same names.
_EVAL_FLAGS = cli.define_dataclass_flags(EvalSettings, help_format="{doc}")
cli.define_mesh_flags()
FLAGS = flags.FLAGS


def _ints(name: str, values) -> list[int]:
  try:
    return [int(v) for v in values]
  except ValueError:
    raise UsageError(f"--{name}: not integers: {values}") from None


def check_run_dir() -> str:
  """The absolute --run_dir, which must hold a run.json."""
  if not FLAGS.run_dir:
    raise UsageError("--run_dir is required")
  if not os.path.isdir(FLAGS.run_dir):
    raise UsageError(f"--run_dir: {FLAGS.run_dir}: no such directory")
  if not os.path.exists(os.path.join(FLAGS.run_dir, "run.json")):
    raise UsageError(f"--run_dir: {FLAGS.run_dir} is not a training run directory (no run.json)")
  return os.path.abspath(FLAGS.run_dir)


def run() -> int:
  run_dir = check_run_dir()
  try:
    settings = EvalSettings(**cli.dataclass_kwargs_from_flags(EvalSettings, _EVAL_FLAGS))
  except EvalSettingsError as e:
    raise cli.usage_error(e, _EVAL_FLAGS) from None
  steps = _ints("steps", FLAGS.steps) or None
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.signals import StopSignals, signal_name
  mesh = cli.mesh_from_flags()
  # Held to the last line: a signal once everything is written changes nothing.
  with StopSignals("will stop once the records in progress are written") as stop:
    try:
      timings = run_evaluation.evaluate(
          run_dir, settings, steps=steps, mesh=mesh, progress=FLAGS.progress,
          log=lambda m: print(f"{PROG}: {m}", flush=True), should_stop=lambda: stop.fired)
    except EvalSettingsError as e:
      raise cli.usage_error(e, _EVAL_FLAGS) from None
    if stop.fired and run_evaluation.pending_steps(run_dir, settings, steps):
      print(f"{PROG}: {run_dir}: stopped by {signal_name(stop.signum)} after writing the "
            "records in progress; re-run the same command to continue")
      return cli.exit_status(stop.signum)
    print(f"{PROG}: {run_dir}: evaluated {len(timings)} checkpoint(s)"
          + ("" if timings else " (all records already present)"))
    return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run, stopped_at_once="before evaluating: nothing to save; re-run the "
                 "same command")
