"""Runs one memdyn_jax binary on a TPU pod slice or a SLURM GPU cluster, or a sweep as one
job per cell.

  # TPU: the same command on every worker of a TPU VM slice (created if absent)
  python launch/launch.py --cluster=tpu --tpu_name=memdyn-v5p --zone=us-east5-a \
      --accelerator_type=v5p-32 --repo_url=https://example.org/memdyn_jax.git -- \
      experiments/train.py --model=meta-llama/Meta-Llama-3-8B --task=gsm8k \
      --preset=kang_llama3_gsm8k --output_dir=gs://bucket/runs/lr2e-5 --mesh_fsdp=32

  # SLURM: an sbatch script, one process per GPU, jax.distributed from SLURM's variables
  python launch/launch.py --cluster=slurm --nodes=2 --gpus_per_node=8 --partition=gpu -- \
      experiments/train.py --model=... --task=gsm8k --output_dir=/shared/runs/lr2e-5

  # A sweep fanned out: one SLURM job per cell, then an analysis job after them all
  python launch/launch.py --cluster=slurm --nodes=2 --gpus_per_node=8 --partition=gpu \
      --fan_out -- experiments/sweep.py --sweep_dir=/shared/runs/kang_gsm8k \
      --model=meta-llama/Meta-Llama-3-8B --task=gsm8k --paper_grid=kang_llama3_gsm8k

`--dry_run` prints every command (and the sbatch scripts) without running or writing
anything. Inside the job, `memdyn_jax.sharding.initialize_distributed()` (called by the
binaries) finds the coordinator: JAX auto-detects TPU pods and SLURM allocations.

`--fan_out` takes an experiments/sweep.py command (any of its flags: a grid, or
`--sweep_dir` alone for a stored sweep; `--cells` picks cells). It asks that command for
its cells (`--plan`, run here: the flags are checked, nothing is written) and reads them with
the installed `memdyn_jax.studies.sweep`; then every cell runs the same command with
`--sweep_dir=<absolute> --cells=<cell> --noanalyze --noprogress` appended, and
experiments/analyze.py analyzes the sweep into <sweep_dir>/analysis after them:
  * SLURM: one sbatch job per cell (scripts in <sweep_dir>/launch/; the sweep directory must
    be on storage the nodes share), then the analysis job on one GPU, `afterany` the cells;
  * TPU: the slice is prepared once, the cells run on it one after the other, then the
    analysis on worker 0.
Without --dry_run, sweep.json is written before anything is submitted.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shlex
import subprocess
import sys
import tempfile
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS
PROG = "launch.py"


class TargetError(ValueError):
  """A cluster target that lacks a setting or has a bad one."""


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A TPU VM slice and the checkout installed on its workers."""
  tpu_name: str | None
  zone: str | None
  repo_url: str | None
  project: str | None = None
  accelerator_type: str = "v5p-8"
  runtime_version: str = "v2-alpha-tpuv5"
  repo_ref: str = "main"

  def check(self) -> None:
    if not (self.tpu_name and self.zone and self.repo_url):
      raise TargetError("the TPU launcher needs --tpu_name, --zone and --repo_url")


@dataclasses.dataclass(frozen=True)
class SlurmTarget:
  """A SLURM allocation: one process per GPU."""
  nodes: int = 1
  gpus_per_node: int = 8
  partition: str | None = None
  time: str = "24:00:00"
  job_name: str = "memdyn"
  workdir: str = "."
  venv: str | None = None

  def check(self) -> None:
    if self.gpus_per_node < 1 or self.nodes < 1:
      raise TargetError("--nodes and --gpus_per_node must be >= 1")


