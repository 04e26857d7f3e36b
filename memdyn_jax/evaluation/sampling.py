"""Batched sampling with a KV cache: `generate` (arrays) and `sample` (text).

Decoding follows HF `generate` with left-padded prompts: positions continue each row's
count of real tokens, logits processors run in HF's order (repetition penalty, then
temperature, top-k, top-p, min-p), and temperature 0 is greedy (the penalty still applies,
as in HF). One prefill program fills a preallocated cache; one decode program runs a
`lax.while_loop` that stops as soon as every row is done. Rows that are done emit `pad_id`.

Randomness: row r = (prompt b, sample j) draws with key
`fold_in(fold_in(key(seed), example_id[b]), j)`, folded with the step index. A prompt's
samples therefore depend only on (seed, example id, sample index) -- not on the batch it
shares, its padding, or the batch size -- and the n samples of a prompt are independent.
Each step draws one uniform per row and inverts the CDF of the processed distribution
(exact, and far cheaper on CPU than a Gumbel draw per vocabulary entry).

Recorded per generated token: `logprobs` and `entropies` of the model's *raw* next-token
distribution (before penalty, temperature and truncation), the quantities memorization
metrics use; the processed distribution only decides which token is drawn.

Stop strings need the tokenizer, so they are checked on the host: with a `stop_fn`, the
decode loop runs in chunks of `check_every` steps and rows whose text contains a stop
string are marked done between chunks (the same compiled program serves every chunk).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.errors import ContextLengthError
from memdyn_jax.evaluation import scoring
from memdyn_jax.models import KVCache
from memdyn_jax.tasks import tokenize

FINISH_LENGTH, FINISH_STOP_TOKEN, FINISH_STOP_STRING = 0, 1, 2
FINISH_REASONS = ("length", "stop_token", "stop_string")  # indexed by the codes above

# Top-p looks for its cutoff among this many most likely tokens and falls back to a full
# sort only when their mass is below top_p (a full vocabulary sort per step is ~50x slower
# on CPU than lax.top_k, and LM nuclei are almost always far smaller).
_TOP_P_CANDIDATES = 256


@dataclasses.dataclass(frozen=True)
class SamplingParams:
  """How to sample. HF `generate` semantics for every knob.

  Attributes:
    temperature: softmax temperature; 0 = greedy (argmax).
    top_p: nucleus mass in (0, 1]; 1 = off.
    top_k: keep the k most likely tokens (ties with the k-th kept, as HF); 0 = off.
    min_p: drop tokens with probability < min_p * max probability; 0 = off.
    repetition_penalty: for tokens already in the prompt or output, positive logits are
      divided by it and negative ones multiplied; 1 = off.
    n: samples per prompt.
    max_new_tokens: generation budget per sample.
    stop: strings that end a completion (text level; the text is cut before them).
    stop_token_ids: token ids that end a completion; None = the tokenizer's EOS (text
      level) or the model config's EOS (array level); () = none.
    seed: PRNG seed.
  """

  temperature: float = 1.0
  top_p: float = 1.0
  top_k: int = 0
  min_p: float = 0.0
  repetition_penalty: float = 1.0
  n: int = 1
  max_new_tokens: int = 256
  stop: tuple[str, ...] = ()
  stop_token_ids: tuple[int, ...] | None = None
  seed: int = 0

  def __post_init__(self):
    # Accept lists / a single string or id, store tuples: params stay hashable.
    stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
    object.__setattr__(self, "stop", stop)
    if self.stop_token_ids is not None:
      ids = self.stop_token_ids
      ids = (ids,) if isinstance(ids, (int, np.integer)) else ids
      object.__setattr__(self, "stop_token_ids", tuple(int(i) for i in ids))
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      raise ValueError(f"temperature must be finite and >= 0, got {self.temperature}")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
    if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
      raise ValueError(f"top_k must be an integer >= 0, got {self.top_k!r}")
    if not 0 <= self.min_p <= 1:
      raise ValueError(f"min_p must be in [0, 1], got {self.min_p}")
    if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
      raise ValueError(f"repetition_penalty must be finite and > 0, got {self.repetition_penalty}")
    if not isinstance(self.n, (int, np.integer)) or self.n < 1:
      raise ValueError(f"n must be an integer >= 1, got {self.n!r}")
    if not isinstance(self.max_new_tokens, (int, np.integer)) or self.max_new_tokens < 1:
      raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
    if any(not isinstance(s, str) or not s for s in stop):
      raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


@dataclasses.dataclass(frozen=True)
class _Program:
  """The static part of SamplingParams: what changes the compiled program."""

  greedy: bool
  top_k: int
  use_top_p: bool
  use_min_p: bool
  use_penalty: bool

  @classmethod
  def of(cls, params: SamplingParams) -> "_Program":
    sampled = not params.greedy
    return cls(greedy=params.greedy, top_k=int(params.top_k) if sampled else 0,
               use_top_p=sampled and params.top_p < 1, use_min_p=sampled and params.min_p > 0,
               use_penalty=params.repetition_penalty != 1)


def _knobs(params: SamplingParams) -> np.ndarray:
  """The float knobs, passed as data so new values do not recompile."""
  return np.asarray([params.temperature or 1.0, params.top_p, params.min_p,
                     params.repetition_penalty], np.float32)


# ----------------------------------------------------------------------------- processors


def _process(logits: jax.Array, seen: jax.Array | None, program: _Program,
             knobs: jax.Array) -> jax.Array:
  """HF's processor chain on (R, V) float32 logits; removed tokens get -inf."""
  temperature, top_p, min_p, penalty = knobs[0], knobs[1], knobs[2], knobs[3]
  if program.use_penalty:
    penalized = jnp.where(logits < 0, logits * penalty, logits / penalty)
    logits = jnp.where(seen, penalized, logits)
  if program.greedy:
    return logits
  logits = logits / temperature
  if program.top_k:
    k = min(program.top_k, logits.shape[-1])
    kth = jax.lax.top_k(logits, k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if program.use_top_p:
    logits = _top_p(logits, top_p)
  if program.use_min_p:
    probs = jax.nn.softmax(logits, axis=-1)
    keep = probs >= min_p * jnp.max(probs, axis=-1, keepdims=True)
    logits = jnp.where(keep, logits, -jnp.inf)
  return logits


def _top_p(logits: jax.Array, top_p: jax.Array) -> jax.Array:
  """Keeps, per row, the most likely tokens whose mass before them is < top_p (HF's rule
  "remove if the ascending cumulative mass <= 1 - top_p", read from the top)."""
  probs = jax.nn.softmax(logits, axis=-1)

  def cutoff(sorted_desc):  # (R, K) descending -> probability of the last kept token
    before = jnp.cumsum(sorted_desc, axis=-1) - sorted_desc
    n_keep = jnp.maximum(jnp.sum(before < top_p, axis=-1), 1)
    return jnp.take_along_axis(sorted_desc, n_keep[:, None] - 1, axis=-1)

  k = min(_TOP_P_CANDIDATES, probs.shape[-1])
  candidates = jax.lax.top_k(probs, k)[0]
  # The nucleus lies inside the candidates iff their mass reaches top_p (in every row).
  covered = jnp.all(jnp.sum(candidates, axis=-1) >= top_p)
  cut = jax.lax.cond(covered, lambda: cutoff(candidates),
                     lambda: cutoff(-jnp.sort(-probs, axis=-1)))
  return jnp.where(probs >= cut, logits, -jnp.inf)


def process_logits(logits: jax.Array, params: SamplingParams,
                   seen: jax.Array | None = None) -> jax.Array:
  """Applies `params`' logits processors to (R, V) logits, as HF `generate` does.

  Args:
    logits: (R, V) next-token logits.
    params: sampling parameters.
    seen: (R, V) bool, tokens already in each row's prompt/output (repetition penalty).

  Returns:
    (R, V) float32 logits, -inf on removed tokens.
  """
  program = _Program.of(params)
  if program.use_penalty and seen is None:
    raise ValueError("repetition_penalty needs `seen` (tokens already in each row)")
  return _process(jnp.asarray(logits, jnp.float32), seen, program, jnp.asarray(_knobs(params)))


def _draw(logits: jax.Array, keys: jax.Array) -> jax.Array:
  """One token per row from softmax(logits) by inverting the CDF at one uniform per row."""
  probs = jax.nn.softmax(logits, axis=-1)
  cdf = jnp.cumsum(probs, axis=-1)
  u = jax.vmap(lambda k: jax.random.uniform(k, dtype=jnp.float32))(keys)
  # First index whose cdf exceeds u * total: never a zero-probability token.
  tok = jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1)
  return jnp.minimum(tok, logits.shape[-1] - 1).astype(jnp.int32)


