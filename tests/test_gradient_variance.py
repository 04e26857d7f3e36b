"""Per-checkpoint gradient variance (Kang et al. App. B.1): the on-device Welford program
against per-minibatch gradients fed to metrics.gradient_variance, one compile reused across
checkpoints, and the seeded disjoint minibatches drawn from train examples."""
from __future__ import annotations

import numpy as np
import pytest
from flax import nnx

from memdyn_jax.evaluation import gradient_variance as gv
from memdyn_jax import models
from memdyn_jax.metrics import baselines
from memdyn_jax.tasks import synthetic_arith as sa
from memdyn_jax.train import loss as loss_lib

from conftest import EVAL_TASK_KWARGS

K, B, T = 3, 2, 12


def _tiny_model(seed: int, vocab: int = 64):
  cfg = models.from_hf_config(dict(
      model_type="llama", vocab_size=vocab, hidden_size=32, intermediate_size=64,
      num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, tie_word_embeddings=False))
  return models.build_model(cfg, seed=seed)


def _random_minibatches(seed: int = 0) -> gv.Minibatches:
  rng = np.random.RandomState(seed)
  ids = rng.randint(1, 64, (K, B, T)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[1, 0, 9:] = 0  # a padded row
  targets = np.zeros_like(ids)
  targets[..., 5:] = 1
  targets *= mask
  return gv.Minibatches(ids, mask, targets,
                        tuple(tuple(f"e{k}{b}" for b in range(B)) for k in range(K)))


def _reference(model, mb: gv.Minibatches, ddof: int) -> float:
  """K separate gradients of the training loss, then the metrics-module formula."""
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def loss_fn(p, batch):
    ids, mask, targets = batch
    return loss_lib.masked_mean_loss(nnx.merge(graphdef, p, rest)(ids, mask), ids, targets)

  batches = [(mb.input_ids[k], mb.attention_mask[k], mb.target_mask[k]) for k in range(K)]
  return baselines.gradient_variance(baselines.minibatch_gradients(loss_fn, params, batches),
                                     ddof=ddof)


def test_distance_from_init_is_the_summed_squared_difference_of_the_parameters():
  base, other = _tiny_model(0), _tiny_model(1)
  init = gv.parameters(base)
  assert gv.distance_from_init(base, init) == 0.0
  flat = {k: np.asarray(v, np.float64) for k, v in init.items()}
  expected = sum(float(((np.asarray(v, np.float64) - flat[k]) ** 2).sum())
                 for k, v in gv.parameters(other).items())
  assert gv.distance_from_init(other, init) == pytest.approx(expected, rel=1e-5)
  with pytest.raises(ValueError, match="shares no parameter path"):
    gv.distance_from_init(other, {("elsewhere",): np.zeros(2)})


def test_matches_per_minibatch_gradients_and_compiles_once():
  mb = _random_minibatches()
  first, second = _tiny_model(0), _tiny_model(1)
  before = gv._moment_sums._cache_size()
  got = [gv.checkpoint_gradient_variance(m, mb) for m in (first, second)]
  # Two "checkpoints" of one architecture: one compiled program.
  assert gv._moment_sums._cache_size() == before + 1
  for model, value in zip((first, second), got):
    assert value > 0
    assert value == pytest.approx(_reference(model, mb, ddof=0), rel=1e-4)
  assert got[0] != pytest.approx(got[1], rel=1e-3)  # the weights matter
  unbiased = gv.checkpoint_gradient_variance(first, mb, ddof=1)
  assert unbiased == pytest.approx(got[0] * K / (K - 1), rel=1e-6)


def test_identical_minibatches_have_zero_variance():
  mb = _random_minibatches()
  same = gv.Minibatches(*(np.repeat(a[:1], K, axis=0) for a in
                          (mb.input_ids, mb.attention_mask, mb.target_mask)), mb.example_ids)
  assert gv.checkpoint_gradient_variance(_tiny_model(0), same) == pytest.approx(0.0, abs=1e-12)


def test_minibatches_are_seeded_disjoint_and_tokenized_as_in_training(tokenizer_no_bos):
  task = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS)
  train = task.load("train")
  cfg = gv.GradientVarianceConfig(num_minibatches=3, batch_size=4, seed=1)
  mb = gv.make_minibatches(tokenizer_no_bos, task, train, cfg, max_length=256)
  assert mb.input_ids.shape[:2] == (3, 4) and mb.input_ids.shape == mb.target_mask.shape
  ids = [i for row in mb.example_ids for i in row]
  assert len(set(ids)) == 12 and set(ids) <= {ex.id for ex in train}
  assert (mb.target_mask.sum(axis=-1) > 0).all()  # every row has target tokens
  again = gv.make_minibatches(tokenizer_no_bos, task, train, cfg, max_length=256)
  assert again.example_ids == mb.example_ids and again.fingerprint() == mb.fingerprint()
  other = gv.make_minibatches(tokenizer_no_bos, task, train,
                              gv.GradientVarianceConfig(3, 4, seed=2), max_length=256)
  assert other.fingerprint() != mb.fingerprint()
  settings = gv.settings(cfg, mb)
  assert settings["num_minibatches"] == 3 and settings["examples"] == mb.fingerprint()
  with pytest.raises(ValueError, match="needs 5 minibatches of 3 = 15 train examples"):
    gv.make_minibatches(tokenizer_no_bos, task, train, gv.GradientVarianceConfig(5, 3),
                        max_length=256)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(num_minibatches=1), "num_minibatches"),
    (dict(batch_size=0), "batch_size"),
    (dict(num_minibatches=2, ddof=2), "ddof"),
])
def test_config_validation(kwargs, needle):
  with pytest.raises(ValueError, match=needle):
    gv.GradientVarianceConfig(**kwargs)
