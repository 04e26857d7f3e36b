"""GSM8K task: loading, answer extraction, grading, bad input; prompt perturbations."""
from __future__ import annotations

import json
import sys
import types

import pytest

from memdyn_jax import hub
from memdyn_jax.tasks import (
    DEFAULT_PERTURBATIONS,
    DEFAULT_TEMPLATE,
    DataError,
    Example,
    GradeResult,
    PromptTemplate,
    expand_perturbations,
    format_prompt,
    get_task,
    write_jsonl,
)
from memdyn_jax.tasks import gsm8k


RECORD = {"question": "Q1?", "answer": "2 + 2 = <<2+2=4>>4 apples.\n#### 4"}


# --- real data ------------------------------------------------------------------------


@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_extract_answer_of_every_reference_solution(gsm8k_dir, split, count):
  task = get_task("gsm8k")
  examples = task.load(split, str(gsm8k_dir))
  assert len(examples) == count
  bad = [(ex.id, task.extract_answer(ex.target), ex.answer) for ex in examples
         if task.extract_answer(ex.target) != ex.answer or not task.grade(ex.target, ex.answer)]
  assert not bad, bad[:20]
  assert examples[0].id == f"gsm8k/{split}/0"
  assert examples[-1].id == f"gsm8k/{split}/{count - 1}"


def test_load_real_file_path_and_commas(gsm8k_dir):
  examples = get_task("gsm8k").load("train", str(gsm8k_dir / "train.jsonl"))
  assert examples[0].answer == "72"
  assert "<<48/2=24>>" in examples[0].target
  assert examples[0].target.endswith("#### 72")
  # Reference answers with thousands separators are normalized ("1,080" -> "1080").
  raw = [json.loads(line) for line in open(gsm8k_dir / "train.jsonl")]
  with_commas = [i for i, r in enumerate(raw) if "," in r["answer"].rsplit("#### ", 1)[1]]
  assert with_commas
  assert all("," not in examples[i].answer for i in with_commas)


def test_strip_calculator_on_real_data(gsm8k_dir):
  task = get_task("gsm8k", strip_calculator=True)
  examples = task.load("test", str(gsm8k_dir))
  assert not any("<<" in ex.target or ">>" in ex.target for ex in examples)
  assert all(task.extract_answer(ex.target) == ex.answer for ex in examples)


# --- extraction and grading -----------------------------------------------------------


@pytest.mark.parametrize("text,expected", [
    ("So she has 1,250 dollars. The answer is $1,250.", "1250"),
    ("2 + 16 = 18\n#### 18\nDone.", "18"),
    ("#### 18", "18"),
    ("The answer is: 42", "42"),
    ("The answer is 7.\nThe answer is 9.", "9"),
    ("The answer is 3\n#### 5", "5"),
    ("#### -3.50", "-3.50"),
    ("She has 18 apples.", None),
    ("", None),
    ("#### \nDone.", None),
    # Model-style endings: units, currency and trailing words after the number.
    ("#### 8 pens", "8"),
    ("#### 8 pens.\nDone.", "8"),
    ("#### $1,250 dollars", "1250"),
    ("The answer is 18 apples.", "18"),
    ("#### -4 degrees", "-4"),
    ("#### 3.5 hours", "3.5"),
])
def test_extract_answer(text, expected):
  assert get_task("gsm8k").extract_answer(text) == expected


@pytest.mark.parametrize("text,expected", [
    ("She has 3 pears and 18 apples.", "18"),
    ("In total $1,250.", "1250"),
    ("Nothing numeric here.", None),
    ("The answer is 4.\nShe has 9 apples.", "4"),  # A marker still wins over the fallback.
])
def test_extract_answer_flexible(text, expected):
  assert get_task("gsm8k", flexible=True).extract_answer(text) == expected


