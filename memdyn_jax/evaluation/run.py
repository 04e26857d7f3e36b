"""Evaluating a run directory as experiments/evaluate.py does, from a frozen settings object.

`EvalSettings` holds evaluate.py's evaluation flags (same names, same defaults), so other
binaries (the sweep, merge.py --evaluate) evaluate their run directories in-process and
write the same records under the same `eval/config.json`: a later evaluate.py run with the
same flags finds everything done.
"""
from __future__ import annotations

import dataclasses
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from memdyn_jax.errors import ContextLengthError, FieldError
from memdyn_jax.evaluation import records
from memdyn_jax.train.config import spread_steps

if TYPE_CHECKING:  # annotations only: this module imports JAX on first use, not on import
  from memdyn_jax.evaluation.gradient_variance import GradientVarianceConfig
  from memdyn_jax.evaluation.sampling import SamplingParams
  from memdyn_jax.tasks.base import Example, Task

SPLITS = ("train", "test", "ood", "perturbed")
# The EvalSettings fields of the sampling parameters (`sampling_params`); other binaries that
# sample (experiments/curate.py) define their flags from these.
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                   "max_new_tokens", "n_samples", "stop", "seed")


class EvalSettingsError(FieldError):
  """A bad evaluation setting or input; `field` names it (and the evaluate.py flag)."""


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """What to evaluate at every checkpoint of a run (experiments/evaluate.py's flags, whose
  help texts are the descriptions below).

  Attributes:
    splits: splits, any of train, test, ood, perturbed.
    task: task name (default: the one the run was trained on, from its examples.json).
    task_kwargs: JSON keyword arguments of the task constructor (default: the run's; given,
      they must reproduce the trained data, which is checked).
    task_path: data file or directory of the task (default: the run's, when it was trained
      from a local path; else the task's own source).
    chat_template: render prompts with the tokenizer's chat template (default: as the run
      was trained).
    system_prompt: system message of the chat template (default: the run's).
    num_fewshot: worked train examples before each question (default: the run's; the train
      split's, whatever split is evaluated, never the example itself).
    fewshot_seed: seed of the few-shot examples' draw (default: the run's).
    tokenizer: tokenizer directory (default: the run's base model).
    num_train: train examples evaluated (a seeded subset; 0 = all).
    max_eval: cap on test/OOD examples (first N; 0 = all).
    subset_seed: seed of the train subset (and of the gradient-variance minibatches).
    perturbations: answer preambles of the 'perturbed' split (Kang et al. Fig. 6).
    temperature: sampling temperature; 0 = greedy (default: the task's).
    top_p: nucleus mass in (0, 1]; 1 = off (default: the task's).
    top_k: keep only the k most likely tokens; 0 = off (default: the task's).
    min_p: drop tokens below min_p times the most likely one's probability; 0 = off
      (default: the task's).
    repetition_penalty: HF's penalty on tokens already in the prompt or output; 1 = off
      (default: the task's).
    max_new_tokens: generation budget (default: the task's).
    n_samples: samples per prompt (default: the task's).
    stop: strings that end a sample, cut before them (default: the task's, "\\nDone."
      for the default template; in bash a newline is $'\\n'; empty = none).
    seed: sampling seed.
    batch_size: prompts per compiled program.
    greedy: greedy completion + likelihood (ATC) on train/test/ood.
    keep_texts: store sample texts in the records.
    include_base: also evaluate the base model as step 0.
    eval_name: records folder under the run directory.
    grad_variance: gradient variance per checkpoint over train minibatches (Kang et al.
      App. B.1), drawn from the `num_train` subset with `subset_seed`.
    grad_variance_minibatches: minibatches of the gradient variance.
    grad_variance_batch_size: train examples per gradient-variance minibatch.
    checkpoints_per_run: evaluate only this many of a run's checkpoints, spread over the
      run (a bit denser late, the last included); 0 = every checkpoint.
    distance_from_init: the squared distance of each checkpoint's parameters from the base
      model's (Kang et al. App. B.2), stored beside the gradient variance; holds the base
      model's parameters on the mesh while evaluating.
  """
  splits: tuple[str, ...] = ("train", "test")
  task: str | None = None
  task_kwargs: Mapping[str, Any] | None = None
  task_path: str | None = None
  chat_template: bool | None = None
  system_prompt: str | None = None
  num_fewshot: int | None = None
  fewshot_seed: int | None = None
  tokenizer: str | None = None
  num_train: int = 256
  max_eval: int = 0
  subset_seed: int = 0
  perturbations: tuple[str, ...] = ("First", "We know that")
  temperature: float | None = None
  top_p: float | None = None
  top_k: int | None = None
  min_p: float | None = None
  repetition_penalty: float | None = None
  max_new_tokens: int | None = None
  n_samples: int | None = None
  stop: tuple[str, ...] | None = None
  seed: int = 0
  batch_size: int = 16
  greedy: bool = True
  keep_texts: bool = False
  include_base: bool = False
  eval_name: str = "eval"
  grad_variance: bool = True
  grad_variance_minibatches: int = 5
  grad_variance_batch_size: int = 8
  checkpoints_per_run: int = 0
  distance_from_init: bool = False

  def __post_init__(self):
    object.__setattr__(self, "splits", tuple(self.splits))
    object.__setattr__(self, "perturbations", tuple(self.perturbations))
    if self.stop is not None:
      object.__setattr__(self, "stop", (self.stop,) if isinstance(self.stop, str)
                         else tuple(self.stop))
    if self.task_kwargs is not None:
      object.__setattr__(self, "task_kwargs", dict(self.task_kwargs))
    bad = [s for s in self.splits if s not in SPLITS]
    if bad or not self.splits:
      raise EvalSettingsError("splits", f"unknown split(s) {bad}; choose from {list(SPLITS)}")
    for name in ("num_train", "max_eval", "checkpoints_per_run", "num_fewshot", "fewshot_seed"):
      if getattr(self, name) is not None and getattr(self, name) < 0:
        raise EvalSettingsError(name, "must be >= 0")
    if self.batch_size < 1:
      raise EvalSettingsError("batch_size", "must be >= 1")
    if "perturbed" in self.splits and not self.preambles:
      raise EvalSettingsError("perturbations",
                              "the 'perturbed' split needs at least one preamble")
    if not self.eval_name or os.sep in self.eval_name:
      raise EvalSettingsError("eval_name", f"must be a plain folder name, got {self.eval_name!r}")
    if self.grad_variance:
      if self.grad_variance_minibatches < 2:
        raise EvalSettingsError("grad_variance_minibatches", "must be >= 2")
      if self.grad_variance_batch_size < 1:
        raise EvalSettingsError("grad_variance_batch_size", "must be >= 1")

  @property
  def preambles(self) -> tuple[str, ...]:
    """The non-empty perturbations, stripped."""
    return tuple(p.strip() for p in self.perturbations if p.strip())

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d.update(splits=list(self.splits), perturbations=list(self.perturbations),
             stop=None if self.stop is None else list(self.stop))
    return d

  def grad_variance_config(self, num_train: int | None = None):
    """The `GradientVarianceConfig` of the settings, or None when off.

    With `num_train` (the size of the train subset the minibatches are drawn from) and the
    default shape (5 minibatches of 8: 40 examples), a smaller subset gets as many of the
    minibatches as it fills, each as large as fits (4 examples: 4 minibatches of 1), and
    none under 2 examples (None). Any other shape is kept as given (`evaluate` refuses a
    subset too small for it).
    """
    if not self.grad_variance:
      return None
    from memdyn_jax.evaluation.gradient_variance import GradientVarianceConfig
    k, b = self.grad_variance_minibatches, self.grad_variance_batch_size
    if num_train is not None and (k, b) == DEFAULT_GRAD_VARIANCE_SHAPE and num_train < k * b:
      k = min(k, num_train)
      if k < 2:
        return None
      b = num_train // k
    return GradientVarianceConfig(num_minibatches=k, batch_size=b, seed=self.subset_seed)

  def unit_keys(self) -> list[tuple[str, str | None]]:
    """(split, perturbation) of every unit evaluated at each checkpoint."""
    keys = []
    for split in self.splits:
      keys += ([("perturbed", p) for p in self.preambles] if split == "perturbed"
               else [(split, None)])
    return keys


