"""Prompt options end to end: a chat-template run through experiments/train.py, its
evaluation (the run's chat template by default, then few-shot) through evaluate.py, and a
sweep's plan that carries both."""
from __future__ import annotations

import json
import os

import pytest

from memdyn_jax import models, testing
from memdyn_jax.evaluation import records
from memdyn_jax.studies import sweep as sweep_lib
from memdyn_jax.tasks import synthetic_arith as sa
from memdyn_jax.train import checkpoints

from conftest import assert_one_line_error, run_binary

TASK_KWARGS = {"n_train": 8, "n_test": 4, "n_ood": 4, "max_steps": 1}
EVAL_FLAGS = ("--splits=train,test", "--num_train=2", "--max_eval=2", "--max_new_tokens=8",
              "--n_samples=1", "--batch_size=2", "--nogreedy", "--nograd_variance",
              "--noprogress")


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
  """A tiny synthetic_arith model whose tokenizer has a ChatML template."""
  out = str(tmp_path_factory.mktemp("chat_model"))
  return testing.save_tiny_task_model(out, sa.SyntheticArithTask(seed=0, **TASK_KWARGS),
                                      max_position_embeddings=512,
                                      chat_template=testing.CHATML_TEMPLATE)


def test_chat_template_run_then_fewshot_evaluation(chat_model, tmp_path):
  run = str(tmp_path / "run")
  proc = run_binary("train.py", f"--model={chat_model}", "--task=synthetic_arith",
                    f"--task_kwargs={json.dumps(TASK_KWARGS)}", "--chat_template",
                    f"--output_dir={run}", "--preset=kang_llama3_gsm8k",
                    "--global_batch_size=8", "--num_epochs=1", "--max_length=512",
                    "--noprogress", "--mesh_data=1", timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  listing = checkpoints.read_examples_listing(run)
  assert listing["task_kwargs"] == {**TASK_KWARGS, "chat_template": True}
  assert checkpoints.list_steps(run) == [1]

  # Evaluated as trained: the chat template, its end of turn stopping the samples.
  proc = run_binary("evaluate.py", f"--run_dir={run}", *EVAL_FLAGS, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  tok = models.load_tokenizer(chat_model)
  config = records.read_config(run)
  assert config["task_kwargs"] == {**TASK_KWARGS, "chat_template": True}
  assert config["sampling"]["stop"] == []
  assert config["sampling"]["stop_token_ids"] == [tok.convert_tokens_to_ids("<|im_end|>"),
                                                  tok.eos_token_id]
  rows = records.load_records(run)
  assert {(r["split"], r["step"]) for r in rows} == {("train", 1), ("test", 1)}
  assert all(r["n_target_tokens"] > 0 for r in rows)

  # The same run, few-shot (2 train examples as prior turns) into its own eval folder.
  proc = run_binary("evaluate.py", f"--run_dir={run}", "--num_fewshot=2",
                    "--eval_name=fewshot", *EVAL_FLAGS, timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  config = records.read_config(run, name="fewshot")
  assert config["task_kwargs"] == {**TASK_KWARGS, "chat_template": True, "num_fewshot": 2}
  fewshot = records.load_records(run, name="fewshot")
  assert len(fewshot) == len(rows)
  # Same targets (same tokens scored), other prompts before them.
  by_id = {(r["split"], r["example_id"]): r for r in rows}
  for r in fewshot:
    zero_shot = by_id[(r["split"], r["example_id"])]
    assert r["n_target_tokens"] == zero_shot["n_target_tokens"]
    assert r["perplexity"] != zero_shot["perplexity"]
  # The default eval folder holds the zero-shot records: a few-shot run into it is refused.
  proc = run_binary("evaluate.py", f"--run_dir={run}", "--num_fewshot=2", *EVAL_FLAGS)
  assert proc.returncode == 2 and "num_fewshot" in proc.stderr, proc.stderr[-3000:]


def test_sweep_plan_carries_the_prompt_options(tmp_path):
  """sweep.py's task flags set the options of every cell's task and its evaluation; a chat
  template's evaluation has no "\\nDone." stop (its end of turn stops it)."""
  proc = run_binary("sweep.py", f"--sweep_dir={tmp_path / 'sweep'}", "--model=m",
                    "--task=synthetic_arith", "--chat_template", "--num_fewshot=1",
                    "--learning_rates=1e-3", "--epochs=1", "--plan")
  assert proc.returncode == 0, proc.stderr[-3000:]
  plan = json.loads(proc.stdout.strip().splitlines()[-1])
  kwargs = {"chat_template": True, "num_fewshot": 1}
  assert plan["sweep"]["task"]["kwargs"] == kwargs
  assert plan["sweep"]["evaluation"]["task_kwargs"] == kwargs
  assert plan["sweep"]["evaluation"]["stop"] == []
  sweep, _ = sweep_lib.sweep_from_plan(plan)  # sweep.json reads back as the same sweep
  assert dict(sweep.task.kwargs) == kwargs


def test_evaluation_takes_the_runs_prompt_options_unless_set(tmp_path):
  from memdyn_jax.evaluation.run import EvalSettings, EvalSettingsError, for_run
  from memdyn_jax.train import task_run

  run = str(tmp_path / "run")
  task_run.write_examples_listing(
      run, task_run.TaskSpec("gsm8k", {"chat_template": True, "num_fewshot": 2}), ids=[])
  assert for_run(run, EvalSettings()).task_kwargs == {"chat_template": True, "num_fewshot": 2}
  # Set options replace the run's; those at their default are not stated.
  assert for_run(run, EvalSettings(num_fewshot=0, chat_template=False)).task_kwargs == {}
  assert for_run(run, EvalSettings(fewshot_seed=7)).task_kwargs == {
      "chat_template": True, "num_fewshot": 2, "fewshot_seed": 7}
  with pytest.raises(EvalSettingsError, match="^num_fewshot: must be >= 0"):
    EvalSettings(num_fewshot=-1)
  with pytest.raises(EvalSettingsError, match="^system_prompt: system_prompt needs chat"):
    for_run(run, EvalSettings(chat_template=False, system_prompt="Be brief."))


@pytest.fixture(scope="module")
def plain_model(tmp_path_factory):
  """A tiny synthetic_arith model whose tokenizer has no chat template."""
  out = str(tmp_path_factory.mktemp("plain_model"))
  return testing.save_tiny_task_model(out, sa.SyntheticArithTask(seed=0, **TASK_KWARGS))


@pytest.mark.parametrize("flag,needle", [
    ("--chat_template", "--chat_template: the tokenizer's chat template cannot render"),
    ("--num_fewshot=-1", "--num_fewshot: num_fewshot must be an integer >= 0"),
    ("--system_prompt=Hi", "--system_prompt: system_prompt needs chat_template"),
])
def test_train_refuses_bad_prompt_options_in_one_line(plain_model, tmp_path, flag, needle):
  proc = run_binary("train.py", f"--model={plain_model}", "--task=synthetic_arith",
                    f"--task_kwargs={json.dumps(TASK_KWARGS)}", flag,
                    f"--output_dir={tmp_path / 'run'}", "--noprogress")
  assert_one_line_error(proc, "train.py", needle)
  assert not os.path.exists(tmp_path / "run")
