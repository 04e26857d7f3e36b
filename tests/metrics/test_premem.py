"""Pre-memorization accuracy and threshold calibration against hand-computed arrays."""
import numpy as np
import pytest

from memdyn_jax.metrics import premem
from memdyn_jax.metrics.premem import CalibrationRun

# Three examples, four checkpoints, threshold p = 1.5.
#   ex0: learns to answer, ppl hits the threshold exactly at m=2 (tie: not memorized),
#        memorized at m=3.
#   ex1: wrong answers, then memorized from m=1 on: PreMemAcc stays 0 although acc -> 1.
#   ex2: right from the start, memorized at m=2, accuracy then drops (min with Acc_m).
ACC = np.array([[0.2, 0.0, 1.0],
                [0.6, 0.4, 1.0],
                [0.8, 0.4, 0.6],
                [1.0, 1.0, 0.4]])
PPL = np.array([[3.0, 2.0, 2.0],
                [2.0, 1.2, 1.8],
                [1.5, 1.3, 1.2],
                [1.1, 1.0, 1.1]])
P = 1.5
EXPECTED_MASKED = np.array([[0.2, 0.0, 1.0],
                            [0.6, 0.0, 1.0],
                            [0.8, 0.0, 0.0],
                            [0.0, 0.0, 0.0]])
EXPECTED_PREMEM = np.array([[0.2, 0.0, 1.0],
                            [0.6, 0.0, 1.0],
                            [0.8, 0.0, 0.6],
                            [0.8, 0.0, 0.4]])


def test_loglog_reference_values():
  assert premem.loglog_to_perplexity(premem.GSM8K_LOGLOG_THRESHOLD) == pytest.approx(1.105,
                                                                                  abs=1e-3)
  assert premem.loglog_to_perplexity(premem.MATH_LOGLOG_THRESHOLD) == pytest.approx(1.200,
                                                                                 abs=1e-3)
  # exp(exp(0)) = e.
  assert premem.loglog_to_perplexity(0.0) == pytest.approx(np.e)
  assert premem.perplexity_to_loglog(np.e) == pytest.approx(0.0, abs=1e-12)


def test_loglog_round_trip_and_arrays():
  t = np.array([-3.0, -2.3, -1.7, 0.5])
  p = premem.loglog_to_perplexity(t)
  assert p.shape == (4,)
  np.testing.assert_allclose(premem.perplexity_to_loglog(p), t, atol=1e-12)
  with pytest.raises(ValueError, match="perplexity"):
    premem.perplexity_to_loglog(1.0)


def test_masked_accuracy_tie_is_not_memorized():
  np.testing.assert_allclose(premem.masked_accuracy(ACC, PPL, P), EXPECTED_MASKED)
  # A single tie: Perp == p keeps the accuracy; just below masks it.
  assert premem.masked_accuracy([[0.7]], [[1.5]], 1.5)[0, 0] == 0.7
  assert premem.masked_accuracy([[0.7]], [[np.nextafter(1.5, 0)]], 1.5)[0, 0] == 0.0


def test_premem_accuracy_hand_computed():
  np.testing.assert_allclose(premem.premem_accuracy(ACC, PPL, P), EXPECTED_PREMEM)


def test_dataset_premem_accuracy_hand_computed():
  np.testing.assert_allclose(premem.dataset_premem_accuracy(ACC, PPL, P),
                             [1.2 / 3, 1.6 / 3, 1.4 / 3, 1.2 / 3])


def test_running_max_is_monotone_and_capped_by_accuracy():
  rng = np.random.default_rng(0)
  acc = rng.integers(0, 6, size=(12, 30)) / 5
  ppl = 1.0 + rng.exponential(0.5, size=(12, 30))
  pm = premem.premem_accuracy(acc, ppl, 1.3)
  assert (pm <= acc + 1e-12).all()
  best = np.maximum.accumulate(premem.masked_accuracy(acc, ppl, 1.3), axis=0)
  assert (np.diff(best, axis=0) >= 0).all()
  np.testing.assert_allclose(pm, np.minimum(best, acc))
  # With non-decreasing accuracy the cap never binds below the running max: monotone.
  acc_up = np.maximum.accumulate(acc, axis=0)
  assert (np.diff(premem.premem_accuracy(acc_up, ppl, 1.3), axis=0) >= 0).all()