# (minibatches, examples each) of the gradient variance by default: sized down to a smaller
# train subset (`EvalSettings.grad_variance_config`), so small evaluations need no flags.
DEFAULT_GRAD_VARIANCE_SHAPE = (EvalSettings.grad_variance_minibatches,
                               EvalSettings.grad_variance_batch_size)


def train_subset_size(run_dir: str, settings: EvalSettings) -> int | None:
  """How many train examples `build_units` draws for the settings, from the run's files
  alone (its task is not loaded): the rows of examples.json (else run.json's count), of
  those the ones subset.json keeps, at most `num_train`. None when the files do not say."""
  from memdyn_jax.train import checkpoints
  try:
    listing = checkpoints.read_examples_listing(run_dir)
    rows = (len(listing["ids"]) if listing else
            (checkpoints.read_run_info(run_dir).get("data") or {}).get("num_examples"))
    drawn = checkpoints.read_subset(run_dir)
  except (OSError, ValueError, KeyError, TypeError):  # reported when the units are built
    return None
  if drawn is not None:
    rows = len(drawn)
  if rows is None:
    return None
  return min(int(rows), settings.num_train) if settings.num_train else int(rows)


def sampling_params(task: Task | str, settings: EvalSettings):
  """The task's default sampling (`default_sampling`: its settings and stop strings) with
  the settings' overrides.

  Raises:
    EvalSettingsError: an unknown task (field "task") or a bad sampling value (its field).
  """
  from memdyn_jax import tasks
  from memdyn_jax.evaluation.examples import default_sampling
  try:
    return default_sampling(
        task, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
        min_p=settings.min_p, repetition_penalty=settings.repetition_penalty,
        max_new_tokens=settings.max_new_tokens, n=settings.n_samples, stop=settings.stop,
        seed=settings.seed)
  except tasks.UnknownTaskError as e:
    raise EvalSettingsError("task", str(e)) from e
  except ValueError as e:  # SamplingParams' messages start with the field's name
    field = str(e).split()[0]
    raise EvalSettingsError({"n": "n_samples"}.get(field, field), str(e)) from e


