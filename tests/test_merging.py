"""Merge methods against plain numpy references on small pytrees."""
from __future__ import annotations

import json
import math
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memdyn_jax import merging
from memdyn_jax.merging import MergeConfig, MergeConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- numpy references


def np_trim(delta, density):
  flat = delta.reshape(-1)
  k = merging.keep_count(density, flat.size)
  order = np.argsort(-np.abs(flat), kind="stable")
  out = np.zeros_like(flat)
  out[order[:k]] = flat[order[:k]]
  return out.reshape(delta.shape)


def np_ties(base, xs, weights, density, lam=1.0, normalize=True):
  deltas = [np_trim(x - base, density) for x in xs]
  weighted = [w * d for w, d in zip(weights, deltas)]
  total = np.sum(weighted, axis=0)
  elected = np.where(total >= 0, 1.0, -1.0)
  merged = np.zeros_like(base)
  divisor = np.zeros_like(base)
  for w, wd in zip(weights, weighted):
    agree = np.sign(wd) == elected
    merged += np.where(agree, wd, 0.0)
    divisor += np.where(agree, w, 0.0)
  if normalize:
    merged = merged / np.where(np.abs(divisor) < 1e-8, 1.0, divisor)
  return base + lam * merged


def np_slerp(a, b, t):
  ua, ub = a / np.linalg.norm(a), b / np.linalg.norm(b)
  dot = np.clip(np.sum(ua * ub), -1.0, 1.0)
  if abs(dot) > 0.9995:
    return (1 - t) * a + t * b
  omega = np.arccos(dot)
  return (np.sin((1 - t) * omega) * a + np.sin(t * omega) * b) / np.sin(omega)


def make_tree(rng, scale=1.0):
  return {"embed": scale * rng.normal(size=(5, 4)).astype(np.float32),
          "layers": [{"kernel": scale * rng.normal(size=(4, 3)).astype(np.float32),
                      "bias": scale * rng.normal(size=(3,)).astype(np.float32)}
                     for _ in range(2)]}


