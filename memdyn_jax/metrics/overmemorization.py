"""Over-memorization stage detection and checkpoint selection (Ruan et al. 2025).

Ruan et al. describe a stage of finetuning where the model has excessively memorized the
training data: test perplexity is high while test accuracy stays good. This module makes
that operational per run, with checkpoints in training order m = 0..C-1:

  ppl_ref_m = min_{m' <= m} Perp^test_{m'}      (reference="running")
  acc_ref_m = max_{m' <= m} Acc^test_{m'}
  over_m    = [Perp^test_m >= (1 + X)·ppl_ref_m]  and  [Acc^test_m >= acc_ref_m - Y]

With reference="overall" the references are the minimum / maximum over the whole run and
only checkpoints at or after the (first) perplexity minimum can be flagged, since
perplexity must have *risen*. A stage is a maximal run of consecutive flagged checkpoints
at least `min_stage_len` long.

Checkpoint selection (Ruan et al.'s recommendation to avoid over-memorized checkpoints):
  "pre_stage_best_acc": argmax test accuracy among checkpoints before the first stage;
  "max_train_premem":   argmax dataset train PreMemAcc (Kang et al.), no test labels needed.
"""
from __future__ import annotations

import dataclasses
from typing import Literal

import numpy as np

from memdyn_jax.metrics._checks import as_float_array, check_nonempty, check_same_shape


@dataclasses.dataclass(frozen=True)
class OverMemorizationConfig:
  """Detector parameters.

  Attributes:
    min_ppl_rise: X as a fraction: flag when test perplexity >= (1 + X)·reference minimum
      (0.10 = a 10% rise).
    max_acc_drop: Y in accuracy units: test accuracy must stay >= best - Y (with
      accuracies in [0, 1], 0.02 = 2 points).
    reference: "running" (minimum / best so far) or "overall" (over the whole run).
    min_stage_len: shortest run of consecutive flagged checkpoints that forms a stage.
  """

  min_ppl_rise: float = 0.10
  max_acc_drop: float = 0.02
  reference: Literal["running", "overall"] = "running"
  min_stage_len: int = 1

  def __post_init__(self):
    if not self.min_ppl_rise > 0:
      raise ValueError(f"min_ppl_rise must be > 0, got {self.min_ppl_rise}")
    if not self.max_acc_drop >= 0:
      raise ValueError(f"max_acc_drop must be >= 0, got {self.max_acc_drop}")
    if self.reference not in ("running", "overall"):
      raise ValueError(f"reference must be 'running' or 'overall', got {self.reference!r}")
    if self.min_stage_len < 1:
      raise ValueError(f"min_stage_len must be >= 1, got {self.min_stage_len}")


@dataclasses.dataclass(frozen=True, eq=False)
class OverMemorization:
  """Detector output for one run.

  Attributes:
    flags: (C,) bool, the per-checkpoint condition over_m.
    in_stage: (C,) bool, flags restricted to stages (runs >= min_stage_len).
    stages: ((start, end), ...) inclusive checkpoint indices of each stage.
    stage_steps: the same boundaries as training steps.
    ppl_rise: (C,) Perp_m / ppl_ref_m - 1.
    acc_gap: (C,) acc_ref_m - Acc_m (>= 0).
  """

  flags: np.ndarray
  in_stage: np.ndarray
  stages: tuple[tuple[int, int], ...]
  stage_steps: tuple[tuple[int, int], ...]
  ppl_rise: np.ndarray
  acc_gap: np.ndarray

  @property
  def onset(self) -> int | None:
    """Index of the first checkpoint of the first stage, or None without a stage."""
    return self.stages[0][0] if self.stages else None


def _runs_of_true(mask: np.ndarray) -> list[tuple[int, int]]:
  runs, start = [], None
  for i, v in enumerate(mask):
    if v and start is None:
      start = i
    elif not v and start is not None:
      runs.append((start, i - 1))
      start = None
  if start is not None:
    runs.append((start, len(mask) - 1))
  return runs


