"""Sweeps: a grid of fine-tuning runs, one run directory per cell, each trained then
evaluated, resumable cell by cell.

The grid is learning rate x epochs x data fraction x base preset (`Grid`), or exactly the
runs a paper reports (`Grid.paper_grid`, e.g. Kang et al.'s "kang_llama3_gsm8k": the
`train.config.PRESETS` grids). Layout of a sweep directory:

    sweep.json      the sweep: model, task, grid, evaluation settings and every cell (name,
                    run directory, TrainConfig); a re-run is compared against it.
    <cell name>/    the cell's run directory (`memdyn_jax.train.checkpoints`) with its eval/ records
    analysis/       the tables and plots of `analyze` (`report.analyze_sweep`, as
                    experiments/analyze.py writes them)

A cell whose final checkpoint exists is not trained again, one whose every checkpoint and
evaluation unit has records is not evaluated again; a cell interrupted mid-training resumes
from its latest checkpoint (`loop.train`), mid-evaluation from its missing record files.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

from memdyn_jax import fileio
from memdyn_jax.errors import FieldError
from memdyn_jax.evaluation import run as run_evaluation
from memdyn_jax.evaluation.run import EvalSettings
from memdyn_jax.train import config as config_lib
from memdyn_jax.train.config import TrainConfig
from memdyn_jax.train.task_run import TaskSpec

SWEEP_FILE = "sweep.json"
ANALYSIS_DIR = "analysis"
FORMAT_VERSION = 1
# Grid axis -> the TrainConfig field it sets.
AXES = {"learning_rates": "learning_rate", "epochs": "num_epochs",
        "data_fractions": "data_fraction"}


class SweepError(FieldError):
  """A bad sweep setting; `field` names it (and the sweep binary's flag)."""


class SweepStopped(Exception):
  """SIGTERM / SIGINT stopped the sweep after `cell` saved its state; a re-run continues."""

  def __init__(self, cell: str, signum: int):
    super().__init__(f"stopped by signal {signum} in cell {cell} after it saved")
    self.cell, self.signum = cell, signum


def _floats(field: str, values) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in values)
  except (TypeError, ValueError) as e:
    raise SweepError(field, f"not numbers: {list(values)}") from e


