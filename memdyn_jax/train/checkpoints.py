"""Run directories and orbax checkpoints of training runs.

Layout of a run directory:

    run.json             TrainConfig, base model reference (path, dtypes, LoRA), data
                         fingerprint: what the run *is*; compared on resume.
    model_config.json    the base model's HF config.json (rebuilds the architecture).
    checkpoints/<step>/  orbax: "params" (trained variables: all params, or only the LoRA
                         adapters), "opt_state", "rngs", "meta" (JSON: step, examples seen,
                         epoch, sampler state, draw counts, config).
    metrics.jsonl, tensorboard/   written by the training loop.

Checkpoints are written asynchronously and atomically by orbax (a step directory appears
only once complete; temporary directories of an interrupted save are never listed and are
cleaned up when a manager opens the run), and all are kept.
`restore(run_dir, step, mesh)` rebuilds the trained model on any mesh for analysis.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import shutil
import sys
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx
from jax.sharding import Mesh

from memdyn_jax import fileio, models
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.tasks.base import Example, Task
from memdyn_jax.train.config import TrainConfig

RUN_INFO = "run.json"
MODEL_CONFIG = "model_config.json"
CHECKPOINT_DIR = "checkpoints"
FORMAT_VERSION = 1


class RunMismatchError(ValueError):
  """The run directory was created by a different configuration / model / dataset."""


_STATUS_CODE = re.compile(r"[A-Z][A-Z_]+(?=:)")  # tensorstore's, leading its message
# orbax 0.12.8 (serialization._read_array_index_and_device_put) re-raises anything that ends
# the read of an array's bytes as a plain `Exception` with this message, the cause chained.
_ORBAX_ARRAY_READ = "Encountered error while reading array index"


class CheckpointReadError(ValueError):
  """A checkpoint on disk cannot be read (truncated or corrupt array files).

  Attributes:
    run_dir, step: which checkpoint.
    path: its folder; removing it lets training resume from the one before.
  The underlying storage error is chained as `__cause__`.
  """

  def __init__(self, run_dir: str, step: int, cause: BaseException):
    self.run_dir, self.step = run_dir, int(step)
    self.path = os.path.join(checkpoint_dir(run_dir), str(int(step)))
    # The rest of tensorstore's message is a multi-line storage spec, kept in __cause__.
    code = _STATUS_CODE.match(str(cause))
    status = code.group(0) if code else "unreadable"
    super().__init__(
        f"{run_dir}: checkpoint at step {step} cannot be read ({type(cause).__name__}: "
        f"{status}); it is truncated or corrupt. Remove {self.path} (training resumes from "
        f"the checkpoint before it and recomputes it) or leave this step out")


class _ReportedReadFailure(logging.Filter):
  """Drops asyncio's "exception was never retrieved" records about one checkpoint folder:
  the failures of the reads that raced the one `_restore` reported (see there)."""

  def __init__(self, path: str):
    super().__init__()
    self.path = path

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return exc is None or self.path not in str(exc)


def _is_late_read_delivery(unraisable) -> bool:
  """A tensorstore read finishing after orbax closed its event loop: its callback's
  `call_soon_threadsafe` raises "Event loop is closed", which Python reports as unraisable."""
  if unraisable.exc_type is not RuntimeError or str(unraisable.exc_value) != "Event loop is closed":
    return False
  tb = unraisable.exc_traceback
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


def _is_abandoned_read(unraisable) -> bool:
  """An array read still waiting when orbax gave up on the restore: its coroutine is closed
  unfinished, and orbax's wrapper (`_ORBAX_ARRAY_READ`, which catches BaseException) turns
  the GeneratorExit of the close into a plain Exception, reported as unraisable. Such a read
  did not fail; the failure that ended the restore is raised on its own."""
  exc = unraisable.exc_value
  return (_is_orbax_read_error(exc)
          and isinstance(exc.__cause__, (GeneratorExit, asyncio.CancelledError)))


def _quiet_late_read_deliveries() -> None:
  """Installs (once) an unraisable hook that drops `_is_late_read_delivery` and
  `_is_abandoned_read` reports and passes every other one to the hook that was there."""
  previous = sys.unraisablehook
  if getattr(previous, "_memdyn_quiets_late_reads", False):
    return

  def hook(unraisable):
    if not (_is_late_read_delivery(unraisable) or _is_abandoned_read(unraisable)):
      previous(unraisable)

  hook._memdyn_quiets_late_reads = True
  sys.unraisablehook = hook


def _storage_error(e: BaseException) -> BaseException | None:
  """The storage failure behind `e`, or None when `e` is not one: an OSError, a truncated
  JSON item, tensorstore's ValueError with a status code (DATA_LOSS, OUT_OF_RANGE, ...)
  raised opening a checkpoint's stores, or orbax's plain Exception wrapping one of these
  (raised reading an array's bytes: a cut, emptied or missing data file)."""
  if isinstance(e, (OSError, json.JSONDecodeError)):
    return e
  if isinstance(e, ValueError):
    return e if _STATUS_CODE.match(str(e)) else None
  if _is_orbax_read_error(e) and e.__cause__ is not None:
    return _storage_error(e.__cause__)
  return None


def _is_orbax_read_error(e: BaseException) -> bool:
  return type(e) is Exception and str(e).startswith(_ORBAX_ARRAY_READ)


@contextlib.contextmanager
def reading_checkpoint(run_dir: str, step: int):
  """Reads of one checkpoint's files go in this block: a storage failure (`_storage_error`:
  an OSError, a truncated JSON item, tensorstore's ValueError with a status code such as
  DATA_LOSS, or orbax's wrapper of one) leaves it as one CheckpointReadError and prints
  nothing else; any other error passes.

  Why nothing else is printed: orbax reads a checkpoint's array files concurrently, raises
  the first failure and closes its event loop; the other reads end later, while the error
  propagates and after: a failed one is logged by asyncio as a never-retrieved exception (a
  multi-line traceback per file), and one still running when the loop closed is reported as
  an unraisable "Event loop is closed" (measured: up to 66 stderr lines around a binary's
  one-line error, on a loaded 2-core box); one not yet started is closed, which orbax's
  wrapper reports as an unraisable Exception (`_is_abandoned_read`: up to 520 lines with one
  data file cut in half). All repeat the damage the CheckpointReadError names, or are no
  failure at all, so they are dropped: the asyncio records that name this checkpoint's
  folder, late deliveries into a closed loop and abandoned reads (hooked before reading,
  since they can come before the failure surfaces). Every other record and report passes.
  """
  _quiet_late_read_deliveries()
  try:
    yield
  except Exception as e:  # noqa: BLE001 - orbax's wrapper is a plain Exception: re-raised
    # unless `_storage_error` recognises it
    if _is_orbax_read_error(e) and isinstance(e.__cause__, KeyboardInterrupt):
      raise e.__cause__  # noqa: B904 - the Ctrl-C / stop signal (`signals.StopRequested`) itself
    cause = _storage_error(e)
    if cause is None:
      raise
    error = CheckpointReadError(run_dir, step, cause)
    logging.getLogger("asyncio").addFilter(_ReportedReadFailure(error.path))
    raise error from e


def _restore(mngr: ocp.CheckpointManager, run_dir: str, step: int, args):
  """`mngr.restore` inside `reading_checkpoint`."""
  with reading_checkpoint(run_dir, step):
    return mngr.restore(step, args=args)


class RunDirError(ValueError):
  """The run directory path is a file, or a non-empty folder that holds no run."""


def check_run_dir_path(run_dir: str) -> None:
  """Refuses a path that cannot become (or resume) a run directory, before anything is
  written: a file, or a non-empty folder without run.json (writing into it would mix a run
  with someone else's files).

  Raises:
    RunDirError: names the path and what to do.
  """
  if os.path.exists(run_dir) and not os.path.isdir(run_dir):
    raise RunDirError(f"{run_dir} is a file, not a run directory; pass a new or empty folder")
  if os.path.isdir(run_dir) and not os.path.exists(os.path.join(run_dir, RUN_INFO)):
    entries = sorted(e for e in os.listdir(run_dir) if not e.startswith("."))
    if entries:
      shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
      raise RunDirError(f"{run_dir} is not empty ({shown}) and holds no run (no {RUN_INFO}); "
                        f"pass a new or empty folder")


def checkpoint_dir(run_dir: str) -> str:
  return os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)


