"""Launcher dry runs print the exact commands for both clusters; bad usage is one error
line. The fan-out of a sweep is tested with the sweep (tests/test_sweep.py)."""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "launch.py")


def run(*args):
  return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                        timeout=120, cwd=REPO)


def test_tpu_dry_run_creates_installs_and_runs_on_every_worker():
  proc = run("--cluster=tpu", "--dry_run", "--tpu_name=pod1", "--zone=us-east5-a",
             "--accelerator_type=v5p-32", "--repo_url=https://example.org/memdyn_jax.git", "--",
             "experiments/train.py", "--task=gsm8k", "--output_dir=gs://b/run one")
  assert proc.returncode == 0, proc.stderr
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 3
  assert "tpu-vm describe pod1" in lines[0] and "|| gcloud compute tpus tpu-vm create pod1" in lines[0]
  assert "--accelerator-type v5p-32" in lines[0]
  assert all("--worker=all" in line for line in lines[1:])
  assert "pip install -q -e ." in lines[1]
  assert "python experiments/train.py --task=gsm8k" in lines[2]
  assert "'--output_dir=gs://b/run one'" in lines[2]  # quoted for the remote shell


def test_slurm_dry_run_prints_one_process_per_gpu_script():
  proc = run("--cluster=slurm", "--dry_run", "--nodes=2", "--gpus_per_node=4", "--partition=gpu",
             "--", "experiments/train.py", "--task=gsm8k")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=gpu"):
    assert line in out
  assert "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in out
  assert "exec python experiments/train.py --task=gsm8k" in out


def test_bad_usage_is_one_clear_error_line():
  for args, needle in [(("--cluster=tpu", "--dry_run", "--", "experiments/train.py"),
                        "--tpu_name"),
                       (("--cluster=slurm", "--dry_run"), "binary"),
                       (("--cluster=slurm", "--nodes=0", "--", "experiments/train.py"),
                        "--nodes"),
                       (("--cluster=slurm", "--fan_out", "--", "experiments/train.py"),
                        "--fan_out runs experiments/sweep.py")]:
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("launch.py: error: ") and needle in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