@dataclasses.dataclass(frozen=True)
class Grid:
  """The cells of a sweep.

  Attributes:
    presets: base configurations (`config.PRESETS` names or "none"), an axis of the grid.
    learning_rates: the learning-rate axis (peak learning rates); empty = the preset's value.
    epochs: the epochs axis (passes over the training set); empty = the preset's value.
    data_fractions: the data-fraction axis (fixed random subsets of the training set);
      empty = the preset's value.
    paper_grid: a preset whose paper grid gives the cells instead of the axes (every run
      the paper reports, in its order).
    overrides: TrainConfig fields set in every cell (not the axes' fields).
    extra_runs: cells added after the grid, each a mapping of TrainConfig fields applied
      on top of `overrides` (with the first preset), e.g. one long half-data run beside a
      learning-rate x epochs grid.
  """
  presets: tuple[str, ...] = ("none",)
  learning_rates: tuple[float, ...] = ()
  epochs: tuple[float, ...] = ()
  data_fractions: tuple[float, ...] = ()
  paper_grid: str = ""
  overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  extra_runs: tuple[Mapping[str, Any], ...] = ()

  def __post_init__(self):
    object.__setattr__(self, "presets", tuple(self.presets))
    for axis in AXES:
      object.__setattr__(self, axis, _floats(axis, getattr(self, axis)))
    object.__setattr__(self, "overrides", dict(self.overrides))
    object.__setattr__(self, "extra_runs", tuple(dict(r) for r in self.extra_runs))
    known = {f.name for f in dataclasses.fields(TrainConfig)}
    for field, fields in [("overrides", self.overrides), *(("extra_runs", r)
                                                           for r in self.extra_runs)]:
      unknown = sorted(set(fields) - known)
      if unknown:
        raise SweepError(field, f"no such TrainConfig field(s) {unknown}")
    if self.paper_grid:
      if self.paper_grid not in config_lib.PRESETS:
        raise SweepError("paper_grid", f"{self.paper_grid!r} is not one of "
                         f"{sorted(config_lib.PRESETS)}")
      if self.presets != ("none",) or any(getattr(self, a) for a in AXES) or self.extra_runs:
        raise SweepError("paper_grid", "gives the whole grid: drop --presets, "
                         "--learning_rates, --epochs, --data_fractions and extra runs")
      set_by_grid = {k for run in config_lib.PRESETS[self.paper_grid].grid for k, _ in run}
      clash = sorted(set_by_grid & set(self.overrides))
      if clash:
        raise SweepError("overrides", f"sets {clash}, which the paper grid varies")
    else:
      if not self.presets:
        raise SweepError("presets", "needs at least one preset (or 'none')")
      bad = [p for p in self.presets if p not in ("none", *config_lib.PRESETS)]
      if bad:
        raise SweepError("presets", f"unknown {bad}; choose from none, "
                         f"{sorted(config_lib.PRESETS)}")
      for axis, field in AXES.items():
        if getattr(self, axis) and field in self.overrides:
          raise SweepError("overrides", f"sets {field}, which --{axis} varies")

  def to_dict(self) -> dict[str, Any]:
    return {"presets": list(self.presets), "paper_grid": self.paper_grid,
            "overrides": dict(self.overrides),
            **({"extra_runs": [dict(r) for r in self.extra_runs]} if self.extra_runs else {}),
            **{axis: list(getattr(self, axis)) for axis in AXES}}

  def configs(self) -> list[tuple[str, TrainConfig]]:
    """(preset, TrainConfig) of every cell, in grid order."""
    try:
      if self.paper_grid:
        preset = config_lib.PRESETS[self.paper_grid]
        return [(self.paper_grid, preset.config(**{**self.overrides, **dict(run)}))
                for run in preset.grid]
      out = []
      for preset in self.presets:
        for lr in self.learning_rates or (None,):
          for epochs in self.epochs or (None,):
            for fraction in self.data_fractions or (None,):
              axes = {"learning_rate": lr, "num_epochs": epochs, "data_fraction": fraction}
              values = {**self.overrides, **{k: v for k, v in axes.items() if v is not None}}
              out.append((preset, config_lib.get_preset(preset, **values)))
      for run in self.extra_runs:
        out.append((self.presets[0], config_lib.get_preset(self.presets[0],
                                                           **{**self.overrides, **run})))
      return out
    except config_lib.ConfigError as e:
      axis = {field: axis for axis, field in AXES.items()}.get(e.field, "overrides")
      raise SweepError(axis, str(e)) from e


def cell_name(cfg: TrainConfig, preset: str | None = None) -> str:
  """The run directory name of a cell, from its values: 'lr2e-05_ep3_frac0.5', prefixed
  by the preset when the grid has several; '_steps3ep' marks a run trained for the steps of
  3 full epochs (Kang et al.'s half/quarter runs)."""
  name = f"lr{cfg.learning_rate:g}_ep{cfg.num_epochs:g}_frac{cfg.data_fraction:g}"
  if cfg.train_steps_as_full_epochs:
    name += f"_steps{cfg.train_steps_as_full_epochs:g}ep"
  return f"{preset}_{name}" if preset else name


@dataclasses.dataclass(frozen=True)
class Cell:
  """One run of the sweep."""
  name: str
  run_dir: str
  preset: str
  config: TrainConfig


@dataclasses.dataclass(frozen=True)
class Sweep:
  """A sweep: what every cell trains on, its grid, and how each run is evaluated.

  Attributes:
    sweep_dir: the sweep directory (absolute).
    model: base model reference (HF directory, hub id, .gguf or 'embedded').
    task: the training data.
    grid: the cells.
    evaluation: evaluation settings (their task fields are the training task's).
    cells: the cells, in grid order.
  """
  sweep_dir: str
  model: str
  task: TaskSpec
  grid: Grid
  evaluation: EvalSettings
  cells: tuple[Cell, ...]

  def to_json(self) -> dict[str, Any]:
    return {"format": FORMAT_VERSION, "model": self.model, "task": self.task.to_dict(),
            "grid": self.grid.to_dict(), "evaluation": self.evaluation.to_dict(),
            "cells": [{"name": c.name, "run_dir": c.run_dir, "preset": c.preset,
                       "config": c.config.to_dict()} for c in self.cells]}

  def select(self, names: Sequence[str]) -> list[Cell]:
    """The named cells (all when `names` is empty), in grid order."""
    if not names:
      return list(self.cells)
    unknown = sorted(set(names) - {c.name for c in self.cells})
    if unknown:
      raise SweepError("cells", f"no such cell(s) {unknown}; cells: "
                       f"{[c.name for c in self.cells]}")
    return [c for c in self.cells if c.name in names]