def run_info(cfg: TrainConfig, *, model_path: str, data_fingerprint: str,
             num_examples: int) -> dict[str, Any]:
  """What identifies a run: compared field by field when resuming."""
  return {
      "format": FORMAT_VERSION,
      "config": cfg.to_dict(),
      "model": {"path": os.path.abspath(model_path) if os.path.exists(model_path) else model_path,
                "compute_dtype": cfg.compute_dtype, "param_dtype": cfg.param_dtype,
                "lora": cfg.lora},
      "data": {"fingerprint": data_fingerprint, "num_examples": int(num_examples)},
  }


def read_run_info(run_dir: str) -> dict[str, Any]:
  path = os.path.join(run_dir, RUN_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{run_dir} is not a training run directory (no {RUN_INFO})")
  with open(path) as f:
    return json.load(f)


SUBSET_FILE = "subset.json"


def write_subset(run_dir: str, data_fraction: float, indices) -> None:
  """Records the fixed `data_fraction` subset a run trains on (rows of its training data)."""
  fileio.atomic_write_json(os.path.join(run_dir, SUBSET_FILE),
                           {"data_fraction": float(data_fraction),
                            "indices": [int(i) for i in indices]})


def read_subset(run_dir: str) -> list[int] | None:
  """Rows of its training data a run draws from, or None when it draws from all of them.

  Raises:
    RunDirError: subset.json is not the listing `write_subset` writes.
  """
  path = os.path.join(run_dir, SUBSET_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      indices = json.load(f)["indices"]
    return [int(i) for i in indices]
  except (ValueError, KeyError, TypeError) as e:
    raise RunDirError(f"{path}: not a subset listing ({type(e).__name__}: {e}); "
                      "it is rewritten by re-running training on this run") from e


def init_run_dir(run_dir: str, info: Mapping[str, Any], model_dir: str) -> None:
  """Creates the run directory, or checks that an existing one describes the same run.

  Raises:
    RunDirError: `run_dir` is a file, or a non-empty folder without run.json.
    RunMismatchError: `run.json` exists and differs from `info` (names every difference).
  """
  check_run_dir_path(run_dir)
  path = os.path.join(run_dir, RUN_INFO)
  if os.path.exists(path):
    old = read_run_info(run_dir)
    if "config" in old:
      old = {**old, "config": with_defaults(old["config"], TrainConfig.from_dict)}
    diffs = differences(old, dict(info))
    if diffs:
      raise RunMismatchError(
          f"{run_dir} holds a run with a different configuration; refusing to resume it "
          f"(use a new --output_dir). Differences (saved -> now): " + "; ".join(diffs))
    return
  if jax.process_index() != 0:
    return
  os.makedirs(run_dir, exist_ok=True)
  shutil.copyfile(os.path.join(model_dir, "config.json"), os.path.join(run_dir, MODEL_CONFIG))
  fileio.atomic_write_json(path, info, indent=2, sort_keys=True)  # always complete


def with_defaults(stored: Mapping[str, Any], build: Callable[[dict], Any]) -> dict[str, Any]:
  """A stored config dict (run.json's, sweep.json's) as `build(stored).to_dict()` gives it:
  fields added to the config class since it was written take their defaults, so comparing
  it with today's config finds what differs, not which version wrote it. As stored when it
  no longer builds (a renamed field then shows as a difference)."""
  try:
    return json.loads(json.dumps(build(dict(stored)).to_dict()))
  except (TypeError, ValueError):
    return dict(stored)


def differences(old: Any, new: Any, prefix: str = "") -> list[str]:
  """"key.path: old -> new" for every leaf where two JSON-like dicts differ."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    out = []
    for k in sorted(set(old) | set(new)):
      out += differences(old.get(k, "<absent>"), new.get(k, "<absent>"), f"{prefix}{k}.")
    return out
  return [] if old == new else [f"{prefix.rstrip('.')}: {old!r} -> {new!r}"]


def make_manager(run_dir: str, *, async_save: bool = True, read_only: bool = False
                 ) -> ocp.CheckpointManager:
  """An orbax manager over `run_dir/checkpoints` that keeps every checkpoint."""
  options = ocp.CheckpointManagerOptions(
      enable_async_checkpointing=async_save, cleanup_tmp_directories=not read_only,
      create=not read_only)
  return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options,
                               item_names=("params", "opt_state", "rngs", "meta"))


def list_steps(run_dir: str) -> list[int]:
  """Steps of the complete checkpoints of a run, ascending ([] if none)."""
  if not os.path.isdir(checkpoint_dir(run_dir)):
    return []
  mngr = make_manager(run_dir, read_only=True)
  try:
    return sorted(mngr.all_steps())
  finally:
    mngr.close()


def _savable(tree):
  # Typed PRNG keys are stored as their raw uint32 data.
  return jax.tree.map(lambda x: jax.random.key_data(x)
                      if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x, tree)


def save_checkpoint(mngr: ocp.CheckpointManager, step: int, *, params, opt_state, rngs,
                    meta: Mapping[str, Any]) -> None:
  """Starts an async save of one step (every process must call it)."""
  items = dict(params=ocp.args.StandardSave(params),
               opt_state=ocp.args.StandardSave(opt_state),
               meta=ocp.args.JsonSave(dict(meta)))
  if jax.tree.leaves(rngs):  # orbax rejects empty trees; most models have no RNG state
    items["rngs"] = ocp.args.StandardSave(_savable(rngs))
  mngr.save(step, force=True, args=ocp.args.Composite(**items))


def restore_checkpoint(mngr: ocp.CheckpointManager, step: int, *, params, opt_state, rngs):
  """Restores a step into the layout (shapes, dtypes, shardings) of the given targets,
  which may be concrete arrays or `jax.ShapeDtypeStruct`s with shardings.

  Returns:
    (params, opt_state, rngs, meta).

  Raises:
    CheckpointReadError: the step's files cannot be read.
  """
  items = dict(params=ocp.args.StandardRestore(params),
               opt_state=ocp.args.StandardRestore(opt_state), meta=ocp.args.JsonRestore())
  if jax.tree.leaves(rngs):
    items["rngs"] = ocp.args.StandardRestore(_savable(rngs))
  restored = _restore(mngr, str(mngr.directory.parent), step, ocp.args.Composite(**items))
  if not jax.tree.leaves(rngs):
    return restored["params"], restored["opt_state"], rngs, restored["meta"]
  new_rngs = jax.tree.map(
      lambda like, x: jax.random.wrap_key_data(x, impl=jax.random.key_impl(like))
      if jnp.issubdtype(like.dtype, jax.dtypes.prng_key) else x, rngs, restored["rngs"])
  return restored["params"], restored["opt_state"], new_rngs, restored["meta"]


def read_meta(run_dir: str, step: int) -> dict[str, Any]:
  """The JSON metadata of one checkpoint."""
  mngr = make_manager(run_dir, read_only=True)
  try:
    return _restore(mngr, run_dir, step,
                    ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mngr.close()


def _abstract_like(state, mesh: Mesh, rules) -> Any:
  """ShapeDtypeStructs with the rule-given sharding on `mesh` for each variable of `state`."""
  def one(var):
    return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype,
                                            sharding=sharding_lib.param_sharding(var, mesh, rules)))
  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def restore(run_dir: str, step: int | None = None, mesh: Mesh | None = None, *,
            merge_lora: bool = True, rules=sharding_lib.DEFAULT_RULES
            ) -> tuple[nnx.Module, dict[str, Any]]:
  """Loads the model of a run's checkpoint onto `mesh`, for analysis.

  Full fine-tuning runs need only the run directory; LoRA runs also read the base model
  recorded in `run.json` and apply the saved adapters (merged into the weights unless
  `merge_lora=False`).

  Args:
    run_dir: the training run directory.
    step: checkpoint step; None = the latest.
    mesh: target mesh (any shape); None = the first local device.
    merge_lora: fold LoRA adapters into the weights.
    rules: logical-axis sharding rules.

  Returns:
    (model, meta): meta is the checkpoint's JSON metadata plus "run" (run.json) and "step".

  Raises:
    CheckpointReadError: the step's files cannot be read.
  """
  info = read_run_info(run_dir)
  cfg = TrainConfig.from_dict(info["config"])
  steps = list_steps(run_dir)
  if not steps:
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise ValueError(f"{run_dir} has no checkpoint at step {step}; steps: {steps}")
  if mesh is None:
    mesh = sharding_lib.make_mesh(devices=jax.local_devices()[:1])
  if cfg.lora:
    from memdyn_jax.train import lora as lora_lib
    from memdyn_jax.models import hf_io
    model = load_base_model(hf_io.resolve_checkpoint_dir(info["model"]["path"]), cfg, mesh, rules)
    lora_lib.apply_lora(model, lora_config(cfg), nnx.Rngs(cfg.seed))
    sharding_lib.shard_model(model, mesh, rules)
    wrt = lora_lib.LoraParam
  else:
    model = _abstract_run_model(run_dir, cfg)
    wrt = nnx.Param
  graphdef, params, *rest = nnx.split(model, wrt, ...)
  if not cfg.lora and any(jax.tree.leaves(r) for r in rest):
    raise ValueError("model has non-parameter state that full fine-tuning checkpoints lack")
  target = _abstract_like(params, mesh, rules)
  mngr = make_manager(run_dir, read_only=True)
  try:
    restored = _restore(mngr, run_dir, step, ocp.args.Composite(
        params=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  model = nnx.merge(graphdef, restored["params"], *rest)
  if cfg.lora and merge_lora:
    lora_lib.merge_lora(model)
  meta = dict(restored["meta"])
  meta.update(run=info, step=step)
  return model, meta


def _abstract_run_model(run_dir: str, cfg: TrainConfig) -> nnx.Module:
  with open(os.path.join(run_dir, MODEL_CONFIG)) as f:
    model_cfg = models.from_hf_config(json.load(f))
  return models.abstract_model(model_cfg, dtype=jnp.dtype(cfg.compute_dtype),
                               param_dtype=jnp.dtype(cfg.param_dtype))


def abstract_params(run_dir: str, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES):
  """The model of a full fine-tuning run without allocating it.

  Returns:
    (graphdef, params, rest): `params` is the nnx State of the parameters as
    ShapeDtypeStructs placed on `mesh` by `rules` (a restore or merge target); `rest` the
    other states, for `nnx.merge(graphdef, params, *rest)`.
  """
  cfg = TrainConfig.from_dict(read_run_info(run_dir)["config"])
  graphdef, params, *rest = nnx.split(_abstract_run_model(run_dir, cfg), nnx.Param, ...)
  return graphdef, _abstract_like(params, mesh, rules), rest


def save_params(run_dir: str, step: int, params, meta: Mapping[str, Any]) -> None:
  """Writes (synchronously) a checkpoint holding only parameters and metadata, e.g. a merged
  model's, which has no optimizer state; `restore` reads it like a training checkpoint."""
  mngr = make_manager(run_dir, async_save=False)
  try:
    mngr.save(step, force=True, args=ocp.args.Composite(params=ocp.args.StandardSave(params),
                                                         meta=ocp.args.JsonSave(dict(meta))))
    mngr.wait_until_finished()
  finally:
    mngr.close()


def load_base_model(model_dir: str, cfg: TrainConfig, mesh: Mesh,
                    rules=sharding_lib.DEFAULT_RULES) -> nnx.Module:
  """The base model of a run, its parameters placed on `mesh` by `rules`."""
  dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
  kwargs = dict(dtype=dtype, param_dtype=param_dtype, rules=rules, remat=cfg.remat)
  model, _ = models.from_pretrained(model_dir, mesh=mesh, **kwargs)
  return model


def lora_config(cfg: TrainConfig):
  """The `LoraConfig` a TrainConfig asks for."""
  from memdyn_jax.train import lora as lora_lib
  return lora_lib.LoraConfig(rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                             target_modules=tuple(cfg.lora_target_modules))


HF_EXPORT = "hf_export"  # the output-marker kind of export_hf's folders
GENERATION_CONFIG = "generation_config.json"


def export_hf(run_dir: str, out_dir: str, step: int | None = None, *, dtype=None,
              tokenizer_from: str | None = None) -> int:
  """Writes one checkpoint of a run as an HF model directory (config.json, safetensors, the
  base model's tokenizer files and generation_config.json) that
  `transformers.AutoModelForCausalLM` and `models.from_pretrained` load. LoRA adapters are
  merged into the weights. The folder appears only when complete. An existing `out_dir` is
  replaced only if it is an earlier export of this run (its output marker says so) or
  empty: any other folder (the run itself, its parent, a user's folder) is refused before
  anything is read or written.

  Args:
    run_dir: the training run directory.
    out_dir: the HF directory to write.
    step: checkpoint step; None = the latest.
    dtype: stored dtype (e.g. "bfloat16"); None = the parameters' own.
    tokenizer_from: where the tokenizer files come from; default the run's base model.

  Returns:
    The step exported.

  Raises:
    fileio.NotReplaceableError: `out_dir` exists and is not an earlier export of this run.
    FileNotFoundError: not a run directory, or no checkpoint.
    ValueError: no such step; CheckpointReadError: its files cannot be read.
  """
  read_run_info(run_dir)  # a missing run is reported as such, before the output is judged
  fileio.check_replaceable(out_dir, HF_EXPORT, run_dir)
  model, meta = restore(run_dir, step)
  with open(os.path.join(run_dir, MODEL_CONFIG)) as f:
    model_cfg = models.from_hf_config(json.load(f))
  source = tokenizer_from or meta["run"]["model"]["path"]

  def write(tmp: str) -> None:
    models.save_pretrained(model, model_cfg, tmp, dtype=dtype)
    if jax.process_index() == 0:
      models.load_tokenizer(source).save_pretrained(tmp)
      generation = os.path.join(models.resolve_checkpoint_dir(source), GENERATION_CONFIG)
      if os.path.exists(generation):  # sampling defaults (eos ids) of the base model
        shutil.copyfile(generation, os.path.join(tmp, GENERATION_CONFIG))

  fileio.replace_dir(write, out_dir, kind=HF_EXPORT, source=run_dir)
  return int(meta["step"])


# ------------------------------------------------------------------ examples listing


EXAMPLES_FILE = "examples.json"


def read_examples_listing(run_dir: str) -> dict[str, Any] | None:
  """The run's examples.json (task, task_kwargs, split, ids of the training rows), or None."""
  file = os.path.join(run_dir, EXAMPLES_FILE)
  if not os.path.exists(file):
    return None
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def trained_examples(run_dir: str, task: Task, split: str | None = None,
                     path: str | None = None) -> list[Example]:
  """The rows of a run's training data, in training-row order (a `data_fraction` < 1 run
  draws from a subset of them: `drawn_examples`).

  Uses `run_dir/examples.json` (written by experiments/train.py: row index -> example id)
  when present; otherwise the task's whole `split` (default "train").

  Raises:
    ValueError: examples.json names ids the task does not produce (a different
      --task_kwargs / --task_path than at training time).
  """
  listing = read_examples_listing(run_dir)
  file = os.path.join(run_dir, EXAMPLES_FILE)
  split = split or (listing or {}).get("split", "train")
  examples = task.load(split, path)
  if listing is None:
    return examples
  by_id = {ex.id: ex for ex in examples}
  missing = [i for i in listing["ids"] if i not in by_id]
  if missing:
    raise ValueError(f"{file}: {len(missing)} trained example ids (e.g. {missing[0]!r}) are "
                     f"not in task {task.name!r} split {split!r}; use the task arguments "
                     "the run was trained with")
  return [by_id[i] for i in listing["ids"]]


def drawn_examples(run_dir: str, trained: Sequence[Example]) -> list[Example]:
  """Of a run's training rows (`trained_examples`), those its sampler draws from: the fixed
  subset of a `data_fraction` < 1 run (subset.json), else all. A run's train split is scored
  on these, so its memorization and PreMemAcc cover only examples it has seen.

  Raises:
    RunDirError: subset.json is damaged or names rows the run does not have.
  """
  indices = read_subset(run_dir)
  if indices is None:
    return list(trained)
  bad = [i for i in indices if not 0 <= i < len(trained)]
  if bad:
    raise RunDirError(f"{run_dir}/{SUBSET_FILE} names row {bad[0]}; "
                                  f"the run's training data has rows 0..{len(trained) - 1}")
  return [trained[i] for i in indices]
