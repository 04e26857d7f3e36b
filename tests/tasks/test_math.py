"""MATH task: boxed-answer extraction, normalizer, math-verify grading, loading, bad input."""
from __future__ import annotations

import json
import sys
import types
import time

import pytest

from memdyn_jax.tasks import DataError, GradeResult, get_task, write_jsonl
from memdyn_jax.tasks import math_task
from memdyn_jax.tasks.math_task import (
    last_boxed,
    math_verify_equal,
    normalize_math_answer,
    normalized_equal,
    parse_level,
    subject_from_type,
)


RECORD = {"unique_id": "test/algebra/1.json", "subject": "algebra", "problem": "1+1?",
          "level": "Level 3", "type": "Algebra", "solution": "It is $\\boxed{2}$.",
          "answer": "2"}


# --- real data ------------------------------------------------------------------------


def test_grade_own_solution_on_full_test_split(math_dir):
  task = get_task("math")
  examples = task.load("test", str(math_dir))
  assert len(examples) == 5000
  start = time.perf_counter()
  failures = [(ex.id, ex.answer) for ex in examples if not task.grade(ex.target, ex.answer)]
  elapsed = time.perf_counter() - start
  rate = 1 - len(failures) / len(examples)
  print(f"\nMATH test: grade(solution, answer) pass rate {rate:.4f} "
        f"({len(examples) - len(failures)}/{len(examples)}) in {elapsed:.2f}s; "
        f"failures: {failures}")
  assert rate >= 0.99, failures


def test_math_verify_agrees_on_test_sample(math_dir):
  # The normalizer short-circuits identical strings above; check math-verify on its own.
  task = get_task("math")
  examples = task.load("test", str(math_dir))[::10]
  failures = [(ex.id, ex.answer) for ex in examples
              if not math_verify_equal(ex.answer, task.extract_answer(ex.target))]
  print(f"\nmath-verify alone: {len(examples) - len(failures)}/{len(examples)} agree; "
        f"failures: {failures}")
  assert len(failures) <= 0.01 * len(examples), failures


def test_load_real_data_meta_and_levels(math_dir):
  examples = get_task("math").load("train", str(math_dir))
  assert len(examples) == 7500
  first = examples[0]
  assert first.id.startswith("math/train/")
  assert set(first.meta) >= {"level", "level_raw", "subject", "type", "unique_id"}
  assert {ex.meta["subject"] for ex in examples} == set(math_task.SUBJECTS)
  assert {ex.meta["level"] for ex in examples} == {1, 2, 3, 4, 5, None}  # Two "Level ?".
  assert len({ex.id for ex in examples}) == len(examples)
  easy = get_task("math", levels=(1, 2, 3)).load("train", str(math_dir))
  assert {ex.meta["level"] for ex in easy} == {1, 2, 3}
  assert len(easy) == sum(ex.meta["level"] in (1, 2, 3) for ex in examples)


# --- extraction -----------------------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("so $\\boxed{5}$.", "5"),
    ("first \\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("nested \\boxed{\\left\\{ 1,2 \\right\\}} end", "\\left\\{ 1,2 \\right\\}"),
    ("\\fbox{7} is it", "7"),
    ("\\boxed{1} and \\fbox{2}", "2"),
    ("So $x = \\boxed 9$.", "9"),
    ("answer \\boxed {3}", "3"),
    ("unclosed \\boxed{1", None),
    ("no box at all", None),
    ("\\boxed{}", ""),
])
def test_last_boxed(text, expected):
  assert last_boxed(text) == expected


def test_extract_answer():
  task = get_task("math")
  assert task.extract_answer("The answer is $\\boxed{ 12 }$") == "12"
  assert task.extract_answer("The answer is 12") is None
  assert task.extract_answer("\\boxed{}") is None


# --- normalizer -----------------------------------------------------------------------


@pytest.mark.parametrize("raw,expected", [
    ("\\dfrac{1}{2}", "\\frac{1}{2}"),
    ("\\tfrac12", "\\frac{1}{2}"),
    ("\\frac1{72}", "\\frac{1}{72}"),
    ("\\frac{3}4", "\\frac{3}{4}"),
    ("0.5", "\\frac{1}{2}"),
    (".5", "\\frac{1}{2}"),
    ("3/4", "\\frac{3}{4}"),
    ("\\sqrt3", "\\sqrt{3}"),
    ("\\sqrt 2", "\\sqrt{2}"),
    ("\\sqrt[3]{2}", "\\sqrt[3]{2}"),
    ("\\left( 1, 2 \\right)", "(1,2)"),
    ("90^\\circ", "90"),
    ("90^{\\circ}", "90"),
    ("\\$18.90", "18.90"),
    ("10\\%", "10"),
    ("5 \\text{ cm}", "5"),
    ("x = 5", "5"),
    ("k=-2", "-2"),
    ("y = 2x + 1", "2x+1"),
    ("a+b=c+d", "a+b=c+d"),
    ("\\displaystyle 4\\,000", "4000"),
    ("\\!7\n", "7"),
])
def test_normalize_math_answer(raw, expected):
  assert normalize_math_answer(raw) == expected


def test_normalized_equal():
  assert normalized_equal("\\dfrac{1}{2}", "0.5")
  assert normalized_equal("x=3", "3")
  assert not normalized_equal("3", "4")


# --- grading --------------------------------------------------------------------------