def leaves(tree):
  return [np.asarray(x, np.float32) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def trees():
  rng = np.random.default_rng(0)
  base = make_tree(rng)
  models = [jax.tree.map(lambda b: b + 0.3 * rng.normal(size=b.shape).astype(np.float32), base)
            for _ in range(3)]
  return base, models


def check_leafwise(result, ref_fn, *trees_, atol=1e-5):
  for got, *inputs in zip(leaves(result), *[leaves(t) for t in trees_]):
    np.testing.assert_allclose(got, ref_fn(*inputs), atol=atol, rtol=1e-5)


# ---------------------------------------------------------------- methods


def test_uniform_soup_and_weighted_linear(trees):
  _, models = trees
  out = merging.merge_pytrees(MergeConfig("linear"), None, models)
  assert jax.tree.structure(out) == jax.tree.structure(models[0])
  check_leafwise(out, lambda a, b, c: (a + b + c) / 3, *models)
  w = (0.5, 0.3, 0.2)
  out = merging.merge_pytrees(MergeConfig("linear", weights=w), None, models)
  check_leafwise(out, lambda a, b, c: 0.5 * a + 0.3 * b + 0.2 * c, *models)
  w = (1.0, 2.0, 1.0)
  out = merging.merge_pytrees(MergeConfig("linear", weights=w, normalize=False), None, models)
  check_leafwise(out, lambda a, b, c: a + 2 * b + c, *models)
  out = merging.merge_pytrees(MergeConfig("linear", weights=w), None, models)
  check_leafwise(out, lambda a, b, c: (a + 2 * b + c) / 4, *models)


def test_task_arithmetic_with_lambda(trees):
  base, models = trees
  cfg = MergeConfig("task_arithmetic", weights=(1.0, 0.5, -0.25), lambda_=0.7)
  out = merging.merge_pytrees(cfg, base, models)
  check_leafwise(out, lambda b, x, y, z: b + 0.7 * ((x - b) + 0.5 * (y - b) - 0.25 * (z - b)),
                 base, *models)
  cfg = MergeConfig("task_arithmetic", weights=(1.0, 1.0, 2.0), lambda_=2.0, normalize=True)
  out = merging.merge_pytrees(cfg, base, models)
  check_leafwise(out, lambda b, x, y, z: b + 2.0 * ((x - b) + (y - b) + 2 * (z - b)) / 4,
                 base, *models)


@pytest.mark.parametrize("density,normalize", [(1.0, True), (0.5, True), (0.3, False)])
def test_ties_matches_numpy(trees, density, normalize):
  base, models = trees
  w = (1.0, 0.6, 0.8)
  cfg = MergeConfig("ties", weights=w, density=density, lambda_=1.5, normalize=normalize)
  out = merging.merge_pytrees(cfg, base, models)
  check_leafwise(out, lambda b, *xs: np_ties(b, xs, w, density, 1.5, normalize), base, *models)


def test_ties_sign_election_ties_and_zeros():
  base = {"w": np.zeros(6, np.float32)}
  # Element by element: majority +; weighted sum decides against the count; exact tie
  # (sum 0 elects +); all-zero; one zero delta among agreeing ones; negative wins.
  a = np.array([1.0, 1.0, 2.0, 0.0, 0.0, -1.0], np.float32)
  b = np.array([2.0, 1.0, -2.0, 0.0, 4.0, -3.0], np.float32)
  c = np.array([-1.0, -3.0, 0.0, 0.0, 2.0, 1.0], np.float32)
  cfg = MergeConfig("ties", density=1.0)
  out = merging.merge_pytrees(cfg, base, [{"w": a}, {"w": b}, {"w": c}])["w"]
  expected = [1.5,   # + elected (sum 2): mean of 1 and 2
              -3.0,  # sum -1 elects -: only c agrees
              2.0,   # sum exactly 0 -> + elected: a agrees (c's 0 never agrees)
              0.0,   # nothing agrees -> 0, so θ = base
              3.0,   # zeros do not count in the divisor: (4 + 2) / 2
              -2.0]  # (-1 - 3) / 2
  np.testing.assert_allclose(np.asarray(out), expected)
  np.testing.assert_allclose(np.asarray(out), np_ties(base["w"], [a, b, c], (1, 1, 1), 1.0))
  # Weighted: the divisor is the sum of agreeing weights only.
  out = merging.merge_pytrees(MergeConfig("ties", density=1.0, weights=(3.0, 1.0, 1.0)), base,
                              [{"w": a}, {"w": b}, {"w": c}])["w"]
  np.testing.assert_allclose(np.asarray(out)[0], (3 * 1 + 1 * 2) / 4)
  # Disjoint sum without normalisation.
  out = merging.merge_pytrees(MergeConfig("ties", density=1.0, normalize=False), base,
                              [{"w": a}, {"w": b}, {"w": c}])["w"]
  np.testing.assert_allclose(np.asarray(out), [3.0, -3.0, 2.0, 0.0, 6.0, -4.0])


def test_ties_trim_keeps_top_magnitudes_with_stable_ties():
  delta = np.array([0.5, -3.0, 1.0, 1.0, -1.0, 0.1], np.float32)
  out = merging.merge_pytrees(MergeConfig("ties", density=0.5), {"w": np.zeros(6, np.float32)},
                              [{"w": delta}])["w"]
  # k = 3: -3 and the first two of the three |1| entries (lowest index first).
  np.testing.assert_array_equal(np.asarray(out), [0, -3, 1, 1, 0, 0])
  assert merging.keep_count(0.7, 10) == 7 and merging.keep_count(0.29, 100) == 29
  assert merging.keep_count(0.1, 5) == 0


def test_ties_trim_matches_stable_argsort_on_random_ties():
  # The bisection threshold must pick exactly what a stable descending argsort picks,
  # also with many equal magnitudes and zeros.
  rng = np.random.default_rng(5)
  zero = np.zeros(50, np.float32)
  for density in (0.02, 0.37, 0.9):
    cfg = MergeConfig("ties", density=density)
    for trial in range(8):
      x = (rng.integers(-3, 4, size=50).astype(np.float32) if trial % 2
           else rng.normal(size=50).astype(np.float32))
      got = merging.merge_tensor(cfg, ("w",), [x], base=zero)
      np.testing.assert_array_equal(np.asarray(got), np_trim(x, density))


def test_slerp_endpoints_midpoint_and_lerp_fallback(trees):
  _, models = trees
  a, b = models[0], models[1]
  for t in (0.0, 1.0):
    out = merging.merge_pytrees(MergeConfig("slerp", t=t), None, [a, b])
    check_leafwise(out, lambda x, y, t=t: y if t else x, a, b, atol=1e-6)
  out = merging.merge_pytrees(MergeConfig("slerp", t=0.5), None, [a, b])
  check_leafwise(out, lambda x, y: np_slerp(x, y, 0.5), a, b)
  out = merging.merge_pytrees(MergeConfig("slerp", t=0.3), None, [a, b])
  check_leafwise(out, lambda x, y: np_slerp(x, y, 0.3), a, b)
  # Slerp of unit vectors 90° apart stays on the sphere; lerp would not.
  x, y = np.array([1.0, 0.0], np.float32), np.array([0.0, 1.0], np.float32)
  mid = np.asarray(merging.merge_pytrees(MergeConfig("slerp"), None, [{"v": x}, {"v": y}])["v"])
  np.testing.assert_allclose(mid, [math.sqrt(0.5)] * 2, atol=1e-6)
  # Nearly parallel (|cos| > 0.9995): plain lerp; also anti-parallel, and a zero tensor.
  p = np.array([1.0, 2.0, 3.0], np.float32)
  for q in (2.0 * p + np.array([0.0, 0.01, 0.0], np.float32), -p, np.zeros(3, np.float32)):
    out = merging.merge_pytrees(MergeConfig("slerp", t=0.25), None, [{"v": p}, {"v": q}])["v"]
    np.testing.assert_allclose(np.asarray(out), 0.75 * p + 0.25 * q, rtol=1e-6)
  # A base counts as the t=0 endpoint.
  out = merging.merge_pytrees(MergeConfig("slerp", t=0.0), a, [b])
  check_leafwise(out, lambda x, y: x, a, b, atol=1e-6)


def test_slerp_per_tensor_t(trees):
  _, models = trees
  a, b = models[0], models[1]
  cfg = MergeConfig("slerp", t={r"kernel": 1.0, r"^layers/1": 0.0, "": 0.5})
  out = merging.merge_pytrees(cfg, None, [a, b])
  np.testing.assert_allclose(np.asarray(out["layers"][0]["kernel"]), b["layers"][0]["kernel"],
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["layers"][1]["bias"]), a["layers"][1]["bias"],
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(out["embed"]), np_slerp(a["embed"], b["embed"], 0.5),
                             atol=1e-5)
  out = merging.merge_pytrees(MergeConfig("slerp", t=lambda n: 1.0 if "embed" in n else 0.0),
                              None, [a, b])
  np.testing.assert_allclose(np.asarray(out["embed"]), b["embed"], atol=1e-6)
  assert cfg.t_for("layers/1/kernel") == 1.0 and cfg.t_for("x") == 0.5
  with pytest.raises(MergeConfigError, match="no pattern matches"):
    MergeConfig("slerp", t={"kernel": 0.2}).t_for("embed")


