"""Sweeps: grid cells and names (product and paper grids), experiments/sweep.py end to end on
two tiny runs, its resume (nothing redone; a crashed cell resumes), and launch/launch.py's
SLURM / TPU fan-out of it in dry-run mode (whose per-cell command, run here, finds its cell
done)."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from memdyn_jax.train import checkpoints
from memdyn_jax.evaluation import records
from memdyn_jax.studies import sweep as sweep_lib
from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError
from memdyn_jax.train.config import PRESETS
from memdyn_jax.train.task_run import TaskSpec

from conftest import (EVAL_CLI_FLAGS, EVAL_TASK_KWARGS, REPO_ROOT, assert_one_line_error,
                      run_binary)

TRAIN_OVERRIDES = {"global_batch_size": 6, "num_epochs": 1, "save_every_steps": 1,
                   "warmup_steps": 1, "max_length": 256, "overlength": "truncate"}
UNITS = (("train", None), ("test", None), ("perturbed", "First"))  # of EVAL_CLI_FLAGS


def run_cli(*args):
  return run_binary("sweep.py", *args, timeout=600)


# ------------------------------------------------------------------------------ grids


def test_product_grid_cells_and_names(tmp_path):
  grid = sweep_lib.Grid(presets=("kang_llama3_gsm8k", "kang_gemma2_gsm8k"),
                        learning_rates=("1e-4", 2e-5), epochs=(3,),
                        data_fractions=(1.0, 0.5), overrides={"global_batch_size": 8})
  sweep = sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("gsm8k"), grid, EvalSettings())
  assert len(sweep.cells) == 8
  first = sweep.cells[0]
  assert first.name == "kang_llama3_gsm8k_lr0.0001_ep3_frac1"
  assert first.run_dir == os.path.join(str(tmp_path), first.name)
  cfg = first.config
  assert (cfg.learning_rate, cfg.num_epochs, cfg.data_fraction) == (1e-4, 3.0, 1.0)
  assert cfg.global_batch_size == 8 and cfg.warmup_steps == 20  # override, then the preset
  gemma = [c for c in sweep.cells if c.preset == "kang_gemma2_gsm8k"]
  assert len(gemma) == 4 and all(c.config.optimizer == "adam" for c in gemma)
  # The evaluation reads the training task.
  assert sweep.evaluation.task == "gsm8k" and sweep.evaluation.task_kwargs == {}
  assert [c.name for c in sweep.select(["kang_gemma2_gsm8k_lr2e-05_ep3_frac0.5"])] == [
      "kang_gemma2_gsm8k_lr2e-05_ep3_frac0.5"]
  with pytest.raises(sweep_lib.SweepError, match="cells"):
    sweep.select(["nope"])


def test_paper_grid_is_the_presets_runs(tmp_path):
  grid = sweep_lib.Grid(paper_grid="kang_llama3_gsm8k", overrides={"save_every_epochs": 0.25})
  sweep = sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("gsm8k"), grid, EvalSettings())
  assert len(sweep.cells) == len(PRESETS["kang_llama3_gsm8k"].grid) == 13
  assert [c.config for c in sweep.cells] == [
      c.replace(save_every_epochs=0.25) for c in PRESETS["kang_llama3_gsm8k"].runs()]
  names = [c.name for c in sweep.cells]
  assert "lr2e-05_ep6_frac0.5_steps3ep" in names and "lr2e-05_ep12_frac0.25_steps3ep" in names
  assert len(set(names)) == 13


def test_a_sweep_json_written_before_a_setting_existed_still_matches(tmp_path):
  """Settings added since sweep.json was written take their defaults: not a difference; a
  stored value that differs still is."""
  grid = sweep_lib.Grid(learning_rates=(1e-3,), epochs=(1,))
  sweep = sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("gsm8k"), grid, EvalSettings())
  stored = json.loads(json.dumps(sweep.to_json()))
  del stored["evaluation"]["distance_from_init"]
  del stored["cells"][0]["config"]["checkpoints_to_save"]
  assert sweep_lib.check_same(sweep, stored) is False
  stored["cells"][0]["config"]["save_every_steps"] = 7
  with pytest.raises(sweep_lib.SweepError, match="save_every_steps"):
    sweep_lib.check_same(sweep, stored)


def test_sweep_json_states_the_sampling_used_and_explicit_defaults_are_the_same_sweep(tmp_path):
  """Unset sampling settings are recorded as the task's (were null), so passing a default
  explicitly is the same sweep; a sweep.json with the nulls still matches."""
  grid = sweep_lib.Grid(learning_rates=(1e-3,), epochs=(1,))
  make = lambda **kw: sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("math"), grid,
                                           EvalSettings(**kw))
  sweep = make()
  evaluation = sweep.to_json()["evaluation"]
  assert (evaluation["temperature"], evaluation["top_p"], evaluation["max_new_tokens"],
          evaluation["n_samples"], evaluation["top_k"], evaluation["stop"]) == (
              0.8, 1.0, 1024, 5, 0, ["\nDone."])
  explicit = make(temperature=0.8, top_p=1.0, stop=("\nDone.",))
  assert explicit.to_json() == sweep.to_json()
  stored = json.loads(json.dumps(sweep.to_json()))
  for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
               "max_new_tokens", "n_samples", "stop"):
    stored["evaluation"][name] = None
  assert sweep_lib.check_same(explicit, stored) is False
  stored["evaluation"]["top_p"] = 0.9
  with pytest.raises(sweep_lib.SweepError, match="top_p"):
    sweep_lib.check_same(explicit, stored)
  with pytest.raises(sweep_lib.SweepError) as e:
    sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("gsm8K"), grid, EvalSettings())
  assert e.value.field == "task"


@pytest.mark.parametrize("kwargs,field", [
    (dict(presets=("nope",)), "presets"),
    (dict(learning_rates=("x",)), "learning_rates"),
    (dict(paper_grid="nope"), "paper_grid"),
    (dict(paper_grid="kang_llama3_gsm8k", epochs=(1,)), "paper_grid"),
    (dict(paper_grid="kang_llama3_gsm8k", overrides={"learning_rate": 1e-3}), "overrides"),
    (dict(learning_rates=(1e-3,), overrides={"learning_rate": 1e-4}), "overrides"),
    (dict(overrides={"no_such_field": 1}), "overrides"),
])
def test_bad_grids_name_the_field(kwargs, field):
  with pytest.raises(sweep_lib.SweepError) as e:
    sweep_lib.Grid(**kwargs)
  assert e.value.field == field


def test_bad_values_inside_cells_name_the_axis(tmp_path):
  grid = sweep_lib.Grid(data_fractions=(2.0,))
  with pytest.raises(sweep_lib.SweepError) as e:
    sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("gsm8k"), grid, EvalSettings())
  assert e.value.field == "data_fractions"
  with pytest.raises(EvalSettingsError) as e:
    EvalSettings(splits=("train", "bogus"))
  assert e.value.field == "splits"


# Prints {flag: default} of the flags experiments/evaluate.py defines (no JAX import).
_EVALUATE_FLAGS = """
import importlib.util, json, sys
from absl import app, flags, logging
import memdyn_jax.cli
before = set(flags.FLAGS)
spec = importlib.util.spec_from_file_location("evaluate_binary", sys.argv[1])
spec.loader.exec_module(importlib.util.module_from_spec(spec))
print(json.dumps({n: flags.FLAGS[n].default for n in set(flags.FLAGS) - before}))
"""


def test_eval_settings_are_evaluate_py_flags_with_its_defaults():
  proc = subprocess.run([sys.executable, "-c", _EVALUATE_FLAGS,
                         str(REPO_ROOT / "experiments" / "evaluate.py")],
                        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  defaults = json.loads(proc.stdout)
  settings = EvalSettings().to_dict()
  if settings["task_kwargs"] is not None:
    settings["task_kwargs"] = json.dumps(settings["task_kwargs"])
  for name, value in settings.items():
    assert name in defaults, f"EvalSettings.{name} is not an evaluate.py flag"
    assert defaults[name] == value, (name, defaults[name], value)
  # Every other evaluate.py flag is about where and what to run, not how to evaluate.
  assert set(defaults) - set(settings) == {"run_dir", "steps", "progress", "mesh_data",
                                           "mesh_fsdp", "mesh_tensor"}


# ------------------------------------------------------------------------------ end to end


def _mtimes(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, fs in os.walk(root) for f in fs
          if "/eval/" in d + "/" or "/checkpoints/" in d + "/"}


@pytest.fixture(scope="module")
def swept(tiny_run, tmp_path_factory):
  """(sweep_dir, base model, completed first run) of a 2-cell sweep."""
  _, base = tiny_run
  sweep_dir = str(tmp_path_factory.mktemp("sweep") / "sw")
  args = [f"--sweep_dir={sweep_dir}", f"--model={base}", "--task=synthetic_arith",
          f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}", "--learning_rates=1e-2,3e-3",
          f"--overrides={json.dumps(TRAIN_OVERRIDES)}", *EVAL_CLI_FLAGS]
  proc = run_cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return sweep_dir, base, args, proc


def test_sweep_trains_evaluates_and_analyzes_every_cell(swept):
  sweep_dir, base, _, proc = swept
  stored = json.load(open(os.path.join(sweep_dir, "sweep.json")))
  names = [c["name"] for c in stored["cells"]]
  assert names == ["lr0.01_ep1_frac1", "lr0.003_ep1_frac1"]
  assert stored["model"] == base and stored["task"]["kwargs"] == EVAL_TASK_KWARGS
  assert stored["evaluation"]["num_train"] == 4 and stored["evaluation"]["max_eval"] == 4
  for cell in stored["cells"]:
    run_dir = cell["run_dir"]
    assert run_dir == os.path.join(sweep_dir, cell["name"])
    assert checkpoints.read_run_info(run_dir)["config"] == cell["config"]
    assert checkpoints.list_steps(run_dir) == [1, 2]  # 12 examples / batch 6, every step
    assert records.list_done(run_dir) == {(s, u, p) for s in (1, 2) for u, p in UNITS}
    assert len(records.read_jsonl(records.record_path(run_dir, 2, "test"))) == 4
    assert records.read_config(run_dir)["sampling"]["max_new_tokens"] == 8
  assert "2 cell(s): 4 step(s) trained, 4 checkpoint(s) evaluated" in proc.stdout
  report = open(os.path.join(sweep_dir, "analysis", "report.md")).read()
  assert "2 run(s)" in report


def test_rerun_does_no_work_and_a_crashed_cell_resumes(swept):
  sweep_dir, _, args, _ = swept
  before = _mtimes(sweep_dir)
  # sweep.json alone describes the sweep.
  proc = run_cli(f"--sweep_dir={sweep_dir}", "--noanalyze")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 cell(s): 0 step(s) trained, 0 checkpoint(s) evaluated" in proc.stdout
  assert _mtimes(sweep_dir) == before
  # A changed flag on the same sweep directory: one-line refusal naming the difference.
  proc = run_cli(*[a for a in args if not a.startswith("--num_train")], "--num_train=3")
  assert proc.returncode == 2 and "num_train" in proc.stderr.strip().splitlines()[-1]
  # Crash: cell 2 lost its final checkpoint, cell 1 one record file.
  a, b = (os.path.join(sweep_dir, n) for n in ("lr0.01_ep1_frac1", "lr0.003_ep1_frac1"))
  shutil.rmtree(os.path.join(b, "checkpoints", "2"))
  os.remove(records.record_path(a, 1, "test"))
  kept = records.record_path(a, 2, "train")
  kept_mtime = os.stat(kept).st_mtime_ns
  proc = run_cli(f"--sweep_dir={sweep_dir}", "--noanalyze")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "lr0.003_ep1_frac1: trained 1 step(s), now at 2/2" in proc.stdout
  assert "2 cell(s): 1 step(s) trained, 1 checkpoint(s) evaluated" in proc.stdout
  assert checkpoints.list_steps(b) == [1, 2] and records.is_done(a, 1, "test")
  assert os.stat(kept).st_mtime_ns == kept_mtime


# ------------------------------------------------------------------------------ launchers


def launch(*args):
  """launch/launch.py with `args` (fan-out dry runs ask experiments/sweep.py for its plan)."""
  return subprocess.run([sys.executable, str(REPO_ROOT / "launch" / "launch.py"), *args],
                        capture_output=True, text=True, timeout=300, cwd=REPO_ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def test_plan_round_trips_the_sweep_and_its_selected_cells(tmp_path):
  grid = sweep_lib.Grid(learning_rates=(1e-3, 2e-3, 3e-3), overrides={"warmup_steps": 1})
  sweep = sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("synthetic_arith"), grid,
                               EvalSettings(eval_name="ev"))
  plan = json.loads(json.dumps(sweep_lib.plan_json(sweep, sweep.cells[1:])))
  again, cells = sweep_lib.sweep_from_plan(plan)
  assert again == sweep and cells == list(sweep.cells[1:])


def test_slurm_fan_out_dry_run_prints_one_job_per_cell_then_analysis(swept):
  sweep_dir, _, _, _ = swept
  proc = launch("--cluster=slurm", "--dry_run", "--nodes=2", "--gpus_per_node=4",
                "--partition=gpu", "--fan_out", "--", "experiments/sweep.py",
                f"--sweep_dir={sweep_dir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = proc.stdout
  for name in ("lr0.01_ep1_frac1", "lr0.003_ep1_frac1"):
    assert f"#SBATCH --job-name=memdyn-{name}" in out
    assert f"sbatch --parsable {sweep_dir}/launch/{name}.sbatch" in out
    assert f"--cells={name} --noanalyze --noprogress" in out
  assert out.count("#SBATCH --nodes=2") == 2 and out.count("#SBATCH --ntasks-per-node=4") == 2
  assert "#SBATCH --job-name=memdyn-analysis" in out and "#SBATCH --nodes=1" in out
  assert "exec python experiments/analyze.py" in out
  assert "--dependency=afterany:" in out.splitlines()[-1]
  assert not os.path.exists(os.path.join(sweep_dir, "launch"))  # a dry run writes nothing


def test_tpu_fan_out_dry_run_and_its_cell_command_runs_here(swept):
  sweep_dir, _, _, _ = swept
  proc = launch("--cluster=tpu", "--dry_run", "--tpu_name=pod1", "--zone=us-east5-a",
                "--repo_url=https://example.org/memdyn_jax.git", "--fan_out", "--",
                "experiments/sweep.py", f"--sweep_dir={sweep_dir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2 + 2 + 1  # create, install, one run per cell, analysis
  assert "tpu-vm create pod1" in lines[0] and "pip install" in lines[1]
  assert all("--worker=all" in line for line in lines[1:4]) and "--worker=0" in lines[4]
  assert "experiments/analyze.py" in lines[4]
  # The remote command of cell 1, run here, finds the cell done (its flags round-trip).
  remote = shlex.split(lines[2])[-1]
  assert remote.startswith("cd memdyn_jax && python experiments/sweep.py")
  argv = shlex.split(remote.split(" && python ", 1)[1])
  assert "--cells=lr0.01_ep1_frac1" in argv
  assert argv[0] == "experiments/sweep.py"
  done = run_cli(*argv[1:])
  assert done.returncode == 0, done.stderr[-3000:]
  assert "1 cell(s): 0 step(s) trained, 0 checkpoint(s) evaluated" in done.stdout


@pytest.mark.parametrize("args,needle", [
    (["--cluster=tpu", "--dry_run", "--fan_out", "--", "experiments/sweep.py",
      "--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith"], "launch.py: error: "
     "the TPU launcher needs --tpu_name"),
    (["--cluster=slurm", "--dry_run", "--fan_out", "--", "experiments/sweep.py",
      "--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith", "--presets=nope"],
     "sweep.py: error: --presets"),
    (["--cluster=slurm", "--dry_run", "--fan_out", "--", "experiments/train.py"],
     "launch.py: error: --fan_out runs experiments/sweep.py"),
])
def test_fan_out_bad_flags_give_one_line_error(args, needle, tmp_path):
  proc = launch(*[a.replace("{tmp}", str(tmp_path)) for a in args])
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert [x for x in proc.stderr.splitlines() if x.strip()] == [proc.stderr.strip()]
  assert proc.stderr.startswith(needle), proc.stderr
  assert os.listdir(tmp_path) == []  # nothing written


@pytest.mark.parametrize("args,needle", [
    ([], "--sweep_dir is required"),
    (["--sweep_dir={tmp}"], "--model is required"),
    (["--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith", "--presets=nope"], "--presets"),
    (["--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith", "--epochs=x"], "--epochs"),
    (["--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith", "--overrides=[1]"],
     "--overrides"),
    (["--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith", "--splits=bogus"], "--splits"),
    (["--sweep_dir={tmp}", "--model=m", "--task=no_such_task"], "--task"),
    (["--sweep_dir={tmp}", "--model={tmp}/no_model", "--task=gsm8k"], "--model"),
    (["--sweep_dir={tmp}", "--model=embedded", "--task=gsm8k", "--task_path={tmp}/nope"],
     "nope: no such data file"),
    (["--sweep_dir={tmp}", "--model=m", "--task=synthetic_arith", "--cells=nope", "--plan"],
     "--cells"),
])
def test_bad_flags_give_one_line_error(args, needle, tmp_path):
  proc = run_cli(*[a.replace("{tmp}", str(tmp_path)) for a in args])
  assert_one_line_error(proc, "sweep.py", needle)
  assert not os.path.exists(os.path.join(tmp_path, "sweep.json"))  # nothing written


def test_a_stop_signal_between_cells_starts_no_new_cell(tmp_path, monkeypatch):
  import signal
  sweep = sweep_lib.make_sweep(str(tmp_path), "m", TaskSpec("synthetic_arith"),
                               sweep_lib.Grid(presets=("kang_llama3_gsm8k",),
                                              learning_rates=(1e-3, 2e-3, 3e-3)),
                               EvalSettings())
  started, before = [], signal.getsignal(signal.SIGTERM)

  def fake_run_cell(sweep, cell, stop=None, **kwargs):
    started.append(cell.name)
    os.kill(os.getpid(), signal.SIGTERM)  # arrives as the first cell finishes
    return sweep_lib.CellOutcome(cell.name, evaluated=1)

  monkeypatch.setattr(sweep_lib, "run_cell", fake_run_cell)
  outcomes = sweep_lib.run_local(sweep, sweep.cells)
  assert started == [sweep.cells[0].name]
  assert [(o.name, o.stop_signal, o.evaluated) for o in outcomes] == [
      (sweep.cells[0].name, None, 1), (sweep.cells[1].name, signal.SIGTERM, 0)]
  assert signal.getsignal(signal.SIGTERM) == before


def test_train_flags_changed_cell_refused_and_grid_extended_in_place(swept):
  """Runs last: it adds a cell to the shared sweep."""
  sweep_dir, _, args, _ = swept
  # train.py's flag on an existing sweep: the refusal names the cell and field only.
  proc = run_cli(*args, "--warmup_steps=2", "--noanalyze")
  line = assert_one_line_error(proc, "sweep.py", "cell lr0.01_ep1_frac1 would change")
  assert "warmup_steps: 1 -> 2" in line and "evaluation" not in line
  before = _mtimes(sweep_dir)
  grid = [a for a in args if not a.startswith("--learning_rates")]
  proc = run_cli(*grid, "--learning_rates=1e-2,3e-3,1e-3", "--noanalyze")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "3 cell(s): 2 step(s) trained, 2 checkpoint(s) evaluated" in proc.stdout
  stored = json.load(open(os.path.join(sweep_dir, "sweep.json")))
  assert [c["name"] for c in stored["cells"]][-1] == "lr0.001_ep1_frac1"
  assert {k: v for k, v in _mtimes(sweep_dir).items() if k in before} == before
  # Leaving a cell out of the grid is refused (the sweep would silently shrink).
  proc = run_cli(*grid, "--learning_rates=1e-2", "--noanalyze")
  assert_one_line_error(proc, "sweep.py", "leaves out")