def make_sweep(sweep_dir: str, model: str, task: TaskSpec, grid: Grid,
               evaluation: EvalSettings) -> Sweep:
  """The sweep of `grid` in `sweep_dir`; the evaluation reads the training task, and its
  unset sampling settings are the task's, stated (`run_evaluation.resolve_sampling`), so
  sweep.json records what is used and an explicit default is the same sweep.

  Raises:
    SweepError: a bad grid, two cells with the same name, an unknown task (field "task")
      or a bad sampling setting (its field).
  """
  sweep_dir = os.path.abspath(sweep_dir)
  configs = grid.configs()
  show_preset = len(grid.presets) > 1
  cells, seen = [], {}
  for preset, cfg in configs:
    name = cell_name(cfg, preset if show_preset else None)
    if name in seen:
      raise SweepError("overrides" if grid.paper_grid else "presets",
                       f"two cells are both {name!r} (they differ only in fields the name "
                       f"does not show: {sorted(cfg.diff(seen[name]))})")
    seen[name] = cfg
    cells.append(Cell(name, os.path.join(sweep_dir, name), preset, cfg))
  evaluation = dataclasses.replace(evaluation, task=task.name, task_kwargs=dict(task.kwargs),
                                   task_path=task.path)
  sampling_task = task.name
  if task.kwargs.get("chat_template"):
    # A chat template has no stop string of the task's ("\nDone."): the end of its turn
    # stops sampling, added at evaluation, when the tokenizer names it.
    from memdyn_jax import tasks
    try:
      sampling_task = tasks.get_task(task.name, **dict(task.kwargs))
    except (ValueError, TypeError) as e:
      raise SweepError("task", f"{e} (task_kwargs {dict(task.kwargs)})") from e
  try:
    evaluation = run_evaluation.resolve_sampling(evaluation, sampling_task)
  except run_evaluation.EvalSettingsError as e:
    raise SweepError(e.field, e.message) from e
  return Sweep(sweep_dir, model, task, grid, evaluation, tuple(cells))


def sweep_file(sweep_dir: str) -> str:
  return os.path.join(os.path.abspath(sweep_dir), SWEEP_FILE)


def read_sweep_json(sweep_dir: str) -> dict[str, Any] | None:
  """The stored sweep.json, or None."""
  path = sweep_file(sweep_dir)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def sweep_from_json(sweep_dir: str, stored: Mapping[str, Any]) -> Sweep:
  """Rebuilds the sweep of a sweep.json (cells recomputed, then checked against it)."""
  task = stored["task"]
  ev = {k: v for k, v in stored["evaluation"].items() if k not in ("task", "task_kwargs",
                                                                  "task_path")}
  sweep = make_sweep(sweep_dir, stored["model"],
                     TaskSpec(task["name"], task["kwargs"], task["path"], task["split"],
                              task["max_examples"]),
                     Grid(**stored["grid"]), EvalSettings(**ev))
  check_same(sweep, stored)
  return sweep


def check_same(sweep: Sweep, stored: Mapping[str, Any]) -> bool:
  """Checks `sweep` against a stored sweep.json: the same sweep, or the same one with new
  cells (an extended grid: its existing cells unchanged, more cells added).

  Run directories are derived from the sweep directory, so a moved sweep still matches.

  Returns:
    True when `sweep` adds cells to the stored one (sweep.json is to be rewritten).

  Raises:
    SweepError: field "sweep_dir", naming only what differs: the model, task or evaluation;
      an existing cell whose training settings changed (its name and fields); or stored cells
      the new grid leaves out.
  """
  from memdyn_jax.train.checkpoints import differences, with_defaults
  new = json.loads(json.dumps(sweep.to_json()))
  old = json.loads(json.dumps(dict(stored)))
  # Settings added since sweep.json was written take their defaults (not a difference), and
  # sampling settings recorded unset (null) before they were resolved are the task's.
  if isinstance(old.get("evaluation"), Mapping):
    old["evaluation"] = with_defaults(old["evaluation"], lambda d: run_evaluation.resolve_sampling(
        EvalSettings(**d), d.get("task")))
  for cell in old.get("cells", []):
    if isinstance(cell.get("config"), Mapping):
      cell["config"] = with_defaults(cell["config"], TrainConfig.from_dict)
  where = sweep_file(sweep.sweep_dir)
  shared = [k for k in ("format", "model", "task", "evaluation") if old.get(k) != new.get(k)]
  if shared:
    diffs = [d for k in shared for d in differences({k: old.get(k)}, {k: new.get(k)})]
    raise SweepError("sweep_dir", f"{where} holds a different sweep (saved -> now: "
                     f"{'; '.join(diffs[:6])}); use a new --sweep_dir")
  new_cells = {c["name"]: c for c in new["cells"]}
  dropped = [c["name"] for c in old["cells"] if c["name"] not in new_cells]
  if dropped:
    raise SweepError("sweep_dir", f"{where} has cells the new grid leaves out ({dropped}); "
                     "keep them in the grid (--cells selects which to run)")
  for cell in old["cells"]:
    diffs = differences({k: cell.get(k) for k in ("preset", "config")},
                        {k: new_cells[cell["name"]].get(k) for k in ("preset", "config")})
    if diffs:
      raise SweepError("sweep_dir", f"{where}: cell {cell['name']} would change (saved -> "
                       f"now: {'; '.join(diffs[:6])}); use a new --sweep_dir")
  return len(new_cells) > len(old["cells"])


