"""Line fit, R² and Pearson r against hand-computed values."""
import numpy as np
import pytest

from memdyn_jax.metrics import regression


def test_fit_r2_hand_computed():
  # x̄ = 1.5, ȳ = 2.75, S_xx = 5, S_xy = 5.5, S_yy = 8.75.
  fit = regression.fit_r2([0, 1, 2, 3], [1, 3, 2, 5])
  assert fit.slope == pytest.approx(1.1)
  assert fit.intercept == pytest.approx(1.1)
  # SS_res = 0.01 + 0.64 + 1.69 + 0.36 = 2.7; R² = 1 - 2.7 / 8.75 = 30.25 / 43.75.
  assert fit.r2 == pytest.approx(1 - 2.7 / 8.75)
  assert fit.pearson_r == pytest.approx(5.5 / np.sqrt(43.75))
  assert fit.n == 4


def test_fit_r2_perfect_negative_line():
  fit = regression.fit_r2([0.0, 0.5, 1.0], [1.0, 0.0, -1.0])
  assert fit.slope == pytest.approx(-2.0)
  assert fit.intercept == pytest.approx(1.0)
  assert fit.r2 == pytest.approx(1.0)
  assert fit.pearson_r == pytest.approx(-1.0)


def test_constant_x_gives_all_nan():
  fit = regression.fit_r2([0.1, 0.1, 0.1], [0.2, 0.5, 0.9])
  assert all(np.isnan(v) for v in (fit.slope, fit.intercept, fit.r2, fit.pearson_r))
  assert fit.n == 3


def test_constant_y_gives_flat_line_and_nan_r2():
  fit = regression.fit_r2([0.0, 1.0, 2.0], [0.3, 0.3, 0.3])
  assert fit.slope == 0.0
  assert fit.intercept == 0.3
  assert np.isnan(fit.r2) and np.isnan(fit.pearson_r)


def test_r2_identity_hand_computed():
  # y - x = [1, 2, 0, 2]: SS_res = 9, SS_tot = 8.75.
  assert regression.r2_identity([0, 1, 2, 3], [1, 3, 2, 5]) == pytest.approx(1 - 9 / 8.75)
  assert regression.r2_identity([0.2, 0.4], [0.2, 0.4]) == 1.0
  assert np.isnan(regression.r2_identity([0.2, 0.4], [0.3, 0.3]))


@pytest.mark.parametrize("x, y, match", [
    ([0, 1, 2], [0, 1], "y"),
    ([[0, 1], [2, 3]], [0, 1], "x"),
    ([0, 1], [[0, 1]], "y"),
    ([0.0], [1.0], "at least 2"),
    ([0, np.nan], [0, 1], "x"),
    ([0, 1], [0, np.inf], "y"),
])
def test_bad_inputs_name_the_argument(x, y, match):
  with pytest.raises(ValueError, match=match):
    regression.fit_r2(x, y)