def test_dare_unbiased_and_structured():
  rng = np.random.default_rng(1)
  base = {"w": rng.normal(size=(64, 64)).astype(np.float32)}
  models = [{"w": base["w"] + rng.normal(size=(64, 64)).astype(np.float32)} for _ in range(2)]
  w, p, lam = (0.7, 0.3), 0.4, 1.0
  linear = merging.merge_pytrees(MergeConfig("task_arithmetic", weights=w), base, models)["w"]
  n_seeds = 120
  outs = np.stack([np.asarray(merging.merge_pytrees(
      MergeConfig("dare_linear", weights=w, density=p, seed=s), base, models)["w"])
      for s in range(n_seeds)])
  # Var of one draw: Σ wᵢ² δᵢ² (1-p)/p; the mean of n draws is within 5σ everywhere-ish.
  deltas = [m["w"] - base["w"] for m in models]
  sigma = np.sqrt(sum(wi ** 2 * d ** 2 for wi, d in zip(w, deltas)) * (1 - p) / p / n_seeds)
  err = outs.mean(0) - np.asarray(linear)
  assert np.mean(np.abs(err) < 4 * sigma + 1e-4) > 0.999
  assert abs(np.mean(err / (sigma + 1e-6))) < 0.05  # no bias in aggregate
  # One model: each entry is dropped (θ = base) or rescaled by 1/p.
  one = np.asarray(merging.merge_pytrees(MergeConfig("dare_linear", density=p, lambda_=lam),
                                         base, models[:1])["w"])
  delta = deltas[0]
  kept = ~np.isclose(one, base["w"], atol=1e-6)
  np.testing.assert_allclose(one[kept], (base["w"] + delta / p)[kept], rtol=1e-5, atol=1e-5)
  assert 0.3 < kept.mean() < 0.5
  # Deterministic per seed and per tensor path, and density 1 is task arithmetic.
  again = merging.merge_pytrees(MergeConfig("dare_linear", density=p), base, models[:1])["w"]
  np.testing.assert_array_equal(np.asarray(again), one)
  other = merging.merge_pytrees(MergeConfig("dare_linear", density=p, seed=1), base, models[:1])
  assert not np.array_equal(np.asarray(other["w"]), one)
  renamed = merging.merge_pytrees(MergeConfig("dare_linear", density=p), {"v": base["w"]},
                                  [{"v": models[0]["w"]}])["v"]
  assert not np.array_equal(np.asarray(renamed), one)
  full = merging.merge_pytrees(MergeConfig("dare_linear", weights=w, density=1.0), base, models)
  np.testing.assert_allclose(np.asarray(full["w"]), np.asarray(linear), rtol=1e-6)
  k0, k1 = merging.dare_key(0, "w", 0), merging.dare_key(0, "w", 1)
  assert not np.array_equal(jax.random.key_data(k0), jax.random.key_data(k1))