def plan_json(sweep: Sweep, cells: Sequence[Cell]) -> dict[str, Any]:
  """The plan of a sweep to run elsewhere (experiments/sweep.py --plan prints it, launch/
  reads it back with `sweep_from_plan`): its directory, sweep.json's content and the
  names of the `cells` to run."""
  return {"sweep_dir": sweep.sweep_dir, "sweep": sweep.to_json(),
          "cells": [c.name for c in cells]}


def sweep_from_plan(plan: Mapping[str, Any]) -> tuple[Sweep, list[Cell]]:
  """(the sweep, the cells to run) of a `plan_json`.

  Raises:
    SweepError: a plan whose cells its grid does not give.
  """
  sweep = sweep_from_json(plan["sweep_dir"], plan["sweep"])
  return sweep, sweep.select(plan["cells"])


def write_sweep(sweep: Sweep) -> None:
  """Writes sweep.json, or checks that the stored one describes the same sweep; a grid that
  adds cells to it (existing cells unchanged) is written over it."""
  stored = read_sweep_json(sweep.sweep_dir)
  if stored is not None and not check_same(sweep, stored):
    return
  fileio.atomic_write_json(sweep_file(sweep.sweep_dir), sweep.to_json(), indent=2,
                           sort_keys=True)


# ------------------------------------------------------------------------------- progress


def _check_run_dir(cell: Cell) -> dict[str, Any] | None:
  from memdyn_jax.train import checkpoints
  if not os.path.exists(os.path.join(cell.run_dir, checkpoints.RUN_INFO)):
    return None
  info = checkpoints.read_run_info(cell.run_dir)
  diffs = checkpoints.differences(
      checkpoints.with_defaults(info.get("config", {}), TrainConfig.from_dict),
      json.loads(json.dumps(cell.config.to_dict())))
  if diffs:
    raise SweepError("sweep_dir", f"{cell.run_dir} holds another run than cell {cell.name} "
                     f"(saved -> now: {'; '.join(diffs[:6])})")
  return info


def training_done(cell: Cell) -> bool:
  """Whether the cell's final checkpoint exists."""
  from memdyn_jax.train import checkpoints
  info = _check_run_dir(cell)
  if info is None:
    return False
  steps = checkpoints.list_steps(cell.run_dir)
  return bool(steps) and steps[-1] >= cell.config.total_steps(info["data"]["num_examples"])


def evaluation_done(cell: Cell, settings: EvalSettings) -> bool:
  """Whether the cell is trained and every checkpoint has all its records."""
  from memdyn_jax.evaluation import run as run_evaluation
  return training_done(cell) and not run_evaluation.pending_steps(cell.run_dir, settings)


@dataclasses.dataclass(frozen=True)
class CellOutcome:
  """What `run_cell` did.

  Attributes:
    name: the cell.
    trained_steps: optimizer steps run by this call (0: training was already done).
    evaluated: checkpoints evaluated by this call.
    error: why the cell failed (non-finite training), or None.
    train_seconds, eval_seconds: wall time of this call's training and evaluation.
    stop_signal: the signal (SIGTERM / SIGINT) that stopped the cell after it saved its
      checkpoint or records, else None; a re-run continues it.
  """
  name: str
  trained_steps: int = 0
  evaluated: int = 0
  error: str | None = None
  train_seconds: float = 0.0
  eval_seconds: float = 0.0
  stop_signal: int | None = None


