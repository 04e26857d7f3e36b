"""Gradient variance and distance from init of a checkpoint (Kang et al. App. B.1, B.2):
the two training-dynamics baselines PreMemAcc is compared with, measured at evaluation
time while the checkpoint is loaded (`memdyn_jax.evaluation.run` stores them in the
checkpoint's stats).

Distance from init: Σ_d (θ_d − θ0_d)² of every parameter against the base model's (LoRA
runs are compared after merging their adapters). Gradient variance over fixed train
minibatches:

"We calculate the gradient of the model for 5 different minibatches, take the variance
across the 5 samples for each element of each weight matrix, and take the average over
each element of the model weights":

    GV = (1/D) Σ_d (1/(K - ddof)) Σ_k (g^(k)_d - ḡ_d)²,

g^(k) the gradient of the training loss (`train.loss.masked_mean_loss`, the mean NLL of a
minibatch's target tokens) on minibatch k with respect to every `nnx.Param` (LoRA runs are
restored with merged adapters, so this is every weight of the model).

The K minibatches are drawn once from the train examples (seeded, disjoint) and reused for
every checkpoint, so checkpoints are compared on the same data. One jitted program (K
gradients in a `lax.scan`, Welford moments accumulated on device) is compiled per
architecture and minibatch shape and reused across checkpoints; it holds the parameters,
one gradient and two moment buffers, never K gradients at once.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.metrics import baselines
from memdyn_jax.tasks.base import Example, Task
from memdyn_jax.train import loss as loss_lib


@dataclasses.dataclass(frozen=True)
class GradientVarianceConfig:
  """How the gradient variance of a checkpoint is measured.

  Attributes:
    num_minibatches: K, gradients whose element-wise variance is taken (Kang et al.: 5).
    batch_size: examples per minibatch (the paper does not say); sharded over the mesh's
      data axes when they divide it, else replicated.
    seed: draws the K·batch_size examples from the train examples.
    ddof: 0 for the population variance, 1 for the unbiased one.
  """

  num_minibatches: int = baselines.NUM_GRADIENT_MINIBATCHES
  batch_size: int = 8
  seed: int = 0
  ddof: int = 0

  def __post_init__(self):
    if self.num_minibatches < 2:
      raise ValueError(f"num_minibatches must be >= 2, got {self.num_minibatches}")
    if self.batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
    if not 0 <= self.ddof < self.num_minibatches:
      raise ValueError(f"ddof must be in [0, {self.num_minibatches - 1}], got {self.ddof}")


@dataclasses.dataclass(frozen=True, eq=False)
class Minibatches:
  """K tokenized minibatches, each (K, B, T) int32, and the example ids of each row."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  target_mask: np.ndarray
  example_ids: tuple[tuple[str, ...], ...]

  def fingerprint(self) -> str:
    """A short digest of the example ids: which data a stored value was measured on."""
    text = "\n".join(",".join(row) for row in self.example_ids)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def make_minibatches(tokenizer, task: Task, examples: Sequence[Example],
                     config: GradientVarianceConfig, *, max_length: int | None,
                     append_eos: bool = False) -> Minibatches:
  """Draws K disjoint minibatches from `examples` and tokenizes them as in training.

  Rows are padded to one width (one compiled program); over-length targets are truncated.

  Raises:
    ValueError: fewer than K·batch_size examples.
  """
  from memdyn_jax.tasks import tokenize_task_examples

  k, b = config.num_minibatches, config.batch_size
  if len(examples) < k * b:
    raise ValueError(f"gradient variance needs {k} minibatches of {b} = {k * b} train "
                     f"examples, got {len(examples)}")
  order = np.random.RandomState(config.seed).permutation(len(examples))[:k * b]
  chosen = [examples[i] for i in order]
  batch = tokenize_task_examples(tokenizer, task, chosen, max_length=max_length,
                                 overlength="truncate", padding_side="right",
                                 append_eos=append_eos)
  shape = (k, b, batch.input_ids.shape[1])
  return Minibatches(batch.input_ids.reshape(shape), batch.attention_mask.reshape(shape),
                     batch.target_mask.reshape(shape),
                     tuple(tuple(ex.id for ex in chosen[i * b:(i + 1) * b]) for i in range(k)))


