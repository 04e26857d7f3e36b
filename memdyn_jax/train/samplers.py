"""Deterministic, resumable data order: which training examples form each global batch.

Three samplers implement `ExampleSampler`:

- `uniform`: shuffled epochs without replacement (the usual SFT order).
- `mbc`: Ge et al.'s memorization-based curriculum: draws *with* replacement, probability
  proportional to each example's current perplexity.
- `memorization_reweight`: the uniform order plus per-example loss weights that shrink as an
  example is memorized (Ruan et al.'s memorization-aware reweighting).

Everything is pure numpy and derived from the seed and small counters (epoch, position,
batch number), so a sampler's whole state is a small JSON dict: restoring it gives exactly
the batches an uninterrupted run would have drawn. Random streams are
`np.random.default_rng([seed, stream tag, counter])`, independent per purpose.

`data_fraction` < 1 trains on a fixed random subset (`select_subset`): nested across
fractions for one seed (the quarter lies inside the half), returned sorted. All indices the
samplers return, and `draw_counts`, are global example indices in [0, num_examples).
"""
from __future__ import annotations

import math
from typing import Any, Protocol, runtime_checkable

import numpy as np

SAMPLERS = ("uniform", "mbc", "memorization_reweight")

# Stream tags keep the subset, the epoch permutations and the MBC draws independent.
_SUBSET_STREAM = 0
_ORDER_STREAM = 1
_MBC_STREAM = 2
_GROUP_STREAM = 3


@runtime_checkable
class ExampleSampler(Protocol):
  """The data-order contract the trainer codes against."""

  num_examples: int
  draw_counts: np.ndarray

  def next_indices(self, batch_size: int) -> np.ndarray: ...
  def loss_weights(self, indices: np.ndarray) -> np.ndarray | None: ...
  def wants_scores(self, step: int) -> bool: ...
  def update_scores(self, perplexity: np.ndarray) -> None: ...
  def state_dict(self) -> dict: ...
  def load_state_dict(self, state: dict) -> None: ...
  def epoch(self) -> float: ...


def _check_fraction(data_fraction: float) -> float:
  if not 0.0 < data_fraction <= 1.0:
    raise ValueError(f"data_fraction must be in (0, 1], got {data_fraction}")
  return float(data_fraction)


def subset_size(num_examples: int, data_fraction: float) -> int:
  """Examples in a `data_fraction` subset: round(fraction · N), at least 1."""
  if num_examples < 1:
    raise ValueError(f"num_examples must be >= 1, got {num_examples}")
  return max(1, int(round(_check_fraction(data_fraction) * num_examples)))


def select_subset(num_examples: int, data_fraction: float, seed: int) -> np.ndarray:
  """The fixed random training subset (sorted global indices, int64).

  The first round(fraction · N) entries of one seeded permutation, so subsets of one seed
  are nested; fraction 1 gives `arange(N)`.
  """
  n = subset_size(num_examples, data_fraction)
  perm = np.random.default_rng([int(seed), _SUBSET_STREAM]).permutation(num_examples)
  return np.sort(perm[:n]).astype(np.int64)


def steps_for(num_examples: int, batch_size: int, epochs: float, data_fraction: float = 1.0,
              train_steps_as_full_epochs: bool = False) -> int:
  """Optimizer steps for a run: ceil(epochs · examples / batch_size).

  Batches have a fixed size and may straddle epoch boundaries, so this is the fewest steps
  that draw every example `epochs` times (the last batch spills into the next epoch).

  Args:
    num_examples: size N of the full training set.
    batch_size: global batch size.
    epochs: passes to train (may be fractional).
    data_fraction: fraction of the data in the training subset.
    train_steps_as_full_epochs: count `epochs` in passes over the *full* data set (Kang et
      al.): a half subset with epochs=3 trains ceil(3 · N / B) steps, i.e. 6 passes over the
      half, and a quarter 12. Otherwise `epochs` counts passes over the subset.

  Returns:
    The number of steps (>= 1).
  """
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  if not epochs > 0:
    raise ValueError(f"epochs must be > 0, got {epochs}")
  n = subset_size(num_examples, data_fraction)
  examples = num_examples if train_steps_as_full_epochs else n
  # Rounded first so float epochs (0.1 · 30 / 3 = 1.0000000000000002) do not add a step.
  return max(1, math.ceil(round(epochs * examples / batch_size, 9)))


