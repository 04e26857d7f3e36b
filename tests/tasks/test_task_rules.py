"""Per-task rules live on the Task interface (sampling defaults, curation keep fraction,
heuristic difficulty, PreMemAcc threshold), read without branching on task names."""
from __future__ import annotations

import math

import pytest

from memdyn_jax import evaluation, tasks
from memdyn_jax.tasks import Example


def example(target: str = "", **meta) -> Example:
  return Example(id="x", question="q", target=target, answer="1", meta=meta)


def test_sampling_defaults_are_kang_et_al_per_task():
  assert evaluation.default_sampling("gsm8k").max_new_tokens == 512
  math_params = evaluation.default_sampling("math")
  assert (math_params.top_p, math_params.max_new_tokens) == (1.0, 1024)
  assert evaluation.default_sampling("synthetic_arith").max_new_tokens == 256
  # A task without its own (sft) uses GSM8K's; overrides win unless None.
  assert evaluation.default_sampling("sft").max_new_tokens == 512
  assert evaluation.default_sampling("math", n=2, top_p=None).n == 2
  assert evaluation.default_sampling("math", n=2, top_p=None).top_p == 1.0


def test_default_sampling_of_a_task_object_is_that_tasks():
  """A Task reads its own rules (was GSM8K's for any object: MATH got top_p 0.95 and 512
  tokens); a name must be exact; anything else names the known tasks."""
  math_params = evaluation.default_sampling(tasks.get_task("math"))
  assert (math_params.top_p, math_params.max_new_tokens) == (1.0, 1024)
  assert math_params == evaluation.default_sampling("math")
  for bad in ("gsm8K", "no_such_task", None, 3):
    with pytest.raises(tasks.UnknownTaskError, match=r"unknown task .*known: \[.*'gsm8k'"):
      evaluation.default_sampling(bad)


def test_default_sampling_stops_where_the_task_does():
  """The task's stop strings are part of its default sampling (the notebook path stops at
  "\\nDone." as the evaluation does); an override replaces them, () means none."""
  assert evaluation.default_sampling("gsm8k").stop == ("\nDone.",)
  chat = tasks.get_task("sft", template=tasks.ChatTemplate(tokenizer=None))
  assert evaluation.default_sampling(chat).stop == ()  # the chat template has none
  assert evaluation.default_sampling("gsm8k", stop=("\n\n",)).stop == ("\n\n",)
  assert evaluation.default_sampling("gsm8k", stop=()).stop == ()


def test_task_class_reads_rules_without_building_the_task():
  assert tasks.task_class("math").curation_keep_fraction == 0.75
  assert tasks.task_class("gsm8k").curation_keep_fraction == 0.5
  assert tasks.task_class(None) is tasks.Task
  assert tasks.memorization_threshold("math") == pytest.approx(math.exp(math.exp(-1.7)))


def test_heuristic_difficulty_per_task():
  gsm = example("Step one.\nStep two.\n#### 3")
  assert tasks.get_task("gsm8k").difficulty(gsm) == 2.0
  assert tasks.get_task("math").difficulty(example(level=4)) == 4.0
  assert math.isnan(tasks.get_task("math").difficulty(example(level=None)))
  assert tasks.get_task("synthetic_arith").difficulty(example(n_steps=3)) == 3.0
  with pytest.raises(NotImplementedError, match="sft"):
    tasks.get_task("sft").difficulty(gsm)


def test_only_procedural_tasks_make_new_problems():
  assert tasks.task_class("synthetic_arith").procedural
  assert not any(tasks.task_class(name).procedural for name in ("gsm8k", "math", "sft"))