@pytest.mark.parametrize("text,ref,correct", [
    ("The answer is $1,250.", "1250", True),
    ("The answer is 1250", "1,250", True),
    ("#### 18\nDone.", "18", True),
    ("#### 18.0", "18", True),
    ("#### 18.5", "18", False),
    ("#### 17", "18", False),
    ("#### 8 pens", "8", True),
    ("Total: 4 + 4 = 8\n#### 8 pens\nDone.", "8", True),
    ("#### 80 pens", "8", False),
    ("The answer is five", "five", True),  # Non-numeric: string comparison.
    ("The answer is five", "5", False),
    ("She has 18.", "18", False),  # Unparseable without flexible.
])
def test_grade(text, ref, correct):
  assert get_task("gsm8k").grade(text, ref) is correct


def test_grade_detailed_tells_unparseable_from_wrong():
  task = get_task("gsm8k")
  assert task.grade_detailed("#### 17", "18") == GradeResult(correct=False, parsed="17")
  unparsed = task.grade_detailed("I think 18", "18")
  assert unparsed == GradeResult(correct=False, parsed=None) and unparsed.unparseable
  assert task.grade_detailed("#### 18", "18") == GradeResult(correct=True, parsed="18")
  flexible = get_task("gsm8k", flexible=True).grade_detailed("I think 18", "18")
  assert flexible == GradeResult(correct=True, parsed="18")


def test_helpers():
  assert gsm8k.strip_calculator("48/2 = <<48/2=24>>24 and <<1+1=2>>2") == "48/2 = 24 and 2"
  assert gsm8k.normalize_answer(" : $1,250. ") == "1250"
  assert gsm8k.answers_equal("18.00", "18")
  assert not gsm8k.answers_equal("18", "19")
  assert gsm8k.answers_equal("abc", "abc")


# --- loading options and bad input ----------------------------------------------------


def test_load_local_and_strip_calculator(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [RECORD, {**RECORD, "question": "Q2?"}])
  kept = get_task("gsm8k").load("train", str(tmp_path))
  assert [ex.id for ex in kept] == ["gsm8k/train/0", "gsm8k/train/1"]
  assert kept[0] == Example(id="gsm8k/train/0", question="Q1?", target=RECORD["answer"],
                            answer="4")
  stripped = get_task("gsm8k", strip_calculator=True).load("train", str(tmp_path))
  assert stripped[0].target == "2 + 2 = 4 apples.\n#### 4"


def test_template_option_and_formatting():
  template = PromptTemplate(prompt_format="Q: {question}\nA:", target_format=" {solution}")
  task = get_task("gsm8k", template=template)
  ex = Example(id="x", question="Why?", target="Because.\n#### 1", answer="1")
  assert task.format_prompt(ex.question) == "Q: Why?\nA:"
  assert task.format_target(ex) == " Because.\n#### 1"
  default = get_task("gsm8k")
  assert default.format_prompt("Why?", "First") == "Why?\nAnswer: First"
  assert default.format_target(ex) == " Because.\n#### 1\nDone."
  assert default.stop == ("\nDone.",)


def test_malformed_json_names_file_and_line(tmp_path):
  path = tmp_path / "train.jsonl"
  path.write_text(json.dumps(RECORD) + "\n{not json\n")
  with pytest.raises(DataError, match=r"train\.jsonl:2"):
    get_task("gsm8k").load("train", str(path))


def test_missing_field_is_named(tmp_path):
  write_jsonl(tmp_path / "test.jsonl", [RECORD, {"question": "Q?"}])
  with pytest.raises(DataError, match=r"test\.jsonl:2.*'answer'"):
    get_task("gsm8k").load("test", str(tmp_path))


def test_missing_final_answer_line(tmp_path):
  write_jsonl(tmp_path / "test.jsonl", [{"question": "Q?", "answer": "no final line"}])
  with pytest.raises(DataError, match=r"test\.jsonl:1.*####"):
    get_task("gsm8k").load("test", str(tmp_path))


def test_empty_split(tmp_path):
  (tmp_path / "test.jsonl").write_text("\n")
  with pytest.raises(DataError, match="empty split"):
    get_task("gsm8k").load("test", str(tmp_path))


def test_missing_file(tmp_path):
  with pytest.raises(DataError, match="no such data file"):
    get_task("gsm8k").load("validation", str(tmp_path))


# --- perturbations --------------------------------------------------------------------


