"""experiments/export.py: any checkpoint as an HF directory that loads back identically."""
from __future__ import annotations

import os

import numpy as np
import pytest

from memdyn_jax.train import checkpoints
from memdyn_jax import models

from conftest import assert_one_line_error, run_binary


def test_export_a_checkpoint_and_load_it_back(tiny_run, tmp_path):
  run_dir, base = tiny_run
  out = str(tmp_path / "hf")
  proc = run_binary("export.py", f"--run_dir={run_dir}", "--step=2", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(out))
  exported, _ = models.from_pretrained(out)
  restored, meta = checkpoints.restore(run_dir, 2)
  assert meta["step"] == 2
  ids = np.array([[1, 5, 9, 13, 7, 3]])
  mask = np.ones_like(ids)
  np.testing.assert_array_equal(np.asarray(exported(ids, mask)), np.asarray(restored(ids, mask)))
  assert models.load_tokenizer(out)("1 + 2")["input_ids"] == models.load_tokenizer(base)(
      "1 + 2")["input_ids"]
  # Re-export replaces the folder whole; bad inputs are one line.
  open(os.path.join(out, "stale.txt"), "w").write("x")
  assert run_binary("export.py", f"--run_dir={run_dir}", f"--output_dir={out}").returncode == 0
  assert "stale.txt" not in os.listdir(out)
  assert_one_line_error(run_binary("export.py", f"--run_dir={run_dir}", "--step=3",
                                   f"--output_dir={out}"), "export.py", "no checkpoint at step 3")
  assert_one_line_error(run_binary("export.py", f"--run_dir={tmp_path}/nope",
                                   f"--output_dir={out}"), "export.py", "--run_dir")


def test_export_refuses_every_folder_that_is_not_an_earlier_export(tiny_run, tmp_path):
  """The walk's data loss: --output_dir at the run, its parent or a user's folder deleted
  it with exit 0. Each is refused with one line naming --output_dir; nothing is touched."""
  run_dir, _ = tiny_run

  def listing(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, files in os.walk(root) for f in files)

  user = tmp_path / "mine"
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  sweep = os.path.dirname(run_dir)
  for target in (run_dir, sweep, str(user)):
    before = listing(target)
    line = assert_one_line_error(
        run_binary("export.py", f"--run_dir={run_dir}", f"--output_dir={target}"),
        "export.py", "--output_dir")
    assert "nothing was deleted" in line
    assert listing(target) == before
  assert (user / "notes.txt").read_text() == "keep me"
  assert checkpoints.list_steps(run_dir) == [2, 4]


def test_export_prints_the_step_and_keeps_the_generation_config(tiny_run, tmp_path):
  import json
  import shutil

  run_dir, base = tiny_run
  out = str(tmp_path / "hf")
  proc = run_binary("export.py", f"--run_dir={run_dir}", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"step 4 -> {out}" in proc.stdout  # the latest, named
  source = str(tmp_path / "base_with_generation")
  shutil.copytree(base, source)
  generation = {"eos_token_id": 2, "do_sample": True, "temperature": 0.7}
  with open(os.path.join(source, checkpoints.GENERATION_CONFIG), "w") as f:
    json.dump(generation, f)
  assert checkpoints.export_hf(run_dir, out, 2, tokenizer_from=source) == 2
  with open(os.path.join(out, checkpoints.GENERATION_CONFIG)) as f:
    assert json.load(f) == generation


def test_export_library_refuses_before_restoring(tiny_run, tmp_path, monkeypatch):
  from memdyn_jax import fileio

  run_dir, _ = tiny_run
  monkeypatch.setattr(checkpoints, "restore", lambda *a, **k: pytest.fail("restored"))
  with pytest.raises(fileio.NotReplaceableError):
    checkpoints.export_hf(run_dir, os.path.dirname(run_dir))