def _check_batch(batch_size: int) -> int:
  if int(batch_size) != batch_size or batch_size < 1:
    raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
  return int(batch_size)


class _Base:
  """Shared bookkeeping: the subset, draw counts, and state-dict identity checks."""

  name = ""

  def __init__(self, num_examples: int, *, seed: int, data_fraction: float = 1.0):
    self.num_examples = int(num_examples)
    self.seed = int(seed)
    self.data_fraction = _check_fraction(data_fraction)
    self.subset = select_subset(self.num_examples, self.data_fraction, self.seed)
    self.draw_counts = np.zeros(self.num_examples, np.int64)
    self.draws = 0  # examples drawn so far (batch_size per batch)

  def _identity(self) -> dict[str, Any]:
    """Constructor arguments a saved state must match (a changed run is an error)."""
    return {"name": self.name, "num_examples": self.num_examples, "seed": self.seed,
            "data_fraction": self.data_fraction}

  def _record(self, indices: np.ndarray) -> np.ndarray:
    np.add.at(self.draw_counts, indices, 1)
    self.draws += len(indices)
    return indices

  def _scores_vector(self, perplexity: np.ndarray) -> np.ndarray:
    """Perplexities of the subset examples, in `subset` order, validated.

    Accepts all N examples (indexed by global index) or just the subset (in `subset`
    order); the two agree when the subset is everything.
    """
    ppl = np.asarray(perplexity, np.float64).reshape(-1)
    if ppl.shape[0] == self.num_examples:
      ppl = ppl[self.subset]
    elif ppl.shape[0] != len(self.subset):
      raise ValueError(f"expected {self.num_examples} (all) or {len(self.subset)} (subset) "
                       f"perplexities, got {ppl.shape[0]}")
    if not np.all(np.isfinite(ppl)) or np.any(ppl <= 0):
      raise ValueError("perplexities must be finite and > 0")
    return ppl

  def epoch(self) -> float:
    """Examples drawn / size of the training (sub)set."""
    return self.draws / len(self.subset)

  def state_dict(self) -> dict:
    return {**self._identity(), "draws": self.draws, "draw_counts": self.draw_counts.tolist()}

  def load_state_dict(self, state: dict) -> None:
    expected = self._identity()
    got = {k: state.get(k) for k in expected}
    if got != expected:
      diff = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
      raise ValueError(f"sampler state does not match this sampler (saved, current): {diff}")
    counts = np.asarray(state["draw_counts"], np.int64)
    if counts.shape != (self.num_examples,):
      raise ValueError(f"draw_counts has shape {counts.shape}, expected ({self.num_examples},)")
    self.draw_counts = counts
    self.draws = int(state["draws"])