def sample_logits(logits: jax.Array, keys: jax.Array, params: SamplingParams,
                  seen: jax.Array | None = None) -> jax.Array:
  """Draws one token per row of (R, V) `logits` under `params` (greedy when temperature 0).

  Args:
    logits: (R, V) next-token logits.
    keys: (R,) PRNG keys, one per row.
    params: sampling parameters.
    seen: (R, V) bool for the repetition penalty.

  Returns:
    (R,) int32 token ids.
  """
  processed = process_logits(logits, params, seen)
  if params.greedy:
    return jnp.argmax(processed, axis=-1).astype(jnp.int32)
  return _draw(processed, keys)


# ----------------------------------------------------------------------------- array level


@dataclasses.dataclass(frozen=True)
class SampleOutput:
  """Generated tokens of B*n rows (row = prompt * n + sample), as numpy arrays.

  Attributes:
    tokens: (B*n, max_new_tokens) int32; the stop token is included; pad_id after the end.
    logprobs: (B*n, max_new_tokens) raw-model log-probs of the tokens (0 after the end).
    entropies: (B*n, max_new_tokens) raw-model entropy at each step (0 after the end).
    lengths: (B*n,) tokens generated (stop token included).
    finish_reason: (B*n,) codes indexing FINISH_REASONS.
  """

  tokens: np.ndarray
  logprobs: np.ndarray
  entropies: np.ndarray
  lengths: np.ndarray
  finish_reason: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class _Loop:
  cache: KVCache
  logits: jax.Array  # (R, V) logits for the next token
  seen: jax.Array | None  # (R, V) tokens in prompt/output, with a repetition penalty
  row_keys: jax.Array  # (R,) PRNG keys
  step: jax.Array
  done: jax.Array  # (R,) bool
  lengths: jax.Array  # (R,) int32
  finish: jax.Array  # (R,) int32
  tokens: jax.Array  # (R, M) int32
  logprobs: jax.Array  # (R, M) float32
  entropies: jax.Array  # (R, M) float32


