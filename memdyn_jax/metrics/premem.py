"""Pre-memorization train accuracy and its threshold calibration (Kang et al. Sec. 4, App. A.1).

An example i counts as memorized at checkpoint m once its target-trace perplexity falls
below a threshold p fixed across examples. Masked accuracy keeps the accuracy only while
the example is not yet memorized, and PreMemAcc is the best masked accuracy so far, capped
by the current accuracy (Kang et al. Sec. 4.1):

  MaskedAcc_m = Acc_m · 1[Perp_m >= p]
  PreMemAcc_m = min( max_{m' <= m} MaskedAcc_{m'}, Acc_m )

Ties: Perp == p counts as *not yet memorized*. (The paper's text writes the indicator with
a strict `>`; this project fixes `>=` so that the rule is stated once, in perplexity units.)

Thresholds are in perplexity units. Kang et al.'s reference code states them on a
log(log(perplexity)) scale, t = log(log(Perp)) = log(mean token NLL); its GSM8K value
t = -2.3 is Perp ≈ 1.105 and its MATH value t = -1.7 is Perp ≈ 1.200.
"""
from __future__ import annotations

import dataclasses
from typing import Literal, Sequence

import numpy as np

from memdyn_jax.metrics import regression
from memdyn_jax.metrics._checks import (
    as_float_array,
    check_nonempty,
    check_same_shape,
    check_unit_interval,
)

# Kang et al.'s reference-code thresholds on the log(log(perplexity)) scale (perplexity
# 1.105 and 1.200): the tasks' defaults (`Task.memorization_loglog_threshold`).
GSM8K_LOGLOG_THRESHOLD = -2.3
MATH_LOGLOG_THRESHOLD = -1.7


def loglog_to_perplexity(t):
  """Perplexity threshold from the reference code's log(log(Perp)) scale: Perp = exp(exp(t)).

  Args:
    t: threshold(s) on the log(log(perplexity)) scale, float or array.

  Returns:
    exp(exp(t)), same shape as `t` (a Python float for scalar input). Always > 1.
  """
  out = np.exp(np.exp(np.asarray(t, dtype=np.float64)))
  return float(out) if out.ndim == 0 else out


def perplexity_to_loglog(perplexity):
  """Inverse of `loglog_to_perplexity`: t = log(log(Perp)), defined for Perp > 1.

  Raises:
    ValueError: some perplexity is <= 1 (log(log(.)) is undefined there).
  """
  p = np.asarray(perplexity, dtype=np.float64)
  if np.isnan(p).any() or (p <= 1.0).any():
    raise ValueError(f"perplexity must be > 1 for log(log(.)), got {perplexity!r}")
  out = np.log(np.log(p))
  return float(out) if out.ndim == 0 else out


# ----------------------------------------------------------------------------- the rule
# A target is memorized when its perplexity is strictly below the threshold p (Kang et al.:
# MaskedAcc keeps accuracy while Perp >= p). A NaN perplexity is a target that was not
# scored: never memorized, and still counted among the targets. Every stage (TensorBoard
# scalars, report, curation) applies the rule through these functions.


def unscored_as_never_memorized(perplexity) -> np.ndarray:
  """Perplexities with NaN (not scored) as +inf, which no threshold calls memorized."""
  return np.nan_to_num(np.asarray(perplexity, dtype=np.float64), nan=np.inf, posinf=np.inf)


def is_memorized(perplexity, threshold: float) -> np.ndarray:
  """1[Perp < p] per target (bool, the shape of `perplexity`); NaN is not memorized."""
  return unscored_as_never_memorized(perplexity) < _threshold(threshold)


def memorized_fraction(perplexity, threshold: float) -> float:
  """Share of targets memorized (`is_memorized`), unscored ones counted as not memorized;
  NaN when there are no targets."""
  memorized = is_memorized(perplexity, threshold)
  return float(memorized.mean()) if memorized.size else float("nan")


