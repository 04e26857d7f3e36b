"""Launcher dry runs print the exact commands for both clusters; bad usage is one error
line. SLURM jobs: the cluster options, the time-limit warning sized for a checkpoint and the
requeue (the script itself run here under stand-in srun/scontrol), per-cell time limits of a
fanned-out sweep, its CPU-only analysis job, and the warnings. The fan-out of a sweep that
ran is tested with the sweep (tests/test_sweep.py)."""
import math
import os
import re
import shlex
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch", "launch.py")
# Meta-Llama-3-8B's parameter count (models.presets.PUBLISHED_NUM_PARAMS["llama3-8b"]).
LLAMA3_8B_PARAMS = 8_030_261_248


def run(*args):
  return subprocess.run([sys.executable, LAUNCH, *args], capture_output=True, text=True,
                        timeout=120, cwd=REPO)


def warnings_of(proc) -> list[str]:
  return [line for line in proc.stderr.splitlines() if line.startswith("launch.py: warning:")]


def sbatch_lines(script: str) -> list[str]:
  return [line for line in script.splitlines() if line.startswith("#SBATCH ")]


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
             "--", "experiments/train.py", "--model=embedded", "--task=gsm8k")
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  for line in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=4", "#SBATCH --gpus-per-node=4",
               "#SBATCH --partition=gpu"):
    assert line in out
  assert "CUDA_VISIBLE_DEVICES=$SLURM_LOCALID" in out
  assert "exec python experiments/train.py --model=embedded --task=gsm8k" in out


def test_slurm_dry_run_shows_the_cluster_options_and_the_requeue():
  proc = run("--cluster=slurm", "--dry_run", "--partition=gpu", "--account=proj7",
             "--qos=high", "--constraint=a100|h100", "--time=2-00:00:00",
             "--sbatch_option=--mail-type=END", "--sbatch_option=#SBATCH --exclusive",
             "--workdir=/shared/memdyn_jax", "--hf_home=/shared/hf", "--hf_offline",
             "--max_requeues=5", "--checkpoint_seconds=100", "--",
             "experiments/train.py", "--model=meta-llama/Meta-Llama-3-8B")
  assert proc.returncode == 0, proc.stderr
  lines = sbatch_lines(proc.stdout)
  for line in ("--account=proj7", "--qos=high", "--constraint=a100|h100",
               "--time=2-00:00:00", "--mail-type=END", "--exclusive", "--requeue",
               "--open-mode=append", "--signal=B:TERM@160"):
    assert f"#SBATCH {line}" in lines, (line, lines)
  script = proc.stdout
  assert "cd /shared/memdyn_jax" in script
  assert "export HF_HOME=/shared/hf" in script
  assert "export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1" in script
  assert '"${SLURM_RESTART_COUNT:-0}" -lt 5' in script and "scontrol requeue" in script
  # The directives come before the first command (sbatch stops reading them there).
  first_command = script.index("set -euo pipefail")
  assert all(script.index(line) < first_command for line in lines)
  assert warnings_of(proc) == []  # --workdir and --hf_offline given: nothing to warn about


def test_norequeue_still_passes_the_warning_on_but_does_not_requeue():
  proc = run("--cluster=slurm", "--dry_run", "--norequeue", "--checkpoint_seconds=0", "--",
             "experiments/analyze.py", "--sweep_dir=/shared/s")
  assert proc.returncode == 0, proc.stderr
  assert "#SBATCH --requeue" not in proc.stdout and "scontrol" not in proc.stdout
  assert "#SBATCH --signal=B:TERM@60" in proc.stdout  # only --signal_margin_seconds
  assert "trap 'stopping=1; kill -TERM" in proc.stdout


@pytest.mark.parametrize("model,extra,params", [
    ("meta-llama/Meta-Llama-3-8B", [], LLAMA3_8B_PARAMS),  # a preset model's hub id
    ("meta-llama/Meta-Llama-3-8B", ["--checkpoint_bytes_per_param=2",
                                    "--write_bandwidth_mb_s=1000", "--seconds_per_step=7.5",
                                    "--signal_margin_seconds=10"], LLAMA3_8B_PARAMS),
    ("embedded", [], None),  # the shipped model's config.json: a few hundred thousand
])
def test_signal_lead_is_sized_from_the_models_checkpoint(model, extra, params):
  proc = run("--cluster=slurm", "--dry_run", *extra, "--", "experiments/train.py",
             f"--model={model}")
  assert proc.returncode == 0, proc.stderr
  flags = dict(a[2:].split("=", 1) for a in extra)
  per_param = float(flags.get("checkpoint_bytes_per_param", 12))
  bandwidth = float(flags.get("write_bandwidth_mb_s", 200)) * 1e6
  margin = float(flags.get("signal_margin_seconds", 60))
  step = float(flags.get("seconds_per_step", 0))
  note = re.search(r"# --signal lead: ([\d,]+) params", proc.stdout).group(1)
  counted = int(note.replace(",", ""))
  if params is not None:
    assert counted == params
  else:
    assert 10_000 < counted < 10_000_000
  lead = math.ceil(counted * per_param / bandwidth + step + margin)
  assert f"#SBATCH --signal=B:TERM@{lead}" in proc.stdout
  if not extra:
    assert model != "meta-llama/Meta-Llama-3-8B" or lead == 542  # 96 GB at 200 MB/s + 60 s


