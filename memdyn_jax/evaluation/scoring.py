"""Teacher-forced scoring of given target traces: log-probs, perplexity, exact memorization.

Array level, `score(model, input_ids, attention_mask, target_mask)` returns per-token
arrays and per-row reductions (`ScoreOutput`); `score_logits` is the same computation on
logits already at hand. Text level, `score_texts` tokenizes (prompt, target) pairs with
`memdyn_jax.tasks.tokenize` -- the trainer's convention, so the prompt/target boundary is
the one trained on:

    ids = [BOS if the tokenizer adds one] + tok(prompt) + tok(target) [+ EOS if asked]
    target_mask = 1 exactly on the target tokens

Conventions (all positions are slots of the padded (B, T) batch):
  * token t is *predicted* when it and token t-1 are both real (attention mask 1); the
    first real token of a row has no prediction. Left or right padding both work.
  * `token_logprobs[:, t] = log p(x_t | x_<t)` on predicted target tokens, 0 elsewhere.
  * exact memorization (Ge et al., 2023, eq. 1) is the fraction of tokens whose argmax
    prediction equals the token: over the target ("response") tokens, and over every
    predicted token of the sequence ("full": instruction and response).
  * a row with no predicted target token has NaN mean / perplexity / memorization, so an
    empty target can never pass for a perfect score.

The jitted core takes `nnx.split(model)`: the graph definition is a static argument and
the weights an ordinary pytree, so every checkpoint of a sweep with the same architecture
reuses one compiled program per (batch, length) shape. `score_texts` pads to a bounded set
of length buckets (`default_length_buckets`) with a fixed batch size, so a sweep compiles
at most one program per bucket.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.errors import ContextLengthError
from memdyn_jax.tasks import tokenize


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ScoreOutput:
  """Per-token arrays (B, T) and per-row reductions (B,) of a teacher-forced pass.

  Attributes:
    token_logprobs: log p(x_t | x_<t) on scored target tokens, 0 elsewhere.
    argmax_correct: the argmax prediction at t-1 equals x_t (False where not predicted).
    entropy: entropy (nats) of the predictive distribution for x_t (0 where not predicted).
    target_mask: tokens actually scored: target_mask & predicted.
    predicted_mask: tokens that have a real predecessor (see the module docstring).
    n_target: number of scored target tokens per row.
    sum_logprob: sum of target log-probs.
    mean_logprob: mean target log-prob (NaN without targets).
    perplexity: exp(-mean_logprob).
    exact_memorization: fraction of target tokens predicted by argmax (response only).
    exact_memorization_full: the same over every predicted token (prompt and response).
    mean_entropy: mean predictive entropy over target tokens.
  """

  token_logprobs: jax.Array
  argmax_correct: jax.Array
  entropy: jax.Array
  target_mask: jax.Array
  predicted_mask: jax.Array
  n_target: jax.Array
  sum_logprob: jax.Array
  mean_logprob: jax.Array
  perplexity: jax.Array
  exact_memorization: jax.Array
  exact_memorization_full: jax.Array
  mean_entropy: jax.Array


def token_statistics(logits: jax.Array, labels: jax.Array
                     ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(log p(label), entropy, argmax == label) of each row of `logits` (..., V), float32.

  Two passes over V, fused by XLA: the max, then the exponentials' sum, their logit-weighted
  sum and the earlier ties. With s1 = sum exp(l - max) and s2 = sum exp(l - max) (l - max):
  logsumexp = max + log s1 and entropy = log s1 - s2 / s1. `argmax == label` keeps argmax's
  first-index tie rule: the label's logit is the max and no earlier entry reaches it.
  """
  lg = logits.astype(jnp.float32)
  labels = labels[..., None]
  mx = jnp.max(lg, axis=-1, keepdims=True)
  shifted = lg - mx
  e = jnp.exp(shifted)
  s1 = jnp.sum(e, axis=-1)
  s2 = jnp.sum(e * shifted, axis=-1)
  picked = jnp.take_along_axis(lg, labels, axis=-1)
  vocab = jax.lax.broadcasted_iota(jnp.int32, lg.shape, lg.ndim - 1)
  earlier_max = jnp.any((lg == mx) & (vocab < labels), axis=-1)
  log_s1 = jnp.log(s1)
  logprob = (picked - mx)[..., 0] - log_s1
  return logprob, log_s1 - s2 / s1, (picked == mx)[..., 0] & ~earlier_max


