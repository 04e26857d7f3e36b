"""One fine-tuning run on a task, as experiments/train.py and the sweep run it.

The task's split is loaded (optionally cut to its first `max_examples`), tokenized under
the trainer/scorer convention, listed in `<run_dir>/examples.json` (row i of the training
arrays = example `ids[i]`, which the evaluation reads back) and trained with `loop.train`.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

from memdyn_jax import fileio
from memdyn_jax.errors import FieldError
from memdyn_jax.train.config import TrainConfig


class TaskRunError(FieldError):
  """A bad task or model setting; `field` names it (and the CLI flag)."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """The training data of a run.

  Attributes:
    name: task name (`memdyn_jax.tasks.get_task`).
    kwargs: the task's keyword arguments (`tasks.get_task`: its constructor's, and the
      prompt options chat_template, system_prompt, num_fewshot, fewshot_seed).
    path: data file or directory (default: the task's own).
    split: split trained on.
    max_examples: use only the first N examples (0 = all).
  """
  name: str
  kwargs: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  path: str | None = None
  split: str = "train"
  max_examples: int = 0

  def to_dict(self) -> dict[str, Any]:
    return {"name": self.name, "kwargs": dict(self.kwargs), "path": self.path,
            "split": self.split, "max_examples": self.max_examples}


def check_task_name(name: str) -> None:
  """Fails fast (before any model is built) on an unknown task name."""
  from memdyn_jax import tasks
  if name not in tasks.task_names():
    raise TaskRunError("task", f"unknown task {name!r}; known: {tasks.task_names()}")


def resolve_model(model: str) -> str:
  """A local HF directory for a model reference: a directory, hub id, `.gguf` file or
  'embedded' (the project's shipped base, its files checked), whose `config.json` describes
  an architecture `memdyn_jax.models` implements (checked here, before a caller writes
  anything: a run directory started for a model that cannot load would refuse the next,
  correct command as another run).

  Raises:
    TaskRunError: the reference resolves to nothing, or to a config.json of an unsupported
      `model_type` (field "model").
  """
  from memdyn_jax.models import embedded, hf_io
  try:
    if model == embedded.EMBEDDED_NAME:
      return embedded.shipped_dir()
    directory = hf_io.resolve_checkpoint_dir(model)
  # A missing directory or file, a hub error (huggingface_hub's are OSErrors or
  # ValueErrors), a damaged shipped base.
  except (OSError, ValueError, embedded.EmbeddedBaseError) as e:
    raise TaskRunError("model", str(e) or type(e).__name__) from e
  try:
    hf_io.load_config(directory)
  except (OSError, ValueError) as e:  # no or malformed config.json, an unsupported model_type
    raise TaskRunError("model", f"{model}: {e}") from e
  return directory


def load_examples(spec: TaskSpec, tokenizer=None):
  """(task, examples) of the spec; the task is ready to render prompts
  (`Task.prepare_prompts`: few-shot examples from the train split at the spec's path; a
  chat template once given the `tokenizer`).

  Raises:
    TaskRunError: the task does not build or its data does not load (field "task"), its
      few-shot examples do not ("num_fewshot"), or the tokenizer's chat template cannot
      render its prompts ("chat_template").
  """
  from memdyn_jax import tasks
  try:
    task = tasks.get_task(spec.name, **dict(spec.kwargs))
    examples = task.load(spec.split, spec.path)
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise TaskRunError("task", str(e)) from e
  try:
    task.prepare_prompts(tokenizer, spec.path)
  except tasks.ChatTemplateError as e:
    raise TaskRunError("chat_template", str(e)) from e
  except (ValueError, FileNotFoundError) as e:
    raise TaskRunError("num_fewshot", f"the train split does not load: {e}") from e
  return task, (examples[:spec.max_examples] if spec.max_examples else examples)


def load_train_data(model_dir: str, spec: TaskSpec, cfg: TrainConfig):
  """The spec's examples tokenized with the model's tokenizer -> (TrainData, example ids)."""
  from memdyn_jax import models
  from memdyn_jax.tasks import TargetBoundaryError
  from memdyn_jax.train.loop import task_train_data
  tokenizer = models.load_tokenizer(model_dir, padding_side="right")
  task, examples = load_examples(spec, tokenizer)
  try:
    return task_train_data(tokenizer, task, examples, cfg)
  except TargetBoundaryError as e:  # a chat template whose prompt ends inside a token
    raise TaskRunError("chat_template", str(e)) from e
  except ValueError as e:
    raise TaskRunError("max_length", str(e)) from e


def write_examples_listing(run_dir: str, spec: TaskSpec, ids) -> None:
  """`examples.json`: the data a run trains on (task, its arguments, the local data path
  if any, split) and which example each training row is; the evaluation reads its task
  settings from here unless told otherwise."""
  from memdyn_jax.train.checkpoints import EXAMPLES_FILE
  os.makedirs(run_dir, exist_ok=True)
  path = os.path.join(run_dir, EXAMPLES_FILE)
  fileio.atomic_write_json(path, {
      "task": spec.name, "task_kwargs": dict(spec.kwargs),
      "task_path": os.path.abspath(spec.path) if spec.path else None,
      "split": spec.split, "ids": list(ids)})


def train_on_task(cfg: TrainConfig, spec: TaskSpec, model: str, run_dir: str, *, mesh=None,
                  resume: bool = True, progress: bool = True, async_checkpoints: bool = True,
                  log_line=None):
  """Trains (or resumes) the run of `cfg` on the spec's data in `run_dir`.

  Args:
    cfg: the run configuration.
    spec: the training data.
    model: base model reference (see `resolve_model`); recorded in run.json as given,
      except 'embedded', recorded as its cached directory.
    run_dir: the run directory.
    mesh, resume, progress, async_checkpoints, log_line: see `loop.train`.

  Returns:
    `loop.TrainResult`.

  Raises:
    TaskRunError: bad task, model or max_length.
    checkpoints.RunMismatchError, loop.RunExistsError, loop.NonFiniteError: see `loop.train`.
  """
  import jax

  from memdyn_jax.train import checkpoints
  from memdyn_jax.models import hf_io
  from memdyn_jax.train import loop
  check_task_name(spec.name)
  checkpoints.check_run_dir_path(run_dir)  # before the (slow) data and model loading
  model_dir = resolve_model(model)
  data, ids = load_train_data(model_dir, spec, cfg)
  model_path = model if model != "embedded" else model_dir
  # The run directory is checked (a file, someone else's folder, another run) before the
  # examples listing is written into it, so a refused run overwrites nothing.
  checkpoints.init_run_dir(run_dir, checkpoints.run_info(
      cfg, model_path=model_path, data_fingerprint=data.fingerprint(),
      num_examples=data.num_examples), hf_io.resolve_checkpoint_dir(model_path))
  if jax.process_index() == 0:
    write_examples_listing(run_dir, spec, ids)
  return loop.train(cfg, data, model_path, run_dir, mesh=mesh, resume=resume, progress=progress,
                    async_checkpoints=async_checkpoints, log_line=log_line)
