r"""Runs one memdyn_jax binary on a TPU pod slice or a SLURM GPU cluster, or a sweep as one
job per cell.

  # TPU: the same command on every worker of a TPU VM slice (created if absent)
  python launch/launch.py --cluster=tpu --tpu_name=memdyn-v5p --zone=us-east5-a \
      --accelerator_type=v5p-32 --repo_url=https://example.org/memdyn_jax.git -- \
      experiments/train.py --model=meta-llama/Meta-Llama-3-8B --task=gsm8k \
      --preset=kang_llama3_gsm8k --output_dir=gs://bucket/runs/lr2e-5 --mesh_fsdp=32

  # SLURM: an sbatch script, one process per GPU, jax.distributed from SLURM's variables
  python launch/launch.py --cluster=slurm --nodes=2 --gpus_per_node=8 --partition=gpu \
      --account=proj --qos=normal --time=12:00:00 --workdir=/shared/memdyn_jax \
      --hf_home=/shared/hf --hf_offline -- \
      experiments/train.py --model=... --task=gsm8k --output_dir=/shared/runs/lr2e-5

  # A sweep fanned out: one SLURM job per cell, then an analysis job after them all
  python launch/launch.py --cluster=slurm --nodes=2 --gpus_per_node=8 --partition=gpu \
      --fan_out -- experiments/sweep.py --sweep_dir=/shared/runs/kang_gsm8k \
      --model=meta-llama/Meta-Llama-3-8B --task=gsm8k --paper_grid=kang_llama3_gsm8k

`--dry_run` prints every command (and the sbatch scripts) without running or writing
anything. Inside the job, `memdyn_jax.sharding.initialize_distributed()` (called by the
binaries) finds the coordinator: JAX auto-detects TPU pods and SLURM allocations.

A SLURM job asks SLURM to warn it before its time limit (`--signal=B:TERM@<lead>`): the
script passes the SIGTERM to the processes, which finish the step, save a checkpoint and
exit 143, then it requeues the job (`--requeue`, at most `--max_requeues` times; a preempted
job is requeued by SLURM) and the re-run of the same command resumes from that checkpoint.
The lead is sized for the checkpoint of the job's `--model` (its parameter count, read from
a local config.json, this machine's HF cache or `memdyn_jax.models.presets`, x
`--checkpoint_bytes_per_param` / `--write_bandwidth_mb_s`, or `--checkpoint_seconds`), plus
a step (`--seconds_per_step`) and `--signal_margin_seconds`; the script's comments show the
sum. `--account`, `--qos`, `--constraint`, `--time` and `--sbatch_option` (any other
`#SBATCH` line, repeatable) go into every job. The nodes must see `--workdir` (default: this
checkout's path) and are often offline: `--hf_home` (a shared, pre-filled cache) and
`--hf_offline` set up the jobs for that; warnings say so when they are not given.

`--fan_out` takes an experiments/sweep.py command (any of its flags: a grid, or
`--sweep_dir` alone for a stored sweep; `--cells` picks cells). It asks that command for
its cells (`--plan`, run here: the flags are checked, nothing is written) and reads them with
the installed `memdyn_jax.studies.sweep`; then every cell runs the same command, its own
--sweep_dir, --cells, --analyze and --progress replaced by `--sweep_dir=<absolute>
--cells=<cell> --noanalyze --noprogress`, and experiments/analyze.py analyzes the sweep into
<sweep_dir>/analysis after them:
  * SLURM: one sbatch job per cell (scripts in <sweep_dir>/launch/; the sweep directory must
    be on storage the nodes share), then the analysis job, `afterany` the cells, on CPUs
    only (`--analysis_partition`, `--analysis_cpus`, `--analysis_time`). With
    `--seconds_per_step` each cell asks for the time its plan needs: its optimizer steps x
    `--seconds_per_step` + its evaluated checkpoints x `--seconds_per_eval` +
    `--time_overhead` + the signal lead, at most `--time` (a longer cell checkpoints at the
    limit and requeues); the step counts need the training-set size (`--train_examples`,
    default the sweep's `--max_examples`);
  * TPU: the slice is prepared once, the cells run on it one after the other, then the
    analysis on worker 0.
Without --dry_run, sweep.json is written before anything is submitted.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
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


# SLURM time limits: minutes, minutes:seconds, hours:minutes:seconds, days-hours,
# days-hours:minutes, days-hours:minutes:seconds (sbatch --time).
_SLURM_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?")
# The most seconds sbatch --signal=...@<seconds> takes (a 16-bit field).
MAX_SIGNAL_SECONDS = 65535
# The binaries' exit status when SIGTERM stopped them after they saved (cli.exit_status).
STOPPED_STATUS = 143


def parse_slurm_time(value: str) -> int:
  """Seconds of a SLURM time limit ("90", "4:00:00", "1-12:00:00", ...).

  Raises:
    ValueError: not a positive SLURM time.
  """
  m = _SLURM_TIME.fullmatch(value.strip())
  if not m:
    raise ValueError(value)
  days, a, b, c = m.groups()
  if days is None:  # M, M:S or H:M:S
    hours, minutes, seconds = (0, a, b or 0) if c is None else (a, b, c)
  else:  # D-H, D-H:M or D-H:M:S
    hours, minutes, seconds = a, b or 0, c or 0
  total = ((int(days or 0) * 24 + int(hours)) * 60 + int(minutes)) * 60 + int(seconds)
  if total <= 0:  # SLURM reads 0 as "no limit"
    raise ValueError(value)
  return total


def format_slurm_time(seconds: float) -> str:
  """A SLURM time limit of at least `seconds`, in whole minutes ("04:10:00", "1-02:00:00")."""
  days, minutes = divmod(math.ceil(seconds / 60), 24 * 60)
  clock = f"{minutes // 60:02d}:{minutes % 60:02d}:00"
  return f"{days}-{clock}" if days else clock


def _check_time(flag: str, value: str) -> int:
  try:
    return parse_slurm_time(value)
  except ValueError:
    raise TargetError(f"--{flag}: {value!r} is not a SLURM time limit (minutes, HH:MM:SS or "
                      "D-HH:MM:SS)") from None


def _check_word(flag: str, value: str | None) -> None:
  # Each lands on one "#SBATCH --x=<value>" line: whitespace would split or end it.
  if value is not None and (not value or re.search(r"\s", value)):
    raise TargetError(f"--{flag}: {value!r} must be one word (no spaces or newlines)")


@dataclasses.dataclass(frozen=True)
class SlurmTarget:
  """A SLURM allocation: one process per GPU.

  Attributes:
    nodes, gpus_per_node: the allocation (one process per GPU).
    partition, account, qos: sbatch's --partition, --account and --qos.
    constraint: node features of the GPU jobs (sbatch --constraint; not the CPU analysis).
    time: each job's time limit; a fanned-out cell asks for less when its steps say so
      (`JobSizing.seconds_per_step`), never more.
    job_name: job name (cells and the analysis append theirs).
    workdir: the repository checkout, at this path on the nodes.
    venv: virtualenv activated on the nodes.
    sbatch_option: extra sbatch options, one "#SBATCH" line each ("--mail-type=END").
    requeue: requeue a job that stopped at its time limit (or was preempted): the binaries
      resume from their last checkpoint when re-run with the same command.
    max_requeues: the most times a job requeues itself (SLURM_RESTART_COUNT).
    hf_home: HF_HOME of the jobs: the model and data cache, on storage the nodes share.
    hf_offline: set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 in the jobs (offline nodes
      read only that cache).
    analysis_partition: partition of the sweep's CPU-only analysis job (default: partition).
    analysis_time, analysis_cpus: the analysis job's time limit and CPUs.
  """
  nodes: int = 1
  gpus_per_node: int = 8
  partition: str | None = None
  time: str = "24:00:00"
  job_name: str = "memdyn"
  workdir: str = "."
  venv: str | None = None
  account: str | None = None
  qos: str | None = None
  constraint: str | None = None
  sbatch_option: tuple[str, ...] = ()
  requeue: bool = True
  max_requeues: int = 3
  hf_home: str | None = None
  hf_offline: bool = False
  analysis_partition: str | None = None
  analysis_time: str = "02:00:00"
  analysis_cpus: int = 8

  def __post_init__(self):
    # "#SBATCH --x" or "--x": the lines carry the option alone.
    object.__setattr__(self, "sbatch_option", tuple(
        re.sub(r"^#SBATCH\s+", "", o.strip()) for o in self.sbatch_option))

  def check(self) -> None:
    if self.gpus_per_node < 1 or self.nodes < 1:
      raise TargetError("--nodes and --gpus_per_node must be >= 1")
    for flag in ("partition", "account", "qos", "constraint", "job_name",
                 "analysis_partition"):
      _check_word(flag, getattr(self, flag))
    _check_time("time", self.time)
    _check_time("analysis_time", self.analysis_time)
    for option in self.sbatch_option:
      if not option.startswith("-") or "\n" in option:
        raise TargetError(f"--sbatch_option: {option!r} is not one sbatch option (e.g. "
                          "--sbatch_option=--mail-type=END)")
    if self.max_requeues < 0:
      raise TargetError("--max_requeues must be >= 0")
    if self.analysis_cpus < 1:
      raise TargetError("--analysis_cpus must be >= 1")


@dataclasses.dataclass(frozen=True)
class JobSizing:
  """The assumptions that size a SLURM job: the lead of its warning signal before the time
  limit (time to save a checkpoint) and, for a fanned-out sweep, each cell's time limit.

  Attributes:
    checkpoint_seconds: seconds one checkpoint takes to write; None: the base model's
      parameter count x checkpoint_bytes_per_param / write_bandwidth_mb_s.
    checkpoint_bytes_per_param: checkpoint bytes per model parameter: 12 = float32 weights
      and Adam's two float32 moments (a LoRA run saves far less: lower it).
    write_bandwidth_mb_s: assumed write bandwidth of the checkpoint storage (MB/s).
    signal_margin_seconds: added to the lead: the step in progress ends, processes exit.
    seconds_per_step: assumed seconds of one optimizer step (train.py's progress bar or
      metrics.jsonl tell); adds one step to the lead and sizes each cell's time limit.
      None: every job asks for --time.
    seconds_per_eval: assumed seconds to evaluate one checkpoint (cells' time limits).
    time_overhead: time added to each cell's limit: start-up, model loading, compilation.
    train_examples: training examples of each cell, for its step count (0: the sweep's
      --max_examples).
  """
  checkpoint_seconds: float | None = None
  checkpoint_bytes_per_param: float = 12.0
  write_bandwidth_mb_s: float = 200.0
  signal_margin_seconds: float = 60.0
  seconds_per_step: float | None = None
  seconds_per_eval: float = 0.0
  time_overhead: str = "00:30:00"
  train_examples: int = 0

  def check(self) -> None:
    for flag, ok in [("checkpoint_seconds", self.checkpoint_seconds is None
                      or self.checkpoint_seconds >= 0),
                     ("checkpoint_bytes_per_param", self.checkpoint_bytes_per_param > 0),
                     ("write_bandwidth_mb_s", self.write_bandwidth_mb_s > 0),
                     ("signal_margin_seconds", self.signal_margin_seconds >= 0),
                     ("seconds_per_step", self.seconds_per_step is None
                      or self.seconds_per_step > 0),
                     ("seconds_per_eval", self.seconds_per_eval >= 0),
                     ("train_examples", self.train_examples >= 0)]:
      if not ok:
        value = getattr(self, flag)
        raise TargetError(f"--{flag}: {value:g} must be "
                          + (">= 0" if flag in ("checkpoint_seconds", "signal_margin_seconds",
                                                "seconds_per_eval", "train_examples")
                             else "> 0"))
    _check_time("time_overhead", self.time_overhead)


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
  flags.DEFINE_string("account", None, "SLURM account to charge (sbatch --account).")
  flags.DEFINE_string("qos", None, "SLURM quality of service (sbatch --qos).")
  flags.DEFINE_string("constraint", None, "Node features of the GPU jobs (sbatch "
                      "--constraint, e.g. a100|h100); not the CPU analysis job.")
  flags.DEFINE_string("time", "24:00:00", "Each job's time limit (a fanned-out cell asks for "
                      "less when --seconds_per_step sizes it, never more).")
  flags.DEFINE_string("job_name", "memdyn", "SLURM job name.")
  flags.DEFINE_string("workdir", os.getcwd(), "Repository checkout on the nodes (default: "
                      "this one's path, which the nodes must see).")
  flags.DEFINE_string("venv", None, "Virtualenv to activate on the nodes.")
  flags.DEFINE_multi_string("sbatch_option", [], "Extra sbatch option, one #SBATCH line "
                            "each (repeat it): --sbatch_option=--mail-type=END.")
  flags.DEFINE_bool("requeue", True, "Requeue a job stopped at its time limit (after its "
                    "checkpoint) or preempted; the re-run resumes from the checkpoint.")
  flags.DEFINE_integer("max_requeues", 3, "The most times a job requeues itself.")
  flags.DEFINE_string("hf_home", None, "HF_HOME of the jobs: the pre-downloaded model and "
                      "data cache, on storage the nodes share.")
  flags.DEFINE_bool("hf_offline", False, "Set HF_HUB_OFFLINE=1 and HF_DATASETS_OFFLINE=1 in "
                    "the jobs (nodes without internet read the --hf_home cache only).")
  flags.DEFINE_string("analysis_partition", None, "Partition of the sweep's CPU-only "
                      "analysis job (default: --partition).")
  flags.DEFINE_string("analysis_time", "02:00:00", "Time limit of the analysis job.")
  flags.DEFINE_integer("analysis_cpus", 8, "CPUs of the analysis job.")
  # SLURM job sizing: the time-limit warning's lead and the cells' time limits
  flags.DEFINE_float("checkpoint_seconds", None, "Seconds one checkpoint takes to write "
                     "(default: the model's parameters x --checkpoint_bytes_per_param / "
                     "--write_bandwidth_mb_s); 0 for a job that saves none.")
  flags.DEFINE_float("checkpoint_bytes_per_param", 12.0, "Checkpoint bytes per parameter "
                     "(12: float32 weights + two Adam moments; lower for LoRA).")
  flags.DEFINE_float("write_bandwidth_mb_s", 200.0, "Assumed checkpoint write bandwidth, "
                     "MB/s.")
  flags.DEFINE_float("signal_margin_seconds", 60.0, "Seconds added to the signal lead (the "
                     "step in progress, process exit).")
  flags.DEFINE_float("seconds_per_step", None, "Assumed seconds per optimizer step: sizes "
                     "each fanned-out cell's --time from its step count.")
  flags.DEFINE_float("seconds_per_eval", 0.0, "Assumed seconds to evaluate one checkpoint "
                     "(cells' time limits).")
  flags.DEFINE_string("time_overhead", "00:30:00", "Time added to each cell's limit "
                      "(start-up, model loading, compilation).")
  flags.DEFINE_integer("train_examples", 0, "Training examples per cell, for its step count "
                       "(default: the sweep's --max_examples).")


def _from_flags(cls):
  return cls(**{f.name: getattr(FLAGS, f.name) for f in dataclasses.fields(cls)})


def tpu_target_from_flags() -> TpuTarget:
  return _from_flags(TpuTarget)


def slurm_target_from_flags() -> SlurmTarget:
  return _from_flags(SlurmTarget)


def job_sizing_from_flags() -> JobSizing:
  return _from_flags(JobSizing)


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


# --------------------------------------------------------------------------- SLURM jobs


def _sbatch_header(target: SlurmTarget, job_name: str, time: str, resources: Sequence[str],
                   partition: str | None, gpu_job: bool) -> list[str]:
  lines = ["#!/bin/bash", f"#SBATCH --job-name={job_name}",
           *(f"#SBATCH {r}" for r in resources), f"#SBATCH --time={time}",
           f"#SBATCH --output={job_name}-%j.out"]
  options = [("partition", partition), ("account", target.account), ("qos", target.qos),
             ("constraint", target.constraint if gpu_job else None)]
  lines += [f"#SBATCH --{name}={value}" for name, value in options if value]
  if target.requeue:
    # A requeued job appends to its log instead of starting it afresh.
    lines += ["#SBATCH --requeue", "#SBATCH --open-mode=append"]
  return lines


def _environment(target: SlurmTarget) -> list[str]:
  lines = ["set -euo pipefail", f"cd {shlex.quote(target.workdir)}"]
  if target.venv:
    lines.append(f"source {shlex.quote(os.path.join(target.venv, 'bin', 'activate'))}")
  if target.hf_home:
    lines.append(f"export HF_HOME={shlex.quote(target.hf_home)}")
  if target.hf_offline:
    lines.append("export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1")
  return lines


def slurm_script(target: SlurmTarget, binary_args: Sequence[str], signal_seconds: int,
                 time: str | None = None, notes: Sequence[str] = ()) -> str:
  """An sbatch script: one task per GPU; JAX's SLURM cluster detection sets up distributed.

  SLURM warns the job `signal_seconds` before its time limit (`time`, default the
  target's); the script passes that SIGTERM to the processes, which save a checkpoint and
  exit 143, then requeues the job (`target.requeue`, at most `target.max_requeues` times)
  and the re-run resumes. `notes` become comment lines (how the numbers were sized).
  """
  target.check()
  lines = _sbatch_header(target, target.job_name, time or target.time,
                         [f"--nodes={target.nodes}",
                          f"--ntasks-per-node={target.gpus_per_node}",
                          f"--gpus-per-node={target.gpus_per_node}"],
                         target.partition, gpu_job=True)
  lines.append(f"#SBATCH --signal=B:TERM@{signal_seconds}")
  lines += [f"#SBATCH {o}" for o in target.sbatch_option]
  lines += [f"# {n}" for n in notes]
  lines += _environment(target)
  # One process per GPU: each sees its own device; jax.distributed reads SLURM_* variables.
  run = ("srun --kill-on-bad-exit=1 bash -c 'export CUDA_VISIBLE_DEVICES=$SLURM_LOCALID; "
         "exec python " + _quote_args(binary_args).replace("'", "'\\''") + "' &")
  lines += [
      "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95",
      # Said in the script, for whoever reads it on the cluster.
      "# SLURM's warning before the time limit (--signal=B:TERM) reaches this shell only:",
      "# pass it on to the job step (run in the background, so that the trap runs), whose",
      "# processes save a checkpoint and exit 143; then requeue: the re-run resumes.",
      "stopping=0 step=",
      "trap 'stopping=1; kill -TERM \"$step\" 2>/dev/null || true' TERM",
      run,
      "step=$!",
      "while :; do",
      "  wait \"$step\" && status=0 || status=$?",
      "  kill -0 \"$step\" 2>/dev/null || break  # the trap cut the wait short: wait again",
      "done"]
  if target.requeue:
    lines += [
        f"if [ \"$stopping\" = 1 ] && [ \"$status\" = {STOPPED_STATUS} ] "
        f"&& [ \"${{SLURM_RESTART_COUNT:-0}}\" -lt {target.max_requeues} ]; then",
        "  echo \"launch.py: checkpointed before the time limit; requeueing job "
        "$SLURM_JOB_ID (it resumes from the checkpoint)\"",
        "  scontrol requeue \"$SLURM_JOB_ID\" || echo \"launch.py: requeue failed: submit the "
        "job again to resume\"",
        "fi"]
  lines.append("exit \"$status\"")
  return "\n".join(lines) + "\n"


def slurm_cpu_script(target: SlurmTarget, binary_args: Sequence[str]) -> str:
  """An sbatch script running `python <binary_args>` as one CPU-only task (the sweep's
  analysis: no GPU, `target.analysis_*` resources; requeued only if preempted)."""
  target.check()
  lines = _sbatch_header(target, target.job_name, target.analysis_time,
                         ["--nodes=1", "--ntasks=1", f"--cpus-per-task={target.analysis_cpus}"],
                         target.analysis_partition or target.partition, gpu_job=False)
  lines += [f"#SBATCH {o}" for o in target.sbatch_option]
  lines += _environment(target)
  lines += ["export JAX_PLATFORMS=cpu", "exec python " + _quote_args(binary_args)]
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


# ------------------------------------------------------------------------ SLURM job sizing


def flag_value(args: Sequence[str], name: str) -> str | None:
  """The value of flag `name` in an absl command line (`--name=v` or `--name v`; the last
  one, as absl keeps), or None."""
  value = None
  for i, arg in enumerate(args):
    m = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg, re.DOTALL)
    if m:
      value = m.group(1) if m.group(1) is not None else (
          args[i + 1] if i + 1 < len(args) else None)
  return value


def model_num_params(model: str) -> int | None:
  """The parameter count of a base model reference, read here without downloading:
  'embedded', a local HF directory (its config.json), a hub id in this machine's HF cache
  or one of the papers' models (`models.presets.HUB_IDS`); None for anything else (a
  .gguf file, an unknown hub id, an architecture the library does not build)."""
  from memdyn_jax.models import embedded, presets, registry
  if model == embedded.EMBEDDED_NAME:
    model = embedded.ASSET_DIR
  path = os.path.join(model, "config.json")
  if not os.path.isfile(path) and not os.path.exists(model) and model.count("/") == 1:
    import huggingface_hub  # the cache only: nothing is fetched
    cached = huggingface_hub.try_to_load_from_cache(model, "config.json")
    path = cached if isinstance(cached, str) else None
  try:
    if path and os.path.isfile(path):
      with open(path) as f:
        raw = json.load(f)
    elif model in presets.HUB_IDS:
      raw = presets.preset_hf_config(presets.HUB_IDS[model])
    else:
      return None
    return registry.num_params(registry.from_hf_config(raw))
  except (OSError, ValueError, KeyError, TypeError):  # unreadable, or not an architecture here
    return None


def signal_lead(sizing: JobSizing, model: str | None) -> tuple[int, str]:
  """(seconds, how they were sized): the lead of the SIGTERM that warns a job before its
  time limit, long enough to finish the step in progress and write a checkpoint of
  `model` (the job's --model, None if it has none).

  Raises:
    TargetError: the checkpoint cannot be sized here (give --checkpoint_seconds), or the
      lead exceeds what sbatch takes.
  """
  if sizing.checkpoint_seconds is not None:
    write = sizing.checkpoint_seconds
    how = f"{write:g} s checkpoint (--checkpoint_seconds)"
  else:
    params = model_num_params(model) if model else None
    if params is None:
      what = f"--model={model}" if model else "a job without --model"
      raise TargetError(f"--checkpoint_seconds: cannot size the checkpoint of {what} here "
                        "(not 'embedded', a local HF directory, a cached hub id or a preset "
                        "model); give the seconds one checkpoint takes to write (0 if the "
                        "job saves none)")
    write = params * sizing.checkpoint_bytes_per_param / (sizing.write_bandwidth_mb_s * 1e6)
    how = (f"{params:,} params x {sizing.checkpoint_bytes_per_param:g} B "
           f"(--checkpoint_bytes_per_param) / {sizing.write_bandwidth_mb_s:g} MB/s "
           f"(--write_bandwidth_mb_s) = {write:.0f} s checkpoint")
  step = sizing.seconds_per_step or 0.0
  seconds = math.ceil(write + step + sizing.signal_margin_seconds)
  how += ((f" + {step:g} s step in progress (--seconds_per_step)" if step else "")
          + f" + {sizing.signal_margin_seconds:g} s (--signal_margin_seconds)")
  if seconds > MAX_SIGNAL_SECONDS:
    raise TargetError(f"--write_bandwidth_mb_s: the signal lead ({how} = {seconds} s) "
                      f"exceeds sbatch's {MAX_SIGNAL_SECONDS} s; raise the bandwidth or "
                      "give --checkpoint_seconds")
  return seconds, f"--signal lead: {how} = {seconds} s"


def check_time_fits_lead(flag: str, time: str, lead: int) -> None:
  """A time limit must outlast the signal lead, or the job is warned as it starts."""
  if parse_slurm_time(time) <= lead:
    raise TargetError(f"--{flag}: {time} is not longer than the {lead} s signal lead "
                      "(the time to save a checkpoint); ask for more time")


def cell_time(sizing: JobSizing, cfg, evaluation, num_examples: int, lead: int
              ) -> tuple[float, str]:
  """(seconds, how they were sized) a sweep cell needs: its optimizer steps x
  --seconds_per_step, its evaluated checkpoints x --seconds_per_eval, --time_overhead and
  the signal lead.

  Args:
    sizing: the assumptions (`seconds_per_step` set).
    cfg: the cell's TrainConfig.
    evaluation: the sweep's EvalSettings (which checkpoints are evaluated).
    num_examples: training examples (before the cell's data fraction).
    lead: the signal lead (seconds).
  """
  from memdyn_jax.train import config as train_config
  steps = cfg.total_steps(num_examples)
  saved = train_config.checkpoint_steps(
      cfg, steps, train_config.subset_size(num_examples, cfg.data_fraction))
  evals = (len(train_config.spread_steps(saved, evaluation.checkpoints_per_run))
           + int(evaluation.include_base))
  overhead = parse_slurm_time(sizing.time_overhead)
  seconds = steps * sizing.seconds_per_step + evals * sizing.seconds_per_eval + overhead + lead
  return seconds, (f"{steps} steps x {sizing.seconds_per_step:g} s (--seconds_per_step) + "
                   f"{evals} checkpoint evaluation(s) x {sizing.seconds_per_eval:g} s "
                   "(--seconds_per_eval)"
                   f" + {overhead} s (--time_overhead) + {lead} s signal lead")


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


def without_flags(args: Sequence[str], names: Sequence[str], bools: Sequence[str] = ()
                  ) -> list[str]:
  """`args` without the flags `names` (`--name=v` or `--name v`) and the boolean flags
  `bools` (`--name`, `--noname`, `--name=false`)."""
  out, skip_value = [], False
  for arg in args:
    if skip_value:
      skip_value = False
      continue
    m = re.fullmatch(r"--?([A-Za-z0-9_]+)(=.*)?", arg, re.DOTALL)
    if m and m.group(1) in names:
      skip_value = m.group(2) is None
      continue
    if m and (m.group(1) in bools or (m.group(2) is None and m.group(1).startswith("no")
                                      and m.group(1)[2:] in bools)):
      continue
    out.append(arg)
  return out


def cell_args(sweep_args: Sequence[str], sweep, cell) -> list[str]:
  """The command line of one cell's job: the sweep command with its own --sweep_dir,
  --cells, --analyze and --progress replaced (the absolute sweep directory, that cell,
  no analysis, no progress bars)."""
  kept = without_flags(sweep_args, ("sweep_dir", "cells"), ("analyze", "progress", "plan"))
  return [*kept, f"--sweep_dir={sweep.sweep_dir}", f"--cells={cell.name}", "--noanalyze",
          "--noprogress"]


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


def slurm_fan_out_jobs(target: SlurmTarget, sizing: JobSizing, sweep_args: Sequence[str],
                       sweep, cells) -> tuple[list[tuple[str, str, bool]], list[str]]:
  """(jobs, warnings): (script path, sbatch script, runs after the cells) of every job, one
  per cell, then the CPU-only analysis; warnings about cells that need more than --time.

  Each cell's time limit is --time, or with `sizing.seconds_per_step` what its steps and
  evaluations need (`cell_time`), at most --time.

  Raises:
    TargetError: a bad sizing (`signal_lead`), a --time shorter than the signal lead, or
      per-cell times without a known training-set size.
  """
  lead, lead_note = signal_lead(sizing, sweep.model)
  max_time = parse_slurm_time(target.time)
  check_time_fits_lead("time", target.time, lead)
  num_examples = sizing.train_examples or sweep.task.max_examples
  # Even max_steps cells need it: their checkpoints every N epochs are counted over it.
  if sizing.seconds_per_step is not None and not num_examples:
    raise TargetError("--train_examples: per-cell time limits (--seconds_per_step) need the "
                      "training set size: give --train_examples=N (or --max_examples to "
                      "the sweep)")
  scripts_dir = os.path.join(sweep.sweep_dir, "launch")
  jobs, over = [], []
  for cell in cells:
    time, notes = target.time, [lead_note]
    if sizing.seconds_per_step is not None:
      seconds, how = cell_time(sizing, cell.config, sweep.evaluation, num_examples, lead)
      time = format_slurm_time(min(seconds, max_time))
      notes.append(f"--time: {how} = {format_slurm_time(seconds)}"
                   + (f", at most --time={target.time}" if seconds > max_time else ""))
      if seconds > max_time:
        over.append(cell.name)
    one = dataclasses.replace(target, job_name=f"{target.job_name}-{cell.name}")
    jobs.append((os.path.join(scripts_dir, f"{cell.name}.sbatch"),
                 slurm_script(one, cell_args(sweep_args, sweep, cell), lead, time, notes),
                 False))
  analysis = dataclasses.replace(target, job_name=f"{target.job_name}-analysis")
  jobs.append((os.path.join(scripts_dir, "analysis.sbatch"),
               slurm_cpu_script(analysis, analysis_args(sweep_args, sweep)), True))
  warnings = []
  if over:
    then = (f"requeue and resume (at most {target.max_requeues} times, --max_requeues)"
            if target.requeue else "submit them again to resume (--norequeue)")
    warnings.append(f"{len(over)} cell(s) need more than --time={target.time} ({', '.join(over)}):"
                    f" they checkpoint at the limit, then {then}")
  return jobs, warnings


def slurm_warnings(target: SlurmTarget, workdir_given: bool) -> list[str]:
  """What a SLURM user must see to before the jobs run: the nodes must see the checkout,
  and usually have no internet."""
  warnings = []
  if not workdir_given:
    warnings.append(f"--workdir defaults to this machine's checkout {target.workdir}: the "
                    "compute nodes must see it at that path (shared storage), or stage the "
                    "repository there and pass --workdir")
  if not target.hf_offline:
    warnings.append("compute nodes are often offline: download the model and data first "
                    "into a shared cache, then pass --hf_home=<it> --hf_offline (README: "
                    "Launching on pods and clusters)")
  return warnings


def warn(message: str) -> None:
  print(f"{PROG}: warning: {message}", file=sys.stderr, flush=True)


def fan_out(cluster: str, sweep_args: Sequence[str], dry_run: bool) -> None:
  """Runs (or with `dry_run` prints) the jobs of a sweep on `cluster` ("tpu" or "slurm",
  set up by the cluster flags).

  Raises:
    TargetError: bad cluster flags (checked before the sweep is planned) or sizing.
    SweepPlanError: the sweep command refused its flags.
  """
  from memdyn_jax.studies import sweep as sweep_lib
  target = tpu_target_from_flags() if cluster == "tpu" else slurm_target_from_flags()
  target.check()
  if cluster == "slurm":
    sizing = job_sizing_from_flags()
    sizing.check()
  sweep, cells = sweep_plan(sweep_args)
  if cluster == "tpu":
    if not dry_run:
      sweep_lib.write_sweep(sweep)
    for cmd in tpu_fan_out_commands(target, sweep_args, sweep, cells):
      run_shell(shell_line(cmd), dry_run)
    return
  jobs, warnings = slurm_fan_out_jobs(target, sizing, sweep_args, sweep, cells)
  for message in slurm_warnings(target, FLAGS["workdir"].present) + warnings:
    warn(message)
  if not dry_run:
    sweep_lib.write_sweep(sweep)
  ids = []
  for path, script, after_cells in jobs:
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


def slurm_job(binary_args: Sequence[str]) -> tuple[str, list[str]]:
  """(sbatch script, warnings) of one binary as a SLURM job, from the flags; its signal
  lead is sized for a checkpoint of the binary's --model.

  Raises:
    TargetError: a bad flag.
  """
  target, sizing = slurm_target_from_flags(), job_sizing_from_flags()
  target.check()
  sizing.check()
  lead, note = signal_lead(sizing, flag_value(binary_args, "model"))
  check_time_fits_lead("time", target.time, lead)
  return (slurm_script(target, binary_args, lead, notes=[note]),
          slurm_warnings(target, FLAGS["workdir"].present))


def parse_flags(argv):
  """absl's flag parsing, a bad flag value as one error line (exit 2); --help exits 0."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    sys.exit(fail(str(e)))
  except SystemExit as e:  # absl's help flags exit 1 after printing the help
    sys.exit(0 if e.code == 1 else e.code)


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
      script, warnings = slurm_job(binary_args)
  except TargetError as e:
    return fail(str(e))
  except SweepPlanError as e:  # the sweep binary's own error line
    sys.stderr.write(e.stderr)
    return e.returncode
  if FLAGS.cluster == "tpu":
    for line in commands:
      run_shell(line, FLAGS.dry_run)
    return 0
  for message in warnings:
    warn(message)
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
  app.run(main, flags_parser=parse_flags)