def _constrain(x: jax.Array, mesh: Mesh | None, axes: tuple[str | None, ...]) -> jax.Array:
  if mesh is None:
    return x
  spec = sharding_lib.logical_to_spec(axes, shape=x.shape, mesh=mesh)
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


@functools.partial(jax.jit, static_argnames=("graphdef", "use_penalty", "n", "max_new", "mesh"))
def _prefill(graphdef, state, prompt_ids, prompt_mask, rng, example_ids, pad_id, *,
             use_penalty: bool, n: int, max_new: int, mesh: Mesh | None) -> _Loop:
  model = nnx.merge(graphdef, state)
  b, p = prompt_ids.shape
  h, cache = model.prefill(prompt_ids, prompt_mask, p + max_new)
  cache = cache.map_kv(lambda x, axes: _constrain(x, mesh, axes))
  logits = model.logits_from_hidden(h[:, -1:])[:, 0]  # left padding: the last slot is real
  # Prefill each prompt once, then copy its cache to its n sample rows.
  rep = lambda x, axis=0: jnp.repeat(x, n, axis=axis) if n > 1 else x
  cache = dataclasses.replace(cache.map_kv(lambda x, axes: rep(x, axes.index("batch"))),
                              key_valid=rep(cache.key_valid),
                              next_pos=rep(cache.next_pos))
  rows = b * n
  sample_idx = jnp.tile(jnp.arange(n), b)
  row_keys = jax.vmap(lambda e, j: jax.random.fold_in(jax.random.fold_in(rng, e), j))(
      rep(example_ids), sample_idx)
  seen = None
  if use_penalty:
    seen = jnp.zeros((b, logits.shape[-1]), bool)
    seen = seen.at[jnp.arange(b)[:, None], prompt_ids].max(prompt_mask.astype(bool))
    seen = rep(seen)
  empty = rep(prompt_mask.sum(axis=1) == 0)  # filler rows: done from the start
  zeros = lambda dtype: jnp.zeros((rows, max_new), dtype)
  return _Loop(cache=cache, logits=rep(logits), seen=seen, row_keys=row_keys,
               step=jnp.int32(0), done=empty, lengths=jnp.zeros((rows,), jnp.int32),
               finish=jnp.full((rows,), FINISH_LENGTH, jnp.int32),
               tokens=jnp.full((rows, max_new), pad_id, jnp.int32),
               logprobs=zeros(jnp.float32), entropies=zeros(jnp.float32))


