"""Fault injection: the train, evaluate, sweep and merge binaries are interrupted (SIGTERM,
SIGINT, SIGKILL, including while a checkpoint or record file is being written), run again,
and their final outputs compared with an uninterrupted run's: nothing is lost, nothing
differs, and a stop signal ends in one line and exit 128 + signal."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from memdyn_jax.train import checkpoints
from memdyn_jax.evaluation import records

from conftest import EVAL_CLI_FLAGS, EVAL_TASK_KWARGS, REPO_ROOT, run_binary

TASK_FLAGS = ("--task=synthetic_arith", f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}")
# 12 examples in batches of 6: 2 steps an epoch; 60 epochs leave time to interrupt.
TRAIN_FLAGS = (*TASK_FLAGS, "--global_batch_size=6", "--num_epochs=60", "--save_every_steps=10",
               "--warmup_steps=1", "--learning_rate=1e-2", "--max_length=256",
               "--overlength=truncate", "--noprogress", "--mesh_data=1")
EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}


def start(name: str, *args) -> subprocess.Popen:
  return subprocess.Popen([sys.executable, str(REPO_ROOT / "experiments" / name), *args],
                          cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env=dict(os.environ, JAX_PLATFORMS="cpu"))


def interrupt_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 300):
  """Sends `sig` as soon as `ready()` holds; returns (returncode, stdout, stderr)."""
  deadline = time.time() + timeout
  while not ready():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"finished (rc {proc.returncode}) before the fault point:\n{err[-3000:]}")
    if time.time() > deadline:
      proc.kill()
      pytest.fail("fault point never reached")
    time.sleep(0.01)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=timeout)
  return proc.returncode, out, err


def assert_stopped_cleanly(rc, out, err, sig, prog):
  assert rc == EXIT[sig], err[-3000:]
  if sig != signal.SIGKILL:
    assert "Traceback" not in err, err[-3000:]
    assert f"{prog}: " in out and f"stopped by {signal.Signals(sig).name}" in out, out


def params(run_dir: str, step: int):
  model, _ = checkpoints.restore(run_dir, step)
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


def losses(run_dir: str) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(run_dir,
                                                                          "metrics.jsonl")))}


def record_rows(run_dir: str, name: str = records.EVAL_DIR):
  rows = records.load_records(run_dir, name=name)
  return sorted(({k: v for k, v in r.items() if k != "run"} for r in rows),
                key=lambda r: (r["step"], r["split"], str(r["perturbation"]), r["example_id"]))


def assert_same_records(a, b):
  """Equal records: texts, answers and counts exactly; floats up to rounding (XLA:CPU may
  reorder a reduction between processes; seen once in ~10 runs at the 7th digit)."""
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      if isinstance(x[k], float) and isinstance(y[k], float):
        assert x[k] == pytest.approx(y[k], rel=1e-5, abs=1e-6, nan_ok=True), (k, x, y)
      else:
        assert x[k] == y[k], (k, x, y)


# ---------------------------------------------------------------------------------- train


@pytest.fixture(scope="module")
def straight_run(tiny_run, tmp_path_factory):
  _, base = tiny_run
  run = str(tmp_path_factory.mktemp("straight") / "run")
  proc = run_binary("train.py", f"--model={base}", f"--output_dir={run}", *TRAIN_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run


def _checkpoint_being_written(run: str) -> bool:
  folder = os.path.join(run, checkpoints.CHECKPOINT_DIR)
  return os.path.isdir(folder) and any("tmp" in e for e in os.listdir(folder))


@pytest.mark.parametrize("sig,point", [
    (signal.SIGTERM, "after a checkpoint"),
    (signal.SIGINT, "after a checkpoint"),
    (signal.SIGKILL, "during a checkpoint write"),
])
def test_train_interrupted_then_rerun_equals_an_uninterrupted_run(tiny_run, straight_run,
                                                                   tmp_path, sig, point):
  _, base = tiny_run
  run = str(tmp_path / "run")
  args = (f"--model={base}", f"--output_dir={run}", *TRAIN_FLAGS)
  ready = ((lambda: _checkpoint_being_written(run)) if point.startswith("during") else
           (lambda: os.path.isdir(checkpoints.checkpoint_dir(run))
            and bool(checkpoints.list_steps(run))))
  rc, out, err = interrupt_when(start("train.py", *args), ready, sig)
  assert_stopped_cleanly(rc, out, err, sig, "train.py")
  done = run_binary("train.py", *args)
  assert done.returncode == 0, done.stderr[-3000:]
  final = checkpoints.list_steps(straight_run)[-1]
  assert checkpoints.list_steps(run)[-1] == final
  for a, b in zip(params(run, final), params(straight_run, final)):
    np.testing.assert_array_equal(a, b)
  assert losses(run) == losses(straight_run)  # one line per step, none lost


@pytest.mark.parametrize("name,sig", [("train.py", signal.SIGINT), ("train.py", signal.SIGTERM),
                                      ("evaluate.py", signal.SIGINT), ("merge.py", signal.SIGTERM)])
def test_a_stop_signal_in_the_first_second_is_one_line(tiny_run, tmp_path, name, sig):
  """The walk's Ctrl-C in a binary's first seconds: swallowed (the run trained to its end,
  exit 0) or a multi-line KeyboardInterrupt. Now one line, 128 + signal, nothing written;
  merge.py is still importing JAX at that point."""
  run_dir, base = tiny_run
  copy = str(tmp_path / "run_a")
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(records.EVAL_DIR))
  out = str(tmp_path / "out")
  args = {"train.py": (f"--model={base}", f"--output_dir={out}", *TRAIN_FLAGS),
          "evaluate.py": (f"--run_dir={copy}", f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}",
                          *EVAL_CLI_FLAGS),
          "merge.py": (f"--checkpoints={copy}:2-4", f"--output_dir={out}")}[name]
  proc = start(name, *args)
  time.sleep(1.0)
  proc.send_signal(sig)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == EXIT[sig], stderr[-3000:]
  assert not stderr.strip(), stderr[-3000:]
  assert stdout.strip().splitlines() == [stdout.strip()], stdout
  assert stdout.startswith(f"{name}: stopped by {signal.Signals(sig).name} "), stdout
  if name != "merge.py":
    assert "nothing to save" in stdout
  assert not checkpoints.list_steps(out) and not os.path.exists(os.path.join(copy, "eval"))


# ------------------------------------------------------------------------------- evaluate


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_evaluate_interrupted_then_rerun_equals_an_uninterrupted_one(evaluated_run, tmp_path,
                                                                     sig):
  run_dir, _ = evaluated_run
  copy = str(tmp_path / os.path.basename(run_dir))
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(records.EVAL_DIR))
  args = (f"--run_dir={copy}", f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}",
          *EVAL_CLI_FLAGS)
  rc, out, err = interrupt_when(start("evaluate.py", *args),
                                lambda: bool(records.list_done(copy)), sig)
  assert_stopped_cleanly(rc, out, err, sig, "evaluate.py")
  assert records.list_done(copy) != records.list_done(run_dir)  # it did stop early
  done = run_binary("evaluate.py", *args)
  assert done.returncode == 0, done.stderr[-3000:]
  assert_same_records(record_rows(copy), record_rows(run_dir))
  assert (records.load_checkpoint_stats(copy) == records.load_checkpoint_stats(run_dir))


def test_evaluate_signalled_after_its_work_exits_0(tiny_run, tmp_path):
  """The walk's SIGTERM after evaluate.py finished exited 143 with training's wording."""
  copy = str(tmp_path / "run_a")
  shutil.copytree(tiny_run[0], copy, ignore=shutil.ignore_patterns(records.EVAL_DIR))
  proc = start("evaluate.py", f"--run_dir={copy}", "--steps=4", "--nograd_variance",
               f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}", *EVAL_CLI_FLAGS)
  for line in proc.stdout:  # printed once the checkpoint's records are all written
    if line.startswith("evaluate.py: step 4:"):
      proc.send_signal(signal.SIGTERM)
      break
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 0, stderr[-3000:]
  assert "evaluated 1 checkpoint(s)" in stdout and "stopped" not in stdout, stdout
  assert "will checkpoint" not in stderr, stderr


# ---------------------------------------------------------------------------------- sweep


SWEEP_FLAGS = (*TASK_FLAGS, "--learning_rates=1e-2,3e-3", *EVAL_CLI_FLAGS,
               '--overrides={"global_batch_size": 6, "num_epochs": 1, "save_every_steps": 1, '
               '"warmup_steps": 1, "max_length": 256, "overlength": "truncate"}')


def test_sweep_stopped_in_its_first_cell_then_rerun_equals_an_uninterrupted_one(tiny_run,
                                                                               tmp_path):
  _, base = tiny_run
  straight, stopped = str(tmp_path / "straight"), str(tmp_path / "stopped")
  proc = run_binary("sweep.py", f"--sweep_dir={straight}", f"--model={base}", *SWEEP_FLAGS,
                    timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  first, second = "lr0.01_ep1_frac1", "lr0.003_ep1_frac1"  # in grid order
  args = (f"--sweep_dir={stopped}", f"--model={base}", *SWEEP_FLAGS)
  rc, out, err = interrupt_when(
      start("sweep.py", *args),
      lambda: bool(records.list_done(os.path.join(stopped, first))), signal.SIGTERM, timeout=600)
  assert_stopped_cleanly(rc, out, err, signal.SIGTERM, "sweep.py")
  assert not os.path.exists(os.path.join(stopped, "analysis"))  # no analysis of half a sweep
  assert not os.path.exists(os.path.join(stopped, second))      # the next cell never started
  proc = run_binary("sweep.py", f"--sweep_dir={stopped}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  for cell in (first, second):
    assert_same_records(record_rows(os.path.join(stopped, cell)),
                        record_rows(os.path.join(straight, cell)))
  assert os.path.exists(os.path.join(stopped, "analysis", "report.md"))


# ---------------------------------------------------------------------------------- merge


def test_merge_killed_while_writing_then_rerun_equals_an_uninterrupted_one(tiny_run, tmp_path):
  run_dir, _ = tiny_run
  straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
  proc = run_binary("merge.py", f"--checkpoints={run_dir}:2-4", f"--output_dir={straight}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  args = (f"--checkpoints={run_dir}:2-4", f"--output_dir={killed}")
  rc, _, err = interrupt_when(
      start("merge.py", *args),
      lambda: any(e.startswith(os.path.basename(killed)) for e in os.listdir(tmp_path)
                  if e != "straight"), signal.SIGKILL)
  assert rc == -signal.SIGKILL
  assert not os.path.exists(os.path.join(killed, checkpoints.RUN_INFO)) or \
      checkpoints.list_steps(killed)  # never a half-written merged run
  proc = run_binary("merge.py", *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  step = checkpoints.list_steps(straight)[-1]
  for a, b in zip(params(killed, step), params(straight, step)):
    np.testing.assert_array_equal(a, b)


# ------------------------------------------------------------------- corrupt checkpoint


# How a checkpoint's array files get damaged: every one cut in half (tensorstore then fails
# opening the stores), or one data file under params/ocdbt.process_0/d/ cut in half,
# emptied or removed (orbax then fails reading the array's bytes and raises a plain
# Exception wrapping tensorstore's error: the walk's 150-line traceback).
DAMAGE = ("all halved", "one halved", "one emptied", "one missing")


def corrupt_copy(run_dir: str, copy: str, how: str = "all halved") -> int:
  """Copies a run and damages the array files of its last checkpoint (`DAMAGE`), as a full
  disk or a cut copy leaves them; returns that step."""
  shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns(records.EVAL_DIR))
  step = checkpoints.list_steps(copy)[-1]
  params_dir = os.path.join(checkpoints.checkpoint_dir(copy), str(step), "params")
  data = [os.path.join(d, f) for d, _, fs in os.walk(params_dir) for f in fs
          if os.path.basename(d) == "d"]  # tensorstore's array data files
  assert data
  if how != "all halved":  # the largest file of the process's OCDBT store: array bytes
    data = [max((p for p in data if f"ocdbt.process_0{os.sep}d{os.sep}" in p),
                key=os.path.getsize)]
  for path in data:
    if how == "one missing":
      os.remove(path)
      continue
    with open(path, "r+b") as f:
      f.truncate(0 if how == "one emptied" else os.path.getsize(path) // 2)
  return step


def listing(root: str) -> list[tuple[str, int]]:
  return sorted((os.path.relpath(os.path.join(d, f), root), os.path.getsize(os.path.join(d, f)))
                for d, _, fs in os.walk(root) for f in fs)


@pytest.mark.parametrize("how", DAMAGE)
def test_each_kind_of_damage_is_a_checkpoint_read_error(tiny_run, tmp_path, how):
  copy = str(tmp_path / "run_a")
  step = corrupt_copy(tiny_run[0], copy, how)
  with pytest.raises(checkpoints.CheckpointReadError) as info:
    checkpoints.restore(copy, step)
  assert info.value.step == step and info.value.path == os.path.join(
      checkpoints.checkpoint_dir(copy), str(step))
  assert "\n" not in str(info.value) and f"Remove {info.value.path}" in str(info.value)
  # Only storage failures are turned into it: another plain Exception passes unchanged.
  with pytest.raises(Exception, match="^unrelated$"):
    with checkpoints.reading_checkpoint(copy, step):
      raise Exception("unrelated")


def test_a_corrupt_checkpoint_is_reported_once(tiny_run, tmp_path):
  """orbax reads the damaged files concurrently and raises the first failure; the other
  reads' failures reach asyncio's "never retrieved" log at collection. Those repeats of the
  reported damage are dropped (CI saw 15 lines of them after the binary's one line); a record
  about anything else still gets through."""
  import gc
  import logging
  copy = str(tmp_path / "run_a")
  step = corrupt_copy(tiny_run[0], copy)
  seen = []
  handler = logging.Handler()
  handler.emit = seen.append
  asyncio_log = logging.getLogger("asyncio")
  asyncio_log.addHandler(handler)
  try:
    with pytest.raises(checkpoints.CheckpointReadError) as info:
      checkpoints.restore(copy, step)
    assert info.value.step == step and info.value.path.startswith(copy)
    assert "\n" not in str(info.value) and "Remove" in str(info.value)
    info = None
    gc.collect()
    about_it = ValueError(f"OUT_OF_RANGE: reading {checkpoints.checkpoint_dir(copy)}/{step}/params/d/x")
    other = ValueError("OUT_OF_RANGE: reading another store")
    for exc in (about_it, other):
      asyncio_log.error("Future exception was never retrieved", exc_info=(ValueError, exc, None))
    assert [r.exc_info[1] for r in seen] == [other], [r.getMessage() for r in seen]
  finally:
    asyncio_log.removeHandler(handler)


def test_reads_abandoned_by_a_failed_restore_print_nothing(monkeypatch):
  """orbax closes the array reads still waiting when a restore fails; its wrapper turns each
  close into an unraisable plain Exception (up to 520 stderr lines after the one-line error).
  Those are dropped; any other unraisable report still reaches the hook that was there."""
  import types
  seen = []
  monkeypatch.setattr(sys, "unraisablehook", seen.append)
  checkpoints._quiet_late_read_deliveries()

  def report(exc):
    sys.unraisablehook(types.SimpleNamespace(exc_type=type(exc), exc_value=exc,
                                             exc_traceback=None, err_msg=None, object=None))

  def wrapped(cause):
    try:
      raise Exception(f"{checkpoints._ORBAX_ARRAY_READ}: (slice(0, 4, 1),). See ...") from cause
    except Exception as e:  # noqa: BLE001 - orbax's own type
      return e

  abandoned, failed, other = wrapped(GeneratorExit()), wrapped(ValueError("DATA_LOSS: x")), \
      Exception("something else")
  for exc in (abandoned, failed, other):
    report(exc)
  assert [u.exc_value for u in seen] == [failed, other]


def test_a_stop_signal_during_a_read_is_the_stop_not_a_read_error():
  """orbax wraps whatever ends an array read, a Ctrl-C too: it comes out as the stop."""
  from memdyn_jax.signals import StopRequested
  stop = StopRequested(signal.SIGINT, "stopped by SIGINT before training started")
  with pytest.raises(StopRequested) as info:
    with checkpoints.reading_checkpoint("/runs/a", 4):
      raise Exception(f"{checkpoints._ORBAX_ARRAY_READ}: (slice(0, 4, 1),).") from stop
  assert info.value is stop


def test_a_corrupt_checkpoint_is_one_line_naming_run_step_and_fix(tiny_run, tmp_path):
  """The walk's damage (one array data file cut in half): evaluate.py, a resuming train.py
  and export.py each print one line naming the run, the step and the fix, exit 2, and
  delete nothing."""
  from conftest import assert_one_line_error
  run_dir, base = tiny_run
  copy = str(tmp_path / "run_a")
  step = corrupt_copy(run_dir, copy, "one halved")
  before = listing(copy)
  needle = f"checkpoint at step {step} cannot be read"
  proc = run_binary("evaluate.py", f"--run_dir={copy}", f"--steps={step}",
                    f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}", *EVAL_CLI_FLAGS)
  line = assert_one_line_error(proc, "evaluate.py", needle)
  assert copy in line and "Remove" in line
  # Training that resumes from it (more epochs than were run) stops the same way.
  info = checkpoints.read_run_info(copy)["config"]
  proc = run_binary("train.py", f"--model={base}", f"--output_dir={copy}", *TASK_FLAGS,
                    "--preset=none", *[f"--{k}={v}" for k, v in info.items()
                                       if k in ("learning_rate", "global_batch_size",
                                                "warmup_steps", "save_every_steps",
                                                "max_length", "overlength")],
                    "--num_epochs=2", "--noprogress", "--mesh_data=1")
  assert_one_line_error(proc, "train.py", needle)
  line = assert_one_line_error(
      run_binary("export.py", f"--run_dir={copy}", f"--output_dir={tmp_path}/x"),
      "export.py", needle)
  assert "--step" not in line  # the step was not given: the run's damage, not a bad flag
  after = dict(listing(copy))
  assert all(path in after for path, _ in before)  # nothing deleted
  assert [e for e in before if e[0].startswith(checkpoints.CHECKPOINT_DIR)] == [
      e for e in after.items() if e[0].startswith(checkpoints.CHECKPOINT_DIR)]  # nor changed
  assert not os.path.exists(tmp_path / "x")
