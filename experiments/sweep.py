"""Runs a grid of fine-tuning runs, evaluates each, then analyzes the sweep.

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
--overrides), then the sweep is analyzed in this
process into <sweep_dir>/analysis (experiments/analyze.py's tables and plots, default
options). `sweep.json` records the sweep: `--sweep_dir=DIR` alone re-runs it. Finished runs
and evaluations are skipped, an interrupted cell resumes; the same command with more grid
values extends a sweep in place (a changed existing cell is refused, naming the change).

--launcher=local runs the cells here, one after the other; --launcher=slurm submits one
sbatch job per cell (launch/launch.py's script; the sweep directory must be on storage the
nodes share) and an analysis job after them; --launcher=tpu prepares the --tpu_name slice
once, runs the cells on it one after the other, then the analysis on worker 0. --dry_run
prints every command and script. Exit status: 0 done, 1 a cell failed (non-finite
training) or the analysis did, 2 bad flags or inputs, 143 / 130 stopped by SIGTERM / SIGINT
(the cell in progress saved; the next cells are not started; a re-run continues).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError
from memdyn_jax.studies import sweep as sweep_lib
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
from memdyn_jax.train.config import TrainConfig

# launch/ is a folder beside experiments/, not an installed package.
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
from launch import launch as launch_lib  # noqa: E402

PROG = "sweep.py"
BINARY = "experiments/sweep.py"
ANALYZE = "experiments/analyze.py"

flags.DEFINE_string("sweep_dir", None, "Sweep directory (holds sweep.json and the runs).")
flags.DEFINE_string("model", None, "Base model: local HF directory, hub id, or 'embedded'.")
_TASK_FLAGS = cli.define_task_flags(help_format="Training data: {doc}")
_GRID_FLAGS = cli.define_dataclass_flags(
    sweep_lib.Grid, help_format="Grid.{field}: see memdyn_jax.studies.sweep.Grid (default {default!r}).")
_EVAL_FLAGS = cli.define_dataclass_flags(
    EvalSettings, skip=("task", "task_kwargs", "task_path"),
    help_format="Evaluation: EvalSettings.{field}, as evaluate.py's flag (default {default!r}).")
# Training settings: train.py's TrainConfig flags, same names (the sampling --seed is the
# evaluation's here, so the training seed is --train_seed), set in every cell on top of its
# preset; the grid axes (learning rate, epochs, data fraction) come from the grid flags.
_TRAIN_FLAGS = cli.define_dataclass_flags(
    TrainConfig, skip=tuple(sweep_lib.AXES.values()), rename={"seed": "train_seed"},
    use_defaults=False,
    help_format="Training, every cell: {doc} (default: the cell's preset's value)")
flags.DEFINE_list("cells", [], "Run only these cells (default: all).")
flags.DEFINE_enum("launcher", "local", ["local", "slurm", "tpu"], "Where the cells run.")
flags.DEFINE_bool("dry_run", False, "Print the cluster commands instead of running them.")
flags.DEFINE_bool("analyze", True, "Analyze the sweep at the end (experiments/analyze.py's "
                  "tables and plots).")
flags.DEFINE_bool("progress", True, "Show progress bars.")
cli.define_mesh_flags()
launch_lib.define_cluster_flags()
FLAGS = flags.FLAGS

_SPEC_FLAGS = ["model", *_TASK_FLAGS.values(), *_GRID_FLAGS.values(), *_EVAL_FLAGS.values(),
               *_TRAIN_FLAGS.values()]


def _settings(cls, names):
  try:
    return cls(**cli.dataclass_kwargs_from_flags(cls, names))
  except (sweep_lib.SweepError, EvalSettingsError) as e:
    raise cli.usage_error(e, names) from None


def sweep_from_flags() -> sweep_lib.Sweep:
  """The sweep the flags describe, or the stored one when only --sweep_dir is given."""
  stored = sweep_lib.read_sweep_json(FLAGS.sweep_dir)
  try:
    if stored is not None and not any(FLAGS[n].present for n in _SPEC_FLAGS):
      return sweep_lib.sweep_from_json(FLAGS.sweep_dir, stored)
    for name in ("model", "task"):
      if not getattr(FLAGS, name):
        raise UsageError(f"--{name} is required (no {sweep_lib.SWEEP_FILE} in --sweep_dir)")
    task = cli.task_spec_from_flags(_TASK_FLAGS)
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
    raise cli.usage_error(e) from None


def job_args(sweep: sweep_lib.Sweep, cell: sweep_lib.Cell) -> list[str]:
  """The command line of one cell's job: this binary, the whole sweep, that cell only."""
  mesh = [f"--{n}={FLAGS[n].value}" for n in ("mesh_data", "mesh_fsdp", "mesh_tensor")]
  return [BINARY, f"--sweep_dir={sweep.sweep_dir}", f"--model={sweep.model}",
          *cli.dataclass_flag_args(sweep.task, _TASK_FLAGS),
          *cli.dataclass_flag_args(sweep.grid, _GRID_FLAGS),
          *cli.dataclass_flag_args(sweep.evaluation, _EVAL_FLAGS),
          f"--cells={cell.name}", "--launcher=local", "--noanalyze", "--noprogress", *mesh]


