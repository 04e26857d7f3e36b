"""GSM8K (Cobbe et al., 2021): grade-school math word problems with a numeric answer.

The target is the dataset's worked solution including its final `#### N` line, so a model
fine-tuned on it ends its answer with `#### N` (then the template's `\\nDone.`). The
`<<48/2=24>>` calculator annotations are kept unless `strip_calculator=True`.

Answers are read from the line after the last "The answer is" or "#### " marker: its first
number, commas, `$` and units stripped (`#### 8 pens` reads 8, as in the reference
harnesses' strict match), or the whole normalized line when it holds no number. Without a
marker a completion is unparseable (`extract_answer` returns None), unless `flexible=True`,
which falls back to the last number in the text.
"""
from __future__ import annotations

import decimal
import re
from typing import Any, Iterable, Mapping

from memdyn_jax.tasks.base import (
    DEFAULT_TEMPLATE,
    DataError,
    Example,
    PromptTemplate,
    Task,
    ensure_nonempty,
    load_hub_dataset,
    read_jsonl,
    register_task,
    resolve_split_path,
)

HUB_NAME = "openai/gsm8k"
ANSWER_MARKERS = ("The answer is", "#### ")

_CALC_RE = re.compile(r"<<.*?>>")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in ANSWER_MARKERS))
# A number as written in text: optional sign, thousands commas, decimals ("-1,250.50", ".5").
_NUMBER_RE = re.compile(r"-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)")


def strip_calculator(text: str) -> str:
  """Removes GSM8K's `<<expr=value>>` calculator annotations."""
  return _CALC_RE.sub("", text)


def normalize_answer(text: str) -> str:
  """Canonical form of a written answer: no `$`, commas, surrounding space, `:` or final `.`."""
  text = text.strip().lstrip(":").strip()
  text = text.replace("$", "").replace(",", "").strip()
  text = text.rstrip(".").strip()
  return text


def _as_number(text: str) -> decimal.Decimal | None:
  try:
    value = decimal.Decimal(text)
  except decimal.InvalidOperation:
    return None
  return value if value.is_finite() else None


def answers_equal(a: str, b: str) -> bool:
  """Numeric comparison when both parse as numbers ("18.0" == "18"), else string equality."""
  a, b = normalize_answer(a), normalize_answer(b)
  x, y = _as_number(a), _as_number(b)
  if x is not None and y is not None:
    return x == y
  return a == b


def _reference_answer(solution: str, where: str) -> str:
  _, sep, tail = solution.rpartition("#### ")
  if not sep:
    raise DataError(f"{where}: solution has no '#### ' final answer line")
  answer = normalize_answer(tail.split("\n", 1)[0])
  if not answer:
    raise DataError(f"{where}: empty final answer after '#### '")
  return answer


@register_task("gsm8k")
class GSM8KTask(Task):
  """GSM8K task.

  Args:
    strip_calculator: remove `<<...>>` annotations from targets.
    flexible: when a completion has no answer marker, grade its last number instead of
      treating it as unparseable.
    template: prompt/target rendering.
  """

  def __init__(self, strip_calculator: bool = False, flexible: bool = False,
               template: PromptTemplate = DEFAULT_TEMPLATE):
    self.strip_calculator = strip_calculator
    self.flexible = flexible
    self.template = template


  def difficulty(self, example: Example) -> float:
    """Reasoning lines of the solution; the `#### N` answer line is not counted."""
    return float(sum(1 for ln in example.target.splitlines()
                     if ln.strip() and not ln.lstrip().startswith("####")))
  def load(self, split: str, path: str | None = None) -> list[Example]:
    """Loads a split from a local jsonl (file or folder with `{split}.jsonl`) or the Hub."""
    if path is not None:
      file = resolve_split_path(path, split)
      records = ((f"{file}:{lineno}", r)
                 for lineno, r in read_jsonl(file, required=("question", "answer")))
      source = file
    else:
      records = self._hub_records(split)
      source = f"{HUB_NAME}[main/{split}]"
    examples = [self._example(split, i, where, r) for i, (where, r) in enumerate(records)]
    ensure_nonempty(examples, source)
    return examples

  def _hub_records(self, split: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    data = load_hub_dataset(HUB_NAME, "main", split)
    for i, record in enumerate(data):
      where = f"{HUB_NAME}[main/{split}] record {i}"
      for key in ("question", "answer"):
        if key not in record:
          raise DataError(f"{where}: missing field(s) [{key!r}]")
      yield where, record

  def _example(self, split: str, index: int, where: str, record: Mapping[str, Any]) -> Example:
    solution = record["answer"]
    if not isinstance(solution, str) or not isinstance(record["question"], str):
      raise DataError(f"{where}: 'question' and 'answer' must be strings")
    answer = _reference_answer(solution, where)
    target = strip_calculator(solution) if self.strip_calculator else solution
    return Example(id=f"gsm8k/{split}/{index}", question=record["question"], target=target,
                   answer=answer)

  def extract_answer(self, text: str) -> str | None:
    """The normalized answer after the last marker, or None if unparseable."""
    matches = list(_MARKER_RE.finditer(text))
    if matches:
      line = text[matches[-1].end():].split("\n", 1)[0]
      number = _NUMBER_RE.search(line.replace("$", ""))
      answer = normalize_answer(number.group() if number else line)
      if answer:
        return answer
    if self.flexible:
      numbers = _NUMBER_RE.findall(text)
      if numbers:
        return normalize_answer(numbers[-1])
    return None

  def grade(self, completion_text: str, reference_answer: str) -> bool:
    parsed = self.extract_answer(completion_text)
    return parsed is not None and answers_equal(parsed, reference_answer)