class UniformSampler(_Base):
  """Shuffled epochs over the subset, a fresh permutation per epoch.

  Epoch e's order is `subset[permutation]` from `default_rng([seed, 1, e])`, so the state is
  just (epoch, position). A batch that crosses the end of an epoch takes the rest of that
  epoch and continues with the next epoch's order: batch size stays fixed, every example
  is drawn exactly once per epoch, and `epoch()` is fractional.

  Length grouping (`group_batches` k > 0, with the examples' `lengths` and `batch_size`),
  like HF Trainer's `group_by_length`: the permutation is cut into chunks of k batches,
  each chunk is sorted by length into k batches of similar length, and the batches are
  shuffled again (`default_rng([seed, 3, e])`), so short and long batches interleave and
  each batch pads to less. Still exactly one draw per example per epoch.
  """

  name = "uniform"

  def __init__(self, num_examples: int, *, seed: int, data_fraction: float = 1.0,
               lengths: np.ndarray | None = None, group_batches: int = 0,
               batch_size: int = 0):
    super().__init__(num_examples, seed=seed, data_fraction=data_fraction)
    self.group_batches = int(group_batches)
    self.batch_size = int(batch_size)
    self.lengths = None
    if self.group_batches:
      if self.group_batches < 0 or self.batch_size < 1 or lengths is None:
        raise ValueError("length grouping needs group_batches > 0, batch_size >= 1 and the "
                         "examples' lengths")
      self.lengths = np.asarray(lengths).reshape(-1)
      if self.lengths.shape != (self.num_examples,):
        raise ValueError(f"expected {self.num_examples} lengths, got {self.lengths.shape[0]}")
    self.epoch_index = 0
    self.position = 0
    self._order_cache: tuple[int, np.ndarray] | None = None

  def _identity(self) -> dict[str, Any]:
    return {**super()._identity(), "group_batches": self.group_batches,
            "batch_size": self.batch_size}

  def load_state_dict(self, state: dict) -> None:
    super().load_state_dict(state)
    self.epoch_index = int(state["epoch_index"])
    self.position = int(state["position"])

  def epoch_order(self, epoch: int) -> np.ndarray:
    """Global indices of epoch `epoch` in the order they are drawn."""
    if self._order_cache is None or self._order_cache[0] != epoch:
      perm = np.random.default_rng([self.seed, _ORDER_STREAM, int(epoch)]).permutation(
          len(self.subset))
      order = self.subset[perm]
      if self.group_batches:
        order = self._grouped(order, epoch)
      self._order_cache = (epoch, order)
    return self._order_cache[1]

  def _grouped(self, order: np.ndarray, epoch: int) -> np.ndarray:
    chunk = self.group_batches * self.batch_size
    batches = []
    for start in range(0, len(order), chunk):
      part = order[start:start + chunk]
      part = part[np.argsort(-self.lengths[part], kind="stable")]
      batches += [part[i:i + self.batch_size] for i in range(0, len(part), self.batch_size)]
    shuffle = np.random.default_rng([self.seed, _GROUP_STREAM, int(epoch)]).permutation(
        len(batches))
    return np.concatenate([batches[i] for i in shuffle])

  def next_indices(self, batch_size: int) -> np.ndarray:
    need = _check_batch(batch_size)
    parts = []
    while need:
      order = self.epoch_order(self.epoch_index)
      take = order[self.position:self.position + need]
      parts.append(take)
      need -= len(take)
      self.position += len(take)
      if self.position == len(order):
        self.epoch_index, self.position = self.epoch_index + 1, 0
    return self._record(np.concatenate(parts))

  def loss_weights(self, indices: np.ndarray) -> np.ndarray | None:
    return None

  def wants_scores(self, step: int) -> bool:
    return False

  def update_scores(self, perplexity: np.ndarray) -> None:
    """Validated and ignored: the uniform order does not depend on perplexity."""
    self._scores_vector(perplexity)

  def state_dict(self) -> dict:
    return {**super().state_dict(), "epoch_index": self.epoch_index, "position": self.position}


def _check_refresh(refresh_steps: int | None, name: str) -> int:
  if refresh_steps is None:
    raise ValueError(f"sampler {name!r} needs refresh_steps (steps between perplexity refreshes)")
  if int(refresh_steps) != refresh_steps or refresh_steps < 1:
    raise ValueError(f"refresh_steps must be a positive integer, got {refresh_steps}")
  return int(refresh_steps)