def resolve_sampling(settings: EvalSettings, task: Task | str) -> EvalSettings:
  """The settings with every unset sampling field set to the value the task's default
  sampling gives it, so a record of the settings (sweep.json) states what is used and an
  explicit default is the same setting as an omitted one.

  Raises:
    EvalSettingsError: as `sampling_params`.
  """
  params = sampling_params(task, settings)
  return dataclasses.replace(
      settings, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k,
      min_p=params.min_p, repetition_penalty=params.repetition_penalty,
      max_new_tokens=params.max_new_tokens, n_samples=params.n, stop=params.stop)


def for_run(run_dir: str, settings: EvalSettings) -> EvalSettings:
  """The settings with the unset task fields (task, task_kwargs, task_path) taken from what
  the run was trained on (its examples.json); set fields are kept. The prompt options that
  are set (chat_template, system_prompt, num_fewshot, fewshot_seed) replace those of the
  task arguments, which state them only where they are not the default.

  Raises:
    EvalSettingsError: no task named and the run has no examples.json naming one; a bad
      prompt option.
  """
  from memdyn_jax import tasks
  from memdyn_jax.train import checkpoints
  listing = checkpoints.read_examples_listing(run_dir) or {}
  task = settings.task or listing.get("task")
  if not task:
    raise EvalSettingsError("task", f"is required ({run_dir} has no examples.json naming it)")
  same_task = task == listing.get("task")
  kwargs = settings.task_kwargs
  if kwargs is None:
    kwargs = dict(listing.get("task_kwargs") or {}) if same_task else {}
  options = {k: getattr(settings, k) for k in tasks.PROMPT_OPTION_NAMES
             if getattr(settings, k) is not None}
  try:
    kwargs = tasks.canonical_task_kwargs({**kwargs, **options})
  except ValueError as e:  # the message starts with the option's name
    field = str(e).split()[0]
    raise EvalSettingsError(field if field in options else "task_kwargs", str(e)) from e
  path = settings.task_path or (listing.get("task_path") if same_task else None)
  return dataclasses.replace(settings, task=task, task_kwargs=kwargs, task_path=path)


def load_task(run_dir: str, settings: EvalSettings, tokenizer=None):
  """The task of the settings, with the run's task fields where they are unset, ready to
  render prompts (`Task.prepare_prompts`: few-shot examples from the train split of the
  settings' data path; with a chat template, `tokenizer`, default the settings' own).

  Raises:
    EvalSettingsError: the task does not build (field "task"), a tokenizer that does not
      load or whose chat template cannot render the prompts ("tokenizer").
  """
  from memdyn_jax import tasks
  settings = for_run(run_dir, settings)
  try:
    task = tasks.get_task(settings.task, **settings.task_kwargs)
  except (ValueError, TypeError) as e:
    raise EvalSettingsError("task", f"{e} (task_kwargs {settings.task_kwargs})") from e
  if task.prompt_options.chat_template and tokenizer is None:
    tokenizer = load_tokenizer(run_dir, settings)
  try:
    return task.prepare_prompts(tokenizer, settings.task_path)
  except tasks.ChatTemplateError as e:
    raise EvalSettingsError("tokenizer", f"--chat_template: {e}") from e
  except (ValueError, FileNotFoundError) as e:  # the few-shot examples' train split
    raise EvalSettingsError("num_fewshot", f"the train split (of --task_path) does not "
                            f"load: {e}") from e


def load_tokenizer(run_dir: str, settings: EvalSettings):
  """The settings' tokenizer, default the run's base model's (right padding)."""
  from memdyn_jax.train import checkpoints
  from memdyn_jax import models
  path = settings.tokenizer or checkpoints.read_run_info(run_dir)["model"]["path"]
  try:
    return models.load_tokenizer(path, padding_side="right")
  except (OSError, ValueError) as e:  # a missing directory, no tokenizer files
    raise EvalSettingsError("tokenizer", f"cannot load a tokenizer from {path}: "
                            f"{e or type(e).__name__}") from e


def check_trained_data(run_dir: str, task, examples, tokenizer) -> None:
  """Checks that `examples` (the run's training rows, by examples.json's ids) tokenize to
  the data the run was trained on (run.json's data fingerprint): same ids with other task
  arguments or another data file would otherwise be scored as if trained on.

  Raises:
    EvalSettingsError: the data differs (field "task_kwargs").
  """
  from memdyn_jax.train import checkpoints
  from memdyn_jax.train.config import TrainConfig
  from memdyn_jax.train.loop import task_train_data
  info = checkpoints.read_run_info(run_dir)
  want = (info.get("data") or {}).get("fingerprint")
  if not want:
    return
  data, _ = task_train_data(tokenizer, task, examples, TrainConfig.from_dict(info["config"]))
  if data.fingerprint() != want:
    raise EvalSettingsError(
        "task_kwargs", f"(or --task_path) the examples {run_dir}/examples.json lists are not "
        f"the data the run was trained on (task {task.name!r}, data fingerprint differs from "
        f"run.json's); leave --task_kwargs and --task_path unset to use the run's")