def analysis_args(sweep: sweep_lib.Sweep) -> list[str]:
  return [ANALYZE, f"--sweep_dir={sweep.sweep_dir}",
          f"--output_dir={sweep_lib.analysis_dir(sweep)}",
          f"--eval_name={sweep.evaluation.eval_name}"]


def launch_tpu(sweep, cells) -> int:
  target = launch_lib.tpu_target_from_flags()
  try:
    commands = (launch_lib.tpu_prepare_commands(target)
                + [launch_lib.tpu_run_command(target, job_args(sweep, c)) for c in cells]
                + [launch_lib.tpu_run_command(target, analysis_args(sweep), worker="0")])
  except ValueError as e:
    raise UsageError(str(e)) from None
  for cmd in commands:
    line = launch_lib.shell_line(cmd)
    print(line, flush=True)
    if not FLAGS.dry_run:
      subprocess.run(line, shell=True, check=True)
  return 0


def launch_slurm(sweep, cells) -> int:
  target = launch_lib.slurm_target_from_flags()
  scripts_dir = os.path.join(sweep.sweep_dir, "launch")
  jobs = []
  try:
    for cell in cells:
      one = dataclasses.replace(target, job_name=f"{target.job_name}-{cell.name}")
      jobs.append((os.path.join(scripts_dir, f"{cell.name}.sbatch"),
                   launch_lib.slurm_script(one, job_args(sweep, cell)), ()))
    single = dataclasses.replace(target, nodes=1, gpus_per_node=1,
                                 job_name=f"{target.job_name}-analysis")
    jobs.append((os.path.join(scripts_dir, "analysis.sbatch"),
                 launch_lib.slurm_script(single, analysis_args(sweep)), ("after",)))
  except ValueError as e:
    raise UsageError(str(e)) from None
  if not FLAGS.dry_run:
    os.makedirs(scripts_dir, exist_ok=True)
  ids = []
  for path, script, after in jobs:
    extra = [f"--dependency=afterany:{':'.join(ids or ['<cell job ids>'])}"] if after else []
    if FLAGS.dry_run:
      print(f"# {path}\n{script}" + launch_lib.shell_line(["sbatch", "--parsable", *extra, path]))
      continue
    job = launch_lib.sbatch(script, extra, script_path=path)
    print(f"{PROG}: submitted {os.path.basename(path)} as job {job}", flush=True)
    if not after:
      ids.append(job)
  return 0


def run_here(sweep, cells) -> int:
  import jax

  from memdyn_jax import sharding
  sharding.initialize_distributed()
  mesh = cli.mesh_from_flags()
  log = (lambda m: print(f"{PROG}: {m}", flush=True)) if jax.process_index() == 0 else (
      lambda m: None)
  from memdyn_jax.train import checkpoints
  try:
    outcomes = sweep_lib.run_local(sweep, cells, mesh=mesh, progress=FLAGS.progress, log=log)
  except (sweep_lib.SweepError, EvalSettingsError) as e:
    raise cli.usage_error(e) from None
  except (checkpoints.CheckpointReadError, checkpoints.RunDirError) as e:
    raise UsageError(str(e)) from None
  stopped = next((o for o in outcomes if o.stop_signal is not None), None)
  if stopped is not None:
    log(f"{stopped.name}: {cli.stopped_note(stopped.stop_signal)} (not analyzed)")
    return cli.exit_status(stopped.stop_signal)
  failed = [o for o in outcomes if o.error]
  status = 1 if failed else 0
  if FLAGS.analyze and jax.process_index() == 0:
    from memdyn_jax import report
    try:
      result = sweep_lib.analyze(sweep)
      log(f"analysis: {len(result.files)} files in {result.output_dir}")
    except report.AnalysisError as e:
      print(f"{PROG}: analysis failed: --{e.field}: {e.message}", file=sys.stderr, flush=True)
      status = 1
  log(f"{len(outcomes)} cell(s): {sum(o.trained_steps for o in outcomes)} step(s) trained, "
      f"{sum(o.evaluated for o in outcomes)} checkpoint(s) evaluated"
      + (f"; failed: {[o.name for o in failed]}" if failed else ""))
  return status


def run() -> int:
  if not FLAGS.sweep_dir:
    raise UsageError("--sweep_dir is required")
  sweep = sweep_from_flags()
  try:
    from memdyn_jax.train import task_run
    task_run.check_task_name(sweep.task.name)
    cells = sweep.select(FLAGS.cells)
    if FLAGS.launcher == "local":  # cluster nodes may see data this machine does not
      sweep_lib.check_inputs(sweep)  # before sweep.json is written
  except (task_run.TaskRunError, sweep_lib.SweepError) as e:
    raise cli.usage_error(e) from None
  if FLAGS.launcher == "local":
    sweep_lib.write_sweep(sweep)
    return run_here(sweep, cells)
  if not FLAGS.dry_run:
    sweep_lib.write_sweep(sweep)
  return launch_slurm(sweep, cells) if FLAGS.launcher == "slurm" else launch_tpu(sweep, cells)


if __name__ == "__main__":
  cli.run_binary(PROG, run)