def define_cluster_flags() -> None:
  """Defines the TPU and SLURM settings as flags (same names as the fields)."""
  # TPU
  flags.DEFINE_string("tpu_name", None, "TPU VM name (created if it does not exist).")
  flags.DEFINE_string("zone", None, "TPU zone.")
  flags.DEFINE_string("project", None, "GCP project (default: gcloud's).")
  flags.DEFINE_string("accelerator_type", "v5p-8", "TPU slice type.")
  flags.DEFINE_string("runtime_version", "v2-alpha-tpuv5", "TPU VM software version.")
  flags.DEFINE_string("repo_url", None, "git URL of memdyn_jax to clone on each worker.")
  flags.DEFINE_string("repo_ref", "main", "Branch / commit to check out.")
  # SLURM
  flags.DEFINE_integer("nodes", 1, "SLURM nodes.")
  flags.DEFINE_integer("gpus_per_node", 8, "GPUs per node (one process per GPU).")
  flags.DEFINE_string("partition", None, "SLURM partition.")
  flags.DEFINE_string("time", "24:00:00", "SLURM time limit.")
  flags.DEFINE_string("job_name", "memdyn", "SLURM job name.")
  flags.DEFINE_string("workdir", os.getcwd(), "Repository checkout visible to the nodes.")
  flags.DEFINE_string("venv", None, "Virtualenv to activate on the nodes.")


def _from_flags(cls):
  return cls(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(cls)})


def tpu_target_from_flags() -> TpuTarget:
  return _from_flags(TpuTarget)


def slurm_target_from_flags() -> SlurmTarget:
  return _from_flags(SlurmTarget)


def _quote_args(args: Sequence[str]) -> str:
  return " ".join(shlex.quote(a) for a in args)


def shell_line(cmd: Sequence[str]) -> str:
  """One command as a shell line; a bare "||" stays an operator."""
  return " ".join(c if c == "||" else shlex.quote(c) for c in cmd)


def _tpu_common(target: TpuTarget) -> list[str]:
  return ["--zone", target.zone] + (["--project", target.project] if target.project else [])


def tpu_prepare_commands(target: TpuTarget) -> list[list[str]]:
  """gcloud commands: create the slice if needed, then clone/install on every worker."""
  target.check()
  common = _tpu_common(target)
  describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", target.tpu_name] + common
  create = ["gcloud", "compute", "tpus", "tpu-vm", "create", target.tpu_name,
            "--accelerator-type", target.accelerator_type, "--version",
            target.runtime_version] + common
  setup = (f"set -e; if [ ! -d memdyn_jax ]; then git clone {shlex.quote(target.repo_url)} "
           f"memdyn_jax; fi; cd memdyn_jax && git fetch -q && git checkout -q "
           f"{shlex.quote(target.repo_ref)} && pip install -q -e . 'jax[tpu]'")
  return [describe + ["||"] + create, _tpu_ssh(target, "all") + ["--command", setup]]


def _tpu_ssh(target: TpuTarget, worker: str) -> list[str]:
  return (["gcloud", "compute", "tpus", "tpu-vm", "ssh", target.tpu_name, f"--worker={worker}"]
          + _tpu_common(target))


def tpu_run_command(target: TpuTarget, binary_args: Sequence[str], worker: str = "all"
                    ) -> list[str]:
  """The gcloud command running `python <binary_args>` in the checkout on `worker`."""
  target.check()
  return _tpu_ssh(target, worker) + ["--command",
                                     "cd memdyn_jax && python " + _quote_args(binary_args)]


def tpu_commands(target: TpuTarget, binary_args: Sequence[str]) -> list[list[str]]:
  """Create the slice if needed, install on every worker, run the binary everywhere."""
  return tpu_prepare_commands(target) + [tpu_run_command(target, binary_args)]


def slurm_script(target: SlurmTarget, binary_args: Sequence[str]) -> str:
  """An sbatch script: one task per GPU; JAX's SLURM cluster detection sets up distributed."""
  target.check()
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={target.job_name}",
           f"#SBATCH --nodes={target.nodes}",
           f"#SBATCH --ntasks-per-node={target.gpus_per_node}",
           f"#SBATCH --gpus-per-node={target.gpus_per_node}",
           f"#SBATCH --time={target.time}",
           f"#SBATCH --output={target.job_name}-%j.out"]
  if target.partition:
    lines.append(f"#SBATCH --partition={target.partition}")
  lines += ["set -euo pipefail", f"cd {shlex.quote(target.workdir)}"]
  if target.venv:
    lines.append(f"source {shlex.quote(os.path.join(target.venv, 'bin', 'activate'))}")
  # One process per GPU: each sees its own device; jax.distributed reads SLURM_* variables.
  lines += ["export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
            "srun --kill-on-bad-exit=1 bash -c 'export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; "
            "exec python " + _quote_args(binary_args).replace("'", "'\\''") + "'"]
  return "\n".join(lines) + "\n"