@functools.partial(jax.jit, static_argnums=0)
def _moment_sums(graphdef, params, rest, input_ids, attention_mask, target_mask):
  """Per parameter leaf, Σ_d M2_d: the summed squared deviation of the K gradients."""

  def loss(p, ids, mask, targets):
    model = nnx.merge(graphdef, p, rest)
    if hasattr(model, "eval"):
      model.eval()  # no dropout: the gradient is a function of the weights and data only
    return loss_lib.masked_mean_loss(model(ids, mask), ids, targets)

  grad_fn = jax.grad(loss)
  zeros = [jnp.zeros(x.shape, jnp.float32) for x in jax.tree.leaves(params)]

  def body(carry, xs):
    means, m2s = carry
    *batch, k = xs
    grads = [g.astype(jnp.float32) for g in jax.tree.leaves(grad_fn(params, *batch))]
    pairs = [baselines.welford_update(m, s, g, k) for m, s, g in zip(means, m2s, grads)]
    return ([p[0] for p in pairs], [p[1] for p in pairs]), None

  (_, m2s), _ = jax.lax.scan(
      body, (zeros, zeros),
      (input_ids, attention_mask, target_mask, jnp.arange(input_ids.shape[0])))
  return [jnp.sum(m2) for m2 in m2s]


def checkpoint_gradient_variance(model: nnx.Module, minibatches: Minibatches, *,
                                 ddof: int = 0, mesh=None) -> float:
  """GV of `model` over `minibatches` (module docstring).

  Args:
    model: a `memdyn_jax.models` causal LM (sharded on `mesh` when one is given).
    minibatches: from `make_minibatches`.
    ddof: 0 population variance, 1 unbiased.
    mesh: shard each minibatch over the mesh's data axes.

  Returns:
    The gradient variance as a Python float.
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)
  arrays = (minibatches.input_ids, minibatches.attention_mask, minibatches.target_mask)
  if mesh is not None:
    # Rows over the batch axes; replicated when the mesh's data shards do not divide them.
    spec = sharding_lib.logical_to_spec((None, "batch", "length"), shape=arrays[0].shape,
                                        mesh=mesh)
    arrays = tuple(sharding_lib.put_global(np.asarray(a, np.int32), NamedSharding(mesh, spec))
                   for a in arrays)
  with sharding_lib.mesh_context(mesh):
    sums = _moment_sums(graphdef, params, rest, *arrays)
  total = sum(float(s) for s in sharding_lib.to_host(sums))  # float64 over leaves
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  return baselines.variance_from_moments(total, count, len(minibatches.example_ids), ddof)


def settings(config: GradientVarianceConfig, minibatches: Minibatches) -> dict[str, Any]:
  """What a stored value depends on (kept beside it; a different one is recomputed)."""
  return dict(dataclasses.asdict(config), examples=minibatches.fingerprint(),
              width=int(minibatches.input_ids.shape[-1]))


def parameters(model: nnx.Module) -> dict[tuple, jax.Array]:
  """{path: array} of a model's `nnx.Param`s (what distance from init compares)."""
  return {path: v[...] for path, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def distance_from_init(model: nnx.Module, init_params: dict[tuple, jax.Array]) -> float:
  """Σ_d (θ_d − θ0_d)² over the parameters the model shares with `init_params` (the base
  model's `parameters`), one tensor pair at a time (App. B.2).

  Raises:
    ValueError: no parameter path in common (another architecture).
  """
  params = parameters(model)
  shared = [path for path in init_params if path in params]
  if not shared:
    raise ValueError("the checkpoint shares no parameter path with the base model")
  return baselines.squared_distance_leaves((params[p], init_params[p]) for p in shared)