class MBCSampler(_Base):
  """Ge et al.'s Memorization-Based Curriculum (Section 3, Algorithm 1).

  Every `refresh_steps` steps (`wants_scores(step)` is `step % refresh_steps == 0`, step 0
  included: Algorithm 1's `if i % k == 0`), the trainer scores every training example's
  perplexity with the current parameters. Batches are then drawn *with replacement* from
  the multinomial

      P(i) = ppl_i / sum_j ppl_j      over the training (sub)set,

  Ge et al.'s "probability ... inversely proportional to its memorization value", with
  perplexity as the memorization proxy (higher perplexity = less memorized). The paper uses
  no temperature or power, so none is applied. An example may appear several times in one
  batch. Before the first scores arrive draws are uniform with replacement. There are no
  epochs: `epoch()` is draws / subset size. Batch b is drawn from
  `default_rng([seed, 2, b])`, and the state holds the current perplexities, so resuming
  reproduces the draws.
  """

  name = "mbc"

  def __init__(self, num_examples: int, *, seed: int, data_fraction: float = 1.0,
               refresh_steps: int | None = None):
    super().__init__(num_examples, seed=seed, data_fraction=data_fraction)
    self.refresh_steps = _check_refresh(refresh_steps, self.name)
    self.batches = 0
    self.scores: np.ndarray | None = None  # perplexities in subset order

  def _identity(self) -> dict[str, Any]:
    return {**super()._identity(), "refresh_steps": self.refresh_steps}

  def probabilities(self) -> np.ndarray:
    """Current draw probability of each subset example (in `subset` order)."""
    if self.scores is None:
      return np.full(len(self.subset), 1.0 / len(self.subset))
    return self.scores / self.scores.sum()

  def next_indices(self, batch_size: int) -> np.ndarray:
    batch_size = _check_batch(batch_size)
    rng = np.random.default_rng([self.seed, _MBC_STREAM, self.batches])
    picks = rng.choice(len(self.subset), size=batch_size, replace=True, p=self.probabilities())
    self.batches += 1
    return self._record(self.subset[picks])

  def loss_weights(self, indices: np.ndarray) -> np.ndarray | None:
    return None

  def wants_scores(self, step: int) -> bool:
    return step % self.refresh_steps == 0

  def update_scores(self, perplexity: np.ndarray) -> None:
    self.scores = self._scores_vector(perplexity)

  def state_dict(self) -> dict:
    return {**super().state_dict(), "batches": self.batches,
            "scores": None if self.scores is None else self.scores.tolist()}

  def load_state_dict(self, state: dict) -> None:
    super().load_state_dict(state)
    self.batches = int(state["batches"])
    self.scores = None if state["scores"] is None else np.asarray(state["scores"], np.float64)


def reweight(perplexity: np.ndarray, *, alpha: float, p: float) -> np.ndarray:
  """Raw memorization-aware weights min(1, (ppl - 1) / (p - 1)) ** alpha (not normalized).

  ppl = 1 (perfectly memorized) gives 0; ppl >= p gives 1; in between the weight grows as
  ((ppl - 1) / (p - 1)) ** alpha.
  """
  ppl = np.asarray(perplexity, np.float64)
  ratio = np.clip((ppl - 1.0) / (p - 1.0), 0.0, 1.0)  # ppl < 1 cannot occur; clip anyway
  return ratio ** alpha


