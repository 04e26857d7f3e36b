"""MATH (Hendrycks et al., 2021): competition problems with a LaTeX `\\boxed{}` answer.

Registered as "math". (The module is `math_task` so it never shadows the standard library's
`math` inside this package.)

The target is the verbatim solution; the reference answer is the content of its last
`\\boxed{...}` / `\\fbox{...}` (brace-matched; `\\boxed 5` also accepted). A completion is
graded by extracting its last boxed answer the same way and comparing with the reference:
first with a Hendrycks-style string normalizer (cheap, catches most matches), then, when the
strings differ, with math-verify's symbolic comparison under a timeout. math-verify failing,
timing out or raising counts as "not equal", leaving the normalizer's verdict.
"""
from __future__ import annotations

import math
import re
import threading
import types
from typing import Any, Iterable, Mapping, Sequence

from absl import logging

from memdyn_jax.metrics import premem
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

HUB_NAME = "EleutherAI/hendrycks_math"
SUBJECTS = ("algebra", "counting_and_probability", "geometry", "intermediate_algebra",
            "number_theory", "prealgebra", "precalculus")

_BOX_RE = re.compile(r"\\(?:boxed|fbox)")
_LEVEL_RE = re.compile(r"Level\s+(\d+)")


def last_boxed(text: str) -> str | None:
  """Content of the last `\\boxed{...}` or `\\fbox{...}` in `text`, braces matched.

  The brace-less form `\\boxed 5` yields the text up to the next `$` or end of line. Returns
  None when there is no box or its braces never close.
  """
  matches = list(_BOX_RE.finditer(text))
  if not matches:
    return None
  rest = text[matches[-1].end():]
  stripped = rest.lstrip(" ")
  if stripped.startswith("{"):
    depth = 0
    for i, ch in enumerate(stripped):
      if ch == "{":
        depth += 1
      elif ch == "}":
        depth -= 1
        if depth == 0:
          return stripped[1:i]
    return None
  if rest.startswith(" "):
    return re.split(r"[$\n]", stripped, maxsplit=1)[0].strip()
  return None


# ---------------------------------------------------------------------------------------
# Hendrycks-style normalizer. Applies the MATH paper's equivalence rules: drop spacing,
# \left/\right, degrees, dollars, percent and trailing "\text{ units}"; canonicalize
# \dfrac/\tfrac, \frac12, \sqrt3, "a/b" and "0.5"; drop a short "x =" prefix.


def _remove_trailing_units(s: str) -> str:
  # Units are written "5 \text{ cm}" (note the space inside the braces) in MATH solutions.
  return s.split("\\text{ ")[0] if "\\text{ " in s else s


def _brace_sqrt(s: str) -> str:
  # "\sqrt3" -> "\sqrt{3}": braces the single character after \sqrt (spaces already gone).
  return re.sub(r"\\sqrt([^{[\\])", r"\\sqrt{\1}", s)


def _brace_fracs(s: str) -> str:
  """Braces \\frac shorthand: `\\frac12`, `\\frac1{2}` and `\\frac{1}2` -> `\\frac{1}{2}`."""
  parts = s.split("\\frac")
  out = [parts[0]]
  for part in parts[1:]:
    out.append("\\frac")
    if part.startswith("{"):
      # Numerator already braced; brace a single-character denominator if needed.
      depth, end = 0, None
      for i, ch in enumerate(part):
        depth += ch == "{"
        depth -= ch == "}"
        if depth == 0:
          end = i
          break
      if end is not None and end + 1 < len(part) and part[end + 1] != "{":
        part = part[:end + 1] + "{" + part[end + 1] + "}" + part[end + 2:]
      out.append(part)
    elif len(part) >= 2:
      num, rest = part[0], part[1:]
      if rest.startswith("{"):
        out.append("{" + num + "}" + rest)
      else:
        out.append("{" + num + "}{" + rest[0] + "}" + rest[1:])
    else:
      out.append(part)
  return "".join(out)


def _slash_to_frac(s: str) -> str:
  # "3/4" -> "\frac{3}{4}" only for a plain integer ratio.
  m = re.fullmatch(r"(-?\d+)/(\d+)", s)
  return f"\\frac{{{m.group(1)}}}{{{m.group(2)}}}" if m else s