def as_trained(run_dir: str, task, settings: EvalSettings, tokenizer):
  """`task` with the prompt options the run was trained with (its examples.json), which
  the trained data is checked with: an evaluation may render its prompts otherwise
  (few-shot, say) without the run's examples counting as other data."""
  from memdyn_jax import tasks
  from memdyn_jax.train import checkpoints
  listing = checkpoints.read_examples_listing(run_dir) or {}
  if listing.get("task") != task.name:
    return task
  try:
    _, trained = tasks.split_prompt_kwargs(listing.get("task_kwargs") or {})
  except ValueError as e:
    raise EvalSettingsError("run_dir", f"{run_dir}/examples.json: {e}") from e
  if trained == task.prompt_options:
    return task
  own, _ = tasks.split_prompt_kwargs(settings.task_kwargs or {})
  try:
    return tasks.get_task(task.name, **own, **trained.to_kwargs()).prepare_prompts(
        tokenizer, settings.task_path)
  except tasks.ChatTemplateError as e:
    raise EvalSettingsError("tokenizer", f"the run was trained with a chat template: {e}"
                            ) from e
  except (ValueError, FileNotFoundError) as e:  # the run's few-shot examples' train split
    raise EvalSettingsError("task_path", f"the run was trained with few-shot prompts, whose "
                            f"train split does not load: {e}") from e


def build_units(run_dir: str, task, settings: EvalSettings, tokenizer=None):
  """(the `EvalUnit`s of the settings' splits, the train subset or None when no
  unit nor the gradient variance needs it). With `tokenizer`, the trained examples are
  checked against the run's data (`check_trained_data`)."""
  from memdyn_jax.evaluation.examples import subset
  from memdyn_jax.train import checkpoints
  settings = for_run(run_dir, settings)
  train = None
  if {"train", "perturbed"} & set(settings.splits) or settings.grad_variance:
    try:
      train = checkpoints.trained_examples(run_dir, task, path=settings.task_path)
    except (ValueError, FileNotFoundError) as e:
      raise EvalSettingsError("task_kwargs", f"(or --task_path) {e}") from e
    if tokenizer is not None:
      check_trained_data(run_dir, as_trained(run_dir, task, settings, tokenizer), train,
                         tokenizer)
    try:
      train = checkpoints.drawn_examples(run_dir, train)
    except checkpoints.RunDirError as e:
      raise EvalSettingsError("run_dir", str(e)) from e
    train = tuple(subset(train, settings.num_train, settings.subset_seed))
  units = []
  for split, perturbation in settings.unit_keys():
    if split == "train":
      units.append(EvalUnit("train", train, greedy=settings.greedy))
    elif split == "perturbed":
      units.append(EvalUnit("perturbed", train, perturbation=perturbation,
                                       greedy=False, score_targets=False))
    else:
      try:
        examples = task.load(split, settings.task_path)
      except (ValueError, FileNotFoundError) as e:
        raise EvalSettingsError("splits", f"task {task.name!r} cannot load split {split!r}: "
                                f"{e}") from e
      if settings.max_eval:
        examples = examples[:settings.max_eval]
      units.append(EvalUnit(split, tuple(examples), greedy=settings.greedy))
  return units, train


def eval_config(task, params, settings: EvalSettings) -> dict[str, Any]:
  """What the records depend on (`records.check_config` refuses another on a re-run)."""
  return {"task": task.name, "task_kwargs": dict(settings.task_kwargs),
          "task_path": settings.task_path, "sampling": dataclasses.asdict(params),
          "num_train": settings.num_train, "max_eval": settings.max_eval,
          "subset_seed": settings.subset_seed, "greedy": settings.greedy}


def check_mesh(settings: EvalSettings, mesh) -> None:
  """Raises EvalSettingsError unless `settings.batch_size` splits over the mesh's data shards."""
  from memdyn_jax import sharding as sharding_lib
  shards = sharding_lib.data_shards(mesh)
  if settings.batch_size % shards:
    raise EvalSettingsError("batch_size", f"{settings.batch_size} is not a multiple of the "
                            f"mesh's {shards} data shards (--mesh_data x --mesh_fsdp)")