def _score_output(logprob: jax.Array, entropy: jax.Array, hit: jax.Array,
                  attention_mask: jax.Array, target_mask: jax.Array) -> ScoreOutput:
  """A ScoreOutput from the statistics (B, T - 1) of tokens 1..T-1 (`token_statistics`)."""
  b = attention_mask.shape[0]
  valid = attention_mask.astype(bool)
  no_pred = jnp.zeros((b, 1), bool)
  predicted = jnp.concatenate([no_pred, valid[:, 1:] & valid[:, :-1]], axis=1)
  targets = target_mask.astype(bool) & predicted

  pad = lambda x: jnp.concatenate([jnp.zeros((b, 1), x.dtype), x], axis=1)
  token_logprobs = jnp.where(targets, pad(logprob), 0.0)
  argmax_correct = pad(hit) & predicted
  entropy = jnp.where(predicted, pad(entropy), 0.0)

  n_target = targets.sum(axis=1)
  n_pred = predicted.sum(axis=1)
  ratio = lambda num, den: jnp.where(den > 0, num / jnp.maximum(den, 1), jnp.nan)
  sum_logprob = token_logprobs.sum(axis=1)
  mean_logprob = ratio(sum_logprob, n_target)
  return ScoreOutput(
      token_logprobs=token_logprobs,
      argmax_correct=argmax_correct,
      entropy=entropy,
      target_mask=targets,
      predicted_mask=predicted,
      n_target=n_target.astype(jnp.int32),
      sum_logprob=sum_logprob,
      mean_logprob=mean_logprob,
      perplexity=jnp.exp(-mean_logprob),
      exact_memorization=ratio((argmax_correct & targets).sum(axis=1), n_target),
      exact_memorization_full=ratio(argmax_correct.sum(axis=1), n_pred),
      mean_entropy=ratio(jnp.where(targets, entropy, 0.0).sum(axis=1), n_target),
  )


def score_logits(logits: jax.Array, input_ids: jax.Array, attention_mask: jax.Array,
                 target_mask: jax.Array) -> ScoreOutput:
  """Scores `input_ids` under next-token `logits` (B, T, V); pure, jit-able.

  Args:
    logits: (B, T, V) logits; position t predicts token t + 1.
    input_ids: (B, T) token ids.
    attention_mask: (B, T) 1 on real tokens, 0 on padding.
    target_mask: (B, T) 1 on the tokens to score.

  Returns:
    A ScoreOutput (module docstring for the conventions).
  """
  stats = token_statistics(logits[:, :-1], input_ids[:, 1:])
  return _score_output(*stats, attention_mask, target_mask)


# Logits are made and reduced this many bytes at a time (B x chunk x V float32): a
# slice that stays near the caches instead of a B x T x V array written and read back
# five times (at 16 x 256 x 49152 that array is 805 MB, and its passes took longer than
# the whole forward on CPU).
LOGITS_CHUNK_BYTES = 16 << 20