def test_sweep_fan_out_sizes_each_cell_and_asks_cpu_only_for_the_analysis(tmp_path):
  sweep_dir = str(tmp_path / "sweep")
  proc = run("--cluster=slurm", "--dry_run", "--nodes=2", "--gpus_per_node=4",
             "--partition=gpu", "--analysis_partition=cpu", "--analysis_cpus=4",
             "--constraint=h100", "--account=proj7", "--time=0:20:00",
             "--seconds_per_step=30", "--seconds_per_eval=120", "--time_overhead=10",
             "--checkpoint_seconds=30", "--signal_margin_seconds=30", "--fan_out", "--",
             "experiments/sweep.py", "--sweep_dir", sweep_dir, "--model=embedded",
             "--task=synthetic_arith", "--max_examples=64", "--learning_rates=1e-3",
             "--epochs=1,2", "--global_batch_size=8", "--save_every_epochs=1",
             "--cells=lr0.001_ep1_frac1,lr0.001_ep2_frac1", "--noanalyze")
  assert proc.returncode == 0, proc.stderr[-3000:]
  scripts = dict(re.findall(r"^# (\S+\.sbatch)\n(.*?)^sbatch ", proc.stdout, re.S | re.M))
  launch_dir = os.path.join(sweep_dir, "launch")
  ep1, ep2, analysis = (scripts[os.path.join(launch_dir, f"{n}.sbatch")]
                        for n in ("lr0.001_ep1_frac1", "lr0.001_ep2_frac1", "analysis"))
  # Lead: 30 s checkpoint + 30 s step in progress + 30 s margin = 90 s.
  # ep1: 64 examples / 8 = 8 steps x 30 s + 1 checkpoint x 120 s + 10 min + 90 s = 17.5 min.
  # ep2: 16 steps x 30 s + 2 x 120 s + 600 s + 90 s = 24 min, more than --time=0:20:00.
  assert "#SBATCH --time=00:18:00" in sbatch_lines(ep1)
  assert "#SBATCH --time=00:20:00" in sbatch_lines(ep2)
  assert "# --time: 8 steps x 30 s (--seconds_per_step) + 1 checkpoint evaluation(s)" in ep1
  assert "= 00:24:00, at most --time=0:20:00" in ep2
  for cell in (ep1, ep2):
    assert "#SBATCH --signal=B:TERM@90" in cell and "#SBATCH --constraint=h100" in cell
    assert "#SBATCH --account=proj7" in cell and "#SBATCH --gpus-per-node=4" in cell
    # The user's --sweep_dir (given as two words), --cells and --noanalyze are replaced.
    argv = shlex.split(re.search(r"exec python (.*)' &$", cell, re.M).group(1))
    assert [a for a in argv if "sweep_dir" in a] == [f"--sweep_dir={sweep_dir}"]
    assert sweep_dir not in [a for a in argv if not a.startswith("--")]
    assert len([a for a in argv if a.startswith("--cells")]) == 1
    assert argv.count("--noanalyze") == 1
  # The analysis: one CPU task, its own partition and time, no GPU, nothing to checkpoint.
  lines = sbatch_lines(analysis)
  for line in ("--ntasks=1", "--cpus-per-task=4", "--partition=cpu", "--time=02:00:00",
               "--account=proj7"):
    assert f"#SBATCH {line}" in lines
  assert not [line for line in lines if re.search(r"gpu|gres|constraint|signal", line)]
  assert "export JAX_PLATFORMS=cpu" in analysis and "CUDA_VISIBLE_DEVICES" not in analysis
  warnings = warnings_of(proc)
  assert len(warnings) == 3, proc.stderr
  assert "--workdir defaults to this machine's checkout" in warnings[0]
  assert "offline" in warnings[1] and "--hf_offline" in warnings[1]
  assert "1 cell(s) need more than --time=0:20:00 (lr0.001_ep2_frac1)" in warnings[2]
  assert not os.path.exists(sweep_dir)  # a dry run writes nothing