class MemorizationReweightSampler(UniformSampler):
  """Uniform order plus memorization-aware loss weights (Ruan et al., 2025, mitigation).

  Every `refresh_steps` steps (`step % refresh_steps == 0`, step 0 included) the trainer
  scores every training example's perplexity ppl_i; each subset example then gets

      r_i = min(1, (ppl_i - 1) / (p - 1)) ** alpha
      w_i = r_i / mean_{j in subset}(r_j)

  i.e. renormalized to mean 1 over the training (sub)set, not per batch: an example's
  weight stays fixed between refreshes and does not depend on its batch-mates, a batch of
  memorized examples keeps small weights, and the expected batch-mean weight under the
  uniform order is 1 (the loss scale matches unweighted training on average). If every
  r_i is 0 (all perplexities exactly 1) all weights are 1. Before the first scores arrive
  all weights are 1. The batch order is exactly the uniform sampler's for the same seed.

  Args:
    alpha: exponent α > 0 (larger shrinks memorized examples' weights faster).
    p: perplexity threshold p > 1 at and above which an example counts as unmemorized.
  """

  name = "memorization_reweight"

  def __init__(self, num_examples: int, *, seed: int, data_fraction: float = 1.0,
               refresh_steps: int | None = None, alpha: float = 1.0, p: float | None = None):
    super().__init__(num_examples, seed=seed, data_fraction=data_fraction)
    self.refresh_steps = _check_refresh(refresh_steps, self.name)
    if p is None or not p > 1.0:
      raise ValueError(f"memorization_reweight needs a perplexity threshold p > 1, got {p}")
    if not alpha > 0:
      raise ValueError(f"memorization_reweight needs alpha > 0, got {alpha}")
    self.alpha = float(alpha)
    self.p = float(p)
    self.scores: np.ndarray | None = None  # perplexities in subset order
    self._weights = np.ones(self.num_examples, np.float32)  # by global index

  def _identity(self) -> dict[str, Any]:
    return {**super()._identity(), "refresh_steps": self.refresh_steps, "alpha": self.alpha,
            "p": self.p}

  def _set_scores(self, scores: np.ndarray | None) -> None:
    self.scores = scores
    self._weights = np.ones(self.num_examples, np.float32)
    if scores is not None:
      raw = reweight(scores, alpha=self.alpha, p=self.p)
      mean = raw.mean()
      if mean > 0:
        self._weights[self.subset] = (raw / mean).astype(np.float32)

  def weights(self) -> np.ndarray:
    """Current loss weight of every example, by global index (1 outside the subset)."""
    return self._weights.copy()

  def loss_weights(self, indices: np.ndarray) -> np.ndarray | None:
    return self._weights[np.asarray(indices, np.int64)]

  def wants_scores(self, step: int) -> bool:
    return step % self.refresh_steps == 0

  def update_scores(self, perplexity: np.ndarray) -> None:
    self._set_scores(self._scores_vector(perplexity))

  def state_dict(self) -> dict:
    return {**super().state_dict(),
            "scores": None if self.scores is None else self.scores.tolist()}

  def load_state_dict(self, state: dict) -> None:
    super().load_state_dict(state)
    self._set_scores(None if state["scores"] is None
                     else np.asarray(state["scores"], np.float64))


_CLASSES = {"uniform": UniformSampler, "mbc": MBCSampler,
            "memorization_reweight": MemorizationReweightSampler}
_KWARGS = {"uniform": ("lengths", "group_batches", "batch_size"), "mbc": ("refresh_steps",),
           "memorization_reweight": ("refresh_steps", "alpha", "p")}


def make_sampler(name: str, num_examples: int, *, seed: int, data_fraction: float = 1.0,
                 **kwargs) -> ExampleSampler:
  """Builds the sampler `name` ("uniform", "mbc" or "memorization_reweight").

  Args:
    name: sampler name.
    num_examples: N, the training set size.
    seed: seeds the subset, the epoch orders and the MBC draws.
    data_fraction: train on a fixed random subset of this fraction (see `select_subset`).
    **kwargs: `mbc`: refresh_steps; `memorization_reweight`: refresh_steps, alpha, p.

  Raises:
    ValueError: unknown name, unexpected or invalid arguments.
  """
  if name not in _CLASSES:
    raise ValueError(f"unknown sampler {name!r}; known: {list(SAMPLERS)}")
  unexpected = sorted(set(kwargs) - set(_KWARGS[name]))
  if unexpected:
    raise ValueError(f"sampler {name!r} takes no arguments {unexpected}; "
                     f"it takes {list(_KWARGS[name])}")
  if int(num_examples) != num_examples or num_examples < 1:
    raise ValueError(f"num_examples must be a positive integer, got {num_examples}")
  return _CLASSES[name](int(num_examples), seed=seed, data_fraction=data_fraction, **kwargs)
