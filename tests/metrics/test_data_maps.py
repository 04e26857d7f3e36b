"""Exact memorization, data maps, easy/hard partitions and category summaries."""
import jax
import numpy as np
import pytest

from memdyn_jax.metrics import data_maps as dm
from memdyn_jax.metrics.data_maps import DataMapThresholds

PRED = np.array([[1, 2, 3, 4], [5, 6, 7, 8]])
TARGET = np.array([[1, 2, 0, 4], [5, 0, 0, 0]])
MASK = np.array([[1, 1, 1, 0], [1, 1, 0, 0]])

# Checkpoints x records.
#   r0: 0.2, 0.4, 0.6 -> mean 0.4, var 0.08/3     (low mean, low var: hard)
#   r1: 0.9, 1.0, 0.8 -> mean 0.9, var 0.02/3     (high mean, low var: easy)
#   r2: 0.0, 0.5, 1.0 -> mean 0.5, var 0.5/3      (high var: other)
EM = np.array([[0.2, 0.9, 0.0],
               [0.4, 1.0, 0.5],
               [0.6, 0.8, 1.0]])


def test_exact_memorization_hand_computed():
  # r0 scores positions 0-2 (hits 1, 1, 0); r1 positions 0-1 (hits 1, 0).
  np.testing.assert_allclose(dm.exact_memorization(PRED, TARGET, MASK), [2 / 3, 0.5])
  np.testing.assert_allclose(jax.jit(dm.exact_memorization)(PRED, TARGET, MASK),
                             [2 / 3, 0.5], rtol=1e-6)
  assert np.isnan(dm.exact_memorization(PRED[:1], TARGET[:1], np.zeros((1, 4))))[0]


def test_exact_memorization_bad_shapes():
  with pytest.raises(ValueError, match="mask"):
    dm.exact_memorization(PRED, TARGET, MASK[:, :3])
  with pytest.raises(ValueError, match="predicted_ids"):
    dm.exact_memorization(PRED[0], TARGET[0], MASK[0])


def test_data_map_hand_computed():
  dmap = dm.data_map(EM)
  np.testing.assert_allclose(dmap.mean, [0.4, 0.9, 0.5])
  np.testing.assert_allclose(dmap.variance, [0.08 / 3, 0.02 / 3, 0.5 / 3])


def test_partition_absolute_thresholds():
  labels = dm.partition(dm.data_map(EM), DataMapThresholds(0.8, 0.45, 0.05))
  assert labels.tolist() == [dm.HARD, dm.EASY, dm.OTHER]


def test_quantile_thresholds_hand_computed():
  dmap = dm.data_map(EM)
  th = dm.quantile_thresholds(dmap)
  # Sorted means 0.4, 0.5, 0.9: 1/3 -> 0.4 + (2/3)·0.1, 2/3 -> 0.5 + (1/3)·0.4.
  assert th.hard_max_mean == pytest.approx(0.4 + 0.2 / 3)
  assert th.easy_min_mean == pytest.approx(0.5 + 0.4 / 3)
  assert th.max_variance == pytest.approx(0.08 / 3)
  assert dm.partition(dmap, th).tolist() == [dm.HARD, dm.EASY, dm.OTHER]


def test_summarize_by_category_hand_computed():
  dmap = dm.data_map(EM)
  labels = dm.partition(dmap, DataMapThresholds(0.8, 0.45, 0.05))
  out = dm.summarize_by_category(EM, ["qa", "gen", "qa"], labels)
  assert list(out) == ["gen", "qa"]
  qa = out["qa"]
  assert qa.count == 2
  assert qa.first == pytest.approx(0.1)
  assert qa.last == pytest.approx(0.8)
  assert qa.mean == pytest.approx(0.45)
  assert qa.variance == pytest.approx((0.08 / 3 + 0.5 / 3) / 2)
  assert (qa.frac_easy, qa.frac_hard) == (0.0, 0.5)
  gen = out["gen"]
  assert (gen.count, gen.frac_easy) == (1, 1.0)
  assert gen.first == pytest.approx(0.9) and gen.last == pytest.approx(0.8)
  assert np.isnan(dm.summarize_by_category(EM, ["a", "a", "b"])["a"].frac_easy)


def test_bad_inputs_name_the_argument():
  with pytest.raises(ValueError, match="memorization"):
    dm.data_map(EM[0])
  with pytest.raises(ValueError, match="memorization"):
    dm.data_map(EM + 0.5)
  with pytest.raises(ValueError, match="categories"):
    dm.summarize_by_category(EM, ["a", "b"])
  with pytest.raises(ValueError, match="labels"):
    dm.summarize_by_category(EM, ["a", "b", "c"], ["easy"])
  with pytest.raises(ValueError, match="hard_max_mean"):
    DataMapThresholds(easy_min_mean=0.5, hard_max_mean=0.6, max_variance=0.1)
  with pytest.raises(ValueError, match="mean_quantiles"):
    dm.quantile_thresholds(dm.data_map(EM), mean_quantiles=(0.7, 0.3))
  with pytest.raises(ValueError, match="spread"):
    dm.quantile_thresholds(dm.data_map(np.full((2, 3), 0.5)))