def check_inputs(sweep: Sweep) -> None:
  """Resolves the base model and loads the training data and every evaluated split once,
  so that a bad model, data path or task argument is reported before anything is written
  or trained.

  Raises:
    SweepError: field "model", "task" (the training data), "chat_template" (the model's
      tokenizer cannot render the prompts), "num_fewshot" (the few-shot examples do not
      load) or "splits" (an evaluation split).
  """
  from memdyn_jax.train import task_run
  try:
    model_dir = task_run.resolve_model(sweep.model)
  except task_run.TaskRunError as e:
    raise SweepError("model", e.message) from e
  tokenizer = None
  if sweep.task.kwargs.get("chat_template"):  # checked to render the prompts too
    from memdyn_jax import models
    tokenizer = models.load_tokenizer(model_dir, padding_side="right")
  try:
    task, _ = task_run.load_examples(sweep.task, tokenizer)
  except task_run.TaskRunError as e:
    raise SweepError(e.field if e.field in ("chat_template", "num_fewshot") else "task",
                     e.message) from e
  for split in sweep.evaluation.splits:
    if split in ("train", "perturbed"):  # drawn from the training data, loaded above
      continue
    try:
      task.load(split, sweep.task.path)
    except (ValueError, FileNotFoundError) as e:
      raise SweepError("splits", f"task {task.name!r} cannot load split {split!r}: {e}"
                       ) from e


def run_cell(sweep: Sweep, cell: Cell, *, mesh=None, progress: bool = True,
             log: Callable[[str], None] = print, stop=None) -> CellOutcome:
  """Trains (or resumes) then evaluates one cell, skipping what is done.

  A run whose training becomes non-finite (a too-high learning rate of the grid) is
  reported in the outcome, not raised: the other cells go on. SIGTERM / SIGINT during
  training checkpoint and stop the cell (training installs its own handlers); during the
  evaluation, `stop` (a `signals.StopSignals` the caller holds) stops it after the
  records in progress. Either way the outcome's `stop_signal` says so.
  """
  import time

  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.train import loop, task_run
  trained = 0
  start = time.time()
  if training_done(cell):
    log(f"{cell.name}: trained (final checkpoint present)")
  else:
    try:
      result = task_run.train_on_task(cell.config, sweep.task, sweep.model, cell.run_dir,
                                      mesh=mesh, progress=progress,
                                      log_line=lambda m: log(f"{cell.name}: {m}"))
    except loop.NonFiniteError as e:
      log(f"{cell.name}: training failed: {e}")
      return CellOutcome(cell.name, error=str(e))
    trained = len(result.losses)
    if result.preempted:
      return CellOutcome(cell.name, trained, train_seconds=time.time() - start,
                         stop_signal=result.stop_signal)
    log(f"{cell.name}: trained {trained} step(s), now at {result.step}/{result.total_steps}")
    del result
  trained_at = time.time()
  timings = run_evaluation.evaluate(
      cell.run_dir, sweep.evaluation, mesh=mesh, progress=progress,
      log=lambda m: log(f"{cell.name}: {m}"),
      should_stop=None if stop is None else (lambda: stop.fired))
  # Stopped only if something is left: a signal after the last record changes nothing.
  stopped = (stop.signum if stop is not None and stop.fired
             and run_evaluation.pending_steps(cell.run_dir, sweep.evaluation) else None)
  log(f"{cell.name}: evaluated {len(timings)} checkpoint(s)"
      + ("" if timings else " (all records present)")
      + (" and stopped (signal)" if stopped is not None else ""))
  return CellOutcome(cell.name, trained, len(timings), train_seconds=trained_at - start,
                     eval_seconds=time.time() - trained_at, stop_signal=stopped)


# What a sweep does on SIGTERM / Ctrl-C outside a cell's training (which checkpoints first).
_STOPPING = "will stop once the records in progress are written; no further cell is started"


def run_local(sweep: Sweep, cells: Sequence[Cell], **kwargs) -> list[CellOutcome]:
  """`run_cell` on each cell in turn (in this process: compiled evaluation programs are
  reused across cells of one architecture). SIGTERM / SIGINT stop it after the cell in
  progress saved its state: the last outcome then has `stop_signal` set, and the cells
  after it are not started."""
  from memdyn_jax.signals import StopSignals
  outcomes = []
  with StopSignals(_STOPPING) as stop:
    for cell in cells:
      if stop.fired:  # between two cells: start nothing new
        outcomes.append(CellOutcome(cell.name, stop_signal=stop.signum))
      else:
        outcomes.append(run_cell(sweep, cell, stop=stop, **kwargs))
      if outcomes[-1].stop_signal is not None:
        break
  return outcomes


