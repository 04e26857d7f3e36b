"""Fine-tunes a causal LM on a reasoning task, checkpointing the trajectory.

  python experiments/train.py --model=/path/to/hf_model --task=gsm8k \
      --output_dir=runs/llama_gsm8k_lr2e-5 --preset=kang_llama3_gsm8k --learning_rate=2e-5

Every `TrainConfig` field is a flag (default: the preset's value). Mesh flags place the
run on the devices (`--mesh_data=-1` = data parallel over everything). On a pod the same
command runs on every host (`jax.distributed` is initialised from the environment).
A run directory that already holds this run is resumed (`--noresume` refuses instead).
Exit status: 0 done, 2 bad flags/inputs, 143 stopped by SIGTERM after checkpointing.
"""
from __future__ import annotations

import json
import os

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError

from memdyn_jax.train import config as config_lib

PROG = "train.py"
SIGTERM_EXIT = 143

flags.DEFINE_string("model", None, "Base model: local HF directory, hub id, or 'embedded'.")
flags.DEFINE_string("task", None, "Task name (memdyn_jax.tasks.get_task).")
flags.DEFINE_string("task_path", None, "Data file or directory for the task (default: its own).")
flags.DEFINE_string("task_kwargs", "{}", "JSON keyword arguments for the task constructor.")
flags.DEFINE_string("split", "train", "Split to train on.")
flags.DEFINE_integer("max_examples", 0, "Use only the first N examples (0 = all).")
flags.DEFINE_string("output_dir", None, "Run directory.")
flags.DEFINE_string("preset", "none", f"Preset: none or one of {sorted(config_lib.PRESETS)}.")
flags.DEFINE_bool("resume", True, "Resume from the latest complete checkpoint.")
flags.DEFINE_bool("progress", True, "Show a progress bar.")
flags.DEFINE_integer("mesh_data", -1, "Mesh 'data' axis size (-1 = remaining devices).")
flags.DEFINE_integer("mesh_fsdp", 1, "Mesh 'fsdp' axis size.")
flags.DEFINE_integer("mesh_tensor", 1, "Mesh 'tensor' axis size.")

_DEFINERS = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
             bool: flags.DEFINE_boolean, tuple: flags.DEFINE_list}
for _name, _type in config_lib.field_types().items():
  _DEFINERS[_type](_name, None, f"TrainConfig.{_name} (default: the preset's).")

FLAGS = flags.FLAGS




def config_from_flags() -> config_lib.TrainConfig:
  overrides = {name: getattr(FLAGS, name) for name in config_lib.field_types()
               if getattr(FLAGS, name) is not None}
  try:
    return config_lib.get_preset(FLAGS.preset, **overrides)
  except config_lib.ConfigError as e:
    raise UsageError(f"--{e.field}: {str(e).split(': ', 1)[1]}") from None


def resolve_model(model: str) -> str:
  """A local HF directory for --model."""
  if model == "embedded":
    from memdyn_jax import embedded  # built and cached on first use
    return embedded.model_dir()
  from memdyn_jax.models import hf_io
  try:
    return hf_io.resolve_checkpoint_dir(model)
  except Exception as e:  # missing dir, hub error: one line
    raise UsageError(f"--model: {e}") from None


def load_data(model_dir: str, cfg: config_lib.TrainConfig):
  """Task examples tokenized under the trainer/scorer convention -> (TrainData, example ids)."""
  from memdyn_jax import models, tasks
  from memdyn_jax.train.loop import task_train_data
  try:
    kwargs = json.loads(FLAGS.task_kwargs)
  except json.JSONDecodeError as e:
    raise UsageError(f"--task_kwargs: not JSON ({e})") from None
  try:
    task = tasks.get_task(FLAGS.task, **kwargs)
    examples = task.load(FLAGS.split, FLAGS.task_path)
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise UsageError(f"--task: {e}") from None
  if FLAGS.max_examples:
    examples = examples[:FLAGS.max_examples]
  tokenizer = models.load_tokenizer(model_dir, padding_side="right")
  try:
    return task_train_data(tokenizer, task, examples, cfg)
  except ValueError as e:
    raise UsageError(f"--max_length: {e}") from None


def run() -> int:
  for name in ("model", "task", "output_dir"):
    if not getattr(FLAGS, name):
      raise UsageError(f"--{name} is required")
  cfg = config_from_flags()
  import jax

  from memdyn_jax import sharding
  from memdyn_jax.train import loop

  sharding.initialize_distributed()
  from memdyn_jax import tasks
  if FLAGS.task not in tasks.task_names():  # fail fast, before building or loading a model
    raise UsageError(f"--task: unknown task {FLAGS.task!r}; known: {tasks.task_names()}")
  model_dir = resolve_model(FLAGS.model)
  data, ids = load_data(model_dir, cfg)
  try:
    mesh = sharding.make_mesh(FLAGS.mesh_data, FLAGS.mesh_fsdp, FLAGS.mesh_tensor)
  except ValueError as e:
    raise UsageError(f"--mesh_data/--mesh_fsdp/--mesh_tensor: {e}") from None
  if jax.process_index() == 0:
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    # Row i of the training arrays (= sampler index i) is example ids[i].
    with open(os.path.join(FLAGS.output_dir, "examples.json"), "w") as f:
      json.dump({"task": FLAGS.task, "task_kwargs": json.loads(FLAGS.task_kwargs),
                 "split": FLAGS.split, "ids": ids}, f)
  try:
    result = loop.train(cfg, data, FLAGS.model if FLAGS.model != "embedded" else model_dir,
                        FLAGS.output_dir, mesh=mesh, resume=FLAGS.resume,
                        progress=FLAGS.progress)
  except (loop.RunExistsError, ValueError) as e:
    if isinstance(e, loop.NonFiniteError):
      raise
    raise UsageError(str(e).splitlines()[0]) from None
  if jax.process_index() == 0:
    print(f"{PROG}: run {result.run_dir}: step {result.step}/{result.total_steps}"
          + (" (stopped by SIGTERM after a checkpoint)" if result.preempted else ""))
  return SIGTERM_EXIT if result.preempted else 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
