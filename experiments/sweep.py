r"""Runs a grid of fine-tuning runs here, evaluates each, then analyzes the sweep.

  # Kang et al.'s Llama-3 GSM8K grid, exactly the runs the paper reports
  python experiments/sweep.py --sweep_dir=runs/kang_gsm8k --model=meta-llama/Meta-Llama-3-8B \
      --task=gsm8k --paper_grid=kang_llama3_gsm8k --save_every_epochs=0.25

  # a product grid: learning rate x epochs x data fraction over a base preset
  python experiments/sweep.py --sweep_dir=runs/grid --model=embedded --task=synthetic_arith \
      --presets=kang_llama3_gsm8k --learning_rates=5e-4,2e-3 --epochs=1,3 \
      --data_fractions=1,0.5 --global_batch_size=16 --warmup_steps=2

One run directory per cell under --sweep_dir, named from its values (lr2e-05_ep3_frac0.5);
each is trained (experiments/train.py's run) then evaluated at every checkpoint (the
evaluation flags are experiments/evaluate.py's, same names and defaults; --batch_size is the
evaluation's; training settings are train.py's flags, --train_seed for its --seed, or a JSON
--overrides), one cell after the other (--cells: only those), then the sweep is analyzed in
this process into <sweep_dir>/analysis (experiments/analyze.py's tables and plots, default
options). `sweep.json` records the sweep: `--sweep_dir=DIR` alone re-runs it. Finished runs
and evaluations are skipped, an interrupted cell resumes; the same command with more grid
values extends a sweep in place (a changed existing cell is refused, naming the change).
On a cluster, `launch/launch.py --fan_out -- experiments/sweep.py <flags>` runs this
command as one job per cell (with --cells=<cell> --noanalyze), then the analysis; it reads
the cells from --plan. Exit status: 0 done, 1 a cell failed (non-finite training) or the
analysis did, 2 bad flags or inputs, 143 / 130 stopped by SIGTERM / SIGINT (the cell in
progress saved; the next cells are not started; a re-run continues).
"""
from __future__ import annotations

import dataclasses
import json
import sys

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
from memdyn_jax.studies import sweep as sweep_lib
from memdyn_jax.tasks import PROMPT_OPTION_NAMES
from memdyn_jax.train.config import TrainConfig

PROG = "sweep.py"

flags.DEFINE_string("sweep_dir", None, "Sweep directory (holds sweep.json and the runs).")
flags.DEFINE_string("model", None, "Base model: local HF directory, hub id, or 'embedded'.")
_TASK_FLAGS = cli.define_task_flags(help_format="Training data: {doc}")
_GRID_FLAGS = cli.define_dataclass_flags(
    sweep_lib.Grid, help_format="Grid: {doc} (default {default!r}).")
# The evaluation renders prompts as the cells were trained (the task flags' prompt options).
_EVAL_FLAGS = cli.define_dataclass_flags(
    EvalSettings, skip=("task", "task_kwargs", "task_path", *PROMPT_OPTION_NAMES),
    help_format="Evaluation (evaluate.py's flag): {doc}")
# train.py's flags, set in every cell over its preset (--seed is the evaluation's: --train_seed)
_TRAIN_FLAGS = cli.define_dataclass_flags(
    TrainConfig, skip=tuple(sweep_lib.AXES.values()), rename={"seed": "train_seed"},
    use_defaults=False,
    help_format="Training, every cell: {doc} (default: the cell's preset's value)")
flags.DEFINE_list("cells", [], "Run only these cells (default: all).")
flags.DEFINE_bool("plan", False, "Print the sweep and its --cells as one JSON line (for "
                  "launch/launch.py --fan_out) and exit; nothing is written or run.")