# Checkpoint i of k sits at fraction (i/k)**SPREAD_POWER of the run: a bit denser late, where
# memorization sets in, but the first early enough to catch a test-perplexity minimum.
def _checked_steps(run_dir: str, steps: Sequence[int] | None,
                   include_base: bool, per_run: int = 0) -> list[int]:
  """The checkpoint steps to evaluate (`steps`, default all or `per_run` of them spread
  over the run), step 0 first with `include_base`.

  Raises:
    EvalSettingsError: no complete checkpoint (field "run_dir"), or a step that is not one
      (field "steps").
  """
  from memdyn_jax.train import checkpoints
  available = checkpoints.list_steps(run_dir)
  if not available:
    raise EvalSettingsError("run_dir", f"{run_dir} has no complete checkpoint")
  wanted = spread_steps(available, per_run) if steps is None else [int(s) for s in steps]
  bad = [s for s in wanted if s not in available and not (s == 0 and include_base)]
  if bad:
    raise EvalSettingsError("steps", f"no checkpoint at step(s) {bad}; steps: {available}")
  return sorted(set(wanted) | ({0} if include_base else set()))


def pending_steps(run_dir: str, settings: EvalSettings,
                  steps: Sequence[int] | None = None) -> list[int]:
  """Of `steps` (default all checkpoints, plus step 0 with `include_base`), those with a
  unit not yet evaluated, a gradient variance missing or measured with other settings, or
  a distance from init missing (when asked for); nothing is loaded (`evaluate_units` also
  compares the minibatches' examples)."""
  from memdyn_jax.train import checkpoints
  if steps is None:
    steps = spread_steps(checkpoints.list_steps(run_dir), settings.checkpoints_per_run)
  steps = sorted(set(steps) | ({0} if settings.include_base else set()))
  name = settings.eval_name
  gv_config = settings.grad_variance_config(
      train_subset_size(run_dir, settings) if settings.grad_variance else None)
  gv_wanted = None if gv_config is None else dataclasses.asdict(gv_config)

  def gv_done(step):
    stats = records.read_checkpoint_stats(run_dir, step, name=name)
    stored = stats.get(records.GRADIENT_VARIANCE_SETTINGS) or {}
    return (records.GRADIENT_VARIANCE in stats
            and {k: stored.get(k) for k in gv_wanted} == gv_wanted)

  def done(step):
    if gv_wanted is not None and not gv_done(step):
      return False
    if settings.distance_from_init and records.DISTANCE_FROM_INIT not in (
        records.read_checkpoint_stats(run_dir, step, name=name)):
      return False
    return all(records.is_done(run_dir, step, split, p, name=name)
               for split, p in settings.unit_keys())

  return [s for s in steps if not done(s)]


def evaluate(run_dir: str, settings: EvalSettings, *, steps: Sequence[int] | None = None,
             mesh=None, progress: bool = True, log: Callable[[str], None] | None = None,
             should_stop: Callable[[], bool] | None = None):
  """Evaluates every pending checkpoint of `run_dir` (see `evaluate_units`).

  The settings are checked against the run (task, sampling, mesh, and the records folder's
  recorded settings) even when every record is already there; the train subset, the
  tokenizer and the models are only loaded when something is pending.

  Args:
    run_dir: the training run directory.
    settings: what to evaluate.
    steps: checkpoint steps (default all).
    mesh: device mesh (default the first local device).
    progress: tqdm bar.
    log: optional `log(message)`: a line after each checkpoint, and one each for work
      already done (a resumed evaluation) and a gradient-variance shape sized to the subset.
    should_stop: checked after each unit written; True stops there (see
      `evaluate_units`).

  Returns:
    The `StepTiming` of each checkpoint evaluated ([] when all was done).

  Raises:
    EvalSettingsError: no checkpoint or a requested step is none (fields "run_dir",
      "steps"); bad settings for this run (task, splits, tokenizer, sampling, a batch size
      the mesh does not divide); a records folder made with other settings (field
      "eval_name"); a prompt that does not fit with max_new_tokens ("max_new_tokens"); a
      damaged record file or checkpoint ("run_dir", naming it and the fix).
  """
  from memdyn_jax.train import checkpoints
  wanted = _checked_steps(run_dir, steps, settings.include_base, settings.checkpoints_per_run)
  settings = for_run(run_dir, settings)
  # A chat template renders with the tokenizer: loaded first; else only when work is pending.
  tokenizer = (load_tokenizer(run_dir, settings) if settings.task_kwargs.get("chat_template")
               else None)
  task = load_task(run_dir, settings, tokenizer)
  params = sampling_params(task, settings)
  if mesh is not None:
    check_mesh(settings, mesh)
  config = eval_config(task, params, settings)
  if not pending_steps(run_dir, settings, wanted):
    if records.read_config(run_dir, name=settings.eval_name) is not None:
      _check_config(run_dir, config, settings, task)
    return []
  tokenizer = tokenizer or load_tokenizer(run_dir, settings)
  units, train = build_units(run_dir, task, settings, tokenizer)
  gv_config = settings.grad_variance_config(None if train is None else len(train))
  if settings.grad_variance and log is not None:
    _log_grad_variance_shape(settings, gv_config, len(train), log)
  if gv_config is not None and len(train) < gv_config.num_minibatches * gv_config.batch_size:
    raise EvalSettingsError(
        "grad_variance_batch_size", f"{gv_config.num_minibatches} minibatches of "
        f"{gv_config.batch_size} need {gv_config.num_minibatches * gv_config.batch_size} train "
        f"examples, the --num_train subset has {len(train)} (or --nograd_variance)")
  _check_config(run_dir, config, settings, task)
  try:
    timings = evaluate_units(
        run_dir, task, tokenizer, units, params, steps=[s for s in wanted if s],
        include_base=settings.include_base, batch_size=settings.batch_size, mesh=mesh,
        keep_texts=settings.keep_texts, progress=progress, name=settings.eval_name, log=log,
        grad_variance=gv_config, grad_variance_examples=train,
        distance_from_init=settings.distance_from_init, should_stop=should_stop)
  except ContextLengthError as e:  # a prompt + max_new_tokens over the model's window
    raise EvalSettingsError("max_new_tokens", str(e)) from e
  except (records.DamagedRecordsError, records.EvalConfigMismatchError,
          checkpoints.CheckpointReadError) as e:  # each names its file and the fix
    raise EvalSettingsError("run_dir", str(e)) from e
  import jax
  if timings and jax.process_index() == 0:
    write_tensorboard(run_dir, task.name, [t.step for t in timings], name=settings.eval_name)
  return timings