def detect_overmemorization(
    test_perplexity,
    test_acc,
    steps=None,
    config: OverMemorizationConfig = OverMemorizationConfig(),
) -> OverMemorization:
  """Flags over-memorized checkpoints of one run and groups them into stages.

  over_m = [Perp_m >= (1+X)·ppl_ref_m] ∧ [Acc_m >= acc_ref_m - Y] (see module docstring).

  Args:
    test_perplexity: dataset test perplexity per checkpoint, shape (C,), training order.
    test_acc: dataset test accuracy per checkpoint, shape (C,).
    steps: training step of each checkpoint, shape (C,); defaults to 0..C-1.
    config: X, Y, reference and minimum stage length.

  Returns:
    An `OverMemorization`.

  Raises:
    ValueError: shapes differ or are not 1-D, empty input, non-positive perplexity.
  """
  ppl = as_float_array("test_perplexity", test_perplexity, ndim=1)
  acc = as_float_array("test_acc", test_acc, ndim=1)
  check_nonempty("test_perplexity", ppl)
  check_same_shape("test_perplexity", ppl, "test_acc", acc)
  if (ppl <= 0).any():
    raise ValueError("test_perplexity must be > 0")
  if steps is None:
    step_arr = np.arange(ppl.size)
  else:
    step_arr = np.asarray(steps)
    if step_arr.shape != ppl.shape:
      raise ValueError(f"steps must have shape {ppl.shape}, got {step_arr.shape}")
  if config.reference == "running":
    ppl_ref = np.minimum.accumulate(ppl)
    acc_ref = np.maximum.accumulate(acc)
    eligible = np.ones(ppl.shape, dtype=bool)
  else:
    ppl_ref = np.full(ppl.shape, ppl.min())
    acc_ref = np.full(acc.shape, acc.max())
    # Perplexity can only have risen after its minimum.
    eligible = np.arange(ppl.size) >= int(np.argmin(ppl))
  ppl_rise = ppl / ppl_ref - 1.0
  acc_gap = acc_ref - acc
  flags = (eligible & (ppl >= (1.0 + config.min_ppl_rise) * ppl_ref)
           & (acc >= acc_ref - config.max_acc_drop))
  stages = [r for r in _runs_of_true(flags) if r[1] - r[0] + 1 >= config.min_stage_len]
  in_stage = np.zeros(ppl.shape, dtype=bool)
  for s, e in stages:
    in_stage[s:e + 1] = True
  stage_steps = tuple((int(step_arr[s]), int(step_arr[e])) for s, e in stages)
  return OverMemorization(flags, in_stage, tuple(stages), stage_steps, ppl_rise, acc_gap)


def select_checkpoint(
    rule: Literal["pre_stage_best_acc", "max_train_premem"],
    *,
    test_acc=None,
    detection: OverMemorization | None = None,
    train_premem=None,
) -> int:
  """Index of the checkpoint a selection rule picks; ties go to the earliest checkpoint.

  - "pre_stage_best_acc": argmax_{m < onset} Acc^test_m, where onset is the first stage's
    first checkpoint (all checkpoints when there is no stage). Onset >= 1 always: checkpoint
    0 is its own perplexity reference, so it cannot have risen. Needs `test_acc` and
    `detection`.
  - "max_train_premem": argmax_m E_train[PreMemAcc_m]. Needs `train_premem`.

  Raises:
    ValueError: unknown rule, or a required argument missing or misshapen.
  """
  if rule == "pre_stage_best_acc":
    if test_acc is None:
      raise ValueError("test_acc is required for rule 'pre_stage_best_acc'")
    if detection is None:
      raise ValueError("detection is required for rule 'pre_stage_best_acc'")
    acc = as_float_array("test_acc", test_acc, ndim=1)
    check_nonempty("test_acc", acc)
    if acc.shape != detection.flags.shape:
      raise ValueError(f"test_acc must have shape {detection.flags.shape} (one per "
                       f"checkpoint of detection), got {acc.shape}")
    onset = detection.onset
    end = acc.size if onset is None else onset
    return int(np.argmax(acc[:end]))  # np.argmax returns the first maximum.
  if rule == "max_train_premem":
    if train_premem is None:
      raise ValueError("train_premem is required for rule 'max_train_premem'")
    pm = as_float_array("train_premem", train_premem, ndim=1)
    check_nonempty("train_premem", pm)
    return int(np.argmax(pm))
  raise ValueError(f"rule must be 'pre_stage_best_acc' or 'max_train_premem', got {rule!r}")