def test_dare_ties_uses_dare_mask_then_ties_election():
  rng = np.random.default_rng(2)
  base = {"w": rng.normal(size=(8, 8)).astype(np.float32)}
  models = [{"w": base["w"] + rng.normal(size=(8, 8)).astype(np.float32)} for _ in range(3)]
  p = 0.5
  cfg = MergeConfig("dare_ties", density=p, weights=(1.0, 0.5, 2.0), seed=3)
  out = np.asarray(merging.merge_pytrees(cfg, base, models)["w"])
  # Rebuild the DARE-dropped models from single-model dare_linear merges (same keys),
  # then apply the numpy TIES election at density 1.
  dropped = []
  for i, m in enumerate(models):
    key = merging.dare_key(3, "w", i)
    keep = np.asarray(jax.random.bernoulli(key, p, (8, 8)))
    dropped.append(base["w"] + np.where(keep, (m["w"] - base["w"]) / p, 0.0))
  np.testing.assert_allclose(out, np_ties(base["w"], dropped, (1.0, 0.5, 2.0), 1.0),
                             rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg,with_base", [
    (MergeConfig("linear"), False), (MergeConfig("slerp", t=0.4), False),
    (MergeConfig("task_arithmetic", lambda_=0.5), True),
    (MergeConfig("ties", density=0.6), True), (MergeConfig("dare_linear", density=0.5), True),
    (MergeConfig("dare_ties", density=0.5), True)])
def test_bfloat16_in_bfloat16_out(trees, cfg, with_base):
  # One tensor keeps the compile count (and the test time) down.
  base, models = {"embed": trees[0]["embed"]}, [{"embed": m["embed"]} for m in trees[1]]
  bf = lambda t: jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), t)
  models_bf = [bf(m) for m in models[:2]]
  out = merging.merge_pytrees(cfg, bf(base) if with_base else None, models_bf)
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(out))
  # float32 math on the bf16 values, rounded once at the end.
  upcast = lambda t: jax.tree.map(lambda x: np.asarray(x, np.float32), t)
  ref = merging.merge_pytrees(cfg, upcast(bf(base)) if with_base else None,
                              [upcast(m) for m in models_bf])
  for got, want in zip(leaves(out), leaves(ref)):
    np.testing.assert_allclose(got, np.asarray(jnp.asarray(want, jnp.bfloat16), np.float32),
                               rtol=1e-2, atol=1e-2)


def test_nnx_state_roundtrip_and_integer_passthrough():
  class M(nnx.Module):
    def __init__(self, seed):
      self.lin = nnx.Linear(3, 2, rngs=nnx.Rngs(seed))
      self.count = nnx.BatchStat(jnp.array([seed], jnp.int32))

  states = [nnx.state(M(s)) for s in (0, 1)]
  out = merging.merge_pytrees(MergeConfig("linear"), None, states)
  assert isinstance(out, nnx.State) and isinstance(out["lin"]["kernel"], nnx.Param)
  np.testing.assert_allclose(out["lin"]["kernel"][...],
                             (states[0]["lin"]["kernel"][...] + states[1]["lin"]["kernel"][...]) / 2,
                             rtol=1e-6)
  np.testing.assert_array_equal(out["count"][...], [0])  # ints: the first model's
  src = merging.PytreeSource(states[0])
  assert [merging.path_str(p) for p in src.paths()] == ["count", "lin/bias", "lin/kernel"]
  plain = merging.to_pytree(src)
  assert set(plain) == {"count", "lin"} and plain["lin"]["kernel"].shape == (3, 2)


def test_greedy_soup_with_fake_evaluator():
  cands = [{"x": np.array([v], np.float32)} for v in (1.0, -1.0, 3.0, -0.8)]
  calls = []

  def evaluate(params):
    calls.append(float(params["x"][0]))
    return -float(params["x"][0]) ** 2  # best at 0

  res = merging.greedy_soup(cands, evaluate)
  # Own scores -1, -1, -9, -0.64 -> order 3, 0, 1, 2. {3}: -0.64; +0 -> mean 0.1 (-0.01,
  # accepted); +1 -> mean -0.267 (worse); +2 -> mean 1.067 (worse).
  assert res.ingredients == (3, 0)
  np.testing.assert_allclose(res.params["x"], [0.1], atol=1e-6)
  assert res.score == pytest.approx(-0.01, abs=1e-6)
  assert res.individual_scores == pytest.approx((-1.0, -1.0, -9.0, -0.64))
  assert [(i, ok) for i, _, ok in res.history] == [(0, True), (1, False), (2, False)]
  assert len(calls) == 4 + 3
  # Known scores skip the individual evaluations; equal scores are not an improvement.
  calls.clear()
  res = merging.greedy_soup(cands[:2], lambda p: 1.0, scores=[0.5, 1.0])
  assert res.ingredients == (1,) and res.history[0][2] is False
  with pytest.raises(ValueError, match="scores"):
    merging.greedy_soup(cands, evaluate, scores=[1.0])