def sbatch(script: str, extra_args: Sequence[str] = (), script_path: str | None = None) -> str:
  """Submits `script` (written to `script_path`, or a temporary file); returns the job id."""
  if script_path is None:
    with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
      f.write(script)
      script_path = f.name
  else:
    with open(script_path, "w") as f:
      f.write(script)
  out = subprocess.run(["sbatch", "--parsable", *extra_args, script_path], check=True,
                       capture_output=True, text=True).stdout
  return out.strip().split(";")[0]


# --------------------------------------------------------------------------- sweep fan-out


class SweepPlanError(Exception):
  """experiments/sweep.py --plan failed: `stderr` says why (one line for bad flags)."""

  def __init__(self, returncode: int, stderr: str):
    super().__init__(stderr)
    self.returncode, self.stderr = returncode, stderr


def sweep_plan(sweep_args: Sequence[str]):
  """(sweep, cells to run) of an experiments/sweep.py command line (binary first), as
  that command's `--plan` prints them.

  Raises:
    SweepPlanError: the command refused its flags, or printed no plan.
  """
  from memdyn_jax.studies import sweep as sweep_lib
  proc = subprocess.run([sys.executable, *sweep_args, "--plan"], capture_output=True,
                        text=True)
  if proc.returncode:
    raise SweepPlanError(proc.returncode, proc.stderr)
  try:
    plan = json.loads(proc.stdout)
  except json.JSONDecodeError as e:
    raise SweepPlanError(1, f"{PROG}: error: {sweep_args[0]} --plan printed no plan ({e}): "
                         f"{proc.stdout!r}\n") from e
  return sweep_lib.sweep_from_plan(plan)


def cell_args(sweep_args: Sequence[str], sweep, cell) -> list[str]:
  """The command line of one cell's job: the sweep command, that cell only (flags given
  twice: absl keeps the last)."""
  return [*sweep_args, f"--sweep_dir={sweep.sweep_dir}", f"--cells={cell.name}",
          "--noanalyze", "--noprogress"]


def analysis_args(sweep_args: Sequence[str], sweep) -> list[str]:
  """experiments/analyze.py (beside the sweep binary) over the sweep, as the sweep binary
  analyzes it."""
  from memdyn_jax.studies import sweep as sweep_lib
  return [os.path.join(os.path.dirname(sweep_args[0]), "analyze.py"),
          f"--sweep_dir={sweep.sweep_dir}", f"--output_dir={sweep_lib.analysis_dir(sweep)}",
          f"--eval_name={sweep.evaluation.eval_name}"]


def tpu_fan_out_commands(target: TpuTarget, sweep_args: Sequence[str], sweep, cells
                         ) -> list[list[str]]:
  """Prepare the slice once, run the cells on it one after the other, analyze on worker 0."""
  return (tpu_prepare_commands(target)
          + [tpu_run_command(target, cell_args(sweep_args, sweep, c)) for c in cells]
          + [tpu_run_command(target, analysis_args(sweep_args, sweep), worker="0")])


def slurm_fan_out_jobs(target: SlurmTarget, sweep_args: Sequence[str], sweep, cells
                       ) -> list[tuple[str, str, bool]]:
  """(script path, sbatch script, runs after the cells) of every job: one per cell, then
  the analysis on one GPU."""
  scripts_dir = os.path.join(sweep.sweep_dir, "launch")
  jobs = []
  for cell in cells:
    one = dataclasses.replace(target, job_name=f"{target.job_name}-{cell.name}")
    jobs.append((os.path.join(scripts_dir, f"{cell.name}.sbatch"),
                 slurm_script(one, cell_args(sweep_args, sweep, cell)), False))
  single = dataclasses.replace(target, nodes=1, gpus_per_node=1,
                               job_name=f"{target.job_name}-analysis")
  jobs.append((os.path.join(scripts_dir, "analysis.sbatch"),
               slurm_script(single, analysis_args(sweep_args, sweep)), True))
  return jobs