@functools.partial(jax.jit, static_argnames=("graphdef", "program"), donate_argnames=("loop",))
def _decode(graphdef, state, loop: _Loop, knobs, end_step, stop_ids, pad_id, *,
            program: _Program) -> _Loop:
  """Decodes until step `end_step` or until every row is done. `stop_ids` (S,) int32 and
  `pad_id` are data, so new values reuse the program."""
  model = nnx.merge(graphdef, state)
  max_new = loop.tokens.shape[1]
  rows = jnp.arange(loop.done.shape[0])

  def cond(c: _Loop):
    return (c.step < end_step) & ~jnp.all(c.done)

  def body(c: _Loop) -> _Loop:
    raw = jax.nn.log_softmax(c.logits, axis=-1)
    processed = _process(c.logits, c.seen, program, knobs)
    if program.greedy:
      tok = jnp.argmax(processed, axis=-1).astype(jnp.int32)
    else:
      tok = _draw(processed, jax.vmap(jax.random.fold_in, (0, None))(c.row_keys, c.step))
    active = ~c.done
    tok = jnp.where(active, tok, pad_id)
    logprob = jnp.where(active, raw[rows, tok], 0.0)
    entropy = jnp.where(active, -jnp.sum(jnp.exp(raw) * raw, axis=-1), 0.0)
    stopped = active & jnp.any(tok[:, None] == stop_ids[None, :], axis=1)
    column = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(buf, x[:, None], c.step, axis=1)
    seen = c.seen.at[rows, tok].max(active) if c.seen is not None else None
    logits, cache = model.forward_with_cache(tok[:, None], active[:, None].astype(jnp.int32),
                                             c.cache)
    return _Loop(cache=cache, logits=logits[:, -1], seen=seen, row_keys=c.row_keys,
                 step=c.step + 1, done=c.done | stopped | (c.step + 1 >= max_new),
                 lengths=c.lengths + active, finish=jnp.where(stopped, FINISH_STOP_TOKEN, c.finish),
                 tokens=column(c.tokens, tok), logprobs=column(c.logprobs, logprob),
                 entropies=column(c.entropies, entropy))

  return jax.lax.while_loop(cond, body, loop)


StopFn = Callable[[np.ndarray, np.ndarray], np.ndarray]