@pytest.mark.parametrize("completion,ref,correct", [
    ("so $\\boxed{\\frac{1}{2}}$", "\\frac12", True),  # Normalizer.
    ("so $\\boxed{\\frac{2}{4}}$", "\\frac{1}{2}", True),  # math-verify only.
    ("so $\\boxed{2\\sqrt{2}}$", "\\sqrt{8}", True),
    ("\\boxed{(1, 2)}", "\\left(1,2\\right)", True),
    ("\\boxed{x^2+2x+1}", "(x+1)^2", True),
    ("\\boxed{3}", "4", False),
    ("the answer is 3", "3", False),  # No box: unparseable.
])
def test_grade(completion, ref, correct):
  assert get_task("math").grade(completion, ref) is correct


def test_grade_without_math_verify_uses_normalizer_only():
  task = get_task("math", use_math_verify=False)
  assert task.grade("\\boxed{\\dfrac12}", "0.5")
  assert not task.grade("\\boxed{\\frac{2}{4}}", "\\frac{1}{2}")


def test_math_verify_equal_handles_garbage():
  assert math_verify_equal("\\frac{1}{2}", "0.5")
  assert not math_verify_equal("\\frac{1}{2}", "\\frac{{{")
  assert not math_verify_equal("", "")


def test_math_verify_equal_off_main_thread():
  import threading

  results = []
  thread = threading.Thread(target=lambda: results.append(math_verify_equal("2/4", "0.5")))
  thread.start()
  thread.join()
  assert results == [True]


def test_grade_detailed():
  task = get_task("math")
  assert task.grade_detailed("\\boxed{3}", "4") == GradeResult(correct=False, parsed="3")
  assert task.grade_detailed("3", "3") == GradeResult(correct=False, parsed=None)
  assert task.grade_detailed("\\boxed{0.5}", "\\frac12") == GradeResult(True, "0.5")


def test_parse_level_and_subject():
  assert parse_level("Level 3") == 3
  assert parse_level("Level ?") is None
  assert parse_level(None) is None
  assert subject_from_type("Counting & Probability") == "counting_and_probability"
  assert subject_from_type("Intermediate Algebra") == "intermediate_algebra"


# --- loading options and bad input ----------------------------------------------------


def test_load_local_derives_answer_subject_and_ids(tmp_path):
  bare = {"problem": "2+2?", "level": "Level 1", "type": "Counting & Probability",
          "solution": "It is \\boxed{4}. Not \\fbox{5}? Yes \\boxed{\\frac{8}{2}}."}
  write_jsonl(tmp_path / "train.jsonl", [RECORD, bare])
  first, second = get_task("math").load("train", str(tmp_path))
  assert first.id == "math/test/algebra/1"
  assert (first.answer, first.meta["level"], first.meta["level_raw"]) == ("2", 3, "Level 3")
  assert second.id == "math/train/1"
  assert second.answer == "\\frac{8}{2}"
  assert second.meta["subject"] == "counting_and_probability"
  assert second.target == bare["solution"] and second.question == "2+2?"
  only_easy = get_task("math", levels=[1]).load("train", str(tmp_path / "train.jsonl"))
  assert [ex.id for ex in only_easy] == ["math/train/1"]


def test_level_filter_leaving_nothing_is_an_error(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [RECORD])
  with pytest.raises(DataError, match="empty split"):
    get_task("math", levels=(5,)).load("train", str(tmp_path))


def test_malformed_json_names_file_and_line(tmp_path):
  (tmp_path / "test.jsonl").write_text(json.dumps(RECORD) + "\n\n[1, 2\n")
  with pytest.raises(DataError, match=r"test\.jsonl:3"):
    get_task("math").load("test", str(tmp_path))


@pytest.mark.parametrize("field", ["problem", "solution", "level"])
def test_missing_field_is_named(tmp_path, field):
  record = {k: v for k, v in RECORD.items() if k != field}
  write_jsonl(tmp_path / "test.jsonl", [RECORD, record])
  with pytest.raises(DataError, match=rf"test\.jsonl:2.*'{field}'"):
    get_task("math").load("test", str(tmp_path))


def test_missing_subject_and_type(tmp_path):
  record = {k: v for k, v in RECORD.items() if k not in ("subject", "type")}
  write_jsonl(tmp_path / "test.jsonl", [record])
  with pytest.raises(DataError, match=r"test\.jsonl:1.*subject"):
    get_task("math").load("test", str(tmp_path))


def test_empty_split(tmp_path):
  (tmp_path / "test.jsonl").write_text("")
  with pytest.raises(DataError, match="empty split"):
    get_task("math").load("test", str(tmp_path))


def test_hub_loading_concatenates_subject_configs(monkeypatch):
  # Stands in for `datasets` (and a Hub that answers) so the Hub code path runs offline.
  from memdyn_jax import hub
  monkeypatch.setattr(hub, "offline_reason", lambda: None)
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    hub_record = {k: RECORD[k] for k in ("problem", "level", "type", "solution")}
    return [hub_record] if config != "geometry" else [{**hub_record, "level": "Level 5"}] * 2

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  examples = get_task("math").load("test")
  assert calls == [("EleutherAI/hendrycks_math", s, "test") for s in math_task.SUBJECTS]
  assert len(examples) == 8
  assert examples[2].id == "math/test/geometry/0" and examples[3].id == "math/test/geometry/1"
  assert examples[2].meta["subject"] == "geometry" and examples[2].meta["level"] == 5
  assert all(ex.answer == "2" for ex in examples)
  hard = get_task("math", levels=(5,)).load("test")
  assert [ex.id for ex in hard] == ["math/test/geometry/0", "math/test/geometry/1"]