def _init_worker(compile_cache_dir: str | None) -> None:
  """A cell worker's JAX set-up: the parent's persistent compilation cache, so programs one
  worker compiled are loaded, not compiled again, by the other."""
  if compile_cache_dir:
    import jax
    jax.config.update("jax_compilation_cache_dir", compile_cache_dir)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def _run_cell_in_worker(sweep: Sweep, cell: Cell) -> CellOutcome:
  from memdyn_jax.signals import StopSignals
  with StopSignals(_STOPPING) as stop:
    return run_cell(sweep, cell, stop=stop, progress=False)


def run_parallel(sweep: Sweep, cells: Sequence[Cell], workers: int, *,
                 compile_cache_dir: str | None = None) -> list[CellOutcome]:
  """`run_cell` on the cells in `workers` processes, each taking the next cell when free.

  A tiny model's train step and sampler keep about one core of two busy: two workers on a
  2-core CPU finish a grid sooner. Each cell is computed as `run_local` would (its own seed,
  the same programs), so the figures do not depend on `workers`; outcomes are returned in
  cell order. Workers are spawned (fresh interpreters: JAX does not survive a fork) and
  inherit the environment (XLA_FLAGS); `compile_cache_dir` is their JAX compilation cache.
  SIGTERM to this process is passed on to the workers (Ctrl-C reaches them through the
  terminal), which stop after saving as `run_cell` does; cells not yet started are not
  started (their outcome carries the signal). `workers` <= 1 is `run_local`.
  """
  import concurrent.futures
  import multiprocessing
  import signal

  from memdyn_jax.signals import StopSignals
  if workers <= 1 or len(cells) <= 1:
    return run_local(sweep, cells, progress=False)
  outcomes: dict[str, CellOutcome] = {}
  with StopSignals(_STOPPING) as stop, concurrent.futures.ProcessPoolExecutor(
      min(workers, len(cells)), mp_context=multiprocessing.get_context("spawn"),
      initializer=_init_worker, initargs=(compile_cache_dir,)) as pool:
    pending = {pool.submit(_run_cell_in_worker, sweep, c) for c in cells}
    forwarded = False
    while pending:
      done, pending = concurrent.futures.wait(
          pending, timeout=1.0, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        if not future.cancelled():
          outcome = future.result()
          outcomes[outcome.name] = outcome
      if stop.fired and not forwarded:
        forwarded = True
        for future in pending:
          future.cancel()
        # Ctrl-C reaches the workers through the terminal's process group already (a
        # second SIGINT would abort them unsaved); a SIGTERM may have been sent to us alone.
        if stop.signum == signal.SIGTERM:
          for child in multiprocessing.active_children():
            os.kill(child.pid, signal.SIGTERM)
  return [outcomes.get(c.name) or CellOutcome(c.name, stop_signal=stop.signum) for c in cells]


def summary(outcomes: Sequence[CellOutcome]) -> str:
  """One line on what `run_local` did: cells, steps trained, checkpoints evaluated, and
  the cells that failed."""
  failed = [o.name for o in outcomes if o.error]
  return (f"{len(outcomes)} cell(s): {sum(o.trained_steps for o in outcomes)} step(s) "
          f"trained, {sum(o.evaluated for o in outcomes)} checkpoint(s) evaluated"
          + (f"; failed: {failed}" if failed else ""))


def analysis_dir(sweep: Sweep) -> str:
  return os.path.join(sweep.sweep_dir, ANALYSIS_DIR)


def analyze(sweep: Sweep, **options):
  """`report.analyze_sweep` over the sweep's runs into `analysis_dir(sweep)`.

  Args:
    sweep: the sweep.
    **options: `report.AnalysisOptions` fields (experiments/analyze.py's flags); the rest
      keep their defaults, and eval_name is always the sweep's.

  Returns:
    The `report.AnalysisResult`.

  Raises:
    report.AnalysisError: nothing evaluated yet, a malformed record file, or a bad option.
  """
  from memdyn_jax import report
  return report.analyze_sweep(
      sweep.sweep_dir, analysis_dir(sweep),
      report.AnalysisOptions(**{**options, "eval_name": sweep.evaluation.eval_name}))
