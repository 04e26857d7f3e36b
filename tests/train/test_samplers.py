"""Samplers: epoch coverage, subsets, step counts, MBC frequencies, reweighting, resumption."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from memdyn_jax.train import samplers

_KWARGS = {"uniform": {}, "mbc": {"refresh_steps": 3},
           "memorization_reweight": {"refresh_steps": 3, "alpha": 2.0, "p": 3.0}}


def _make(name, n=20, seed=0, fraction=1.0):
  return samplers.make_sampler(name, n, seed=seed, data_fraction=fraction, **_KWARGS[name])


def _ppl(n, seed=0):
  return 1.0 + np.random.default_rng(seed).uniform(0.0, 6.0, n)


# ----------------------------------------------------------------------------- subsets, steps


def test_subset_size():
  assert samplers.subset_size(10, 1.0) == 10
  assert samplers.subset_size(10, 0.25) == 2  # round(2.5) -> 2 (round half to even)
  assert samplers.subset_size(3, 0.01) == 1  # never empty
  with pytest.raises(ValueError):
    samplers.subset_size(0, 1.0)


def test_select_subset_is_fixed_by_seed_sorted_and_nested():
  full = samplers.select_subset(101, 1.0, seed=3)
  np.testing.assert_array_equal(full, np.arange(101))
  half = samplers.select_subset(101, 0.5, seed=3)
  quarter = samplers.select_subset(101, 0.25, seed=3)
  assert len(half) == 50 and len(quarter) == 25
  np.testing.assert_array_equal(half, samplers.select_subset(101, 0.5, seed=3))
  assert np.all(np.diff(half) > 0)
  assert set(quarter) <= set(half)
  assert not np.array_equal(half, samplers.select_subset(101, 0.5, seed=4))
  for bad in (0.0, -0.5, 1.5):
    with pytest.raises(ValueError, match="data_fraction"):
      samplers.select_subset(10, bad, seed=0)


def test_steps_for():
  assert samplers.steps_for(10, 3, 1) == 4  # the 4th batch spills into epoch 2
  assert samplers.steps_for(10, 5, 2) == 4
  assert samplers.steps_for(10, 5, 0.5) == 1
  assert samplers.steps_for(30, 3, 0.1) == 1  # no extra step from float error
  # Kang et al. on GSM8K (7473 examples, batch 128): 3 full epochs ...
  full = samplers.steps_for(7473, 128, 3)
  assert full == math.ceil(3 * 7473 / 128) == 176
  # ... equal a half subset for 6 epochs and a quarter for 12 when counted in full epochs,
  assert samplers.steps_for(7473, 128, 3, 0.5, train_steps_as_full_epochs=True) == full
  assert samplers.steps_for(7473, 128, 3, 0.25, train_steps_as_full_epochs=True) == full
  # while without the flag epochs count passes over the subset.
  assert samplers.steps_for(7473, 128, 3, 0.5) == math.ceil(3 * 3736 / 128) == 88
  assert samplers.steps_for(7473, 128, 6, 0.5) == math.ceil(6 * 3736 / 128)
  for bad in (dict(batch_size=0, epochs=1), dict(batch_size=4, epochs=0)):
    with pytest.raises(ValueError):
      samplers.steps_for(10, **bad)


# ----------------------------------------------------------------------------- uniform


@pytest.mark.parametrize("fraction", [1.0, 0.5, 0.25])
def test_uniform_draws_every_subset_example_once_per_epoch(fraction):
  sampler = _make("uniform", n=40, seed=1, fraction=fraction)
  subset = samplers.select_subset(40, fraction, seed=1)
  n = len(subset)
  epochs = 5
  batch = 7  # does not divide n: batches straddle epochs
  stream = np.concatenate([sampler.next_indices(batch)
                           for _ in range(math.ceil(epochs * n / batch))])
  orders = [stream[e * n:(e + 1) * n] for e in range(epochs)]
  for e, order in enumerate(orders):
    np.testing.assert_array_equal(np.sort(order), subset)
    np.testing.assert_array_equal(order, sampler.epoch_order(e))
  assert not all(np.array_equal(orders[0], o) for o in orders[1:])  # reshuffled per epoch
  expected = np.zeros(40, np.int64)
  np.add.at(expected, stream, 1)
  np.testing.assert_array_equal(sampler.draw_counts, expected)
  assert sampler.epoch() == len(stream) / n
  assert sampler.loss_weights(stream[:batch]) is None
  assert not sampler.wants_scores(0)


def test_uniform_order_depends_on_seed_only():
  a, b, c = _make("uniform", seed=5), _make("uniform", seed=5), _make("uniform", seed=6)
  np.testing.assert_array_equal(a.next_indices(20), b.next_indices(20))
  assert not np.array_equal(a.next_indices(20), c.next_indices(20))


def test_uniform_update_scores_checks_shape():
  sampler = _make("uniform", n=10, fraction=0.5)
  sampler.update_scores(_ppl(10))
  sampler.update_scores(_ppl(5))
  with pytest.raises(ValueError, match="perplexities"):
    sampler.update_scores(_ppl(7))


# ----------------------------------------------------------------------------- MBC


def test_mbc_draw_frequencies_follow_perplexity():
  n, batch, batches = 25, 64, 500
  sampler = _make("mbc", n=n, seed=2)
  ppl = _ppl(n, seed=1)
  sampler.update_scores(ppl)
  np.testing.assert_allclose(sampler.probabilities(), ppl / ppl.sum())
  for _ in range(batches):
    sampler.next_indices(batch)
  observed = sampler.draw_counts
  total = batch * batches
  assert observed.sum() == total
  expected = total * ppl / ppl.sum()
  chi2 = float(((observed - expected) ** 2 / expected).sum())
  # 99.9% point of chi-square with 24 dof is 51.2; a uniform draw would give ~ 2000 here.
  assert chi2 < 51.2, chi2
  uniform_chi2 = float(((observed - total / n) ** 2 / (total / n)).sum())
  assert uniform_chi2 > 500
  assert sampler.epoch() == total / n


def test_mbc_draws_with_replacement_and_uniform_before_scores():
  sampler = _make("mbc", n=5, seed=0)
  np.testing.assert_allclose(sampler.probabilities(), np.full(5, 0.2))
  batch = sampler.next_indices(20)  # more than N: repeats are unavoidable
  assert len(batch) == 20 and len(np.unique(batch)) <= 5
  for _ in range(400):
    sampler.next_indices(20)
  freq = sampler.draw_counts / sampler.draw_counts.sum()
  np.testing.assert_allclose(freq, 0.2, atol=0.02)


def test_mbc_refresh_schedule_follows_algorithm_1():
  sampler = _make("mbc")
  assert [s for s in range(10) if sampler.wants_scores(s)] == [0, 3, 6, 9]


def test_mbc_subset_scores_by_global_or_subset_index():
  n = 30
  ppl = _ppl(n)
  by_global = _make("mbc", n=n, seed=4, fraction=0.5)
  by_subset = _make("mbc", n=n, seed=4, fraction=0.5)
  subset = by_global.subset
  by_global.update_scores(ppl)
  by_subset.update_scores(ppl[subset])
  np.testing.assert_array_equal(by_global.probabilities(), by_subset.probabilities())
  drawn = np.concatenate([by_global.next_indices(8) for _ in range(50)])
  assert set(drawn) <= set(subset)
  assert np.all(by_global.draw_counts[np.setdiff1d(np.arange(n), subset)] == 0)
  for bad in (np.full(n, np.nan), np.zeros(n), _ppl(n - 1)):
    with pytest.raises(ValueError):
      by_global.update_scores(bad)


# ----------------------------------------------------------------------------- reweighting


def test_reweight_formula_at_known_values():
  raw = samplers.reweight(np.array([1.0, 2.0, 3.0, 5.0]), alpha=2.0, p=3.0)
  np.testing.assert_allclose(raw, [0.0, 0.25, 1.0, 1.0])
  np.testing.assert_allclose(samplers.reweight(np.array([1.5, 4.0]), alpha=1.0, p=2.0), [0.5, 1.0])


def test_reweight_sampler_weights_have_mean_one_over_the_dataset():
  sampler = samplers.make_sampler("memorization_reweight", 4, seed=0, refresh_steps=2,
                                  alpha=2.0, p=3.0)
  np.testing.assert_array_equal(sampler.loss_weights(np.arange(4)), np.ones(4))  # no scores yet
  sampler.update_scores(np.array([1.0, 2.0, 3.0, 5.0]))
  mean = (0 + 0.25 + 1 + 1) / 4
  expected = np.array([0.0, 0.25, 1.0, 1.0]) / mean
  np.testing.assert_allclose(sampler.weights(), expected, rtol=1e-6)
  assert sampler.weights().mean() == pytest.approx(1.0)
  np.testing.assert_allclose(sampler.loss_weights(np.array([3, 0, 3])),
                             expected[[3, 0, 3]], rtol=1e-6)
  assert sampler.loss_weights(np.array([1])).dtype == np.float32
  assert [s for s in range(5) if sampler.wants_scores(s)] == [0, 2, 4]
  sampler.update_scores(np.ones(4))  # everything memorized: no weight survives -> all 1
  np.testing.assert_array_equal(sampler.weights(), np.ones(4))


def test_reweight_sampler_on_a_subset_and_same_order_as_uniform():
  n = 40
  rw = _make("memorization_reweight", n=n, seed=9, fraction=0.5)
  uni = _make("uniform", n=n, seed=9, fraction=0.5)
  for _ in range(7):
    np.testing.assert_array_equal(rw.next_indices(6), uni.next_indices(6))
  rw.update_scores(_ppl(n))
  weights = rw.weights()
  assert weights[rw.subset].mean() == pytest.approx(1.0, rel=1e-6)
  outside = np.setdiff1d(np.arange(n), rw.subset)
  np.testing.assert_array_equal(weights[outside], 1.0)


# ----------------------------------------------------------------------------- resumption


@pytest.mark.parametrize("name", samplers.SAMPLERS)
@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_state_round_trip_gives_identical_future_batches(name, fraction):
  n, batch = 23, 5
  first = _make(name, n=n, seed=11, fraction=fraction)

  def run(sampler, steps):
    out = []
    for s in steps:
      if sampler.wants_scores(s):
        sampler.update_scores(_ppl(n, seed=s))  # stands in for the trainer's scorer
      idx = sampler.next_indices(batch)
      w = sampler.loss_weights(idx)
      out.append((idx, None if w is None else w.copy()))
    return out

  run(first, range(0, 7))  # k batches, crossing an epoch and a score refresh
  saved = json.loads(json.dumps(first.state_dict()))  # must be JSON-serializable
  expected = run(first, range(7, 16))
  restored = _make(name, n=n, seed=11, fraction=fraction)
  restored.load_state_dict(saved)
  got = run(restored, range(7, 16))
  for (i1, w1), (i2, w2) in zip(expected, got):
    np.testing.assert_array_equal(i1, i2)
    if w1 is None:
      assert w2 is None
    else:
      np.testing.assert_array_equal(w1, w2)
  np.testing.assert_array_equal(first.draw_counts, restored.draw_counts)
  assert first.epoch() == restored.epoch()


def test_restoring_state_of_another_configuration_is_an_error():
  state = _make("uniform", seed=1).state_dict()
  with pytest.raises(ValueError, match="seed"):
    _make("uniform", seed=2).load_state_dict(state)
  with pytest.raises(ValueError, match="name"):
    _make("mbc", seed=1).load_state_dict(state)


# ----------------------------------------------------------------------------- factory


@pytest.mark.parametrize("name", samplers.SAMPLERS)
def test_every_sampler_implements_the_protocol(name):
  sampler = _make(name)
  assert isinstance(sampler, samplers.ExampleSampler)
  assert sampler.num_examples == 20 and sampler.draw_counts.shape == (20,)


@pytest.mark.parametrize("name,kwargs,match", [
    ("random", {}, "unknown sampler"),
    ("uniform", {"refresh_steps": 3}, "takes no arguments"),
    ("mbc", {"temperature": 1.0, "refresh_steps": 3}, "takes no arguments"),
    ("mbc", {}, "refresh_steps"),
    ("mbc", {"refresh_steps": 0}, "refresh_steps"),
    ("memorization_reweight", {"refresh_steps": 3}, "p > 1"),
    ("memorization_reweight", {"refresh_steps": 3, "p": 1.0}, "p > 1"),
    ("memorization_reweight", {"refresh_steps": 3, "p": 2.0, "alpha": 0.0}, "alpha"),
])
def test_bad_names_and_arguments(name, kwargs, match):
  with pytest.raises(ValueError, match=match):
    samplers.make_sampler(name, 10, seed=0, **kwargs)


def test_bad_sizes():
  with pytest.raises(ValueError, match="num_examples"):
    samplers.make_sampler("uniform", 0, seed=0)
  with pytest.raises(ValueError, match="data_fraction"):
    samplers.make_sampler("uniform", 10, seed=0, data_fraction=2.0)
  for name in samplers.SAMPLERS:
    with pytest.raises(ValueError, match="batch_size"):
      _make(name).next_indices(0)


@pytest.mark.parametrize("fraction", [1.0, 0.5])
def test_length_grouping_draws_each_example_once_in_batches_of_similar_length(fraction):
  n, batch, k = 96, 8, 4
  lengths = np.random.RandomState(1).randint(10, 200, n)
  kwargs = dict(seed=3, data_fraction=fraction, lengths=lengths, group_batches=k,
                batch_size=batch)
  grouped = samplers.make_sampler("uniform", n, **kwargs)
  plain = samplers.make_sampler("uniform", n, seed=3, data_fraction=fraction)
  per_epoch = len(grouped.subset) // batch
  spread = lambda s: np.mean([np.ptp(lengths[s.next_indices(batch)]) for _ in range(per_epoch)])
  for epoch in range(2):
    order = grouped.epoch_order(epoch)
    assert sorted(order) == sorted(grouped.subset)  # one draw per example per epoch
    assert sorted(order) == sorted(plain.epoch_order(epoch))
    # Each chunk of k batches is the plain permutation's chunk, sorted into batches.
    # Batches are regrouped within chunks of k batches of the plain permutation.
    chunks = {frozenset(plain.epoch_order(epoch)[i:i + k * batch])
              for i in range(0, len(order), k * batch)}
    for i in range(0, len(order), batch):
      assert any(set(order[i:i + batch]) <= c for c in chunks)
  assert spread(grouped) < 0.6 * spread(plain)
  # Deterministic and resumable like the plain sampler.
  again = samplers.make_sampler("uniform", n, **kwargs)
  state = grouped.state_dict()
  again.load_state_dict(state)
  np.testing.assert_array_equal(again.next_indices(batch), grouped.next_indices(batch))
  with pytest.raises(ValueError, match="does not match"):
    plain.load_state_dict(state)
  with pytest.raises(ValueError, match="lengths"):
    samplers.make_sampler("uniform", n, seed=0, group_batches=2, batch_size=4)