def test_bad_config_and_inputs_raise(trees):
  base, models = trees
  bad = [
      (dict(method="soup"), "method"),
      (dict(method="linear", weights=(1.0, float("nan"))), "weights"),
      (dict(method="linear", weights=(1.0, -1.0)), "weights"),
      (dict(method="slerp", weights=(1.0, 1.0)), "weights"),
      (dict(method="slerp", t=1.5), "t"),
      (dict(method="slerp", t={"kernel": 2.0}), "t"),
      (dict(method="linear", t=0.5), "t"),
      (dict(method="ties"), "density"),
      (dict(method="ties", density=0.0), "density"),
      (dict(method="dare_linear", density=1.5), "density"),
      (dict(method="linear", density=0.5), "density"),
      (dict(method="linear", lambda_=2.0), "lambda_"),
      (dict(method="task_arithmetic", lambda_=float("inf")), "lambda_"),
      (dict(method="dare_ties", density=0.5, seed=-1), "seed"),
      (dict(method="linear", normalize="yes"), "normalize"),
  ]
  for kwargs, field in bad:
    with pytest.raises(MergeConfigError, match=f"^{field}:") as e:
      MergeConfig(**kwargs)
    assert e.value.field == field
  MergeConfig("linear", weights=(1.0, -1.0), normalize=False)  # fine without normalising
  with pytest.raises(MergeConfigError, match="weights: has 2 entries for 3 models"):
    merging.merge_pytrees(MergeConfig("linear", weights=(1.0, 2.0)), None, models)
  with pytest.raises(ValueError, match="needs a base"):
    merging.merge_pytrees(MergeConfig("ties", density=0.5), None, models)
  with pytest.raises(ValueError, match="exactly 2"):
    merging.merge_pytrees(MergeConfig("slerp"), None, models)
  with pytest.raises(ValueError, match="no base"):
    merging.merge_pytrees(MergeConfig("linear"), base, models)
  with pytest.raises(ValueError, match="different tensors"):
    merging.merge_pytrees(MergeConfig("linear"), None, [models[0], {"embed": base["embed"]}])
  bad_shape = jax.tree.map(lambda x: x, models[1])
  bad_shape["embed"] = np.zeros((4, 5), np.float32)
  with pytest.raises(ValueError, match="different shapes"):
    merging.merge_pytrees(MergeConfig("linear"), None, [models[0], bad_shape])


def test_merge_tensor_directly():
  x, y = np.ones(3, np.float32), 3 * np.ones(3, np.float32)
  out = merging.merge_tensor(MergeConfig("linear"), ("a",), [x, y])
  np.testing.assert_allclose(np.asarray(out), 2.0)
  out = merging.merge_tensor(MergeConfig("task_arithmetic", lambda_=0.5), ("a",), [y], base=x)
  np.testing.assert_allclose(np.asarray(out), 2.0)
  with pytest.raises(ValueError, match="takes no base"):
    merging.merge_tensor(MergeConfig("linear"), ("a",), [x], base=y)


# ---------------------------------------------------------------- stacked layers


WHOLE_TENSOR_CONFIGS = [
    MergeConfig("ties", density=0.3, weights=(1.0, 0.5)),
    MergeConfig("slerp", t=0.3),
    MergeConfig("dare_linear", density=0.5, seed=4, lambda_=0.8),
    MergeConfig("dare_ties", density=0.5, seed=4, weights=(1.0, 2.0))]


def per_layer_reference(cfg, name, xs, base, layer_axis=0):
  """Stacks the merges of each layer's slices, each merged as a tensor of its own (DARE: the
  layer's keys, `dare_key` with its index)."""
  out = []
  for l in range(xs[0].shape[layer_axis]):
    take = lambda x, l=l: np.take(np.asarray(x, np.float32), l, axis=layer_axis)
    layer_xs, layer_base = [take(x) for x in xs], None if base is None else take(base)
    if cfg.method.startswith("dare"):
      dropped = []  # DARE's drop-and-rescale by hand, then the method at density 1
      for i, x in enumerate(layer_xs):
        keep = np.asarray(jax.random.bernoulli(merging.dare_key(cfg.seed, name, i, (l,)),
                                               cfg.density, x.shape))
        dropped.append(layer_base + np.where(keep, (x - layer_base) / cfg.density, 0.0))
      dense = MergeConfig("ties" if cfg.method == "dare_ties" else "task_arithmetic",
                          weights=cfg.weights, lambda_=cfg.lambda_,
                          density=1.0 if cfg.method == "dare_ties" else None,
                          normalize=cfg.resolved_normalize)
      out.append(np.asarray(merging.merge_tensor(dense, (name,), dropped, layer_base)))
    else:
      out.append(np.asarray(merging.merge_tensor(cfg, (name,), layer_xs, layer_base)))
  return np.stack(out, axis=layer_axis)