def test_per_cell_time_needs_the_training_set_size(tmp_path):
  proc = run("--cluster=slurm", "--dry_run", "--seconds_per_step=1", "--checkpoint_seconds=0",
             "--fan_out", "--", "experiments/sweep.py", f"--sweep_dir={tmp_path}",
             "--model=embedded", "--task=synthetic_arith", "--learning_rates=1e-3")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert proc.stderr.startswith("launch.py: error: --train_examples: ")
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_slurm_script_passes_the_warning_on_and_requeues(tmp_path):
  """The script itself, run by bash with stand-ins for srun (runs the task) and scontrol
  (records its arguments): SIGTERM to the batch shell reaches the task, which saves and
  exits 143; the job then requeues itself, but not past --max_requeues."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "srun").write_text('#!/bin/bash\nshift\nexec "$@"\n')
  (bin_dir / "scontrol").write_text(f'#!/bin/bash\necho "$@" >> {tmp_path}/scontrol\n')
  (tmp_path / "task.py").write_text(
      "import signal, sys, time\n"
      "def stop(*_):\n"
      "  open(sys.argv[1] + '/saved', 'w').close()\n"
      "  sys.exit(143)\n"
      "signal.signal(signal.SIGTERM, stop)\n"
      "open(sys.argv[1] + '/ready', 'w').close()\n"
      "time.sleep(60)\n")
  for path in ("srun", "scontrol"):
    os.chmod(bin_dir / path, 0o755)
  proc = run("--cluster=slurm", "--dry_run", f"--workdir={tmp_path}", "--max_requeues=1",
             "--checkpoint_seconds=1", "--", "task.py", str(tmp_path))
  assert proc.returncode == 0, proc.stderr
  script = proc.stdout.rsplit("sbatch <script above>", 1)[0]
  (tmp_path / "job.sbatch").write_text(script)

  def job(restarts):
    for name in ("ready", "saved", "scontrol"):
      if (tmp_path / name).exists():
        (tmp_path / name).unlink()
    env = dict(os.environ, SLURM_JOB_ID="42",
               SLURM_LOCALID="0", SLURM_RESTART_COUNT=str(restarts))
    # The script runs `python`: this one.
    env["PATH"] = f"{bin_dir}:{os.path.dirname(sys.executable)}:{os.environ['PATH']}"
    shell = subprocess.Popen(["bash", str(tmp_path / "job.sbatch")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 30
    while not (tmp_path / "ready").exists() and time.time() < deadline:
      time.sleep(0.05)
    shell.send_signal(signal.SIGTERM)  # SLURM's --signal=B:TERM: the batch shell only
    out, _ = shell.communicate(timeout=30)
    requeued = ((tmp_path / "scontrol").read_text() if (tmp_path / "scontrol").exists()
                else "")
    return shell.returncode, out, (tmp_path / "saved").exists(), requeued

  status, out, saved, requeued = job(restarts=0)
  assert (status, saved, requeued) == (143, True, "requeue 42\n"), out
  assert "requeueing job 42" in out
  status, out, saved, requeued = job(restarts=1)  # --max_requeues=1 reached
  assert (status, saved, requeued) == (143, True, ""), out


@pytest.mark.parametrize("args,needle", [
    (("--time=abc",), "--time: 'abc' is not a SLURM time limit"),
    (("--time=0",), "--time: '0'"),
    (("--analysis_time=1:2:3:4",), "--analysis_time:"),
    (("--time_overhead=x",), "--time_overhead:"),
    (("--account=my proj",), "--account: 'my proj' must be one word"),
    (("--qos=a\nb",), "--qos:"),
    (("--sbatch_option=mail-type=END",), "--sbatch_option: 'mail-type=END'"),
    (("--max_requeues=-1",), "--max_requeues must be >= 0"),
    (("--analysis_cpus=0",), "--analysis_cpus must be >= 1"),
    (("--seconds_per_step=0",), "--seconds_per_step: 0 must be > 0"),
    (("--seconds_per_step=abc",), "--seconds_per_step"),  # absl's parse error, one line
    (("--write_bandwidth_mb_s=0",), "--write_bandwidth_mb_s: 0 must be > 0"),
    (("--checkpoint_seconds=-1",), "--checkpoint_seconds: -1 must be >= 0"),
    (("--checkpoint_bytes_per_param=0",), "--checkpoint_bytes_per_param"),
    (("--train_examples=-3",), "--train_examples: -3 must be >= 0"),
    (("--checkpoint_seconds=600", "--time=10"), "--time: 10 is not longer than the 660 s"),
    (("--write_bandwidth_mb_s=0.0001",), "--write_bandwidth_mb_s: the signal lead"),
])
def test_bad_slurm_flag_values_are_one_error_line_naming_the_flag(args, needle):
  proc = run("--cluster=slurm", "--dry_run", *args, "--", "experiments/train.py",
             "--model=embedded")
  assert proc.returncode == 2, proc.stderr
  assert proc.stderr.startswith("launch.py: error: ") and needle in proc.stderr, proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_an_unsized_model_asks_for_checkpoint_seconds():
  for model_args in (["--model=someone/unknown-model"], ["--task=gsm8k"]):
    proc = run("--cluster=slurm", "--dry_run", "--", "experiments/train.py", *model_args)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("launch.py: error: --checkpoint_seconds: cannot size")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


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