def generate(model: nnx.Module, prompt_ids, prompt_mask, params: SamplingParams,
             rng: jax.Array | None = None, *, example_ids: Sequence[int] | None = None,
             stop_fn: StopFn | None = None, check_every: int = 32, pad_id: int | None = None,
             mesh: Mesh | None = None) -> SampleOutput:
  """Samples `params.n` continuations of each left-padded prompt.

  Args:
    model: a `memdyn_jax.models` causal LM (sharded on `mesh` when one is given).
    prompt_ids: (B, P) left-padded prompt ids.
    prompt_mask: (B, P) 1 on real tokens; an all-zero row is a filler row (emits pad only).
    params: sampling parameters (`params.stop` is ignored here; see `stop_fn`).
    rng: PRNG key; default `jax.random.key(params.seed)`.
    example_ids: (B,) ids that seed each prompt's samples; default 0..B-1.
    stop_fn: host callback `(tokens (R, t), lengths (R,)) -> (R,) bool` run every
      `check_every` steps; True marks a row finished with FINISH_STOP_STRING.
    check_every: decode steps between `stop_fn` calls.
    pad_id: emitted after a row ends; default the config's pad, else EOS, else 0.
    mesh: shard rows over the mesh's data axes (B must be a multiple of the data shards).

  Returns:
    SampleOutput with B * n rows, prompt-major.
  """
  cfg = model.cfg
  mask_host = np.asarray(sharding_lib.to_host(prompt_mask))
  if np.shape(prompt_ids) != mask_host.shape or mask_host.ndim != 2:
    raise ValueError(f"prompt_ids {np.shape(prompt_ids)} and prompt_mask {mask_host.shape} "
                     "must share one (B, P) shape")
  b = mask_host.shape[0]
  longest = int(mask_host.sum(axis=1).max(initial=0))
  if longest + params.max_new_tokens > cfg.max_position_embeddings:
    raise ContextLengthError(f"prompt of {longest} tokens + max_new_tokens "
                             f"{params.max_new_tokens} exceeds the model's context window "
                             f"({cfg.max_position_embeddings})")
  if b % sharding_lib.data_shards(mesh):
    raise ValueError(f"{b} prompts do not split over the mesh's {sharding_lib.data_shards(mesh)} "
                     "data shards")
  stop_ids = params.stop_token_ids
  if stop_ids is None:
    eos = cfg.eos_token_id
    stop_ids = () if eos is None else (eos,) if isinstance(eos, int) else tuple(eos)
  if pad_id is None:
    pad_id = next((t for t in (cfg.pad_token_id, *stop_ids) if t is not None), 0)
  example_ids = np.arange(b) if example_ids is None else np.asarray(example_ids)
  if example_ids.shape != (b,):
    raise ValueError(f"example_ids must have shape ({b},), got {example_ids.shape}")
  rng = jax.random.key(params.seed) if rng is None else rng

  graphdef, state = nnx.split(model)
  program = _Program.of(params)
  ints = lambda x: sharding_lib.put_batch(np.asarray(sharding_lib.to_host(x), np.int32), mesh)
  pad = np.int32(pad_id)
  # -1 matches no token; keeps the array non-empty (and its shape common) without stop ids.
  stop_array = np.asarray(stop_ids or (-1,), np.int32)
  with sharding_lib.mesh_context(mesh):
    loop = _prefill(graphdef, state, ints(prompt_ids), ints(prompt_mask), rng,
                    ints(example_ids), pad, use_penalty=program.use_penalty, n=params.n,
                    max_new=params.max_new_tokens, mesh=mesh)
    knobs = _knobs(params)
    chunk = check_every if stop_fn is not None else params.max_new_tokens
    step = 0
    while True:
      step = min(step + chunk, params.max_new_tokens)
      loop = _decode(graphdef, state, loop, knobs, np.int32(step), stop_array, pad,
                     program=program)
      done = sharding_lib.to_host(loop.done)
      if stop_fn is not None and not done.all():
        host = sharding_lib.to_host((loop.tokens, loop.lengths))
        hit = np.asarray(stop_fn(host[0][:, :int(loop.step)], host[1]), bool) & ~done
        if hit.any():
          finish = np.where(hit, FINISH_STOP_STRING, sharding_lib.to_host(loop.finish))
          done = done | hit
          loop = dataclasses.replace(loop, done=sharding_lib.put_batch(done, mesh),
                                     finish=sharding_lib.put_batch(finish.astype(np.int32), mesh))
      if done.all() or step >= params.max_new_tokens:
        break
  host = sharding_lib.to_host((loop.tokens, loop.logprobs, loop.entropies, loop.lengths, loop.finish))
  return SampleOutput(*host[:4], finish_reason=host[4].astype(np.int8))