def _acc_ppl(acc, perplexity) -> tuple[np.ndarray, np.ndarray]:
  a = as_float_array("acc", acc, ndim=2)
  check_unit_interval("acc", a)
  # +inf perplexity (a target with a zero-probability token) is legal: never memorized.
  p = as_float_array("perplexity", perplexity, ndim=2, allow_inf=True)
  check_same_shape("acc", a, "perplexity", p)
  return a, p


def _threshold(threshold) -> float:
  t = float(threshold)
  if np.isnan(t):
    raise ValueError("threshold is NaN")
  return t


def masked_accuracy(acc, perplexity, threshold: float) -> np.ndarray:
  """MaskedAcc = Acc · 1[Perp >= p] (Kang et al. Sec. 4.1); Perp == p is not memorized.

  Args:
    acc: per-(checkpoint, example) accuracy in [0, 1], shape (C, N).
    perplexity: target-trace perplexity, shape (C, N).
    threshold: memorization threshold p in perplexity units.

  Returns:
    Shape (C, N) float array.
  """
  a, p = _acc_ppl(acc, perplexity)
  return a * ~is_memorized(p, threshold)


def premem_accuracy(acc, perplexity, threshold: float) -> np.ndarray:
  """Per-example pre-memorization accuracy at every checkpoint (Kang et al. Sec. 4.1).

  PreMemAcc_m = min( max_{m' <= m} Acc_{m'}·1[Perp_{m'} >= p], Acc_m ).

  Args:
    acc: accuracy (fraction of sampled completions correct), shape (C, N) with
      checkpoints in training order along axis 0 and examples along axis 1.
    perplexity: perplexity of the target trace, shape (C, N).
    threshold: p in perplexity units; Perp == p counts as not yet memorized.

  Returns:
    Shape (C, N) float array.

  Raises:
    ValueError: shapes differ or are not 2-D, acc outside [0, 1], NaN inputs.
  """
  a, _ = _acc_ppl(acc, perplexity)
  best_so_far = np.maximum.accumulate(masked_accuracy(acc, perplexity, threshold), axis=0)
  # The min with the current accuracy covers examples whose accuracy later drops.
  return np.minimum(best_so_far, a)


