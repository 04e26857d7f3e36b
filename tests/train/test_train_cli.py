"""experiments/train.py: one-line errors for bad flags, and an end-to-end run on a task."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from memdyn_jax.train import checkpoints
from memdyn_jax import models

from conftest import assert_one_line_error

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BINARY = os.path.join(REPO, "experiments", "train.py")


def run_cli(*args, timeout=300):
  return subprocess.run([sys.executable, BINARY, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=timeout, env=dict(os.environ, JAX_PLATFORMS="cpu"))


@pytest.mark.parametrize("args,needle", [
    (["--no_such_flag=1"], "no_such_flag"),
    (["--model=m", "--task=t", "--output_dir=o", "--optimizer=lion"], "--optimizer"),
    (["--model=m", "--task=t", "--output_dir=o", "--global_batch_size=12",
      "--micro_batch_size=5"], "--micro_batch_size"),
    (["--global_batch_size=abc"], "global_batch_size"),
    (["--task=t", "--output_dir=o"], "--model"),
    # the task is checked before the (slow, cached) embedded model is built
    (["--model=embedded", "--task=no_such_task", "--output_dir=o"], "--task"),
    (["--model=/nonexistent/dir", "--task=gsm8k", "--output_dir=o"], "--model"),
    (["--model=m", "--task=t", "--output_dir=o", "--preset=nope"], "--preset"),
])
def test_bad_flags_give_one_line_error(args, needle):
  proc = run_cli(*args)
  assert proc.returncode == 2
  lines = [x for x in proc.stderr.splitlines() if x.strip()]
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("train.py: error:") and needle in lines[0]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer_no_bos):
  out = str(tmp_path_factory.mktemp("cli_model"))
  cfg = models.from_hf_config(dict(
      model_type="llama", vocab_size=len(tokenizer_no_bos), hidden_size=32,
      intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=512, tie_word_embeddings=True))
  models.save_pretrained(models.build_model(cfg, seed=0), cfg, out)
  tokenizer_no_bos.save_pretrained(out)
  return out


def test_end_to_end_on_a_task_then_unknown_task(model_dir, tmp_path):
  run = str(tmp_path / "run")
  common = [f"--model={model_dir}", "--task=synthetic_arith",
            '--task_kwargs={"n_train": 16, "n_test": 4, "n_ood": 4}', f"--output_dir={run}",
            "--preset=kang_llama3_gsm8k", "--global_batch_size=8", "--num_epochs=1",
            "--max_length=256", "--overlength=truncate", "--noprogress", "--mesh_data=1"]
  proc = run_cli(*common)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 2/2" in proc.stdout
  assert f"train.py: {run}: compiling the train step" in proc.stdout  # before the first step
  # The preset's 20 warmup steps in this 2-step run: the peak rate is never reached.
  assert "warmup_steps 20 spans the whole 2-step run" in proc.stderr, proc.stderr
  info = checkpoints.read_run_info(run)
  assert info["config"]["warmup_steps"] == 20 and info["config"]["global_batch_size"] == 8
  assert info["config"]["max_grad_norm"] == 2.0  # from the preset
  assert len(json.load(open(os.path.join(run, "examples.json")))["ids"]) == 16
  assert checkpoints.list_steps(run) == [2]
  # The same command again resumes the finished run, and says so.
  proc = run_cli(*common)
  assert proc.returncode == 0 and f"train.py: {run}: resumed from step 2 of 2" in proc.stdout
  assert "compiling" not in proc.stdout  # nothing left to train
  # A changed flag on the same run directory: one-line refusal naming the field.
  proc = run_cli(*common, "--learning_rate=1e-3")
  assert proc.returncode == 2 and "learning_rate" in proc.stderr.strip().splitlines()[-1]
  proc = run_cli(*common[:1], "--task=no_such_task", f"--output_dir={tmp_path / 'x'}")
  assert proc.returncode == 2 and "--task" in proc.stderr
  # Different task data on the same run: refused before examples.json is touched.
  listing = open(os.path.join(run, "examples.json")).read()
  proc = run_cli(*[a.replace('"n_train": 16', '"n_train": 12') for a in common])
  assert proc.returncode == 2 and "holds a run" in proc.stderr.strip().splitlines()[-1]
  assert open(os.path.join(run, "examples.json")).read() == listing


@pytest.mark.parametrize("make,needle", [
    (lambda p: open(p, "w").write("x"), "is a file"),
    (lambda p: (os.makedirs(p), open(os.path.join(p, "notes.txt"), "w").write("mine")),
     "not empty (notes.txt) and holds no run"),
])
def test_output_dir_that_is_no_run_is_refused_before_writing(model_dir, tmp_path, make, needle):
  out = str(tmp_path / "out")
  make(out)
  before = sorted(os.listdir(out)) if os.path.isdir(out) else None
  proc = run_cli(f"--model={model_dir}", "--task=synthetic_arith",
                 '--task_kwargs={"n_train": 16, "n_test": 4, "n_ood": 4}', f"--output_dir={out}",
                 "--global_batch_size=8", "--num_epochs=1", "--max_length=256",
                 "--overlength=truncate", "--noprogress", "--mesh_data=1")
  assert_one_line_error(proc, "train.py", needle)
  assert (sorted(os.listdir(out)) if os.path.isdir(out) else None) == before


@pytest.mark.parametrize("model_type", ["bert", "mamba"])
def test_unsupported_architecture_is_refused_before_anything_is_written(model_dir, tmp_path,
                                                                        model_type):
  """A config.json of an architecture memdyn_jax does not implement: one line naming --model
  and the supported types, exit 2, and no run directory (which would refuse the next,
  correct command as a different run)."""
  other = tmp_path / model_type
  other.mkdir()
  for name in os.listdir(model_dir):
    data = open(os.path.join(model_dir, name), "rb").read()
    (other / name).write_bytes(data)
  config = json.load(open(other / "config.json"))
  (other / "config.json").write_text(json.dumps({**config, "model_type": model_type}))
  out = tmp_path / "run"
  proc = run_cli(f"--model={other}", "--task=synthetic_arith", f"--output_dir={out}",
                 "--noprogress")
  line = assert_one_line_error(proc, "train.py", "--model: ")
  assert f"'model_type' = '{model_type}' is not supported" in line and "'llama'" in line
  assert not out.exists()
