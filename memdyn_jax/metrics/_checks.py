"""Input validation shared by the metrics modules.

Every check raises ValueError naming the offending argument, so a caller passing arrays
from the wrong split or with transposed axes sees which input is wrong.
"""
from __future__ import annotations

import numpy as np


def as_float_array(name: str, x, ndim: int | None = None, *,
                   allow_inf: bool = False) -> np.ndarray:
  """`x` as a float64 array with `ndim` dimensions and no NaN (and no inf unless allowed)."""
  arr = np.asarray(x, dtype=np.float64)
  if ndim is not None and arr.ndim != ndim:
    raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
  if np.isnan(arr).any():
    raise ValueError(f"{name} contains NaN")
  if not allow_inf and np.isinf(arr).any():
    raise ValueError(f"{name} contains inf")
  return arr


def check_unit_interval(name: str, arr: np.ndarray) -> None:
  """Accuracies and memorization scores are fractions: they must lie in [0, 1]."""
  if arr.size and (arr.min() < 0.0 or arr.max() > 1.0):
    raise ValueError(f"{name} must lie in [0, 1], got range [{arr.min()}, {arr.max()}]")


def check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
  if a.shape != b.shape:
    raise ValueError(f"{name_b} must have the shape of {name_a} {a.shape}, got {b.shape}")


def check_nonempty(name: str, arr: np.ndarray) -> None:
  if arr.size == 0:
    raise ValueError(f"{name} is empty")