def normalize_math_answer(answer: str) -> str:
  """Canonical string form of a MATH answer for equality checks (Hendrycks rules)."""
  s = answer.replace("\n", "").replace("\\!", "")
  s = s.replace("\\\\", "\\")
  s = s.replace("tfrac", "frac").replace("dfrac", "frac")
  s = s.replace("\\left", "").replace("\\right", "")
  s = s.replace("^{\\circ}", "").replace("^\\circ", "")
  s = s.replace("\\$", "").replace("$", "")
  s = _remove_trailing_units(s)
  s = s.replace("\\%", "").replace("%", "")
  s = s.replace("\\displaystyle", "")
  for space in ("\\,", "\\;", "\\:", "\\ "):
    s = s.replace(space, " ")
  # Leading-zero decimals: " .5" / "{.5" / ".5" -> "0.5".
  s = s.replace(" .", " 0.").replace("{.", "{0.")
  s = s.strip()
  if s.startswith("."):
    s = "0" + s
  # "x = 5" / "k=5" -> "5": a short left-hand side names the variable, not the answer.
  sides = s.split("=")
  if len(sides) == 2 and len(sides[0].strip()) <= 2:
    s = sides[1]
  s = s.replace(" ", "")
  s = _brace_sqrt(s)
  s = _brace_fracs(s)
  if s == "0.5":
    s = "\\frac{1}{2}"
  s = _slash_to_frac(s)
  s = s.rstrip(".")
  return s


def normalized_equal(a: str, b: str) -> bool:
  """Hendrycks string equivalence; falls back to raw equality if normalization fails."""
  try:
    return normalize_math_answer(a) == normalize_math_answer(b)
  # Model output is arbitrary text: grading must not crash on what the normalizer's
  # string surgery did not foresee (an IndexError on a stray brace, ...).
  except Exception:  # noqa: BLE001 - grading odd model output
    return a.strip() == b.strip()


def math_verify_equal(reference: str, predicted: str, timeout_s: int = 5) -> bool:
  """Symbolic equality of two LaTeX answers with math-verify; False on failure or timeout.

  math-verify's timeout uses SIGALRM, which only works in the main thread; elsewhere it runs
  without a timeout (math-verify's own recommendation).
  """
  from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify

  if threading.current_thread() is not threading.main_thread():
    timeout_s = None
  config = (LatexExtractionConfig(), ExprExtractionConfig())
  try:
    # Wrapping in \boxed{} makes math-verify read the whole string as one LaTeX answer.
    gold = parse(f"\\boxed{{{reference}}}", extraction_config=config, parsing_timeout=timeout_s)
    pred = parse(f"\\boxed{{{predicted}}}", extraction_config=config, parsing_timeout=timeout_s)
    if not gold or not pred:
      return False
    return bool(verify(gold, pred, timeout_seconds=timeout_s))
  # math-verify (sympy underneath) raises many types on exotic LaTeX: "not shown equal".
  except Exception as e:  # noqa: BLE001 - third-party parser on odd model output
    logging.debug("math-verify failed on %r vs %r: %s", reference, predicted, e)
    return False


def parse_level(raw: Any) -> int | None:
  """"Level 3" -> 3; None for unknown levels (MATH train has two "Level ?")."""
  m = _LEVEL_RE.fullmatch(str(raw).strip())
  return int(m.group(1)) if m else None


def subject_from_type(problem_type: str) -> str:
  """"Counting & Probability" -> "counting_and_probability"."""
  return problem_type.strip().lower().replace(" & ", "_and_").replace(" ", "_")