def _log_grad_variance_shape(settings: EvalSettings, config, num_train: int,
                             log: Callable[[str], None]) -> None:
  """One line when the default gradient-variance shape was sized down to the subset."""
  asked = (settings.grad_variance_minibatches, settings.grad_variance_batch_size)
  if config is not None and (config.num_minibatches, config.batch_size) == asked:
    return
  why = (f"the train subset has {num_train} example(s), fewer than the default "
         f"{asked[0]} minibatches of {asked[1]}")
  log(f"gradient variance skipped: {why} and under the 2 it needs" if config is None else
      f"gradient variance over {config.num_minibatches} minibatches of {config.batch_size}: "
      f"{why} (--grad_variance_minibatches, --grad_variance_batch_size set it)")


def checkpoint_scalars(rows: Sequence[Mapping[str, Any]], threshold: float
                       ) -> dict[int, dict[str, float]]:
  """Per-checkpoint evaluation scalars from a run's records: for every unit, mean accuracy,
  perplexity and exact memorization; for "train", also the share of targets memorized
  (`metrics.memorized_fraction`: perplexity below `threshold`, unscored never) and PreMemAcc
  over the checkpoints so far (Kang et al., on the train examples present at all of them).

  Returns:
    {step: {"<unit>/<metric>": value}}.
  """
  import numpy as np

  from memdyn_jax import metrics
  by_step: dict[int, dict[str, list]] = {}
  for r in rows:
    unit = records.unit_name(r["split"], r.get("perturbation"))
    by_step.setdefault(int(r["step"]), {}).setdefault(unit, []).append(r)
  out: dict[int, dict[str, float]] = {}
  train_acc, train_ppl = [], []
  for step in sorted(by_step):
    scalars = {}
    for unit, recs in by_step[step].items():
      for key in ("accuracy", "perplexity", "exact_memorization"):
        values = np.array([float(r.get(key, np.nan)) for r in recs])
        if np.isfinite(values).any():
          scalars[f"{unit}/{key}"] = float(np.nanmean(values))
    train = {r["example_id"]: r for r in by_step[step].get("train", [])}
    if train:
      # The memorization rule and its NaN policy are metrics.premem's (as in the report).
      ppl = {i: float(r.get("perplexity", np.nan)) for i, r in train.items()}
      scalars["train/memorized_fraction"] = metrics.memorized_fraction(
          list(ppl.values()), threshold)
      train_acc.append({i: float(r["accuracy"]) for i, r in train.items()})
      train_ppl.append(ppl)
      ids = sorted(set.intersection(*(set(a) for a in train_acc)))
      if ids:
        acc = np.array([[a[i] for i in ids] for a in train_acc])
        ppl_m = metrics.unscored_as_never_memorized([[p[i] for i in ids] for p in train_ppl])
        scalars["train/premem_accuracy"] = float(
            metrics.dataset_premem_accuracy(acc, ppl_m, threshold)[-1])
    out[step] = scalars
  return out


def write_tensorboard(run_dir: str, task_name: str, steps: Sequence[int], *,
                      name: str = "eval") -> None:
  """Adds the evaluation scalars of `steps` (`checkpoint_scalars`, at the task's default
  PreMemAcc threshold) to the run's TensorBoard folder, beside the training scalars, under
  "<eval name>/<unit>/<metric>". A no-op without tensorboardX."""
  try:
    import tensorboardX
  except ImportError:
    return
  from memdyn_jax import tasks
  scalars = checkpoint_scalars(records.load_records(run_dir, name=name),
                               tasks.memorization_threshold(task_name))
  writer = tensorboardX.SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                      filename_suffix=f".{name}")
  try:
    for step in steps:
      for key, value in sorted(scalars.get(int(step), {}).items()):
        writer.add_scalar(f"{name}/{key}", value, int(step))
  finally:
    writer.close()