def dataset_premem_accuracy(acc, perplexity, threshold: float) -> np.ndarray:
  """E_{D_train}[PreMemAcc_m] per checkpoint (Kang et al. Sec. 4.2), shape (C,)."""
  a, _ = _acc_ppl(acc, perplexity)
  check_nonempty("acc", a)
  return premem_accuracy(acc, perplexity, threshold).mean(axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationRun:
  """One training run's measurements for threshold calibration.

  Attributes:
    train_acc: per-(checkpoint, train example) accuracy, shape (C, N).
    train_perplexity: target-trace perplexity on the same grid, shape (C, N).
    test_acc: dataset test accuracy at the same checkpoints, shape (C,).
  """

  train_acc: np.ndarray
  train_perplexity: np.ndarray
  test_acc: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class CalibrationResult:
  """Outcome of `calibrate_threshold`.

  Attributes:
    threshold: the candidate with the highest R² (perplexity units).
    best_index: its index in `candidates`.
    candidates: the swept thresholds, shape (K,), in the order given.
    r2: R² at each candidate, shape (K,); NaN where PreMemAcc was constant.
    fit: the line fit of test accuracy on train PreMemAcc at the chosen threshold
      (for `against="identity"`, its r2 field is still the fitted-line R²).
  """

  threshold: float
  best_index: int
  candidates: np.ndarray
  r2: np.ndarray
  fit: regression.LinearFit


def _pooled_xy(runs: Sequence[CalibrationRun], threshold: float):
  xs, ys = [], []
  for run in runs:
    xs.append(dataset_premem_accuracy(run.train_acc, run.train_perplexity, threshold))
    ys.append(np.asarray(run.test_acc, dtype=np.float64))
  return np.concatenate(xs), np.concatenate(ys)


def calibrate_threshold(
    runs: Sequence[CalibrationRun],
    candidates,
    against: Literal["fit", "identity"] = "fit",
    require_positive_slope: bool = True,
    base_perplexity=None,
    max_base_memorized: float = 0.05,
) -> CalibrationResult:
  """Selects the memorization threshold p by sweeping candidates (Kang et al. App. A.1).

  Every checkpoint of every run is one point (x, y) = (E_train[PreMemAcc_m(p)],
  E_test[Acc_m]); the chosen p maximizes R² of y on x over the pooled points. With
  `against="fit"` R² is the least-squares line's (`regression.fit_r2`); with
  `against="identity"` it is the R² of the y = x prediction (`regression.r2_identity`).
  Ties go to the first candidate in the given order.

  Args:
    runs: calibration runs; the paper uses ~3 with spread in test accuracy and memorization.
    candidates: thresholds in perplexity units, shape (K,), K >= 1.
    against: which R² to maximize.
    require_positive_slope: with `against="fit"`, skip thresholds whose fitted line falls
      (PreMemAcc anti-correlated with test accuracy): R² alone is blind to the sign, and
      on noisy sweeps the best-R² threshold can be one the paper's account rules out. Their
      R² stays in the curve; only the choice skips them.
    base_perplexity: train-target perplexities of the base model (before fine-tuning), any
      shape. When given, thresholds under which more than `max_base_memorized` of them
      count as memorized are skipped the same way: a threshold that calls the untrained
      model's targets memorized makes PreMemAcc a constant 0, not a measure of learning.
    max_base_memorized: the largest share of base-model targets allowed under the threshold.

  Returns:
    A `CalibrationResult` holding the chosen threshold and the whole R² curve.

  Raises:
    ValueError: no runs, bad shapes (named per run), no candidates, an unknown `against`,
      or every candidate giving an undefined R².
  """
  if against not in ("fit", "identity"):
    raise ValueError(f"against must be 'fit' or 'identity', got {against!r}")
  if len(runs) == 0:
    raise ValueError("runs is empty")
  cands = as_float_array("candidates", candidates, ndim=1, allow_inf=True)
  check_nonempty("candidates", cands)
  for k, run in enumerate(runs):
    try:
      a, _ = _acc_ppl(run.train_acc, run.train_perplexity)
      t = as_float_array("test_acc", run.test_acc, ndim=1)
    except ValueError as e:
      raise ValueError(f"runs[{k}]: {e}") from e
    check_nonempty(f"runs[{k}].train_acc", a)
    if t.shape[0] != a.shape[0]:
      raise ValueError(f"runs[{k}].test_acc must have one entry per checkpoint "
                       f"({a.shape[0]}), got {t.shape[0]}")
  r2 = np.empty(cands.shape, dtype=np.float64)
  eligible = np.ones(cands.shape, dtype=bool)
  if base_perplexity is not None:
    base = as_float_array("base_perplexity", np.ravel(base_perplexity), ndim=1, allow_inf=True)
    check_nonempty("base_perplexity", base)
    eligible &= np.array([memorized_fraction(base, p) <= max_base_memorized for p in cands])
  for k, p in enumerate(cands):
    x, y = _pooled_xy(runs, p)
    if against == "fit":
      fit = regression.fit_r2(x, y)
      r2[k] = fit.r2
      # AND, not assign: the base-model rule above must survive the slope rule.
      eligible[k] &= not (require_positive_slope and fit.slope <= 0)
    else:
      r2[k] = regression.r2_identity(x, y)
  if np.isnan(r2).all():
    raise ValueError("R² is undefined for every candidate (constant PreMemAcc or test "
                     "accuracy); widen candidates or add runs with spread")
  choice = np.where(eligible, r2, np.nan)
  if np.isnan(choice).all():
    raise ValueError("every candidate threshold gives PreMemAcc falling with test accuracy "
                     "(negative slope) or calls more than "
                     f"{max_base_memorized:.0%} of the base model's train targets memorized; "
                     "the sweep cannot calibrate it")
  best = int(np.nanargmax(choice))
  x, y = _pooled_xy(runs, cands[best])
  return CalibrationResult(float(cands[best]), best, cands, r2, regression.fit_r2(x, y))