@register_task("math")
class MathTask(Task):
  """MATH task (PreMemAcc threshold: Kang et al.'s MATH value, log log perplexity -1.7).

  Args:
    levels: keep only these difficulty levels (1-5); None keeps all. Problems of unknown
      level are dropped whenever a filter is given.
    use_math_verify: also try math-verify when normalized strings differ.
    verify_timeout_s: math-verify timeout per parse/compare, seconds.
    template: prompt/target rendering.
  """

  memorization_loglog_threshold = premem.MATH_LOGLOG_THRESHOLD
  sampling_defaults = types.MappingProxyType(
      dict(temperature=0.8, top_p=1.0, max_new_tokens=1024, n=5))
  curation_keep_fraction = 0.75  # Kang et al. App. C

  def __init__(self, levels: Sequence[int] | None = None, use_math_verify: bool = True,
               verify_timeout_s: int = 5, template: PromptTemplate = DEFAULT_TEMPLATE):
    self.levels = None if levels is None else tuple(int(x) for x in levels)
    self.use_math_verify = use_math_verify
    self.verify_timeout_s = verify_timeout_s
    self.template = template


  def difficulty(self, example: Example) -> float:
    """The problem's level (1-5); NaN when unknown (ranked last)."""
    level = example.meta.get("level")
    return math.nan if level is None else float(level)
  def load(self, split: str, path: str | None = None) -> list[Example]:
    """Loads a split from a local jsonl (file or folder with `{split}.jsonl`) or the Hub.

    Hub loading concatenates the seven subject configs of `EleutherAI/hendrycks_math`.
    """
    if path is not None:
      file = resolve_split_path(path, split)
      records = ((f"{file}:{lineno}", None, r) for lineno, r in
                 read_jsonl(file, required=("problem", "solution", "level")))
      source = file
    else:
      records = self._hub_records(split)
      source = f"{HUB_NAME}[{split}]"
    examples = []
    for index, (where, hub_id, record) in enumerate(records):
      examples.append(self._example(split, index, where, hub_id, record))
    ensure_nonempty(examples, source)
    no_answer = sum(not ex.answer for ex in examples)
    if no_answer:
      logging.warning("%s: %d problem(s) have an empty boxed answer; they can never grade "
                      "correct", source, no_answer)
    if self.levels is not None:
      examples = [ex for ex in examples if ex.meta["level"] in self.levels]
      ensure_nonempty(examples, f"{source} with levels {self.levels}")
    return examples

  def _hub_records(self, split: str) -> Iterable[tuple[str, str, Mapping[str, Any]]]:
    for subject in SUBJECTS:
      data = load_hub_dataset(HUB_NAME, subject, split)
      for i, record in enumerate(data):
        where = f"{HUB_NAME}[{subject}/{split}] record {i}"
        missing = [k for k in ("problem", "solution", "level") if k not in record]
        if missing:
          raise DataError(f"{where}: missing field(s) {missing}")
        yield where, f"math/{split}/{subject}/{i}", {"subject": subject, **record}

  def _example(self, split: str, index: int, where: str, hub_id: str | None,
               record: Mapping[str, Any]) -> Example:
    if "subject" in record:
      subject = record["subject"]
    elif "type" in record:
      subject = subject_from_type(record["type"])
    else:
      raise DataError(f"{where}: missing field(s) ['subject' or 'type']")
    solution = record["solution"]
    if not isinstance(solution, str) or not isinstance(record["problem"], str):
      raise DataError(f"{where}: 'problem' and 'solution' must be strings")
    answer = record.get("answer")
    if answer is None:
      answer = last_boxed(solution) or ""
    if hub_id is not None:
      example_id = hub_id
    elif "unique_id" in record:
      example_id = "math/" + re.sub(r"\.json$", "", str(record["unique_id"]))
    else:
      example_id = f"math/{split}/{index}"
    meta = {"level": parse_level(record["level"]), "level_raw": record["level"],
            "subject": subject, "type": record.get("type", "")}
    if "unique_id" in record:
      meta["unique_id"] = record["unique_id"]
    return Example(id=example_id, question=record["problem"], target=solution,
                   answer=answer, meta=meta)

  def extract_answer(self, text: str) -> str | None:
    """The last boxed answer, or None if there is none (or it is empty)."""
    answer = last_boxed(text)
    return answer.strip() if answer and answer.strip() else None

  def answers_equal(self, predicted: str, reference: str) -> bool:
    """Normalizer first (fast); math-verify only when the normalized strings differ."""
    if normalized_equal(predicted, reference):
      return True
    return self.use_math_verify and math_verify_equal(reference, predicted,
                                                      self.verify_timeout_s)

  def grade(self, completion_text: str, reference_answer: str) -> bool:
    parsed = self.extract_answer(completion_text)
    return parsed is not None and self.answers_equal(parsed, reference_answer)
