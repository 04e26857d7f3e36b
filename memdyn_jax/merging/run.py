"""A merged model written as a run directory, so that it is restored, evaluated and analyzed
like any checkpoint of a training run (Ruan et al.'s merging against over-memorization).

Inputs are checkpoints of training runs, `RUN_DIR:SELECTOR` (`parse_checkpoints`), merged
tensor by tensor with `memdyn_jax.merging` (one tensor of each input in memory at a time,
read lazily from orbax, placed on the mesh like the model's parameters; the stacked blocks
one layer at a time where the method sees a tensor whole, as mergekit does). The base (for
task arithmetic, TIES, DARE; optional for SLERP) is an HF directory or `RUN_DIR:STEP`;
by default the first source run's base model. Output layout:

    run.json            the first source run's run info ("config", "model": the base model
                        path whose tokenizer is used, "data") plus the "merge" field below
    model_config.json   the architecture (the first source's)
    examples.json       the first source's training examples (the evaluation's 'train' split)
    checkpoints/<step>/ orbax: "params" (the merged weights) and "meta"; <step> is the
                        largest source step, so the merge sits at the end of its trajectory
    hf/                 HF export: config.json, safetensors and the tokenizer's files

"merge" (also in the checkpoint's meta):

    {"method": "linear" | "greedy_soup" | "slerp" | "task_arithmetic" | "ties" |
               "dare_linear" | "dare_ties",
     "sources": [{"run_dir": abs path, "step": int}, ...],   # the models averaged/merged
     "base": {"hf_dir": path} | {"run_dir": path, "step": int} | null,
     "step": int,                                            # the merged checkpoint's step
     # the settings with their defaults resolved (null: the method takes none):
     "weights": [one per source] | null, "t": float | [[pattern, t], ..] | null,
     "lambda": float | null, "density": float | null, "seed": int, "normalize": bool,
     "candidates": [{"run_dir", "step"}, ..],                # greedy_soup: all tried
     "validation": {"split", "examples", "metric", "candidate_scores", "soup_score",
                    "history": [[candidate index, score, accepted], ..]},   # greedy_soup
     "request": {...}}                                       # what was asked (compared on
                                                             # a re-run)

The directory is assembled under `<output_dir>.partial` and renamed into place when
complete: an existing output directory is always a finished merge (a re-run with the same
request skips the merge; another request is refused).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

from memdyn_jax import fileio, merging
from memdyn_jax.errors import FieldError
from memdyn_jax.merging import MergeConfig
from memdyn_jax.train import checkpoints

if TYPE_CHECKING:  # annotations only: the evaluation loads on first use
  from memdyn_jax.evaluation.run import EvalSettings

MERGE_FIELD = "merge"
MERGE_PARTIAL = "merge_partial"  # the output-marker kind of a merge being written
HF_DIR = "hf"
GREEDY_SOUP = "greedy_soup"
METHODS = merging.METHODS + (GREEDY_SOUP,)


class MergeInputError(FieldError):
  """A bad merge input; `field` names it (and the merge binary's flag)."""


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
  """One checkpoint of a training run."""
  run_dir: str
  step: int

  def to_dict(self) -> dict[str, Any]:
    return {"run_dir": self.run_dir, "step": self.step}

  def __str__(self) -> str:
    return f"{self.run_dir}:{self.step}"


@dataclasses.dataclass(frozen=True)
class BaseRef:
  """The base model: an HF directory or a checkpoint."""
  hf_dir: str | None = None
  checkpoint: CheckpointRef | None = None

  def to_dict(self) -> dict[str, Any]:
    return {"hf_dir": self.hf_dir} if self.hf_dir else self.checkpoint.to_dict()


def _run_steps(run_dir: str, field: str) -> list[int]:
  if not os.path.exists(os.path.join(run_dir, checkpoints.RUN_INFO)):
    raise MergeInputError(field, f"{run_dir} is not a training run directory "
                          f"(no {checkpoints.RUN_INFO})")
  try:
    steps = checkpoints.list_steps(run_dir)
  except OSError as e:  # an unreadable checkpoints folder
    raise MergeInputError(field, f"cannot list the checkpoints of {run_dir}: {e}") from e
  if not steps:
    raise MergeInputError(field, f"{run_dir} has no complete checkpoint")
  return steps


def _range(field: str, spec: str, text: str, number=float) -> tuple[Any, Any]:
  lo, sep, hi = text.partition("-")
  try:
    return (number(lo), number(hi)) if sep else (number(lo), number(lo))
  except ValueError as e:
    raise MergeInputError(field, f"{spec!r}: expected a number or a range A-B, got "
                          f"{text!r}") from e


def parse_checkpoints(specs: Sequence[str], field: str = "checkpoints") -> list[CheckpointRef]:
  """Checkpoints from `RUN_DIR:SELECTOR` specs, in the given order, without repeats.

  Selectors: `STEP`; `A-B` (every checkpoint with A <= step <= B); `all`; `last`;
  `epochs=A-B` (every checkpoint whose epoch, from its metadata, is in [A, B]; `epochs=E`
  the one at epoch E).

  Raises:
    MergeInputError: a malformed spec, not a run, no such step, or an empty selection.
  """
  out: list[CheckpointRef] = []
  for spec in specs:
    run_dir, sep, selector = spec.rpartition(":")
    if not sep or not run_dir or not selector:
      raise MergeInputError(field, f"{spec!r}: expected RUN_DIR:STEP (or RUN_DIR:A-B, "
                            ":all, :last, :epochs=A-B)")
    run_dir = os.path.abspath(run_dir)
    steps = _run_steps(run_dir, field)
    if selector == "all":
      chosen = steps
    elif selector == "last":
      chosen = steps[-1:]
    elif selector.startswith("epochs="):
      lo, hi = _range(field, spec, selector[len("epochs="):])
      epochs = {s: float(checkpoints.read_meta(run_dir, s).get("epoch", float("nan")))
                for s in steps}
      chosen = [s for s in steps if lo - 1e-6 <= epochs[s] <= hi + 1e-6]
      if not chosen:
        raise MergeInputError(field, f"{spec!r}: no checkpoint at epochs {lo:g}-{hi:g}; "
                              f"epochs: {[round(epochs[s], 4) for s in steps]}")
    else:
      lo, hi = _range(field, spec, selector, int)
      chosen = [s for s in steps if lo <= s <= hi]
      if not chosen or (lo == hi and lo not in steps):
        raise MergeInputError(field, f"{run_dir} has no checkpoint at step {selector}; "
                              f"steps: {steps}")
    for step in chosen:
      ref = CheckpointRef(run_dir, step)
      if ref not in out:
        out.append(ref)
  if not out:
    raise MergeInputError(field, "no checkpoints given")
  return out


def parse_base(spec: str) -> BaseRef:
  """`RUN_DIR:STEP` of a training run, or an HF model directory (of a supported
  architecture).

  Raises:
    MergeInputError: neither, or an architecture `memdyn_jax.models` does not implement.
  """
  run_dir, sep, step = spec.rpartition(":")
  if sep and step.isdigit() and os.path.isdir(run_dir):
    return BaseRef(checkpoint=parse_checkpoints([spec], field="base")[0])
  if os.path.isfile(os.path.join(spec, "config.json")):
    from memdyn_jax.models import hf_io
    try:  # an architecture the models do not implement fails here, before any reading
      hf_io.load_config(spec)
    except (OSError, ValueError) as e:
      raise MergeInputError("base", f"{spec}: {e}") from e
    return BaseRef(hf_dir=os.path.abspath(spec))
  raise MergeInputError("base", f"{spec!r} is neither RUN_DIR:STEP of a training run nor an "
                        "HF model directory (with config.json)")


def default_base(source: CheckpointRef) -> BaseRef:
  """The base model the source run was fine-tuned from."""
  from memdyn_jax.models import hf_io
  path = checkpoints.read_run_info(source.run_dir)["model"]["path"]
  try:
    return BaseRef(hf_dir=hf_io.resolve_checkpoint_dir(path))
  except (OSError, ValueError) as e:  # a moved directory, an unreachable hub id
    raise MergeInputError("base", f"the base model of {source.run_dir} ({path}) cannot be "
                          f"found ({e}); give --base") from e


def _config_record(config: MergeConfig, num_models: int) -> dict[str, Any]:
  """The settings of `config` as a request records them: every default its method uses
  stated (`MergeConfig.resolved`, the weights of `num_models` models), so an explicit
  default is the same merge as an omitted one."""
  config = config.resolved()
  t = config.t
  if callable(t):
    raise MergeInputError("t", "a callable t cannot be recorded; give patterns")
  weights = None if config.method == "slerp" else list(config.model_weights(num_models))
  return {"weights": weights, "t": [list(p) for p in t] if isinstance(t, tuple) else t,
          "lambda": config.lambda_, "density": config.density, "seed": config.seed,
          "normalize": config.normalize}


def merge_request(method: str, sources: Sequence[CheckpointRef], base: BaseRef | None,
                  config: MergeConfig | None, **extra) -> dict[str, Any]:
  """What a merge is asked to do (JSON), defaults resolved: compared with a finished
  merge's on a re-run."""
  params = {} if config is None else _config_record(config, len(sources))
  return json.loads(json.dumps({"method": method, "sources": [s.to_dict() for s in sources],
                                "base": None if base is None else base.to_dict(),
                                **params, **extra}))


def _stated_request(out_dir: str, request: Mapping[str, Any]) -> dict[str, Any]:
  """A recorded request as `merge_request` records it now: requests recorded before the
  defaults were resolved say null for t, lambda, normalize and the weights, and before the
  sampling stated its stop strings, a greedy soup's validation says `"stop": []` where the
  task's (of the merged run's examples.json) were applied. As recorded where it does not
  build."""
  from memdyn_jax import tasks
  from memdyn_jax.evaluation import records
  request = dict(request)
  if request.get("method") in merging.METHODS:
    t = request.get("t")
    try:
      config = MergeConfig(
          request["method"], weights=request.get("weights"),
          t=tuple(tuple(p) for p in t) if isinstance(t, list) else t,
          lambda_=request.get("lambda"), density=request.get("density"),
          seed=request.get("seed", 0), normalize=request.get("normalize"))
      request.update(_config_record(config, len(request.get("sources") or ())))
    except (merging.MergeConfigError, MergeInputError, KeyError, TypeError, ValueError):
      pass
  if isinstance(request.get("validation"), Mapping):
    task = (checkpoints.read_examples_listing(out_dir) or {}).get("task")
    request["validation"] = records.stated_stop(request["validation"],
                                                tasks.task_class(task).template.stop)
  return json.loads(json.dumps(request))


def read_merge_info(run_dir: str) -> dict[str, Any] | None:
  """The "merge" field of a run directory (None for a training run)."""
  return checkpoints.read_run_info(run_dir).get(MERGE_FIELD)


# ------------------------------------------------------------------------------ sources


class _LabelledSource:
  """A TensorSource whose read errors name the input (flag and RUN:STEP)."""

  def __init__(self, source, field: str, label: str):
    self.source, self.field, self.label = source, field, label

  def paths(self):
    return self.source.paths()

  def shape(self, path) -> tuple[int, ...]:
    if hasattr(self.source, "shape"):
      return self.source.shape(path)
    return tuple(getattr(self.source.get(path), "shape", ()))  # in memory: no read

  def get(self, path):
    try:
      return self.source.get(path)
    except checkpoints.CheckpointReadError as e:  # names the run and step
      raise MergeInputError(self.field, f"cannot read {merging.path_str(path)}: {e}") from e

  def close(self):
    if hasattr(self.source, "close"):
      self.source.close()


def _check_layout(source, shapes: Mapping[str, tuple], field: str, label: str) -> None:
  """The source holds exactly the model's tensors, with the model's shapes."""
  names = {merging.path_str(p): p for p in source.paths()}
  missing, extra = sorted(set(shapes) - set(names)), sorted(set(names) - set(shapes))
  if missing or extra:
    raise MergeInputError(field, f"{label} does not hold the model's tensors: lacks "
                          f"{missing[:4]}, has extra {extra[:4]}")
  for name, path in names.items():
    shape = source.shape(path)
    if tuple(shape) != tuple(shapes[name]):
      raise MergeInputError(field, f"{label}: tensor {name} has shape {tuple(shape)}, the "
                            f"model of the first checkpoint has {tuple(shapes[name])}")


def _checkpoint_source(ref: CheckpointRef, shardings: Mapping[str, Any], field: str):
  try:
    source = merging.OrbaxCheckpointSource(
        ref.run_dir, ref.step, sharding=lambda path, *_: shardings[merging.path_str(path)])
  except MergeInputError:
    raise
  except ValueError as e:  # no such step or item, unreadable metadata, a LoRA run
    raise MergeInputError(field, f"cannot open checkpoint {ref}: {e}") from e
  return _LabelledSource(source, field, str(ref))


def _base_source(base: BaseRef, shardings, cfg, mesh, rules):
  if base.checkpoint is not None:
    return _checkpoint_source(base.checkpoint, shardings, "base")
  import jax.numpy as jnp
  from flax import nnx

  from memdyn_jax import models
  try:
    model, _ = models.from_pretrained(base.hf_dir, dtype=jnp.dtype(cfg.compute_dtype),
                                      param_dtype=jnp.dtype(cfg.param_dtype), mesh=mesh,
                                      rules=rules)
  except (OSError, ValueError) as e:  # another architecture, missing tensors
    raise MergeInputError("base", f"cannot load {base.hf_dir}: {e}") from e
  # The whole base is held on the mesh (an HF checkpoint is not read lazily here).
  return _LabelledSource(merging.PytreeSource(nnx.state(model, nnx.Param)), "base", base.hf_dir)


# --------------------------------------------------------------------------- validation


def validation_accuracy(task, examples, tokenizer, params, *, batch_size: int, max_length: int,
                        append_eos: bool, mesh=None) -> Callable[[Any], float]:
  """model -> mean sampled accuracy on `examples` (the greedy soup's validation score; the
  same sampling as the evaluation, seeded, so a model always gets the same score)."""
  import numpy as np

  from memdyn_jax import evaluation

  def score(model) -> float:
    records = evaluation.evaluate_examples(
        model, tokenizer, task, examples, "validation", params=params, batch_size=batch_size,
        max_length=max_length, mesh=mesh, append_eos=append_eos, score_targets=False)
    return float(np.mean([r.accuracy for r in records]))

  return score


def soup_scorer(first_run: str, settings: EvalSettings, split: str, tokenizer, *,
                max_examples: int = 0, mesh=None
                ) -> tuple[Callable[[Any], float], dict[str, Any]]:
  """The greedy soup's validation: `validation_accuracy` on `split` of the first source
  run's task, sampled as the evaluation `settings` say.

  Args:
    first_run: the first source run (its task, task arguments and training settings).
    settings: the evaluation settings (task fields unset = the run's).
    split: the validation split.
    tokenizer: the tokenizer the candidates are sampled with.
    max_examples: the first N examples of the split (0 = all).
    mesh: device mesh of the sampling.

  Returns:
    (soup_score, the validation record for `merge_to_run_dir`'s `soup_validation`).

  Raises:
    MergeInputError: the task cannot load the split (field "validation_split").
    EvalSettingsError: no task to evaluate, or one that does not build.
  """
  from memdyn_jax.evaluation import run as run_evaluation
  settings = run_evaluation.for_run(first_run, settings)
  task = run_evaluation.load_task(first_run, settings)
  try:
    examples = task.load(split, settings.task_path)
  except (ValueError, FileNotFoundError) as e:
    raise MergeInputError("validation_split", f"task {task.name!r} cannot load split "
                          f"{split!r}: {e}") from e
  examples = examples[:max_examples or None]
  params = run_evaluation.sampling_params(task, settings)
  cfg = checkpoints.read_run_info(first_run)["config"]
  score = validation_accuracy(task, examples, tokenizer, params, batch_size=settings.batch_size,
                              max_length=cfg["max_length"], append_eos=cfg["append_eos"],
                              mesh=mesh)
  return score, {"split": split, "examples": len(examples), "metric": "accuracy",
                 "sampling": dataclasses.asdict(params)}


# -------------------------------------------------------------------------------- merge


@dataclasses.dataclass(frozen=True)
class MergeOutcome:
  """What `merge_to_run_dir` did: the "merge" info, and whether it was already done."""
  info: Mapping[str, Any]
  skipped: bool


def _check_existing(out_dir: str, request: Mapping[str, Any]) -> Mapping[str, Any] | None:
  if not os.path.exists(out_dir):
    return None
  try:
    info = read_merge_info(out_dir)
  except FileNotFoundError:
    info = None
  if info is None:
    raise MergeInputError("output_dir", f"{out_dir} exists and is not a merged run directory")
  diffs = checkpoints.differences(_stated_request(out_dir, info.get("request", {})),
                                  dict(request))
  if diffs:
    raise MergeInputError("output_dir", f"{out_dir} holds another merge (saved -> now: "
                          f"{'; '.join(diffs[:4])}); use a new --output_dir")
  return info


def merge_to_run_dir(out_dir: str, method: str, sources: Sequence[CheckpointRef], *,
                     config: MergeConfig | None = None, base: BaseRef | None = None,
                     soup_score: Callable[[Any], float] | None = None,
                     soup_validation: Mapping[str, Any] | None = None, tokenizer=None,
                     mesh=None, log: Callable[[str], None] = print) -> MergeOutcome:
  """Merges checkpoints into a new run directory (see the module docstring).

  Args:
    out_dir: the output run directory (must not exist, or hold this very merge).
    method: one of `METHODS`; "greedy_soup" is Wortsman et al.'s greedy uniform soup of
      the sources scored by `soup_score`.
    sources: the checkpoints (greedy_soup: the candidates).
    config: the `MergeConfig` (not for greedy_soup).
    base: the base model; None = the first source run's base for the methods that need
      one, none otherwise.
    soup_score: greedy_soup: model -> validation score (e.g. `validation_accuracy`).
    soup_validation: greedy_soup: how the score is computed (split, examples, metric), for
      the record.
    tokenizer: saved beside the HF export (e.g. the base model's).
    mesh: device mesh of the merge (default: the first local device).
    log: progress messages.

  Returns:
    A `MergeOutcome`.

  Raises:
    MergeInputError: bad inputs, naming the field (checkpoints, base, output_dir, ...).
    merging.MergeConfigError: weights that do not match the models.
  """
  import jax
  from flax import nnx

  from memdyn_jax import models
  from memdyn_jax import sharding as sharding_lib
  from memdyn_jax.train.config import TrainConfig

  if method not in METHODS:
    raise MergeInputError("method", f"{method!r} is not one of {list(METHODS)}")
  greedy = method == GREEDY_SOUP
  if greedy and (config is not None or soup_score is None):
    raise MergeInputError("method", "greedy_soup takes a soup_score and no MergeConfig")
  if not greedy and (config is None or config.method != method):
    raise MergeInputError("method", f"{method} needs its MergeConfig")
  if not greedy:
    config.model_weights(len(sources))  # fail before any reading
  out_dir = os.path.abspath(out_dir)
  if base is None and not greedy and config.needs_base:
    base = default_base(sources[0])
  request = merge_request(method, sources, base, config,
                          **({"validation": dict(soup_validation or {})} if greedy else {}))
  done = _check_existing(out_dir, request)
  if done is not None:
    return MergeOutcome(done, skipped=True)

  first = sources[0].run_dir
  info = checkpoints.read_run_info(first)
  cfg = TrainConfig.from_dict(info["config"])
  mesh = mesh if mesh is not None else sharding_lib.make_mesh(devices=jax.local_devices()[:1])
  graphdef, target, rest = checkpoints.abstract_params(first, mesh)
  flat = nnx.to_flat_state(target)
  shapes = {merging.path_str(p): v.get_value().shape for p, v in flat}
  shardings = {merging.path_str(p): v.get_value().sharding for p, v in flat}
  inputs, base_source = [], None
  try:
    for ref in sources:
      inputs.append(_checkpoint_source(ref, shardings, "checkpoints"))
    if base is not None:
      base_source = _base_source(base, shardings, cfg, mesh, sharding_lib.DEFAULT_RULES)
    for ref, source in zip(sources, inputs):
      _check_layout(source, shapes, "checkpoints", str(ref))
    if base_source is not None:
      _check_layout(base_source, shapes, "base", base_source.label)
    extra: dict[str, Any] = {}
    if greedy:
      result = merging.greedy_soup(
          inputs, lambda params: soup_score(nnx.merge(graphdef, params, *rest)),
          template=target)
      params, merged = result.params, [sources[i] for i in result.ingredients]
      extra = {"candidates": [s.to_dict() for s in sources],
               "validation": {**dict(soup_validation or {}),
                              "candidate_scores": list(result.individual_scores),
                              "soup_score": result.score,
                              "history": [list(h) for h in result.history]}}
      log(f"greedy soup: {len(merged)} of {len(sources)} checkpoints, validation score "
          f"{result.score:.4f}")
    else:
      sink = merging.PytreeSink(template=target)
      try:
        # Stacked blocks are merged per layer: the model's structure names the axes.
        merging.merge(config, base_source, inputs, sink, layer_axes=merging.layer_axes_of(target))
      except merging.MergeConfigError:
        raise
      except ValueError as e:  # model counts, a base a method does not take
        raise MergeInputError("base" if "base" in str(e) else "checkpoints", str(e)) from e
      params, merged = sink.result(), list(sources)
  finally:
    for source in inputs + ([base_source] if base_source is not None else []):
      source.close()

  last = max(merged, key=lambda s: s.step)
  step = last.step
  merge = {**request, "method": method, "sources": [s.to_dict() for s in merged],
           "step": step, **extra, "request": request}
  partial = out_dir + ".partial"
  is_writer = jax.process_index() == 0
  if is_writer:
    try:  # an interrupted earlier attempt is removed; a folder of anything else never is
      fileio.check_replaceable(partial, MERGE_PARTIAL, out_dir)
    except fileio.NotReplaceableError as e:
      raise MergeInputError("output_dir", str(e)) from e
    shutil.rmtree(partial, ignore_errors=True)
    fileio.mark_output(partial, MERGE_PARTIAL, out_dir)
  epoch = checkpoints.read_meta(last.run_dir, last.step).get("epoch")
  checkpoints.save_params(partial, step, params, {"step": step, "epoch": epoch,
                                                  "config": cfg.to_dict(), MERGE_FIELD: merge})
  model = nnx.merge(graphdef, params, *rest)
  with open(os.path.join(first, checkpoints.MODEL_CONFIG)) as f:
    model_config = json.load(f)
  models.save_pretrained(model, models.from_hf_config(model_config),
                         os.path.join(partial, HF_DIR))
  if is_writer:
    if tokenizer is not None:
      tokenizer.save_pretrained(os.path.join(partial, HF_DIR))
    from memdyn_jax.train.checkpoints import EXAMPLES_FILE
    for name in (checkpoints.MODEL_CONFIG, EXAMPLES_FILE):
      if os.path.exists(os.path.join(first, name)):
        shutil.copyfile(os.path.join(first, name), os.path.join(partial, name))
    with open(os.path.join(partial, checkpoints.RUN_INFO), "w") as f:
      json.dump({**info, MERGE_FIELD: merge}, f, indent=2, sort_keys=True)
    os.rename(partial, out_dir)  # the output directory appears only when complete
  log(f"merged {len(merged)} checkpoint(s) ({method}) -> {out_dir} (step {step})")
  return MergeOutcome(merge, skipped=False)


def evaluation_settings(first_run: str, settings: EvalSettings) -> EvalSettings:
  """The settings a merge of `first_run`'s checkpoints is evaluated with: unset task
  arguments are the run's (its examples.json), as its evaluation would take them."""
  if settings.task_kwargs is not None:
    return settings
  listing = checkpoints.read_examples_listing(first_run)
  if listing is None:
    return settings
  return dataclasses.replace(settings, task_kwargs=listing.get("task_kwargs", {}))


def merge_for_evaluation(out_dir: str, method: str, sources: Sequence[CheckpointRef],
                         settings: EvalSettings, *, config: MergeConfig | None = None,
                         base: BaseRef | None = None, validation_split: str | None = None,
                         validation_examples: int = 0, mesh=None,
                         log: Callable[[str], None] = print) -> MergeOutcome:
  """`merge_to_run_dir` of a merge that is evaluated as a run (experiments/merge.py): the
  HF export holds the evaluation's tokenizer, and a greedy soup scores its candidates on
  `validation_split` (`soup_scorer`).

  Args:
    out_dir, method, sources, config, base, mesh, log: as `merge_to_run_dir`'s.
    settings: the evaluation settings (`evaluation_settings`): the tokenizer (default:
      the first source run's base model's) and, for greedy_soup, the sampling.
    validation_split: greedy_soup: the split scoring the soups.
    validation_examples: greedy_soup: the first N examples of the split (0 = all).

  Returns:
    A `MergeOutcome`.

  Raises:
    MergeInputError: bad inputs, naming the field (checkpoints, base, output_dir,
      validation_split, ...).
    merging.MergeConfigError: weights that do not match the models.
    EvalSettingsError: a tokenizer or task that does not load.
  """
  from memdyn_jax.evaluation import run as run_evaluation
  first_run = sources[0].run_dir
  tokenizer = run_evaluation.load_tokenizer(first_run, settings)
  score, validation = None, None
  if method == GREEDY_SOUP:
    if not validation_split:
      raise MergeInputError("validation_split", "is required by greedy_soup")
    score, validation = soup_scorer(first_run, settings, validation_split, tokenizer,
                                    max_examples=validation_examples, mesh=mesh)
  return merge_to_run_dir(out_dir, method, sources, config=config, base=base,
                          soup_score=score, soup_validation=validation, tokenizer=tokenizer,
                          mesh=mesh, log=log)