def sequence_chunk(batch: int, length: int, vocab: int,
                   chunk_bytes: int = LOGITS_CHUNK_BYTES) -> int:
  """The largest divisor of `length` whose (batch, chunk, vocab) float32 logits fit in
  `chunk_bytes` (at least 1)."""
  if min(batch, length, vocab, chunk_bytes) < 1:
    raise ValueError(f"batch {batch}, length {length}, vocab {vocab} and chunk_bytes "
                     f"{chunk_bytes} must all be positive")
  fits = max(1, chunk_bytes // (4 * batch * vocab))
  return max(d for d in range(1, min(fits, length) + 1) if length % d == 0)


def _check_batch_shapes(input_ids, attention_mask, target_mask) -> None:
  shapes = [np.shape(x) for x in (input_ids, attention_mask, target_mask)]
  if len(set(shapes)) != 1 or len(shapes[0]) != 2:
    raise ValueError(f"input_ids, attention_mask and target_mask must share one (B, T) shape, "
                     f"got {shapes}")


def score_model(model: nnx.Module, input_ids: jax.Array, attention_mask: jax.Array,
                target_mask: jax.Array, *, chunk_bytes: int = LOGITS_CHUNK_BYTES) -> ScoreOutput:
  """`score_logits(model(input_ids, attention_mask), ...)` without the (B, T, V) logits:
  the LM head and `token_statistics` run over slices of the sequence (`sequence_chunk`).
  Pure, jit-able; the same numbers up to float rounding."""
  _check_batch_shapes(input_ids, attention_mask, target_mask)
  b, t = input_ids.shape
  hidden = model.hidden_states(input_ids, attention_mask)
  labels = jnp.concatenate([input_ids[:, 1:], jnp.zeros((b, 1), input_ids.dtype)], axis=1)
  c = sequence_chunk(b, t, model.cfg.vocab_size, chunk_bytes)
  # (B, T, ...) -> (T / c, B, c, ...): lax.map walks the chunks one at a time.
  chunks = lambda x: jnp.swapaxes(x.reshape(b, t // c, c, *x.shape[2:]), 0, 1)
  unchunk = lambda x: jnp.swapaxes(x, 0, 1).reshape(b, t)[:, :-1]
  stats = jax.lax.map(lambda xs: token_statistics(model.logits_from_hidden(xs[0]), xs[1]),
                      (chunks(hidden), chunks(labels)))
  return _score_output(*(unchunk(x) for x in stats), attention_mask, target_mask)


@functools.partial(jax.jit, static_argnums=0, static_argnames="chunk_bytes")
def _score_jit(graphdef, state, input_ids, attention_mask, target_mask, *,
               chunk_bytes: int = LOGITS_CHUNK_BYTES) -> ScoreOutput:
  return score_model(nnx.merge(graphdef, state), input_ids, attention_mask, target_mask,
                     chunk_bytes=chunk_bytes)


def lower_score(graphdef, state, input_ids, attention_mask, target_mask, *,
                chunk_bytes: int = LOGITS_CHUNK_BYTES):
  """Lowers the program `score` runs (ahead-of-time compilation and memory planning: the
  arguments may be `jax.ShapeDtypeStruct`s with shardings, int32; `chunk_bytes` as
  `score_model`'s). Returns the `jax.stages.Lowered`."""
  _check_batch_shapes(input_ids, attention_mask, target_mask)
  return _score_jit.lower(graphdef, state, input_ids, attention_mask, target_mask,
                          chunk_bytes=chunk_bytes)


def score(model: nnx.Module, input_ids, attention_mask, target_mask) -> ScoreOutput:
  """Teacher-forced scores of a padded batch under `model` (jitted; see module docstring).

  Args:
    model: a `memdyn_jax.models` causal LM.
    input_ids: (B, T) int token ids (numpy or jax; may be sharded over the batch).
    attention_mask: (B, T) 1 on real tokens.
    target_mask: (B, T) 1 on the tokens to score.

  Returns:
    ScoreOutput of jax arrays.
  """
  _check_batch_shapes(input_ids, attention_mask, target_mask)  # before tracing, on the host
  graphdef, state = nnx.split(model)
  as_int = lambda x: x.astype(jnp.int32) if isinstance(x, jax.Array) else np.asarray(x, np.int32)
  return _score_jit(graphdef, state, as_int(input_ids), as_int(attention_mask), as_int(target_mask))


# ----------------------------------------------------------------------------- batching helpers
# Shared with `memdyn_jax.evaluation.sampling`: bucketed shapes, placement on a mesh, host transfer.


def default_length_buckets(max_length: int, minimum: int = 16) -> tuple[int, ...]:
  """Lengths {1, 1.5} x 2^k from `minimum`, capped by (and ending at) `max_length`.

  Padding to the next bucket wastes at most a third of a batch, while the number of
  compiled programs grows only logarithmically with the longest sequence.
  """
  if max_length < 1:
    raise ValueError(f"max_length must be positive, got {max_length}")
  buckets, base = [], minimum
  while base < max_length:
    buckets += [base, base * 3 // 2]
    base *= 2
  return tuple(sorted({b for b in buckets if b < max_length} | {max_length}))


def bucket_length(length: int, buckets: Sequence[int]) -> int:
  """The smallest bucket >= `length`; ContextLengthError if none fits."""
  for b in sorted(buckets):
    if b >= length:
      return b
  raise ContextLengthError(f"sequence of {length} tokens exceeds the largest length bucket "
                           f"{max(buckets)}")


# ----------------------------------------------------------------------------- text level


@dataclasses.dataclass(frozen=True)
class ScoreRecord:
  """Scores of one (prompt, target) example.

  Attributes:
    index: position of the example in the `prompts` / `targets` lists.
    n_prompt_tokens: tokens before the target (BOS included).
    n_target_tokens: scored target tokens (EOS included when appended).
    sum_logprob, mean_logprob, perplexity, exact_memorization, exact_memorization_full,
    mean_entropy: as in `ScoreOutput`.
    token_logprobs, token_argmax_correct, token_entropy: per target token, with
      `return_tokens=True`; else None.
  """

  index: int
  n_prompt_tokens: int
  n_target_tokens: int
  sum_logprob: float
  mean_logprob: float
  perplexity: float
  exact_memorization: float
  exact_memorization_full: float
  mean_entropy: float
  token_logprobs: np.ndarray | None = None
  token_argmax_correct: np.ndarray | None = None
  token_entropy: np.ndarray | None = None


def score_texts(model: nnx.Module, tokenizer: Any, prompts: Sequence[str],
                targets: Sequence[str], *, batch_size: int = 16, max_length: int | None = None,
                overlength: str = "error", add_bos: bool | None = None, append_eos: bool = False,
                length_buckets: Sequence[int] | None = None, mesh: Mesh | None = None,
                return_tokens: bool = False, joint_target: bool = False) -> list[ScoreRecord]:
  """Scores each target given its prompt, batched into fixed-shape length buckets.

  Args:
    model: a `memdyn_jax.models` causal LM (sharded on `mesh` when one is given).
    tokenizer: the Hugging Face tokenizer the model was trained with.
    prompts: rendered prompts.
    targets: rendered targets (the scored part), same length as `prompts`.
    batch_size: rows per compiled program; must be a multiple of the mesh's data shards.
    max_length: tokens per example; default the model's `max_position_embeddings`.
    overlength: "error" (default), "drop" or "truncate" (`tasks.tokenize`); dropped
      examples get no record.
    add_bos: None = as the tokenizer does; True/False force (as in training).
    append_eos: score an EOS token after each target (as when trained with it).
    length_buckets: padded lengths to use; default `default_length_buckets(max_length)`.
    mesh: shard each batch over the mesh's data axes.
    return_tokens: also return per-target-token arrays.
    joint_target: targets tokenized jointly with their prompts (a chat template's,
      `Task.joint_target`; `tasks.tokenize`).

  Returns:
    One ScoreRecord per kept example, in input order.
  """
  cfg = model.cfg
  limit = max_length or cfg.max_position_embeddings
  if limit > cfg.max_position_embeddings:
    raise ContextLengthError(f"max_length {limit} exceeds the model's "
                             f"max_position_embeddings {cfg.max_position_embeddings}")
  if batch_size < 1 or batch_size % sharding_lib.data_shards(mesh):
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the mesh's "
                     f"{sharding_lib.data_shards(mesh)} data shards")
  buckets = tuple(length_buckets) if length_buckets else default_length_buckets(limit)
  batch = tokenize.tokenize_examples(tokenizer, prompts, targets, limit, overlength,
                                     padding_side="right", add_bos=add_bos, append_eos=append_eos,
                                     joint_target=joint_target)
  if not len(batch.kept_indices):
    return []
  lengths = batch.attention_mask.sum(axis=1)
  n_target_given = batch.target_mask.sum(axis=1)
  # Longest first: rows of similar length share a bucket, so little is padded.
  order = np.argsort(-lengths, kind="stable")

  pending = []
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = bucket_length(int(lengths[rows].max()), buckets)
    arrays = []
    for src in (batch.input_ids, batch.attention_mask, batch.target_mask):
      out = np.zeros((batch_size, width), np.int32)  # filler rows: no real tokens
      cols = min(width, src.shape[1])  # right-padded: a row's content is a prefix
      out[:len(rows), :cols] = src[rows, :cols]
      arrays.append(sharding_lib.put_batch(out, mesh))
    # Dispatch every batch before fetching any: host work overlaps device work.
    with sharding_lib.mesh_context(mesh):
      pending.append((rows, score(model, *arrays)))

  records = []
  for rows, out in pending:
    host = sharding_lib.to_host(out)
    for j, r in enumerate(rows):
      tm = host.target_mask[j]
      records.append(ScoreRecord(
          index=int(batch.kept_indices[r]),
          n_prompt_tokens=int(lengths[r] - n_target_given[r]),
          n_target_tokens=int(host.n_target[j]),
          sum_logprob=float(host.sum_logprob[j]),
          mean_logprob=float(host.mean_logprob[j]),
          perplexity=float(host.perplexity[j]),
          exact_memorization=float(host.exact_memorization[j]),
          exact_memorization_full=float(host.exact_memorization_full[j]),
          mean_entropy=float(host.mean_entropy[j]),
          token_logprobs=host.token_logprobs[j][tm] if return_tokens else None,
          token_argmax_correct=host.argmax_correct[j][tm] if return_tokens else None,
          token_entropy=host.entropy[j][tm] if return_tokens else None,
      ))
  return sorted(records, key=lambda rec: rec.index)

