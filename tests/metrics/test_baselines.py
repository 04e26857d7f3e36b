"""Gradient variance, distance from initialization and ATC against hand-computed values."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memdyn_jax.metrics import baselines

# Three minibatch gradients of a two-leaf model: w has 2 elements, b has 1.
#   w[0]: 1, 3, 5 -> mean 3, squared deviations 4 + 0 + 4 = 8
#   w[1]: 2, 2, 2 -> 0
#   b[0]: 0, 0, 3 -> mean 1, squared deviations 1 + 1 + 4 = 6
GRADS = [
    {"w": np.array([1.0, 2.0]), "b": np.array([0.0])},
    {"w": np.array([3.0, 2.0]), "b": np.array([0.0])},
    {"w": np.array([5.0, 2.0]), "b": np.array([3.0])},
]


def test_gradient_variance_hand_computed():
  # Population variance per element: 8/3, 0, 2; averaged over 3 elements.
  assert baselines.gradient_variance(GRADS) == pytest.approx((8 / 3 + 0 + 2) / 3, rel=1e-6)
  # Unbiased: 8/2, 0, 6/2.
  assert baselines.gradient_variance(GRADS, ddof=1) == pytest.approx(7 / 3, rel=1e-6)


def test_gradient_variance_is_stable_under_large_means():
  shifted = [jax.tree_util.tree_map(lambda x: x + 1e4, g) for g in GRADS]
  assert baselines.gradient_variance(shifted) == pytest.approx(14 / 9, rel=1e-3)


def test_gradient_variance_bad_inputs():
  with pytest.raises(ValueError, match="grads"):
    baselines.gradient_variance(GRADS[:1])
  with pytest.raises(ValueError, match=r"grads\[2\]"):
    baselines.gradient_variance(GRADS[:2] + [{"w": np.zeros(2)}])
  with pytest.raises(ValueError, match=r"grads\[1\]"):
    baselines.gradient_variance([GRADS[0], {"w": np.zeros(3), "b": np.zeros(1)}])
  with pytest.raises(ValueError, match="ddof"):
    baselines.gradient_variance(GRADS[:2], ddof=2)


def test_minibatch_gradients_feed_gradient_variance():
  # loss = 0.5·Σ (w - batch)²  =>  grad = w - batch.
  def loss_fn(params, batch):
    return 0.5 * jnp.sum((params["w"] - batch) ** 2)

  params = {"w": jnp.array([1.0, 2.0])}
  batches = [jnp.array([0.0, 2.0]), jnp.array([-2.0, 2.0]), jnp.array([-4.0, 2.0])]
  grads = baselines.minibatch_gradients(loss_fn, params, batches)
  assert len(grads) == 3
  np.testing.assert_allclose(grads[2]["w"], [5.0, 0.0])
  # Element variances 8/3 and 0, averaged over 2 elements.
  assert baselines.gradient_variance(grads) == pytest.approx(4 / 3, rel=1e-6)


def test_distance_from_init_hand_computed():
  params = {"a": np.array([1.0, 2.0]), "b": (np.array([[0.0, 0.0], [1.0, 1.0]]),)}
  init = {"a": np.array([0.0, 0.0]), "b": (np.array([[0.0, 1.0], [1.0, -1.0]]),)}
  # a: 1 + 4; b: 0 + 1 + 0 + 4.
  assert baselines.distance_from_init(params, init) == pytest.approx(10.0)
  assert baselines.distance_from_init(params, params) == 0.0


def test_distance_from_init_low_precision_and_streaming():
  a = jnp.array([1.5, -0.5], dtype=jnp.bfloat16)
  b = jnp.array([0.5, 0.5], dtype=jnp.bfloat16)
  assert baselines.distance_from_init([a], [b]) == pytest.approx(2.0)
  pairs = ((np.full(3, float(k)), np.zeros(3)) for k in range(3))
  assert baselines.squared_distance_leaves(pairs) == pytest.approx(3 * (0 + 1 + 4))


def test_distance_from_init_bad_inputs():
  with pytest.raises(ValueError, match="init_params"):
    baselines.distance_from_init({"a": np.zeros(2)}, {"b": np.zeros(2)})
  with pytest.raises(ValueError, match="init_params"):
    baselines.distance_from_init({"a": np.zeros(2)}, {"a": np.zeros(3)})


def test_atc_threshold_matches_reference_accuracy():
  ref = np.array([0.9, 0.1, 0.5, 0.7, 0.3])
  # k = 3 of 5 above: sorted descending 0.9, 0.7, 0.5 | 0.3, 0.1 -> t = 0.3.
  t = baselines.atc_threshold(ref, 0.6)
  assert t == 0.3
  assert baselines.atc_predicted_accuracy(ref, t) == pytest.approx(0.6)
  # A per-example accuracy array is averaged first.
  assert baselines.atc_threshold(ref, np.array([1, 0, 1, 1, 0])) == 0.3


def test_atc_predicted_accuracy_on_train_scores():
  # Scores equal to t are not above it.
  assert baselines.atc_predicted_accuracy([0.2, 0.3, 0.4, 0.95], 0.3) == 0.5


def test_atc_extremes_and_rounding():
  ref = [0.9, 0.1, 0.5, 0.7]
  assert baselines.atc_threshold(ref, 1.0) == -np.inf
  assert baselines.atc_predicted_accuracy(ref, -np.inf) == 1.0
  assert baselines.atc_threshold(ref, 0.0) == 0.9
  assert baselines.atc_predicted_accuracy(ref, 0.9) == 0.0
  # 0.625·4 = 2.5 rounds half up to k = 3: t = 0.1.
  assert baselines.atc_threshold(ref, 0.625) == 0.1


def test_atc_bad_inputs():
  with pytest.raises(ValueError, match="ref_test_scores"):
    baselines.atc_threshold(np.zeros((2, 2)), 0.5)
  with pytest.raises(ValueError, match="ref_test_scores"):
    baselines.atc_threshold([], 0.5)
  with pytest.raises(ValueError, match="ref_test_accuracy"):
    baselines.atc_threshold([0.1, 0.2], 1.5)
  with pytest.raises(ValueError, match="scores"):
    baselines.atc_predicted_accuracy([0.1, np.nan], 0.5)


def test_welford_update_gives_running_mean_and_squared_deviations():
  import jax

  xs = np.array([[1.0, 4.0], [3.0, 4.0], [8.0, 4.0], [-2.0, 4.0]])
  mean = m2 = 0.0
  for k, x in enumerate(xs):
    mean, m2 = baselines.welford_update(mean, m2, x, k)
    np.testing.assert_allclose(mean, xs[:k + 1].mean(0))
    np.testing.assert_allclose(m2, ((xs[:k + 1] - xs[:k + 1].mean(0)) ** 2).sum(0))
  jitted = jax.jit(baselines.welford_update)(np.float32(2.0), np.float32(0.0),
                                             np.float32(4.0), 1)
  np.testing.assert_allclose(jitted, (3.0, 2.0))
  assert baselines.variance_from_moments(m2.sum(), 2, 4) == pytest.approx(xs.var(0).mean())
  assert baselines.variance_from_moments(6.0, 2, 4, ddof=1) == 1.0