@pytest.mark.parametrize("cfg", WHOLE_TENSOR_CONFIGS, ids=lambda c: c.method)
def test_stacked_tensor_merges_per_layer(cfg):
  rng = np.random.default_rng(7)
  # Layers of very different scales: a merge over the whole stack differs from per layer.
  scales = np.array([0.1, 1.0, 5.0], np.float32)[:, None, None]
  base = rng.normal(size=(3, 6, 5)).astype(np.float32) * scales
  xs = [base + rng.normal(size=base.shape).astype(np.float32) * scales * (i + 1)
        for i in range(2)]
  b = None if cfg.method == "slerp" else base
  got = np.asarray(merging.merge_tensor(cfg, ("w",), xs, b, layer_axes=(0,)))
  want = per_layer_reference(cfg, "w", xs, b)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  if cfg.method == "ties":
    np.testing.assert_array_equal(got, want)
  whole = np.asarray(merging.merge_tensor(cfg, ("w",), xs, b))
  assert np.max(np.abs(whole - want)) > 1e-3  # the stack as one tensor is another merge
  # The stacked axis anywhere (moved back in place), and two stacked axes (one layer per
  # pair of indices, DARE keys folded with both).
  moved = np.asarray(merging.merge_tensor(cfg, ("w",), [np.moveaxis(x, 0, 1) for x in xs],
                                          None if b is None else np.moveaxis(b, 0, 1),
                                          layer_axes=(1,)))
  np.testing.assert_allclose(np.moveaxis(moved, 1, 0), got, rtol=1e-6, atol=1e-6)
  if not cfg.method.startswith("dare"):
    two = np.asarray(merging.merge_tensor(
        cfg, ("w",), [x.reshape(3, 2, 3, 5) for x in xs],
        None if b is None else b.reshape(3, 2, 3, 5), layer_axes=(0, 1)))
    want_two = np.stack([per_layer_reference(cfg, "w", [x.reshape(3, 2, 3, 5)[l] for x in xs],
                                             None if b is None else b.reshape(3, 2, 3, 5)[l])
                         for l in range(3)])
    np.testing.assert_allclose(two, want_two, rtol=1e-6, atol=1e-6)


def test_elementwise_methods_ignore_the_layer_axes():
  rng = np.random.default_rng(8)
  base = rng.normal(size=(3, 4)).astype(np.float32)
  xs = [base + rng.normal(size=(3, 4)).astype(np.float32) for _ in range(2)]
  for cfg, b in ((MergeConfig("linear"), None), (MergeConfig("task_arithmetic", lambda_=0.5), base)):
    np.testing.assert_array_equal(
        np.asarray(merging.merge_tensor(cfg, ("w",), xs, b, layer_axes=(0,))),
        np.asarray(merging.merge_tensor(cfg, ("w",), xs, b)))
  with pytest.raises(ValueError, match="out of range"):
    merging.merge_tensor(MergeConfig("slerp"), ("w",), xs, layer_axes=(2,))
  with pytest.raises(ValueError, match="repeat"):
    merging.merge_tensor(MergeConfig("slerp"), ("w",), xs, layer_axes=(0, -2))


def test_dare_layer_masks_do_not_depend_on_the_stack():
  rng = np.random.default_rng(9)
  base = rng.normal(size=(3, 8, 8)).astype(np.float32)
  xs = [base + rng.normal(size=base.shape).astype(np.float32) for _ in range(2)]
  cfg = MergeConfig("dare_ties", density=0.5, seed=1)
  full = np.asarray(merging.merge_tensor(cfg, ("w",), xs, base, layer_axes=(0,)))
  first_two = np.asarray(merging.merge_tensor(cfg, ("w",), [x[:2] for x in xs], base[:2],
                                              layer_axes=(0,)))
  np.testing.assert_array_equal(first_two, full[:2])
  assert not np.array_equal(full[0] - base[0], full[1] - base[1])  # fresh masks per layer


