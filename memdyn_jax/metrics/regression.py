"""Least-squares line fit with R² and Pearson r (Kang et al. Sec. 4.2, Fig. 4-5).

Kang et al. report the coefficient of determination of test accuracy against average
pre-memorization train accuracy (Fig. 4) and Pearson correlations for the baselines
(Fig. 5). Both come from the ordinary least-squares fit y ≈ a·x + b:

  a = S_xy / S_xx,  b = ȳ - a·x̄,
  R² = 1 - SS_res / SS_tot = S_xy² / (S_xx·S_yy),  r = S_xy / sqrt(S_xx·S_yy),

with S_xy = Σ (x_i - x̄)(y_i - ȳ). For a one-variable OLS fit with intercept, R² = r².

Constant inputs: if x is constant the slope is undefined and every field is NaN; if only
y is constant the fit is the flat line a = 0, b = y_0 (exact), but R² and r are 0/0 and
are NaN. Callers sweeping thresholds (`calibrate_threshold`) skip NaN R².
"""
from __future__ import annotations

import dataclasses

import numpy as np

from memdyn_jax.metrics._checks import as_float_array, check_same_shape


@dataclasses.dataclass(frozen=True)
class LinearFit:
  """Result of `fit_r2`: y ≈ slope·x + intercept.

  Attributes:
    slope: a = S_xy / S_xx (NaN if x is constant).
    intercept: b = ȳ - a·x̄ (NaN if x is constant).
    r2: coefficient of determination 1 - SS_res/SS_tot (NaN if x or y is constant).
    pearson_r: S_xy / sqrt(S_xx·S_yy) (NaN if x or y is constant).
    n: number of points.
  """

  slope: float
  intercept: float
  r2: float
  pearson_r: float
  n: int


def _xy(x, y) -> tuple[np.ndarray, np.ndarray]:
  xa = as_float_array("x", x, ndim=1)
  ya = as_float_array("y", y, ndim=1)
  check_same_shape("x", xa, "y", ya)
  if xa.size < 2:
    raise ValueError(f"x must have at least 2 points, got {xa.size}")
  return xa, ya


def fit_r2(x, y) -> LinearFit:
  """Ordinary least-squares fit of y on x, with R² and Pearson r.

  a = S_xy/S_xx, b = ȳ - a·x̄, R² = S_xy²/(S_xx·S_yy), r = S_xy/sqrt(S_xx·S_yy).

  Args:
    x: predictor, shape (n,), n >= 2 (e.g. train PreMemAcc per checkpoint).
    y: response, shape (n,) (e.g. test accuracy per checkpoint).

  Returns:
    A `LinearFit`. Constant x gives all-NaN fields; constant y (x not constant) gives
    slope 0, intercept y_0 and NaN R² and r.

  Raises:
    ValueError: x or y is not 1-D, lengths differ, fewer than 2 points, or non-finite.
  """
  xa, ya = _xy(x, y)
  n = int(xa.size)
  # np.ptp is exactly 0 only for identical values; a centred sum could leave rounding noise.
  if np.ptp(xa) == 0:
    return LinearFit(np.nan, np.nan, np.nan, np.nan, n)
  dx = xa - xa.mean()
  dy = ya - ya.mean()
  sxx = float(dx @ dx)
  sxy = float(dx @ dy)
  slope = sxy / sxx
  intercept = float(ya.mean() - slope * xa.mean())
  if np.ptp(ya) == 0:
    return LinearFit(0.0, float(ya[0]), np.nan, np.nan, n)
  syy = float(dy @ dy)
  r = sxy / np.sqrt(sxx * syy)
  r = float(np.clip(r, -1.0, 1.0))
  return LinearFit(float(slope), intercept, r * r, r, n)


def r2_identity(x, y) -> float:
  """R² of the prediction ŷ = x (the y = x line of Kang et al. Fig. 4), no fitted slope.

  R²_id = 1 - Σ (y_i - x_i)² / Σ (y_i - ȳ)². Can be negative; NaN if y is constant.

  Args:
    x: prediction, shape (n,), n >= 2 (e.g. train PreMemAcc).
    y: target, shape (n,) (e.g. test accuracy).
  """
  xa, ya = _xy(x, y)
  if np.ptp(ya) == 0:
    return float("nan")
  dy = ya - ya.mean()
  res = ya - xa
  return float(1.0 - (res @ res) / (dy @ dy))
