"""experiments/export.py: any checkpoint as an HF directory that loads back identically."""
from __future__ import annotations

import os

import numpy as np

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