@pytest.fixture(scope="module")
def tiny_llama_states():
  """Parameter States (nnx Params with their logical axes) of three tiny 3-layer Llamas: a
  base and two fine-tuned-like models, the base plus deltas of very different size per layer.
  Values are drawn into the abstract model's State (eager init takes seconds here)."""
  from memdyn_jax import models
  cfg = models.ModelConfig(family="llama", model_type="llama", vocab_size=64, hidden_size=16,
                           intermediate_size=24, num_layers=3, num_heads=2, num_kv_heads=1,
                           head_dim=8, max_position_embeddings=32, norm_eps=1e-5,
                           hidden_act="silu", layer_windows=(0, 0, 0))
  abstract = nnx.state(models.abstract_model(cfg), nnx.Param)
  rng = np.random.default_rng(3)
  is_var = lambda x: isinstance(x, nnx.Variable)
  base = jax.tree.map(lambda v: v.replace(jnp.asarray(
      rng.normal(size=v.shape).astype(np.float32) * 0.2)), abstract, is_leaf=is_var)

  def tuned(scale):
    def one(v):
      noise = rng.normal(size=v.shape).astype(np.float32) * scale
      if v.get_metadata()["logical_axes"][0] == merging.LAYERS_AXIS:
        noise *= np.array([0.1, 1.0, 4.0], np.float32).reshape((-1,) + (1,) * (v.ndim - 1))
      return v.replace(v[...] + noise)
    return jax.tree.map(one, base, is_leaf=is_var)
  return base, [tuned(0.02), tuned(0.03)]


# dare_linear's per-layer path is dare_ties' (synthetic arrays test both): threefry is slow
# to compile on XLA:CPU, once per tensor shape.
@pytest.mark.parametrize("cfg", [c for c in WHOLE_TENSOR_CONFIGS if c.method != "dare_linear"],
                         ids=lambda c: c.method)
def test_model_state_merges_its_stacked_blocks_per_layer(tiny_llama_states, cfg):
  base, tuned = tiny_llama_states
  axes = merging.layer_axes_of(base)
  stacked = {n for n, a in axes.items() if a}
  # The model's structure, not shapes, names the stacked tensors: every block parameter,
  # the layer axis first; embeddings, final norm and head are not stacked.
  source = merging.PytreeSource(base)
  names = {merging.path_str(p) for p in source.paths()}
  assert stacked == {n for n in names if n.startswith("blocks/")} and len(stacked) >= 9
  assert all(axes[n] == (0,) for n in stacked) and set(axes) == names
  assert all(source.layer_axes(p) == axes[merging.path_str(p)] for p in source.paths())
  b = None if cfg.method == "slerp" else base
  models_ = tuned if b is not None else [base, tuned[0]]
  inputs = [merging.PytreeSource(m) for m in models_]
  base_in = None if b is None else merging.PytreeSource(b)
  out = merging.PytreeSource(merging.merge_pytrees(cfg, b, models_))
  # A kernel and a norm of the stack (each layer on its own), and an unstacked tensor.
  for path in (("blocks", "self_attn", "q_proj", "kernel"),
               ("blocks", "input_layernorm", "scale"), ("embedding",)):
    name = merging.path_str(path)
    xs = [m.get(path) for m in inputs]
    base_t = None if base_in is None else base_in.get(path)
    whole = np.asarray(merging.merge_tensor(cfg, path, xs, base_t))
    want = per_layer_reference(cfg, name, xs, base_t) if name in stacked else whole
    np.testing.assert_allclose(np.asarray(out.get(path)), want, rtol=1e-5, atol=1e-6,
                               err_msg=name)
    if name in stacked:  # the stack merged as one tensor is another merge
      assert np.max(np.abs(whole - want)) > 1e-4, name


def test_layer_axes_disagreements_and_unknown_names_raise(tiny_llama_states):
  base, tuned = tiny_llama_states
  cfg = MergeConfig("ties", density=0.5)
  path = ("blocks", "mlp", "up_proj", "kernel")
  xs = [merging.PytreeSource(m).get(path) for m in tuned]
  base_t = merging.PytreeSource(base).get(path)
  # A source without metadata says nothing: the others' stacked axes count.
  plain = merging.to_pytree(merging.PytreeSource(tuned[0]))
  out = merging.merge_pytrees(cfg, base, [plain, tuned[1]])
  np.testing.assert_array_equal(
      np.asarray(out["blocks"]["mlp"]["up_proj"]["kernel"]),
      np.asarray(merging.merge_tensor(cfg, path, xs, base_t, layer_axes=(0,))))
  # Explicit layer axes win over the sources' metadata: none given, stacks merge whole.
  out = merging.merge_pytrees(cfg, base, tuned, layer_axes={})
  np.testing.assert_array_equal(np.asarray(out["blocks"]["mlp"]["up_proj"]["kernel"][...]),
                                np.asarray(merging.merge_tensor(cfg, path, xs, base_t)))
  with pytest.raises(ValueError, match="layer_axes names tensors the models lack"):
    merging.merge_pytrees(cfg, base, tuned, layer_axes={"blocks/nope": (0,)})

  class Lying(merging.PytreeSource):
    def layer_axes(self, path):
      return ()

  with pytest.raises(ValueError, match="disagree on the stacked layer axes"):
    merging.merge(cfg, merging.PytreeSource(base),
                  [Lying(tuned[0]), merging.PytreeSource(tuned[1])], merging.PytreeSink())


