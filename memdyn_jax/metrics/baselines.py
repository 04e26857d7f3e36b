"""Prior generalization metrics Kang et al. compare against (Sec. 4.2, App. B).

- Gradient variance (App. B.1, after Jiang et al.): gradients g^(1..K) of K = 5 minibatches;
  per weight element the variance across the K gradients, averaged over all elements:
    GV = (1/D) Σ_{d=1..D} Var_k[g^(k)_d],   Var_k = (1/(K - ddof)) Σ_k (g^(k)_d - ḡ_d)².
- Distance from initialization (App. B.2, after Nagarajan & Kolter):
    Dist = Σ_d (θ_d - θ0_d)²   (a sum of squares, not its square root).
- Average Thresholded Confidence (App. B.3, after Garg et al.): with a per-example score
  s (the likelihood of the model's greedy response), a threshold t is chosen on a
  reference model's *test* scores so that the fraction of test scores above t equals the
  reference model's test accuracy; any model's predicted accuracy is then the fraction of
  its *train* scores above t:  ATC = (1/N) Σ_i 1[s_i > t].
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from memdyn_jax.metrics._checks import as_float_array, check_nonempty

PyTree = Any

# Kang et al. App. B.1 uses 5 minibatches.
NUM_GRADIENT_MINIBATCHES = 5


def _check_same_structure(name_ref: str, ref: PyTree, name: str, tree: PyTree) -> None:
  ref_def = jax.tree_util.tree_structure(ref)
  tree_def = jax.tree_util.tree_structure(tree)
  if ref_def != tree_def:
    raise ValueError(f"{name} must have the tree structure of {name_ref}: "
                     f"{tree_def} vs {ref_def}")


def minibatch_gradients(loss_fn: Callable[[PyTree, Any], jax.Array], params: PyTree,
                        batches: Iterable[Any]) -> list[PyTree]:
  """Gradients of `loss_fn(params, batch)` w.r.t. `params`, one per batch (App. B.1).

  One jitted gradient function is compiled and reused across batches of equal shapes.

  Args:
    loss_fn: scalar loss, `loss_fn(params, batch) -> ()`.
    params: parameter pytree to differentiate at.
    batches: the minibatches (Kang et al. use 5).

  Returns:
    A list of gradient pytrees with the structure of `params`.
  """
  grad_fn = jax.jit(jax.grad(loss_fn))
  return [grad_fn(params, batch) for batch in batches]


def gradient_variance(grads: Sequence[PyTree], ddof: int = 0) -> float:
  """Element-wise variance across minibatch gradients, averaged over all weights (App. B.1).

  GV = (1/D) Σ_d (1/(K - ddof)) Σ_k (g^(k)_d - ḡ_d)², D = total number of weight elements.
  Computed leaf by leaf with Welford's update, so only the running mean and sum of squared
  deviations are held per leaf (no stacked copy of K gradients).

  Args:
    grads: K >= 2 gradient pytrees of identical structure and leaf shapes.
    ddof: 0 for the population variance (numpy's default), 1 for the unbiased one
      (torch.var's default); the paper does not say which.

  Returns:
    GV as a Python float.

  Raises:
    ValueError: fewer than 2 gradients, K <= ddof, or mismatched structure/shapes.
  """
  grads = list(grads)
  k_total = len(grads)
  if k_total < 2:
    raise ValueError(f"grads must hold at least 2 gradients, got {k_total}")
  if ddof < 0 or k_total - ddof <= 0:
    raise ValueError(f"ddof must be in [0, {k_total - 1}], got {ddof}")
  for k in range(1, k_total):
    _check_same_structure("grads[0]", grads[0], f"grads[{k}]", grads[k])
  leaves = [jax.tree_util.tree_leaves(g) for g in grads]
  total_m2 = 0.0
  total_count = 0
  for j in range(len(leaves[0])):
    shape = np.shape(leaves[0][j])
    mean = m2 = 0.0
    for k in range(k_total):
      leaf = leaves[k][j]
      if np.shape(leaf) != shape:
        raise ValueError(f"grads[{k}] leaf {j} has shape {np.shape(leaf)}, expected {shape}")
      x = jnp.asarray(leaf, dtype=jnp.promote_types(jnp.asarray(leaf).dtype, jnp.float32))
      mean, m2 = welford_update(mean, m2, x, k)
    total_m2 += float(jnp.sum(m2))
    total_count += int(math.prod(shape))
  if total_count == 0:
    raise ValueError("grads hold no weight elements")
  return variance_from_moments(total_m2, total_count, k_total, ddof)


def welford_update(mean, m2, x, count):
  """One step of Welford's algorithm, element-wise: adds the `count`-th value (0-based).

  mean' = mean + (x - mean) / (count + 1);  M2' = M2 + (x - mean)(x - mean').
  Stable even when the mean dwarfs the spread. Works on numpy or jax arrays (and inside
  `jax.jit` / `lax.scan`); start from mean = M2 = 0.

  Returns:
    (mean', M2'): the running mean and sum of squared deviations of the values so far.
  """
  delta = x - mean
  mean = mean + delta / (count + 1)
  return mean, m2 + delta * (x - mean)


def variance_from_moments(total_m2: float, num_elements: int, num_gradients: int,
                          ddof: int = 0) -> float:
  """GV from Welford sums: Σ_d M2_d / (K - ddof) / D (see `gradient_variance`)."""
  return float(total_m2) / (num_gradients - ddof) / num_elements


def squared_distance_leaves(pairs: Iterable[tuple[Any, Any]]) -> float:
  """Σ over (θ, θ0) leaf pairs of Σ_d (θ_d - θ0_d)² (App. B.2), one leaf pair at a time.

  Accepts any iterable, e.g. a generator that loads one tensor of each checkpoint at a
  time, so a model need not be resident twice.

  Raises:
    ValueError: a pair's shapes differ (named by position).
  """
  total = 0.0
  for j, (a, b) in enumerate(pairs):
    if np.shape(a) != np.shape(b):
      raise ValueError(f"init_params leaf {j} has shape {np.shape(b)}, "
                       f"params leaf has {np.shape(a)}")
    a = jnp.asarray(a)
    dtype = jnp.promote_types(a.dtype, jnp.float32)
    diff = a.astype(dtype) - jnp.asarray(b).astype(dtype)
    total += float(jnp.sum(diff * diff))
  return total


def distance_from_init(params: PyTree, init_params: PyTree) -> float:
  """Dist = Σ_d (θ_d - θ0_d)² over every weight element (Kang et al. App. B.2).

  Args:
    params: finetuned parameter pytree.
    init_params: the initial (pretrained) parameters, same structure and shapes.

  Returns:
    The summed squared difference as a Python float (accumulated leaf by leaf).

  Raises:
    ValueError: structures or leaf shapes differ.
  """
  _check_same_structure("params", params, "init_params", init_params)
  return squared_distance_leaves(
      zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(init_params)))


def atc_threshold(ref_test_scores, ref_test_accuracy) -> float:
  """ATC threshold t: the fraction of reference test scores strictly above t = test accuracy.

  With N scores sorted descending s_(1) >= ... >= s_(N) and k = floor(acc·N + 1/2),
  t = s_(k+1) (t = -inf when k = N), so exactly k scores exceed t when scores are
  distinct; with ties at s_(k+1) fewer may. (Kang et al. App. B.3; Garg et al., ATC.)

  Args:
    ref_test_scores: the reference model's score per test example, shape (N,): the
      likelihood of its greedy response. Any monotone transform (log-likelihood, mean
      token log-probability) gives the same predictions if used consistently.
    ref_test_accuracy: its test accuracy in [0, 1], a float or per-example array whose
      mean is taken.

  Returns:
    The threshold t.
  """
  s = as_float_array("ref_test_scores", ref_test_scores, ndim=1, allow_inf=True)
  check_nonempty("ref_test_scores", s)
  acc = as_float_array("ref_test_accuracy", ref_test_accuracy)
  check_nonempty("ref_test_accuracy", acc)
  acc = float(acc.mean())
  if not 0.0 <= acc <= 1.0:
    raise ValueError(f"ref_test_accuracy must lie in [0, 1], got {acc}")
  # Half rounds up (Python's round() would round half to even).
  k = int(math.floor(acc * s.size + 0.5))
  if k >= s.size:
    return float("-inf")
  return float(np.sort(s)[::-1][k])


def atc_predicted_accuracy(scores, threshold: float) -> float:
  """ATC prediction = (1/N) Σ_i 1[s_i > t] (Kang et al. App. B.3: train scores, per model).

  Args:
    scores: the evaluated model's scores on the train examples, shape (N,).
    threshold: t from `atc_threshold`.
  """
  s = as_float_array("scores", scores, ndim=1, allow_inf=True)
  check_nonempty("scores", s)
  if math.isnan(threshold):
    raise ValueError("threshold is NaN")
  return float(np.mean(s > threshold))