# ----------------------------------------------------------------------------- text level


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sampled completion.

  Attributes:
    text: decoded text without the stop token (special tokens skipped), cut before the
      first stop string.
    token_ids: generated ids up to the end (stop token included; with a stop string, up
      to the token that completed it).
    logprobs: raw-model log-prob of each token in `token_ids`.
    entropies: raw-model entropy at each step of `token_ids`.
    finish_reason: "length", "stop_token" or "stop_string".
  """

  text: str
  token_ids: tuple[int, ...]
  logprobs: np.ndarray
  entropies: np.ndarray
  finish_reason: str


def lower_prefill(graphdef, state, prompt_ids, prompt_mask, rng, example_ids, pad_id, *,
                  params: SamplingParams, n: int = 1, mesh: Mesh | None = None):
  """Lowers the prefill program `generate` runs for `params` (ahead-of-time compilation and
  memory planning: the arguments may be `jax.ShapeDtypeStruct`s with shardings).

  Returns:
    The `jax.stages.Lowered` prefill; its output is the decode loop state `lower_decode`
    takes.
  """
  return _prefill.lower(graphdef, state, prompt_ids, prompt_mask, rng, example_ids, pad_id,
                        use_penalty=_Program.of(params).use_penalty, n=n,
                        max_new=params.max_new_tokens, mesh=mesh)


def lower_decode(graphdef, state, loop, knobs, end_step, stop_ids, pad_id, *,
                 params: SamplingParams):
  """Lowers the decode program `generate` runs for `params` (see `lower_prefill`); `loop`
  is the prefill's output (abstract), `knobs` the float32 (4,) sampling knobs."""
  return _decode.lower(graphdef, state, loop, knobs, end_step, stop_ids, pad_id,
                       program=_Program.of(params))


def _decode_text(tokenizer, ids) -> str:
  return tokenizer.decode(list(ids), skip_special_tokens=True)


def _first_stop(text: str, stops: Sequence[str]) -> int:
  """Index of the earliest stop string in `text`, or -1."""
  hits = [i for i in (text.find(s) for s in stops) if i >= 0]
  return min(hits) if hits else -1


