"""Held-out R²: folds, the calibration-run rule, baselines and PreMemAcc scored on runs their
parameters never saw."""
import numpy as np
import pytest

from memdyn_jax.metrics import held_out, premem
from memdyn_jax.metrics.premem import CalibrationRun


def test_out_of_sample_r2_against_hand_values():
  y = np.array([0.1, 0.2, 0.3, 0.4])
  assert held_out.out_of_sample_r2(y, y) == 1.0
  assert held_out.out_of_sample_r2(y, np.full(4, y.mean())) == pytest.approx(0.0)
  # Off by 0.1 everywhere: SS_res 0.04, SS_tot 0.05.
  assert held_out.out_of_sample_r2(y, y + 0.1) == pytest.approx(1 - 0.04 / 0.05)
  assert held_out.out_of_sample_r2(y, y[::-1]) < 0  # worse than the held-out mean
  assert np.isnan(held_out.out_of_sample_r2([0.3, 0.3], [0.1, 0.2]))
  assert np.isnan(held_out.out_of_sample_r2([0.3], [0.3]))


def test_leave_one_run_out_holds_each_run_out_once():
  folds = held_out.leave_one_run_out(4)
  assert folds == [((1, 2, 3), (0,)), ((0, 2, 3), (1,)), ((0, 1, 3), (2,)), ((0, 1, 2), (3,))]
  with pytest.raises(ValueError, match="at least 3 runs"):
    held_out.leave_one_run_out(2)
  assert held_out.k_run_fold((4, 0, 2), 6) == [((0, 2, 4), (1, 3, 5))]


def test_calibration_runs_span_test_accuracy_and_memorization():
  acc = [0.50, 0.10, 0.30, 0.70, 0.20, 0.60]
  mem = [0.40, 0.00, 0.45, 0.50, 0.90, 0.45]
  # Ranks by accuracy: 1 (0.10), 4, 2, 0, 5, 3 (0.70); evenly spaced ranks 0, 2/3, 5.
  picks = held_out.choose_calibration_runs(acc, mem, 3)
  assert 1 in picks and 3 in picks  # both extremes of test accuracy
  assert np.ptp(np.asarray(mem)[list(picks)]) >= 0.5 * np.ptp(mem)
  # Without spread in memorization among the picks, the middle one is swapped for the
  # run farthest from them in memorized share.
  flat = held_out.choose_calibration_runs([0.1, 0.2, 0.3, 0.4, 0.5], [0.5, 0.5, 0.5, 0.0, 0.5], 3)
  assert flat == (0, 3, 4)
  with pytest.raises(ValueError, match="K-run calibration"):
    held_out.choose_calibration_runs([0.1, 0.2, 0.3], [0, 0, 0], 3)


def test_a_baseline_on_one_line_predicts_held_out_runs_and_offsets_do_not():
  x = [np.array([0.1, 0.2, 0.3]), np.array([0.4, 0.5]), np.array([0.6, 0.7, np.nan])]
  on_line = [2 * xi + 0.1 for xi in x]
  score = held_out.line_held_out(x, on_line, held_out.leave_one_run_out(3))
  assert score.r2 == pytest.approx(1.0) and score.n == 7  # the NaN point is dropped
  # Each run on its own line (same slope, offsets): in-sample pooled R² stays high, but a
  # run's offset is not predictable from the others.
  offsets = [0.0, 0.3, -0.3]
  shifted = [2 * xi + o for xi, o in zip(x, offsets)]
  pooled = premem.regression.fit_r2(*[np.concatenate(v)[:-1] for v in (x, shifted)])
  loro = held_out.line_held_out(x, shifted, held_out.leave_one_run_out(3))
  assert loro.r2 < pooled.r2


def _runs_where_premem_predicts(threshold: float, seed: int = 0) -> list[CalibrationRun]:
  """Four runs whose test accuracy is exactly their dataset PreMemAcc at `threshold`."""
  rng = np.random.default_rng(seed)
  runs = []
  for speed in (0.3, 0.5, 0.8, 1.2):
    c, n = 5, 30
    acc = np.maximum.accumulate(rng.integers(0, 6, size=(c, n)) / 5, axis=0)
    start = 1.0 + rng.uniform(0.5, 2.0, size=n)
    ppl = 1.0 + (start - 1.0) * np.exp(-speed * rng.uniform(0.5, 1.5, size=n)
                                       * np.arange(c)[:, None])
    runs.append(CalibrationRun(acc, ppl, premem.dataset_premem_accuracy(acc, ppl, threshold)))
  return runs


def test_premem_threshold_calibrated_on_other_runs_predicts_the_held_out_one():
  runs = _runs_where_premem_predicts(1.3)
  cands = np.array([1.05, 1.1, 1.2, 1.3, 1.4, 1.6, 2.0])
  loro = held_out.premem_held_out(runs, cands, held_out.leave_one_run_out(4))
  assert loro.r2 == pytest.approx(1.0) and loro.n == 20
  assert loro.thresholds == (1.3,) * 4  # every fold finds the planted threshold
  k_run = held_out.premem_held_out(runs, cands, held_out.k_run_fold((0, 2, 3), 4))
  assert k_run.r2 == pytest.approx(1.0) and k_run.n == 5 and k_run.thresholds == (1.3,)
  # A threshold no fold can calibrate (all candidates skipped) scores nothing.
  none = held_out.premem_held_out(runs, cands, held_out.leave_one_run_out(4),
                                  base_perplexity=np.ones(5), max_base_memorized=0.0)
  assert np.isnan(none.r2) and none.n == 0 and none.thresholds == ()
