"""Exact memorization and memorization data maps (Ge et al. Sec. 2.1-2.3, Fig. 2 and 7).

Exact memorization (Ge et al. Eq. 1, after Tirumala et al.) of one record is the fraction
of its target tokens that the model's argmax prediction reproduces under teacher forcing:

  M(f) = (1/|C|) Σ_{(x, y) ∈ C} 1{argmax f(x) = y}.

A data map (Ge et al. Sec. 2.3, after Swayamdipta et al.) places each training record at
(variance, mean) of its exact memorization across all C checkpoints:

  μ_i = (1/C) Σ_m M_{m,i},   σ²_i = (1/C) Σ_m (M_{m,i} - μ_i)².

Ge et al. call records with high mean and low variance *easy-to-memorize* (upper-left
cluster) and records with low mean and low variance *hard-to-memorize* (bottom-left). The
paper gives no numeric cut-offs; `quantile_thresholds` supplies data-relative defaults and
`DataMapThresholds` accepts absolute ones.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax.numpy as jnp
import numpy as np

from memdyn_jax.metrics._checks import as_float_array, check_nonempty, check_unit_interval

EASY = "easy"
HARD = "hard"
OTHER = "other"


def exact_memorization(predicted_ids, target_ids, mask):
  """Per-record exact memorization M = Σ_t mask·1{pred_t = y_t} / Σ_t mask (Ge et al. Eq. 1).

  Works on numpy or jax arrays and inside `jax.jit` (shapes are checked at trace time).

  Args:
    predicted_ids: argmax of the teacher-forced logits at each target position, (B, T).
    target_ids: ground-truth token ids aligned with `predicted_ids`, (B, T).
    mask: 1 where a position is scored (e.g. response tokens only, or the whole
      dialogue for Ge et al.'s "full" variant), 0 elsewhere, (B, T).

  Returns:
    (B,) float32; NaN for a row with an all-zero mask (0/0).

  Raises:
    ValueError: the inputs are not 2-D arrays of one shape.
  """
  shape = jnp.shape(predicted_ids)
  if len(shape) != 2:
    raise ValueError(f"predicted_ids must be 2-D (B, T), got shape {shape}")
  for name, x in (("target_ids", target_ids), ("mask", mask)):
    if jnp.shape(x) != shape:
      raise ValueError(f"{name} must have the shape of predicted_ids {shape}, "
                       f"got {jnp.shape(x)}")
  m = jnp.asarray(mask, dtype=jnp.float32)
  hits = (jnp.asarray(predicted_ids) == jnp.asarray(target_ids)).astype(jnp.float32)
  return jnp.sum(hits * m, axis=1) / jnp.sum(m, axis=1)


@dataclasses.dataclass(frozen=True, eq=False)
class DataMap:
  """Per-record coordinates: mean μ_i and variance σ²_i over checkpoints, each (N,)."""

  mean: np.ndarray
  variance: np.ndarray


def data_map(memorization) -> DataMap:
  """μ_i = mean_m M_{m,i}, σ²_i = mean_m (M_{m,i} - μ_i)² (Ge et al. Sec. 2.3).

  Args:
    memorization: exact memorization, shape (C, N): checkpoints × records, values in [0, 1].

  Raises:
    ValueError: not 2-D, empty, NaN, or outside [0, 1].
  """
  em = as_float_array("memorization", memorization, ndim=2)
  check_nonempty("memorization", em)
  check_unit_interval("memorization", em)
  return DataMap(em.mean(axis=0), em.var(axis=0))


@dataclasses.dataclass(frozen=True)
class DataMapThresholds:
  """Cut-offs for the two Ge et al. regions.

  easy: μ >= easy_min_mean and σ² <= max_variance;
  hard: μ <= hard_max_mean and σ² <= max_variance; every other record is "other".

  Attributes:
    easy_min_mean: lowest mean memorization of an easy-to-memorize record.
    hard_max_mean: highest mean memorization of a hard-to-memorize record.
    max_variance: highest variance of either region (both are low-variance clusters).
  """

  easy_min_mean: float
  hard_max_mean: float
  max_variance: float

  def __post_init__(self):
    if self.hard_max_mean >= self.easy_min_mean:
      raise ValueError(f"hard_max_mean ({self.hard_max_mean}) must be below "
                       f"easy_min_mean ({self.easy_min_mean}) so the regions are disjoint")


def quantile_thresholds(dmap: DataMap, mean_quantiles: tuple[float, float] = (1 / 3, 2 / 3),
                        variance_quantile: float = 0.5) -> DataMapThresholds:
  """Data-relative cut-offs: hard below the low mean quantile, easy above the high one,
  both within the lowest `variance_quantile` of variances (linear-interpolated quantiles).

  Raises:
    ValueError: quantiles outside [0, 1] or mean_quantiles not increasing.
  """
  lo, hi = mean_quantiles
  if not 0.0 <= lo < hi <= 1.0:
    raise ValueError(f"mean_quantiles must satisfy 0 <= lo < hi <= 1, got {mean_quantiles}")
  if not 0.0 <= variance_quantile <= 1.0:
    raise ValueError(f"variance_quantile must lie in [0, 1], got {variance_quantile}")
  q_lo, q_hi = np.quantile(dmap.mean, [lo, hi])
  if q_lo >= q_hi:
    raise ValueError("mean memorization has no spread between the quantiles; "
                     "pass absolute DataMapThresholds instead")
  return DataMapThresholds(easy_min_mean=float(q_hi), hard_max_mean=float(q_lo),
                           max_variance=float(np.quantile(dmap.variance, variance_quantile)))


def partition(dmap: DataMap, thresholds: DataMapThresholds) -> np.ndarray:
  """Labels each record EASY, HARD or OTHER (Ge et al. Sec. 2.3); returns (N,) str array."""
  low_var = dmap.variance <= thresholds.max_variance
  labels = np.full(dmap.mean.shape, OTHER, dtype=object)
  labels[low_var & (dmap.mean >= thresholds.easy_min_mean)] = EASY
  labels[low_var & (dmap.mean <= thresholds.hard_max_mean)] = HARD
  return labels.astype(str)


@dataclasses.dataclass(frozen=True)
class CategorySummary:
  """Memorization statistics of one category (e.g. task type, MATH subject or level).

  Attributes:
    count: records in the category.
    first: mean exact memorization at the first checkpoint (Ge et al. Fig. 7, light).
    last: mean exact memorization at the last checkpoint (Ge et al. Fig. 7, dark).
    mean: mean over records of μ_i.
    variance: mean over records of σ²_i.
    frac_easy: fraction labelled EASY (NaN when no labels were given).
    frac_hard: fraction labelled HARD (NaN when no labels were given).
  """

  count: int
  first: float
  last: float
  mean: float
  variance: float
  frac_easy: float
  frac_hard: float


def summarize_by_category(memorization, categories: Sequence[str],
                          labels: Sequence[str] | None = None) -> dict[str, CategorySummary]:
  """Per-category summary of a (C, N) exact-memorization matrix, keys sorted.

  Args:
    memorization: shape (C, N), checkpoints in training order.
    categories: category of each record, length N.
    labels: optional `partition` output, length N.

  Raises:
    ValueError: `categories` or `labels` length differs from N.
  """
  dmap = data_map(memorization)
  em = np.asarray(memorization, dtype=np.float64)
  cats = np.asarray(list(categories), dtype=object)
  n = em.shape[1]
  if cats.shape != (n,):
    raise ValueError(f"categories must have length {n} (one per record), got {cats.shape}")
  lab = None
  if labels is not None:
    lab = np.asarray(list(labels), dtype=object)
    if lab.shape != (n,):
      raise ValueError(f"labels must have length {n} (one per record), got {lab.shape}")
  out = {}
  for cat in sorted(set(cats.tolist())):
    sel = cats == cat
    out[cat] = CategorySummary(
        count=int(sel.sum()),
        first=float(em[0, sel].mean()),
        last=float(em[-1, sel].mean()),
        mean=float(dmap.mean[sel].mean()),
        variance=float(dmap.variance[sel].mean()),
        frac_easy=float(np.mean(lab[sel] == EASY)) if lab is not None else float("nan"),
        frac_hard=float(np.mean(lab[sel] == HARD)) if lab is not None else float("nan"),
    )
  return out