def _check_config(run_dir: str, config: Mapping[str, Any], settings: EvalSettings,
                  task: Task) -> None:
  try:
    records.check_config(run_dir, config, name=settings.eval_name, task_stop=task.stop)
  except records.EvalConfigMismatchError as e:
    raise EvalSettingsError("eval_name", str(e)) from e


# ------------------------------------------------------------- the evaluation engine


@dataclasses.dataclass(frozen=True)
class EvalUnit:
  """One (split, perturbation) evaluated at every checkpoint.

  Attributes:
    split: label of the records ("train", "test", "ood", "perturbed").
    examples: the examples.
    perturbation: answer preamble, or None.
    greedy: also decode greedily (ATC score).
    score_targets: teacher-force the target trace.
  """

  split: str
  examples: tuple[Example, ...]
  perturbation: str | None = None
  greedy: bool = True
  score_targets: bool = True


@dataclasses.dataclass(frozen=True)
class StepTiming:
  """Wall-clock seconds spent on one checkpoint: restoring it (with its distance from init
  when measured), evaluating its units and measuring its gradient variance (0 when not
  measured)."""

  step: int
  load_s: float
  eval_s: float
  units: int
  gradient_variance_s: float = 0.0


def evaluate_units(run_dir: str, task: Task, tokenizer, units: Sequence[EvalUnit],
                   params: SamplingParams, *, steps: Sequence[int] | None = None,
                   include_base: bool = False, batch_size: int = 16,
                   max_length: int | None = None, append_eos: bool | None = None, mesh=None,
                   keep_texts: bool = False, progress: bool = True,
                   name: str = records.EVAL_DIR, log=None,
                   grad_variance: GradientVarianceConfig | None = None,
                   grad_variance_examples: Sequence[Example] | None = None,
                   distance_from_init: bool = False,
                   should_stop: Callable[[], bool] | None = None) -> list[StepTiming]:
  """Evaluates every pending (checkpoint, unit) of a run and writes its records atomically.

  Units whose record files already exist are skipped, and a checkpoint with nothing
  pending is not even restored. Every checkpoint shares one architecture and the same
  batch/bucket shapes, so the sampling, scoring and gradient programs compiled for the
  first one are reused for the rest.

  Args:
    run_dir: the training run directory.
    task: the run's task.
    tokenizer: the base model's tokenizer.
    units: what to evaluate at each checkpoint.
    params: sampling parameters.
    steps: checkpoint steps; default all complete ones.
    include_base: also evaluate the base model, as step 0.
    batch_size: prompts per compiled program.
    max_length, append_eos: scoring convention; default the run's training config.
    mesh: device mesh; default the first local device.
    keep_texts: store sample texts in the records.
    progress: tqdm bar over (checkpoint, unit) pairs, showing the unit in progress too
      (its phase, prompts done of the unit's, tokens/s).
    name: eval folder name under `run_dir`.
    log: optional `log(message)` called after each checkpoint, and once at the start when
      some of the (checkpoint, unit) pairs asked for are already evaluated.
    grad_variance: also measure each checkpoint's gradient variance (Kang et al. App. B.1)
      into `step_<n>/checkpoint.json`; a checkpoint whose stored value was measured with
      the same settings is skipped, one with other settings is measured again.
    grad_variance_examples: the train examples its minibatches are drawn from; default
      the examples of the "train" unit.
    distance_from_init: also store each checkpoint's squared distance from the base model
      (Kang et al. App. B.2; step 0 and checkpoint 0 are the base: 0) where it is missing.
      The base model's parameters are loaded once, on the first checkpoint that needs them.
    should_stop: checked after each unit's records are written; when it returns True the
      evaluation stops there (what is written stays; a re-run continues), e.g. the flag of
      `signals.StopSignals` on SIGTERM / Ctrl-C.

  Returns:
    A StepTiming per checkpoint evaluated (skipped ones are absent).

  Raises:
    FileNotFoundError: not a run directory, or it has no checkpoint.
    ValueError: a requested step is not a checkpoint; too few gradient-variance examples.
  """
  import tqdm

  from memdyn_jax.evaluation import gradient_variance as gv_lib
  from memdyn_jax.evaluation.examples import evaluate_examples
  from memdyn_jax.train import checkpoints

  info = checkpoints.read_run_info(run_dir)
  cfg = info["config"]
  available = checkpoints.list_steps(run_dir)
  if not available:
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
  wanted = list(available) if steps is None else [int(s) for s in steps]
  bad = [s for s in wanted if s not in available and not (s == 0 and include_base)]
  if bad:
    raise ValueError(f"{run_dir} has no checkpoint at step(s) {bad}; steps: {available}")
  if include_base and 0 not in wanted:
    wanted = [0] + wanted
  max_length = max_length or cfg.get("max_length")
  append_eos = cfg.get("append_eos", False) if append_eos is None else append_eos
  pending = [(s, u) for s in sorted(set(wanted)) for u in units
             if not records.is_done(run_dir, s, u.split, u.perturbation, name=name)]
  asked = len(set(wanted)) * len(units)
  if log is not None and pending and len(pending) < asked:
    log(f"resumed: {asked - len(pending)} of {asked} (checkpoint, unit) pairs already "
        f"evaluated, {len(pending)} to go")
  gv_batches, gv_settings, gv_pending = None, None, set()
  if grad_variance is not None:
    if grad_variance_examples is None:
      grad_variance_examples = next((u.examples for u in units if u.split == "train"), ())
    gv_batches = gv_lib.make_minibatches(tokenizer, task, grad_variance_examples,
                                         grad_variance, max_length=max_length,
                                         append_eos=append_eos)
    gv_settings = gv_lib.settings(grad_variance, gv_batches)
    gv_pending = {s for s in set(wanted) if records.read_checkpoint_stats(
        run_dir, s, name=name).get(records.GRADIENT_VARIANCE_SETTINGS) != gv_settings}
  distance_pending = set()
  if distance_from_init:
    distance_pending = {s for s in set(wanted) if records.DISTANCE_FROM_INIT not in
                        records.read_checkpoint_stats(run_dir, s, name=name)}
  base_params = None
  timings = []
  bar = tqdm.tqdm(total=len(pending), disable=not progress, desc=os.path.basename(run_dir),
                  unit="unit")
  try:
    for step in sorted({s for s, _ in pending} | gv_pending | distance_pending):
      t0 = time.perf_counter()
      model = _load_step(run_dir, step, info, mesh)
      if step in distance_pending:
        if base_params is None:
          base_params = gv_lib.parameters(_load_step(run_dir, 0, info, mesh))
        records.update_checkpoint_stats(
            run_dir, step, {records.DISTANCE_FROM_INIT: gv_lib.distance_from_init(
                model, base_params)}, name=name)
      load_s = time.perf_counter() - t0
      gv_s = 0.0
      if step in gv_pending:
        t1 = time.perf_counter()
        value = gv_lib.checkpoint_gradient_variance(model, gv_batches, mesh=mesh,
                                                    ddof=grad_variance.ddof)
        records.update_checkpoint_stats(
            run_dir, step, {records.GRADIENT_VARIANCE: value,
                            records.GRADIENT_VARIANCE_SETTINGS: gv_settings}, name=name)
        gv_s = time.perf_counter() - t1
      todo = [u for s, u in pending if s == step]
      t1 = time.perf_counter()
      for unit in todo:
        unit_name = records.unit_name(unit.split, unit.perturbation)
        bar.set_postfix(step=step, split=unit_name)
        recs = evaluate_examples(
            model, tokenizer, task, unit.examples, unit.split, params=params,
            perturbation=unit.perturbation, batch_size=batch_size, max_length=max_length,
            mesh=mesh, append_eos=append_eos, greedy=unit.greedy,
            score_targets=unit.score_targets, keep_texts=keep_texts,
            progress=_UnitProgress(bar, step, unit_name) if progress else None)
        records.write_records(run_dir, step, unit.split, [r.to_dict() for r in recs],
                                  unit.perturbation, name=name)
        bar.update(1)
        if should_stop is not None and should_stop():
          break
      timing = StepTiming(step, load_s, time.perf_counter() - t1, len(todo), gv_s)
      timings.append(timing)
      if log is not None:
        log(f"step {step}: restored in {timing.load_s:.1f}s, {timing.units} unit(s) "
            f"evaluated in {timing.eval_s:.1f}s"
            + (f", gradient variance in {gv_s:.1f}s" if step in gv_pending else ""))
      del model
      if should_stop is not None and should_stop():
        break
  finally:
    bar.close()
  return timings


