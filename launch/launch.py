"""Runs one memdyn_jax binary on a TPU pod slice or a SLURM GPU cluster.

  # TPU: the same command on every worker of a TPU VM slice (created if absent)
  python launch/launch.py --cluster=tpu --tpu_name=memdyn-v5p --zone=us-east5-a \
      --accelerator_type=v5p-32 --repo_url=https://example.org/memdyn_jax.git -- \
      experiments/train.py --model=meta-llama/Meta-Llama-3-8B --task=gsm8k \
      --preset=kang_llama3_gsm8k --output_dir=gs://bucket/runs/lr2e-5 --mesh_fsdp=32

  # SLURM: an sbatch script, one process per GPU, jax.distributed from SLURM's variables
  python launch/launch.py --cluster=slurm --nodes=2 --gpus_per_node=8 --partition=gpu -- \
      experiments/train.py --model=... --task=gsm8k --output_dir=/shared/runs/lr2e-5

`--dry_run` prints every command (and the sbatch script) without running anything.
Inside the job, `memdyn_jax.sharding.initialize_distributed()` (called by the binaries)
finds the coordinator: JAX auto-detects TPU pods and SLURM allocations.

The command and script builders are plain functions of a `TpuTarget` / `SlurmTarget`, so
other binaries (experiments/sweep.py's fan-out) import them; `define_cluster_flags()` gives
them the same cluster flags as this one.
"""
from __future__ import annotations

import dataclasses
import os
import shlex
import subprocess
import tempfile
from typing import Sequence

from absl import app, flags

FLAGS = flags.FLAGS


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
      raise ValueError("the TPU launcher needs --tpu_name, --zone and --repo_url")


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
      raise ValueError("--nodes and --gpus_per_node must be >= 1")


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


def main(argv):
  binary_args = argv[1:]
  if not binary_args or not binary_args[0].endswith(".py"):
    raise app.UsageError("give the binary and its flags after --, e.g. -- experiments/train.py ...")
  try:
    if FLAGS.cluster == "tpu":
      commands = [shell_line(c) for c in tpu_commands(tpu_target_from_flags(), binary_args)]
    else:
      script = slurm_script(slurm_target_from_flags(), binary_args)
  except ValueError as e:
    raise app.UsageError(str(e)) from None
  if FLAGS.cluster == "tpu":
    for text in commands:
      if FLAGS.dry_run:
        print(text)
      else:
        subprocess.run(text, shell=True, check=True)
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
  define_cluster_flags()
  flags.mark_flag_as_required("cluster")
  app.run(main)