def _stop_string_fn(tokenizer, stops: Sequence[str]) -> StopFn:
  """Rows (not yet done) whose text so far contains a stop string."""
  def fn(tokens: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    out = np.zeros(len(tokens), bool)
    for r, (row, n) in enumerate(zip(tokens, lengths)):
      out[r] = _first_stop(_decode_text(tokenizer, row[:n]), stops) >= 0
    return out

  return fn


def _completion(tokenizer, ids: np.ndarray, logprobs: np.ndarray, entropies: np.ndarray,
                finish: int, stops: Sequence[str]) -> Completion:
  ids = [int(t) for t in ids]
  body = ids[:-1] if finish == FINISH_STOP_TOKEN else ids
  text = _decode_text(tokenizer, body)
  reason = FINISH_REASONS[FINISH_STOP_TOKEN if finish == FINISH_STOP_TOKEN else FINISH_LENGTH]
  cut = _first_stop(text, stops)
  if cut >= 0:
    text, reason = text[:cut], FINISH_REASONS[FINISH_STOP_STRING]
    # Shortest token prefix whose text contains a stop string (monotone: bisect).
    lo, hi = 1, len(body)
    while lo < hi:
      mid = (lo + hi) // 2
      if _first_stop(_decode_text(tokenizer, body[:mid]), stops) >= 0:
        hi = mid
      else:
        lo = mid + 1
    ids = body[:lo]
  n = len(ids)
  return Completion(text=text, token_ids=tuple(ids), logprobs=logprobs[:n].copy(),
                    entropies=entropies[:n].copy(), finish_reason=reason)


def sample(model: nnx.Module, tokenizer: Any, prompts: Sequence[str], params: SamplingParams, *,
           batch_size: int = 8, add_bos: bool | None = None,
           length_buckets: Sequence[int] | None = None, check_every: int = 32,
           mesh: Mesh | None = None, progress: Callable[[int, int], None] | None = None
           ) -> list[list[Completion]]:
  """Samples `params.n` completions of each prompt.

  Prompts are tokenized with `tasks.tokenize` (BOS as in training, no EOS), sorted by
  length and padded on the left to a length bucket, `batch_size` prompts per program.

  Args:
    model: a `memdyn_jax.models` causal LM.
    tokenizer: its Hugging Face tokenizer.
    prompts: rendered prompts.
    params: sampling parameters; `stop_token_ids=None` means the tokenizer's EOS.
    batch_size: prompts per compiled program (rows = batch_size * n); a multiple of the
      mesh's data shards.
    add_bos: None = as the tokenizer does; True/False force.
    length_buckets: padded prompt lengths; default `scoring.default_length_buckets`.
    check_every: decode steps between stop-string checks.
    mesh: shard rows over the mesh's data axes.
    progress: `progress(prompts_done, tokens_generated)` after each batch of prompts.

  Returns:
    For each prompt, its n Completions.
  """
  cfg = model.cfg
  if batch_size < 1 or batch_size % sharding_lib.data_shards(mesh):
    raise ValueError(f"batch_size {batch_size} must be a positive multiple of the mesh's "
                     f"{sharding_lib.data_shards(mesh)} data shards")
  if not prompts:
    return []
  stop_ids = params.stop_token_ids
  if stop_ids is None:
    stop_ids = () if tokenizer.eos_token_id is None else (tokenizer.eos_token_id,)
    params = dataclasses.replace(params, stop_token_ids=stop_ids)
  pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
  batch = tokenize.tokenize_examples(tokenizer, prompts, [""] * len(prompts), None,
                                     padding_side="left", add_bos=add_bos)
  lengths = batch.attention_mask.sum(axis=1)
  if (lengths == 0).any():
    raise ValueError(f"prompt {int(np.argmin(lengths))} is empty after tokenization")
  window = cfg.max_position_embeddings - params.max_new_tokens
  if lengths.max() > window:
    i = int(np.argmax(lengths))
    raise ContextLengthError(f"prompt {i} has {lengths[i]} tokens; with max_new_tokens "
                             f"{params.max_new_tokens} the model's window "
                             f"({cfg.max_position_embeddings}) allows {max(window, 0)}")
  buckets = tuple(length_buckets) if length_buckets else scoring.default_length_buckets(
      max(window, 1))
  stop_fn = _stop_string_fn(tokenizer, params.stop) if params.stop else None
  order = np.argsort(-lengths, kind="stable")
  width_all = batch.input_ids.shape[1]
  results: list[list[Completion]] = [[] for _ in prompts]
  generated = 0
  for start in range(0, len(order), batch_size):
    rows = order[start:start + batch_size]
    width = scoring.bucket_length(int(lengths[rows].max()), buckets)
    ids = np.full((batch_size, width), pad_id, np.int32)
    mask = np.zeros((batch_size, width), np.int32)
    cols = min(width, width_all)  # left-padded: a row's content is a suffix
    ids[:len(rows), width - cols:] = batch.input_ids[rows, width_all - cols:]
    mask[:len(rows), width - cols:] = batch.attention_mask[rows, width_all - cols:]
    example_ids = np.full(batch_size, -1, np.int64)
    example_ids[:len(rows)] = rows
    out = generate(model, ids, mask, params, example_ids=example_ids, stop_fn=stop_fn,
                   check_every=check_every, pad_id=pad_id, mesh=mesh)
    for j, prompt_index in enumerate(rows):
      for s in range(params.n):
        r = j * params.n + s
        n_tok = int(out.lengths[r])
        results[prompt_index].append(_completion(
            tokenizer, out.tokens[r, :n_tok], out.logprobs[r, :n_tok], out.entropies[r, :n_tok],
            int(out.finish_reason[r]), params.stop))
    if progress is not None:
      generated += int(np.asarray(out.lengths[:len(rows) * params.n]).sum())
      progress(start + len(rows), generated)
  return results
