"""Held-out R² of test-accuracy predictors: calibrated on some runs, scored on the others.

Kang et al. (App. A.1) calibrate the PreMemAcc threshold on a few runs ("e.g. 3") and state
that it generalizes to new training runs of the same model and data. An R² reported on the
checkpoints the threshold was tuned on is in-sample, and the baselines it is compared with
have no tuned parameter; here every predictor is scored the same way:

- a fold = (calibration runs, held-out runs). On the calibration runs the predictor's
  parameters are fitted: the line test_acc ≈ a·x + b, and for PreMemAcc also the threshold
  (`premem.calibrate_threshold`, whose fit is the line at that threshold);
- the line predicts the held-out runs' test accuracy at every checkpoint; the held-out R²
  pools those predictions over all folds: 1 - SS_res / SS_tot, SS_tot around the held-out
  points' own mean. It can be negative (worse than predicting their mean);
- protocols: leave-one-run-out (each run held out once, calibrated on all the others) and
  Kang et al.'s K-run calibration (`choose_calibration_runs`, then one fold).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from memdyn_jax.metrics import premem, regression

Fold = tuple[tuple[int, ...], tuple[int, ...]]  # (calibration run indices, held-out ones)


@dataclasses.dataclass(frozen=True)
class HeldOutScore:
  """One predictor under one protocol.

  Attributes:
    r2: pooled held-out R² (NaN: fewer than 2 held-out points, constant held-out test
      accuracy, or no fold could be fitted).
    n: held-out points (checkpoints) scored.
    thresholds: PreMemAcc's threshold per fold (perplexity units); () for other predictors.
  """

  r2: float
  n: int
  thresholds: tuple[float, ...] = ()


def out_of_sample_r2(y_true, y_pred) -> float:
  """1 - Σ(y - ŷ)² / Σ(y - ȳ)² over held-out points; NaN for < 2 points or constant y."""
  y = np.asarray(y_true, dtype=np.float64)
  yhat = np.asarray(y_pred, dtype=np.float64)
  if y.size < 2 or np.ptp(y) == 0:
    return float("nan")
  return float(1.0 - np.sum((y - yhat) ** 2) / np.sum((y - y.mean()) ** 2))


def leave_one_run_out(num_runs: int) -> list[Fold]:
  """Each run held out once, calibrated on all the others (needs 3+ runs: a line through
  one run's checkpoints says little about another's)."""
  if num_runs < 3:
    raise ValueError(f"leave-one-run-out needs at least 3 runs, got {num_runs}")
  return [(tuple(j for j in range(num_runs) if j != i), (i,)) for i in range(num_runs)]


def choose_calibration_runs(final_test_accuracy: Sequence[float],
                            final_memorized_fraction: Sequence[float], k: int) -> tuple[int, ...]:
  """K calibration runs with spread in test accuracy and in memorization (Kang et al. App.
  A.1), by a fixed rule: runs ordered by final test accuracy (ties: by memorized share of
  train targets), the K at evenly spaced ranks — the lowest and highest always among them.
  If the K span less than half of the runs' range of memorized share, the middle pick is
  swapped for the run at the far end of memorization from the others. Indices, ascending.

  Raises:
    ValueError: k < 2, or fewer than k + 1 runs (nothing would be held out).
  """
  acc = np.asarray(final_test_accuracy, dtype=np.float64)
  mem = np.nan_to_num(np.asarray(final_memorized_fraction, dtype=np.float64), nan=0.0)
  n = acc.size
  if k < 2 or n < k + 1:
    raise ValueError(f"K-run calibration needs 2 <= K < number of runs; K={k}, {n} runs")
  order = np.lexsort((mem, np.nan_to_num(acc, nan=-np.inf)))
  picks = [int(order[r]) for r in np.round(np.linspace(0, n - 1, k)).astype(int)]
  if k >= 3 and np.ptp(mem) > 0 and np.ptp(mem[picks]) < 0.5 * np.ptp(mem):
    rest = [i for i in range(n) if i not in picks]
    far = max(rest, key=lambda i: min(abs(mem[i] - mem[j]) for j in picks))
    picks[k // 2] = far
  return tuple(sorted(picks))


def k_run_fold(calibration: Sequence[int], num_runs: int) -> list[Fold]:
  """The one fold of K-run calibration: the chosen runs, and every other run held out."""
  cal = tuple(sorted(calibration))
  return [(cal, tuple(i for i in range(num_runs) if i not in cal))]


def line_held_out(x_by_run: Sequence[np.ndarray], y_by_run: Sequence[np.ndarray],
                  folds: Sequence[Fold]) -> HeldOutScore:
  """A predictor without a parameter of its own (a baseline): per fold, the line fitted on
  the calibration runs' (x, y) points predicts the held-out runs'. Non-finite points are
  dropped; a fold whose calibration points cannot fit a line (< 2, constant x) is skipped."""
  ys, preds = [], []
  for cal, held in folds:
    x, y = _finite(np.concatenate([x_by_run[i] for i in cal]),
                   np.concatenate([y_by_run[i] for i in cal]))
    if x.size < 2 or np.ptp(x) == 0:
      continue
    fit = regression.fit_r2(x, y)
    hx, hy = _finite(np.concatenate([x_by_run[i] for i in held]),
                     np.concatenate([y_by_run[i] for i in held]))
    ys.append(hy)
    preds.append(fit.slope * hx + fit.intercept)
  return _pooled(ys, preds)


def premem_held_out(runs: Sequence[premem.CalibrationRun], candidates, folds: Sequence[Fold],
                    **calibrate_kwargs) -> HeldOutScore:
  """PreMemAcc with its threshold calibrated inside each fold (`premem.calibrate_threshold`
  on the calibration runs, `calibrate_kwargs` passed on), its line predicting the held-out
  runs at that threshold. A fold whose calibration fails (no eligible threshold) is skipped."""
  ys, preds, thresholds = [], [], []
  for cal, held in folds:
    try:
      result = premem.calibrate_threshold([runs[i] for i in cal], candidates,
                                          **calibrate_kwargs)
    except ValueError:
      continue
    thresholds.append(result.threshold)
    for i in held:
      x = premem.dataset_premem_accuracy(runs[i].train_acc, runs[i].train_perplexity,
                                         result.threshold)
      ys.append(np.asarray(runs[i].test_acc, dtype=np.float64))
      preds.append(result.fit.slope * x + result.fit.intercept)
  score = _pooled(ys, preds)
  return dataclasses.replace(score, thresholds=tuple(thresholds))


def _finite(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  keep = np.isfinite(x) & np.isfinite(y)
  return x[keep], y[keep]


def _pooled(ys: list[np.ndarray], preds: list[np.ndarray]) -> HeldOutScore:
  if not ys:
    return HeldOutScore(float("nan"), 0)
  y, yhat = np.concatenate(ys), np.concatenate(preds)
  return HeldOutScore(out_of_sample_r2(y, yhat), int(y.size))