def fan_out(cluster: str, sweep_args: Sequence[str], dry_run: bool) -> None:
  """Runs (or with `dry_run` prints) the jobs of a sweep on `cluster` ("tpu" or "slurm",
  set up by the cluster flags).

  Raises:
    TargetError: bad cluster flags (checked before the sweep is planned).
    SweepPlanError: the sweep command refused its flags.
  """
  from memdyn_jax.studies import sweep as sweep_lib
  target = tpu_target_from_flags() if cluster == "tpu" else slurm_target_from_flags()
  target.check()
  sweep, cells = sweep_plan(sweep_args)
  if not dry_run:
    sweep_lib.write_sweep(sweep)
  if cluster == "tpu":
    for cmd in tpu_fan_out_commands(target, sweep_args, sweep, cells):
      run_shell(shell_line(cmd), dry_run)
    return
  ids = []
  for path, script, after_cells in slurm_fan_out_jobs(target, sweep_args, sweep, cells):
    extra = ([f"--dependency=afterany:{':'.join(ids or ['<cell job ids>'])}"]
             if after_cells else [])
    if dry_run:
      print(f"# {path}\n{script}" + shell_line(["sbatch", "--parsable", *extra, path]))
      continue
    os.makedirs(os.path.dirname(path), exist_ok=True)
    job = sbatch(script, extra, script_path=path)
    print(f"{PROG}: submitted {os.path.basename(path)} as job {job}", flush=True)
    if not after_cells:
      ids.append(job)


# ---------------------------------------------------------------------------------- main


def run_shell(line: str, dry_run: bool) -> None:
  """Prints a shell command line, then runs it unless `dry_run` (failing on its error)."""
  print(line, flush=True)
  if not dry_run:
    subprocess.run(line, shell=True, check=True)


def fail(message: str) -> int:
  """Prints `launch.py: error: <message>` (as the binaries report a user error); returns
  the exit status 2."""
  print(f"{PROG}: error: {message}", file=sys.stderr, flush=True)
  return 2


def main(argv):
  binary_args = argv[1:]
  if not binary_args or not binary_args[0].endswith(".py"):
    return fail("give the binary and its flags after --, e.g. -- experiments/train.py ...")
  if FLAGS.fan_out and os.path.basename(binary_args[0]) != "sweep.py":
    return fail(f"--fan_out runs experiments/sweep.py, not {binary_args[0]}")
  try:
    if FLAGS.fan_out:
      fan_out(FLAGS.cluster, binary_args, FLAGS.dry_run)
      return 0
    if FLAGS.cluster == "tpu":
      commands = [shell_line(c) for c in tpu_commands(tpu_target_from_flags(), binary_args)]
    else:
      script = slurm_script(slurm_target_from_flags(), binary_args)
  except TargetError as e:
    return fail(str(e))
  except SweepPlanError as e:  # the sweep binary's own error line
    sys.stderr.write(e.stderr)
    return e.returncode
  if FLAGS.cluster == "tpu":
    for line in commands:
      run_shell(line, FLAGS.dry_run)
    return 0
  if FLAGS.dry_run:
    print(script, end="")
    print("sbatch <script above>")
    return 0
  print(f"submitted job {sbatch(script)}")
  return 0


if __name__ == "__main__":
  flags.DEFINE_enum("cluster", None, ["tpu", "slurm"], "Where to run.")
  flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
  flags.DEFINE_bool("fan_out", False, "The binary is experiments/sweep.py: one job per cell "
                    "(SLURM) or one command per cell on the slice (TPU), then the analysis.")
  define_cluster_flags()
  flags.mark_flag_as_required("cluster")
  app.run(main)