class _UnitProgress:
  """Shows the unit in progress on the evaluation's bar: each phase's prompts done (of the
  unit's) and its generated tokens/s (the bar itself moves once per unit, which at paper
  scale is minutes)."""

  def __init__(self, bar, step: int, unit: str):
    self.bar, self.step, self.unit = bar, step, unit
    self.phase, self.start = None, 0.0

  def __call__(self, phase: str, done: int, total: int, tokens: int) -> None:
    now = time.perf_counter()
    if phase != self.phase:
      self.phase, self.start = phase, now
    shown = {"step": self.step, "split": self.unit, phase: f"{done}/{total}"}
    if tokens and now > self.start:
      shown["tok_s"] = f"{tokens / (now - self.start):.0f}"
    self.bar.set_postfix(shown)  # in this order (keywords would be sorted)


def _load_step(run_dir: str, step: int, info: Mapping[str, Any], mesh):
  """The model of checkpoint `step`; step 0 without a checkpoint is the base model."""
  import jax

  from memdyn_jax.train import checkpoints
  from memdyn_jax import sharding
  from memdyn_jax.models import hf_io
  from memdyn_jax.train.config import TrainConfig

  if step == 0 and 0 not in checkpoints.list_steps(run_dir):
    cfg = TrainConfig.from_dict(info["config"])
    mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices()[:1])
    return checkpoints.load_base_model(hf_io.resolve_checkpoint_dir(info["model"]["path"]),
                                       cfg, mesh)
  model, _ = checkpoints.restore(run_dir, step, mesh)
  return model
