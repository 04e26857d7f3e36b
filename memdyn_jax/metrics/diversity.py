"""Diversity among the n completions sampled for one prompt (Ruan et al. 2025).

Ruan et al. report that over-memorized models generate less diverse outputs. Per prompt,
over its n samples:

  distinct-k = |unique k-grams| / |k-grams|, pooled over the samples (Li et al. 2016);
  unique final answers = number of distinct parsed answers;
  unique traces = number of distinct completion texts.

Samples are strings (split on whitespace) or token sequences (e.g. token-id lists).
"""
from __future__ import annotations

import dataclasses
from typing import Hashable, Sequence, Union

Sample = Union[str, Sequence[Hashable]]


def _tokens(sample: Sample, index: int) -> tuple:
  if isinstance(sample, str):
    return tuple(sample.split())
  if isinstance(sample, (bytes, bytearray)):
    raise ValueError(f"samples[{index}] is bytes; decode it or pass token ids")
  try:
    return tuple(sample)
  except TypeError:
    raise ValueError(f"samples[{index}] must be a string or a token sequence, "
                     f"got {type(sample).__name__}") from None


def distinct_n(samples: Sequence[Sample], n: int) -> float:
  """distinct-n = |∪_s ngrams_n(s)| / Σ_s |ngrams_n(s)|, n-grams pooled over the samples.

  n-grams never span two samples. Returns 0.0 when no sample has n tokens.

  Args:
    samples: the completions for one prompt (strings or token sequences).
    n: the n-gram order, >= 1 (distinct-1 and distinct-2 are reported).

  Raises:
    ValueError: n < 1, or a sample that is neither a string nor a sequence.
  """
  if n < 1:
    raise ValueError(f"n must be >= 1, got {n}")
  total = 0
  seen = set()
  for i, s in enumerate(samples):
    toks = _tokens(s, i)
    for j in range(len(toks) - n + 1):
      seen.add(toks[j:j + n])
      total += 1
  return len(seen) / total if total else 0.0


def unique_final_answers(answers: Sequence[str | None], count_unparseable: bool = False) -> int:
  """Number of distinct final answers (surrounding whitespace ignored).

  Answers should already be normalized by the task's grader. None marks an unparseable
  completion; by default it is not an answer, with `count_unparseable` all Nones count as
  one extra distinct outcome.
  """
  distinct = {a.strip() for a in answers if a is not None}
  has_none = any(a is None for a in answers)
  return len(distinct) + int(count_unparseable and has_none)


def unique_traces(samples: Sequence[Sample], normalize_whitespace: bool = True) -> int:
  """Number of distinct completions; strings compare after collapsing whitespace runs
  (when `normalize_whitespace`), token sequences compare exactly."""
  keys = set()
  for i, s in enumerate(samples):
    if isinstance(s, str):
      keys.add(" ".join(s.split()) if normalize_whitespace else s)
    else:
      keys.add(_tokens(s, i))
  return len(keys)


@dataclasses.dataclass(frozen=True)
class Diversity:
  """All diversity measures for one prompt's samples."""

  distinct_1: float
  distinct_2: float
  unique_answers: int
  unique_traces: int
  num_samples: int


def sample_diversity(samples: Sequence[Sample], answers: Sequence[str | None]) -> Diversity:
  """distinct-1, distinct-2, unique final answers and unique traces of one prompt's samples.

  Raises:
    ValueError: `answers` length differs from `samples` length.
  """
  if len(answers) != len(samples):
    raise ValueError(f"answers must have one entry per sample ({len(samples)}), "
                     f"got {len(answers)}")
  return Diversity(distinct_n(samples, 1), distinct_n(samples, 2),
                   unique_final_answers(answers), unique_traces(samples), len(samples))