flags.DEFINE_bool("analyze", True, "Analyze the sweep at the end (experiments/analyze.py's "
                  "tables and plots).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
cli.define_mesh_flags()
FLAGS = flags.FLAGS

_SPEC_FLAGS = ["model", *_TASK_FLAGS.values(), *_GRID_FLAGS.values(), *_EVAL_FLAGS.values(),
               *_TRAIN_FLAGS.values()]


def _settings(cls, names):
  try:
    return cls(**cli.dataclass_kwargs_from_flags(cls, names))
  except (sweep_lib.SweepError, EvalSettingsError) as e:
    raise cli.usage_error(e, names) from e


def sweep_from_flags() -> sweep_lib.Sweep:
  """The sweep the flags describe, or the stored one when only --sweep_dir is given."""
  stored = sweep_lib.read_sweep_json(FLAGS.sweep_dir)
  try:
    if stored is not None and not any(FLAGS[n].present for n in _SPEC_FLAGS):
      return sweep_lib.sweep_from_json(FLAGS.sweep_dir, stored)
    for name in ("model", "task"):
      if not getattr(FLAGS, name):
        raise UsageError(f"--{name} is required (no {sweep_lib.SWEEP_FILE} in --sweep_dir)")
    task = cli.task_spec_from_flags(_TASK_FLAGS, FLAGS.model)
    grid = _settings(sweep_lib.Grid, _GRID_FLAGS)
    train = cli.dataclass_kwargs_from_flags(TrainConfig, _TRAIN_FLAGS)
    if train:  # the flags win over the same fields in --overrides
      grid = dataclasses.replace(grid, overrides={**grid.overrides, **train})
    settings = _settings(EvalSettings, _EVAL_FLAGS)
    sweep = sweep_lib.make_sweep(FLAGS.sweep_dir, FLAGS.model, task, grid, settings)
    if stored is not None:
      sweep_lib.check_same(sweep, stored)
    return sweep
  except sweep_lib.SweepError as e:
    raise cli.usage_error(e) from e


def run_here(sweep, cells) -> int:
  import jax

  from memdyn_jax import report, sharding
  from memdyn_jax.train import checkpoints
  sharding.initialize_distributed()
  mesh = cli.mesh_from_flags()
  log = (lambda m: print(f"{PROG}: {m}", flush=True)) if jax.process_index() == 0 else (
      lambda m: None)
  try:
    outcomes = sweep_lib.run_local(sweep, cells, mesh=mesh, progress=FLAGS.progress, log=log)
  except (sweep_lib.SweepError, EvalSettingsError) as e:
    raise cli.usage_error(e) from e
  except (checkpoints.CheckpointReadError, checkpoints.RunDirError) as e:
    raise UsageError(str(e)) from e
  stopped = next((o for o in outcomes if o.stop_signal is not None), None)
  if stopped is not None:
    log(f"{stopped.name}: {cli.stopped_note(stopped.stop_signal)} (not analyzed)")
    return cli.exit_status(stopped.stop_signal)
  status = 1 if any(o.error for o in outcomes) else 0
  if FLAGS.analyze and jax.process_index() == 0:
    try:
      result = sweep_lib.analyze(sweep)
      log(f"analysis: {len(result.files)} files in {result.output_dir}")
    except report.AnalysisError as e:
      print(f"{PROG}: analysis failed: --{e.field}: {e.message}", file=sys.stderr, flush=True)
      status = 1
  log(sweep_lib.summary(outcomes))
  return status


def run() -> int:
  from memdyn_jax.train import task_run
  cli.check_output_dir(FLAGS.sweep_dir, "sweep_dir", required=True)
  sweep = sweep_from_flags()
  try:
    task_run.check_task_name(sweep.task.name)
    cells = sweep.select(FLAGS.cells)
    if FLAGS.plan:  # runs elsewhere, whose nodes may see data this machine does not
      print(json.dumps(sweep_lib.plan_json(sweep, cells)))
      return 0
    sweep_lib.check_inputs(sweep)  # before sweep.json is written
  except (task_run.TaskRunError, sweep_lib.SweepError) as e:
    raise cli.usage_error(e) from e
  sweep_lib.write_sweep(sweep)
  return run_here(sweep, cells)


if __name__ == "__main__":
  cli.run_binary(PROG, run)