# ---------------------------------------------------------------- orbax and sharding


def test_orbax_checkpoint_source_reads_one_array_at_a_time(tmp_path):
  from memdyn_jax.train import checkpoints

  class M(nnx.Module):
    def __init__(self, seed):
      self.layers = nnx.List([nnx.Linear(4, 4, rngs=nnx.Rngs(seed + i)) for i in range(2)])

  states = [nnx.state(M(s), nnx.Param) for s in (0, 10)]
  mngr = checkpoints.make_manager(str(tmp_path), async_save=False)
  for step, st in zip((1, 2), states):
    checkpoints.save_checkpoint(mngr, step, params=st, opt_state={"n": jnp.zeros(1)}, rngs={},
                                meta={"step": step})
  mngr.wait_until_finished()
  mngr.close()
  sources = [merging.OrbaxCheckpointSource(str(tmp_path), s) for s in (1, 2)]
  names = [merging.path_str(p) for p in sources[0].paths()]
  assert sorted(names) == sorted(merging.path_str(p)
                                 for p in merging.PytreeSource(states[0]).paths())
  np.testing.assert_array_equal(sources[1].get(("layers", 1, "kernel")),
                                states[1]["layers"][1]["kernel"][...])
  # No run.json / model_config.json: the model's structure is unknown (merged whole).
  assert sources[0].layer_axes(("layers", 1, "kernel")) is None
  # Merge straight from the checkpoints into the nnx State layout.
  sink = merging.PytreeSink(template=states[0])
  merging.merge(MergeConfig("linear"), None, sources, sink)
  out = sink.result()
  want = merging.merge_pytrees(MergeConfig("linear"), None, states)
  for got, ref in zip(jax.tree.leaves(out), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-6)
  for s in sources:
    s.close()
  with pytest.raises(ValueError, match="no checkpoint at step 7"):
    merging.OrbaxCheckpointSource(str(tmp_path), 7)
  (tmp_path / "run.json").write_text(json.dumps({"config": {"lora": True}}))
  with pytest.raises(ValueError, match="LoRA"):
    merging.OrbaxCheckpointSource(str(tmp_path), 1)


_SHARDED = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P, AxisType
    from memdyn_jax import merging
    from memdyn_jax.merging import MergeConfig
    assert jax.device_count() == 4
    mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(AxisType.Auto,) * 2)
    sh = NamedSharding(mesh, P("a", "b"))
    rng = np.random.default_rng(0)
    base = {"w": rng.normal(size=(8, 6)).astype(np.float32)}
    models = [{"w": base["w"] + rng.normal(size=(8, 6)).astype(np.float32)} for _ in range(2)]
    put = lambda t: {"w": jax.device_put(jnp.asarray(t["w"], jnp.bfloat16), sh)}
    for cfg, b in [(MergeConfig("ties", density=0.5), base), (MergeConfig("slerp"), None),
                   (MergeConfig("dare_ties", density=0.5), base)]:
      # The base lives on one device: it is moved to the models' sharding.
      base_in = {"w": jnp.asarray(b["w"], jnp.bfloat16)} if b is not None else None
      out = merging.merge_pytrees(cfg, base_in, [put(m) for m in models])["w"]
      assert out.sharding == sh and out.dtype == jnp.bfloat16, (cfg.method, out.sharding)
      ref = merging.merge_pytrees(cfg, base_in, [{"w": jnp.asarray(m["w"], jnp.bfloat16)}
                                                 for m in models])["w"]
      np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    # A stacked tensor, merged per layer, each layer sharded over both mesh axes.
    sh3 = NamedSharding(mesh, P(None, "a", "b"))
    base3 = rng.normal(size=(3, 8, 6)).astype(np.float32)
    xs3 = [base3 + rng.normal(size=(3, 8, 6)).astype(np.float32) for _ in range(2)]
    for cfg, b in [(MergeConfig("ties", density=0.5), base3), (MergeConfig("slerp"), None)]:
      out = merging.merge_tensor(cfg, ("w",), [jax.device_put(x, sh3) for x in xs3], b,
                                 layer_axes=(0,))
      assert out.sharding == sh3, (cfg.method, out.sharding)
      ref = np.stack([merging.merge_tensor(cfg, ("w",), [x[l] for x in xs3],
                                           None if b is None else b[l]) for l in range(3)])
      np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-6, atol=1e-6)
    print("OK")
""")


def test_sharded_inputs_keep_sharding_and_values():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SHARDED], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr[-3000:]