def test_infinite_perplexity_is_never_memorized():
  pm = premem.premem_accuracy([[0.5], [1.0]], [[np.inf], [np.inf]], 1.2)
  np.testing.assert_allclose(pm, [[0.5], [1.0]])


def test_memorization_rule_and_its_nan_policy():
  """Memorized = perplexity strictly below p; an unscored target (NaN) is never memorized
  and still counts among the targets."""
  ppl = np.array([1.0, 1.1, np.nan, np.inf, 1.05])
  np.testing.assert_array_equal(premem.is_memorized(ppl, 1.1), [True, False, False, False, True])
  assert premem.memorized_fraction(ppl, 1.1) == pytest.approx(2 / 5)
  assert np.isnan(premem.memorized_fraction([], 1.1))
  np.testing.assert_array_equal(premem.unscored_as_never_memorized(ppl)[2:4], [np.inf, np.inf])


def test_tensorboard_and_report_agree_on_a_checkpoint_with_an_unscored_target():
  """The TensorBoard scalars (evaluation) and the report count the same share memorized when
  one train target has no perplexity: both through the rule above (the TensorBoard path
  once skipped such a step while the report counted NaN as never memorized)."""
  from memdyn_jax.evaluation import run as run_evaluation
  from memdyn_jax.report import analysis
  ppl = [1.01, float("nan"), 3.0, 1.02]
  rows = [dict(step=10, split="train", example_id=i, accuracy=0.5, perplexity=p,
               exact_memorization=0.0) for i, p in enumerate(ppl)]
  tensorboard = run_evaluation.checkpoint_scalars(rows, threshold=1.1)[10]
  assert tensorboard["train/memorized_fraction"] == pytest.approx(0.5)
  assert analysis.memorized_fraction(np.array(ppl), 1.1) == pytest.approx(0.5)
  # PreMemAcc of the unscored example: its accuracy, never masked as memorized.
  expected = premem.dataset_premem_accuracy([[0.5] * 4], [[1.01, np.inf, 3.0, 1.02]], 1.1)
  assert tensorboard["train/premem_accuracy"] == pytest.approx(float(expected[-1]))


@pytest.mark.parametrize("acc, ppl, match", [
    (np.zeros(3), np.ones(3), "acc"),
    (np.zeros((2, 3)), np.ones((3, 2)), "perplexity"),
    (np.full((2, 2), 1.5), np.ones((2, 2)), "acc"),
    (np.zeros((2, 2)), np.array([[1.0, np.nan], [1.0, 1.0]]), "perplexity"),
])
def test_bad_inputs_name_the_argument(acc, ppl, match):
  with pytest.raises(ValueError, match=match):
    premem.premem_accuracy(acc, ppl, 1.5)


def _planted_runs(threshold, seed=0):
  """Runs whose test accuracy is exactly the dataset PreMemAcc at `threshold`."""
  rng = np.random.default_rng(seed)
  runs = []
  for speed in (0.3, 0.6, 1.0):  # Slow to fast memorization: spread across runs.
    c, n = 6, 40
    acc = np.maximum.accumulate(rng.integers(0, 6, size=(c, n)) / 5, axis=0)
    start = 1.0 + rng.uniform(0.5, 2.0, size=n)
    decay = np.exp(-speed * rng.uniform(0.5, 1.5, size=n) * np.arange(c)[:, None])
    ppl = 1.0 + (start - 1.0) * decay
    test = premem.dataset_premem_accuracy(acc, ppl, threshold)
    runs.append(CalibrationRun(acc, ppl, test))
  return runs


