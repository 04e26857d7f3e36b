r"""Fine-tunes a causal LM on a reasoning task, checkpointing the trajectory.

  python experiments/train.py --model=/path/to/hf_model --task=gsm8k \
      --output_dir=runs/llama_gsm8k_lr2e-5 --preset=kang_llama3_gsm8k --learning_rate=2e-5

Every `TrainConfig` field is a flag (default: the preset's value). Mesh flags place the
run on the devices (`--mesh_data=-1` = data parallel over everything). On a pod the same
command runs on every host (`jax.distributed` is initialised from the environment).
A run directory that already holds this run is resumed (`--noresume` refuses instead).
`--chat_template` renders prompts with the model tokenizer's chat template and
`--num_fewshot=K` prepends K train examples (task arguments, recorded in examples.json).
Exit status: 0 done, 2 bad flags/inputs, 143 / 130 stopped by SIGTERM / SIGINT (Ctrl-C):
after checkpointing the current step once training, at once before (from start-up, while
loading and restoring: nothing to save), one line either way; a re-run continues.
"""
from __future__ import annotations

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError

from memdyn_jax.train import config as config_lib
from memdyn_jax.train import task_run

PROG = "train.py"

flags.DEFINE_string("model", None, "Base model: local HF directory, hub id, or 'embedded'.")
_TASK_FLAGS = cli.define_task_flags()
flags.DEFINE_string("output_dir", None, "Run directory.")
flags.DEFINE_string("preset", "none", f"Preset: none or one of {sorted(config_lib.PRESETS)}.")
flags.DEFINE_bool("resume", True, "Resume from the latest complete checkpoint.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
cli.define_mesh_flags()
cli.define_train_config_flags()

FLAGS = flags.FLAGS


def run() -> int:
  for name in ("model", "task", "output_dir"):
    if not getattr(FLAGS, name):
      raise UsageError(f"--{name} is required")
  cli.check_output_dir(FLAGS.output_dir)
  cfg = cli.train_config_from_flags(FLAGS.preset)
  spec = cli.task_spec_from_flags(_TASK_FLAGS, FLAGS.model)
  import jax

  from memdyn_jax import sharding
  from memdyn_jax.errors import ContextLengthError
  from memdyn_jax.tasks import DataError
  from memdyn_jax.train import checkpoints, loop

  sharding.initialize_distributed()
  mesh = cli.mesh_from_flags()
  try:
    result = task_run.train_on_task(cfg, spec, FLAGS.model, FLAGS.output_dir, mesh=mesh,
                                    resume=FLAGS.resume, progress=FLAGS.progress,
                                    log_line=lambda m: print(f"{PROG}: {m}", flush=True))
  except task_run.TaskRunError as e:
    raise cli.usage_error(e) from None
  except checkpoints.RunDirError as e:  # a folder holding something else than a run
    raise UsageError(f"--output_dir: {e}") from e
  # The run directory refuses (another run, damaged, existing with --noresume) or the data
  # does not fit the settings; anything else is a bug and keeps its traceback.
  except (loop.RunExistsError, checkpoints.RunMismatchError,
          checkpoints.CheckpointReadError, DataError, ContextLengthError) as e:
    raise UsageError(str(e)) from e
  if jax.process_index() == 0:
    print(f"{PROG}: run {result.run_dir}: step {result.step}/{result.total_steps}"
          + (f" ({cli.stopped_note(result.stop_signal)})" if result.preempted else ""))
  return cli.exit_status(result.stop_signal)


if __name__ == "__main__":
  cli.run_binary(PROG, run, stopped_at_once="before training started: nothing to save; re-run "
                 "the same command")
