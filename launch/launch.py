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
"""
from __future__ import annotations

import os
import shlex
import subprocess
import tempfile

from absl import app, flags

flags.DEFINE_enum("cluster", None, ["tpu", "slurm"], "Where to run.")
flags.DEFINE_bool("dry_run", False, "Print the commands instead of running them.")
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
FLAGS = flags.FLAGS


def tpu_commands(binary_args: list[str]) -> list[list[str]]:
  """gcloud commands: create the slice if needed, install on every worker, run everywhere."""
  if not (FLAGS.tpu_name and FLAGS.zone and FLAGS.repo_url):
    raise app.UsageError("--cluster=tpu needs --tpu_name, --zone and --repo_url")
  common = ["--zone", FLAGS.zone] + (["--project", FLAGS.project] if FLAGS.project else [])
  describe = ["gcloud", "compute", "tpus", "tpu-vm", "describe", FLAGS.tpu_name] + common
  create = ["gcloud", "compute", "tpus", "tpu-vm", "create", FLAGS.tpu_name,
            "--accelerator-type", FLAGS.accelerator_type, "--version", FLAGS.runtime_version] + common
  setup = (f"set -e; if [ ! -d memdyn_jax ]; then git clone {shlex.quote(FLAGS.repo_url)} memdyn_jax; fi; "
           f"cd memdyn_jax && git fetch -q && git checkout -q {shlex.quote(FLAGS.repo_ref)} && "
           "pip install -q -e . 'jax[tpu]'")
  run = "cd memdyn_jax && python " + " ".join(shlex.quote(a) for a in binary_args)
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", FLAGS.tpu_name, "--worker=all"] + common
  return [describe + ["||"] + create, ssh + ["--command", setup], ssh + ["--command", run]]


def slurm_script(binary_args: list[str]) -> str:
  """An sbatch script: one task per GPU; JAX's SLURM cluster detection sets up distributed."""
  if FLAGS.gpus_per_node < 1 or FLAGS.nodes < 1:
    raise app.UsageError("--nodes and --gpus_per_node must be >= 1")
  lines = ["#!/bin/bash",
           f"#SBATCH --job-name={FLAGS.job_name}",
           f"#SBATCH --nodes={FLAGS.nodes}",
           f"#SBATCH --ntasks-per-node={FLAGS.gpus_per_node}",
           f"#SBATCH --gpus-per-node={FLAGS.gpus_per_node}",
           f"#SBATCH --time={FLAGS.time}",
           f"#SBATCH --output={FLAGS.job_name}-%j.out"]
  if FLAGS.partition:
    lines.append(f"#SBATCH --partition={FLAGS.partition}")
  lines += ["set -euo pipefail", f"cd {shlex.quote(FLAGS.workdir)}"]
  if FLAGS.venv:
    lines.append(f"source {shlex.quote(os.path.join(FLAGS.venv, 'bin', 'activate'))}")
  # One process per GPU: each sees its own device; jax.distributed reads SLURM_* variables.
  lines += ["export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
            "srun --kill-on-bad-exit=1 bash -c 'export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; "
            "exec python " + " ".join(shlex.quote(a) for a in binary_args).replace("'", "'\\''")
            + "'"]
  return "\n".join(lines) + "\n"


def main(argv):
  binary_args = argv[1:]
  if not binary_args or not binary_args[0].endswith(".py"):
    raise app.UsageError("give the binary and its flags after --, e.g. -- experiments/train.py ...")
  if FLAGS.cluster == "tpu":
    for cmd in tpu_commands(binary_args):
      text = " ".join(c if c == "||" else shlex.quote(c) for c in cmd)
      if FLAGS.dry_run:
        print(text)
      else:
        subprocess.run(text, shell=True, check=True)
    return 0
  script = slurm_script(binary_args)
  if FLAGS.dry_run:
    print(script, end="")
    print("sbatch <script above>")
    return 0
  with tempfile.NamedTemporaryFile("w", suffix=".sbatch", delete=False) as f:
    f.write(script)
  subprocess.run(["sbatch", f.name], check=True)
  return 0


if __name__ == "__main__":
  flags.mark_flag_as_required("cluster")
  app.run(main)