def test_format_prompt_appends_preamble_after_answer_cue():
  assert DEFAULT_PERTURBATIONS == ("First", "We know that")
  assert format_prompt("What is 2+2?", "First") == "What is 2+2?\nAnswer: First"
  assert format_prompt("What is 2+2?") == "What is 2+2?\nAnswer:"
  custom = PromptTemplate(prompt_format="Q: {question}\nA:")
  assert format_prompt("Hi", "We know that", custom) == "Q: Hi\nA: We know that"


def test_expand_perturbations():
  examples = [Example("e0", "Q0", "t", "1"), Example("e1", "Q1", "t", "2")]
  prompts = expand_perturbations(examples)
  assert [(p.example_index, p.example_id, p.perturbation, p.prompt) for p in prompts] == [
      (0, "e0", "First", "Q0\nAnswer: First"),
      (0, "e0", "We know that", "Q0\nAnswer: We know that"),
      (1, "e1", "First", "Q1\nAnswer: First"),
      (1, "e1", "We know that", "Q1\nAnswer: We know that"),
  ]
  with_plain = expand_perturbations(examples, ["First"], include_unperturbed=True)
  assert [(p.perturbation, p.prompt) for p in with_plain] == [
      (None, "Q0\nAnswer:"), ("First", "Q0\nAnswer: First"),
      (None, "Q1\nAnswer:"), ("First", "Q1\nAnswer: First")]
  task = get_task("gsm8k", template=PromptTemplate(prompt_format="Q: {question}\nA:"))
  via_task = expand_perturbations(examples[:1], ["First"], task=task)
  assert via_task[0].prompt == "Q: Q0\nA: First"
  assert expand_perturbations([], DEFAULT_PERTURBATIONS) == []
  assert DEFAULT_TEMPLATE.prompt("Q0") == "Q0\nAnswer:"


def test_hub_loading_path(monkeypatch):
  # Stands in for `datasets` (and a Hub that answers) so the Hub code path runs offline.
  monkeypatch.setattr(hub, "offline_reason", lambda: None)
  calls = []

  def load_dataset(name, config, split):
    calls.append((name, config, split))
    return [RECORD, {**RECORD, "answer": "x\n#### 1,000"}]

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
  examples = get_task("gsm8k").load("test")
  assert calls == [("openai/gsm8k", "main", "test")]
  assert [(ex.id, ex.answer) for ex in examples] == [("gsm8k/test/0", "4"),
                                                       ("gsm8k/test/1", "1000")]
  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(
      load_dataset=lambda *a, **k: [{"question": "Q?"}]))
  with pytest.raises(DataError, match=r"openai/gsm8k\[main/test\] record 0.*'answer'"):
    get_task("gsm8k").load("test")


@pytest.mark.parametrize("task_name,hub_name", [("gsm8k", "openai/gsm8k"),
                                           ("math", "EleutherAI/hendrycks_math")])
def test_hub_unreachable_says_to_pass_a_local_path(monkeypatch, task_name, hub_name):
  def offline(*args, **kwargs):
    raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (LocalEntryNotFoundError)")

  monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=offline))
  # The Hub answered the probe, then the load failed.
  monkeypatch.setattr(hub, "offline_reason", lambda: None)
  with pytest.raises(DataError, match=rf"cannot load {hub_name}\[.*ConnectionError.*--task_path"):
    get_task(task_name).load("test")
  # The Hub did not answer (memdyn_jax.hub): the load ran in offline mode, and says why.
  monkeypatch.setattr(hub, "offline_reason", lambda: "the Hub (http://x) cannot be reached")
  with pytest.raises(DataError, match=rf"cannot load {hub_name}\[.*: the Hub \(http://x\) cannot "
                     r"be reached, and the local cache \(HF_HOME\) does not hold it.*--task_path"):
    get_task(task_name).load("test")


def test_write_jsonl_round_trips_through_read_jsonl(tmp_path):
  from memdyn_jax.tasks import read_jsonl
  records = [RECORD, {"question": "Q2 with \"quotes\"\nand a newline", "answer": "#### 5"}]
  path = write_jsonl(tmp_path / "x.jsonl", records)
  assert path == tmp_path / "x.jsonl"
  assert list(read_jsonl(str(path), required=("question", "answer"))) == [(1, records[0]),
                                                                          (2, records[1])]