@pytest.mark.parametrize("against", ["fit", "identity"])
def test_calibration_finds_planted_threshold(against):
  runs = _planted_runs(1.3)
  cands = np.array([1.05, 1.1, 1.2, 1.3, 1.4, 1.6, 2.0])
  res = premem.calibrate_threshold(runs, cands, against=against)
  assert res.threshold == 1.3
  assert res.best_index == 3
  assert res.r2.shape == (7,)
  assert res.r2[3] == pytest.approx(1.0)
  assert (np.delete(res.r2, 3) < 1.0 - 1e-6).all()
  assert res.fit.slope == pytest.approx(1.0)
  assert res.fit.intercept == pytest.approx(0.0, abs=1e-9)


def test_calibration_accepts_reference_scale_candidates():
  runs = _planted_runs(premem.loglog_to_perplexity(-1.7), seed=1)
  res = premem.calibrate_threshold(runs, premem.loglog_to_perplexity(
      np.array([-3.0, -2.3, -1.7, -1.0])))
  assert premem.perplexity_to_loglog(res.threshold) == pytest.approx(-1.7)


def test_calibration_skips_undefined_r2():
  runs = _planted_runs(1.3)
  # p = inf masks everything: PreMemAcc is constantly 0, R² undefined.
  res = premem.calibrate_threshold(runs, [np.inf, 1.3])
  assert np.isnan(res.r2[0])
  assert res.threshold == 1.3
  with pytest.raises(ValueError, match="undefined"):
    premem.calibrate_threshold(runs, [np.inf])


def test_calibration_skips_thresholds_with_a_falling_fit():
  planted = _planted_runs(1.3)
  # Test accuracy = 1 - PreMemAcc(1.3): the perfect fit at 1.3 now has slope -1.
  flipped = [CalibrationRun(r.train_acc, r.train_perplexity, 1.0 - r.test_acc) for r in planted]
  cands = np.array([1.05, 1.3, 2.0])
  free = premem.calibrate_threshold(flipped, cands, require_positive_slope=False)
  assert free.threshold == 1.3 and free.fit.slope == pytest.approx(-1.0)
  # Every candidate's line falls here, so none may be chosen.
  assert (np.array([premem.calibrate_threshold(flipped, [c], require_positive_slope=False)
                    .fit.slope for c in cands]) < 0).all()
  with pytest.raises(ValueError, match="negative slope"):
    premem.calibrate_threshold(flipped, cands)
  # The planted (rising) runs calibrate as before.
  mixed = premem.calibrate_threshold(planted, cands)
  assert mixed.threshold == 1.3 and mixed.fit.slope > 0


def test_calibration_skips_thresholds_calling_base_targets_memorized():
  runs = _planted_runs(1.3)
  cands = np.array([1.05, 1.3, 2.0])
  # Half of the base model's targets sit at 1.2: any p > 1.2 calls them memorized, so the
  # planted 1.3 (rising fit, R² = 1) must be skipped for the best remaining candidate.
  base = np.array([1.2, 1.2, 5.0, 5.0])
  res = premem.calibrate_threshold(runs, cands, base_perplexity=base)
  assert res.threshold == 1.05
  assert res.r2[1] == pytest.approx(1.0)  # The skipped threshold stays in the curve.
  loose = premem.calibrate_threshold(runs, cands, base_perplexity=base, max_base_memorized=0.5)
  assert loose.threshold == 1.3
  with pytest.raises(ValueError, match="base model"):
    premem.calibrate_threshold(runs, [1.3, 2.0], base_perplexity=base)


def test_calibration_bad_inputs():
  good = _planted_runs(1.3)
  bad = CalibrationRun(good[0].train_acc, good[0].train_perplexity, good[0].test_acc[:-1])
  with pytest.raises(ValueError, match=r"runs\[1\]\.test_acc"):
    premem.calibrate_threshold([good[0], bad], [1.3])
  bad_shape = CalibrationRun(good[0].train_acc[0], good[0].train_perplexity, good[0].test_acc)
  with pytest.raises(ValueError, match=r"runs\[0\].*acc"):
    premem.calibrate_threshold([bad_shape], [1.3])
  with pytest.raises(ValueError, match="runs"):
    premem.calibrate_threshold([], [1.3])
  with pytest.raises(ValueError, match="candidates"):
    premem.calibrate_threshold(good, [])
  with pytest.raises(ValueError, match="against"):
    premem.calibrate_threshold(good, [1.3], against="pearson")
