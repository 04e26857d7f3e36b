"""Data curation by pre-memorization accuracy (Kang et al. Sec. 5.2, Algorithm 1) and the
baselines it is compared with (i.i.d. additions, IFD, difficulty heuristics).

Algorithm 1, for n iterations with PreMemAcc cutoff t:

  D' = {}
  for i = 1..n:
    train a model (from the base model) on D_train + D'
    compute every D_train example's pre-memorization accuracy (PreMemAcc)
    P'_i = the examples whose PreMemAcc is below t
    collect N'_i new examples from P'_i and add them to D'

New examples come from a `Generator` applied to source examples of the original D_train:
fresh problems of the same template or rephrasings (synthetic_arith), a user-supplied jsonl
of rephrasings keyed by example id, or a local model prompted to rephrase. The baselines
add the *same* number of examples per iteration from other source distributions:

  * "iid": every D_train example;
  * "ifd": the top `keep_fraction` of D_train by Instruction-Following Difficulty (Li et
    al.), IFD = ppl(target | question) / ppl(target), under a model fine-tuned
    `ifd_epochs` (2) epochs on the test split (Kang et al. App. C: briefly trained for the
    task, never exposed to D_train; it is not used for evaluation, so nothing leaks);
  * "heuristic": the top `keep_fraction` by a difficulty heuristic: GSM8K the number of
    solution lines, MATH the level, synthetic_arith the number of steps.

`keep_fraction` is the share of D_train kept: Kang et al.'s "top 50 percentile" (GSM8K)
and "top 75 percentile" (MATH) are read as the 50% / 75% hardest examples, sized to match
the share PreMemAcc < 0.75 selects on those tasks.

Every round trains from the base model on the current set and records test accuracy, so
each method yields a sample-efficiency curve (test accuracy vs training-set size);
`data_efficiency_ratio` compares two curves at matched accuracy.

Resumption: a method's state (`<out>/<method>/state.json`) and each round's new examples
(`added_NNN.jsonl`) are written atomically when a round finishes; a re-run continues from
the first unfinished round (training and evaluation resume too). Runs are stored under
`<out>/runs/` by a hash of their example ids, so the round-0 run, identical for every
method, is trained once.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import re
from typing import Any, Callable, Mapping, Protocol, Sequence

import numpy as np

from memdyn_jax import fileio
from memdyn_jax.evaluation import records as records_lib
from memdyn_jax.errors import FieldError
from memdyn_jax.evaluation.sampling import SamplingParams
from memdyn_jax.tasks.base import DataError, Example, Task, read_jsonl
from memdyn_jax.train.config import TrainConfig, get_preset

METHODS = ("premem", "iid", "ifd", "heuristic")
STATE_FILE = "state.json"
RUNS_DIR = "runs"
IFD_DIR = "ifd"
IFD_SCORES_FILE = "scores.json"
SEED_DIR_PREFIX = "seed_"
SUMMARY_FILE = "summary.json"



class CurationError(ValueError):
  """A curation study cannot go on: a changed configuration on resume, a generator that
  cannot produce the examples asked for."""


class CurationConfigError(FieldError):
  """A bad `CurationConfig` value; `field` names it."""


class CurationInputError(FieldError):
  """A study input that cannot be used: task data that does not load, a method the task
  has no heuristic for, rephrasings or a rephrasing model that cannot be read; `field`
  names the input (and experiments/curate.py's flag)."""


# ----------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class CurationConfig:
  """One curation method's settings (Kang et al. App. C defaults).

  Attributes:
    method: one of METHODS.
    iterations: n, rounds of data collection (n + 1 training runs: one per set size).
    premem_cutoff: t; D_train examples with PreMemAcc below it are the sources ("premem").
      (Kang et al. call it a threshold; here "threshold" is only the memorization one.)
    additions_per_iteration: N'_i, new examples per round, the same for every method;
      0 = len(D_train) // iterations (the set doubles over the study).
    keep_fraction: share of D_train the "ifd"/"heuristic" baselines draw from; None =
      the task's default (`Task.curation_keep_fraction`, Kang et al. App. C).
    memorization_perplexity: PreMemAcc's memorization threshold p (perplexity units);
      None = Kang et al.'s reference value for the task.
    ifd_epochs: epochs of the IFD model's fine-tuning on the test split.
    seed: seeds the choice of sources and the generator.
  """

  method: str = "premem"
  iterations: int = 5
  premem_cutoff: float = 0.75
  additions_per_iteration: int = 0
  keep_fraction: float | None = None
  memorization_perplexity: float | None = None
  ifd_epochs: float = 2.0
  seed: int = 0

  def __post_init__(self):
    if self.method not in METHODS:
      raise CurationConfigError("method", f"{self.method!r} is not one of {list(METHODS)}")
    if self.iterations < 1:
      raise CurationConfigError("iterations", f"must be >= 1, got {self.iterations}")
    if not 0 <= self.premem_cutoff <= 1:
      raise CurationConfigError("premem_cutoff",
                                f"must be in [0, 1], got {self.premem_cutoff}")
    if self.additions_per_iteration < 0:
      raise CurationConfigError("additions_per_iteration",
                                f"must be >= 0, got {self.additions_per_iteration}")
    if self.keep_fraction is not None and not 0 < self.keep_fraction <= 1:
      raise CurationConfigError("keep_fraction", f"must be in (0, 1], got {self.keep_fraction}")
    if self.memorization_perplexity is not None and not self.memorization_perplexity >= 1:
      raise CurationConfigError("memorization_perplexity",
                                f"must be >= 1, got {self.memorization_perplexity}")
    if not self.ifd_epochs > 0:
      raise CurationConfigError("ifd_epochs", f"must be > 0, got {self.ifd_epochs}")

  def resolved(self, task_name: str, num_train: int) -> "CurationConfig":
    """The config with every task- or size-dependent default filled in."""
    from memdyn_jax.tasks import memorization_threshold, task_class

    return dataclasses.replace(
        self,
        additions_per_iteration=(self.additions_per_iteration
                                 or max(1, num_train // self.iterations)),
        keep_fraction=(self.keep_fraction if self.keep_fraction is not None
                       else task_class(task_name).curation_keep_fraction),
        memorization_perplexity=(self.memorization_perplexity
                                 if self.memorization_perplexity is not None
                                 else memorization_threshold(task_name)))


@dataclasses.dataclass(frozen=True)
class CurationSetup:
  """What every method of one study shares.

  Attributes:
    task: the task (grades samples, renders prompts and targets).
    model_path: base model, a local HF directory; every round fine-tunes it afresh.
    train_examples: D_train, the original training set (and the pool of sources).
    test_examples: evaluated after every round (the y axis of the curve).
    ifd_examples: the IFD model's training set (Kang et al.: the test split).
    train_config: fine-tuning settings (preset `curation_default` by default). Without a
      checkpoint cadence, a checkpoint is saved every epoch (PreMemAcc needs the
      trajectory).
    sampling: how accuracy is sampled (train PreMemAcc and test accuracy).
    eval_batch_size: prompts per compiled sampling/scoring program.
  """

  task: Task
  model_path: str
  train_examples: tuple[Example, ...]
  test_examples: tuple[Example, ...]
  sampling: SamplingParams
  ifd_examples: tuple[Example, ...] = ()
  train_config: TrainConfig = dataclasses.field(
      default_factory=lambda: get_preset("curation_default"))
  eval_batch_size: int = 16

  def __post_init__(self):
    for name in ("train_examples", "test_examples", "ifd_examples"):
      object.__setattr__(self, name, tuple(getattr(self, name)))
    if not self.train_examples:
      raise ValueError("train_examples is empty")
    if not self.test_examples:
      raise ValueError("test_examples is empty")
    ids = [ex.id for ex in self.train_examples]
    if len(set(ids)) != len(ids):
      raise ValueError("train_examples has duplicate ids")

  def checkpointed_config(self) -> TrainConfig:
    cfg = self.train_config
    if not cfg.save_every_epochs and not cfg.save_every_steps:
      cfg = cfg.replace(save_every_epochs=1.0)
    return cfg


def load_setup(spec, model_path: str, *, sampling: SamplingParams, methods: Sequence[str],
               n_train: int = 0, n_test: int = 0, n_ifd: int = 0,
               train_config: TrainConfig | None = None, eval_batch_size: int = 16
               ) -> CurationSetup:
  """The study's data and settings from the task's "train" and "test" splits.

  Args:
    spec: the task (a `memdyn_jax.train.task_run.TaskSpec`: name, kwargs, path).
    model_path: the base model, a local HF directory.
    sampling: how accuracy is sampled (without stop strings: the task's).
    methods: the methods the study runs ("heuristic" is checked against the task).
    n_train: D_train is the first N train examples (0 = all).
    n_test: test examples evaluated after every round (the first N; 0 = all).
    n_ifd: test examples the IFD model is fine-tuned on (the first N; 0 = all).
    train_config: fine-tuning settings (default: preset `curation_default`).
    eval_batch_size: prompts per compiled sampling/scoring program.

  Raises:
    CurationInputError: field "task" (the task or its data does not load) or "methods"
      (no difficulty heuristic for the task).
  """
  from memdyn_jax import evaluation, tasks
  try:
    task = tasks.get_task(spec.name, **dict(spec.kwargs))
    train = task.load("train", spec.path)
    test = task.load("test", spec.path)
    task.prepare_prompts(path=spec.path)  # few-shot examples, from the train split
  except (ValueError, FileNotFoundError, TypeError) as e:
    raise CurationInputError("task", f"cannot load the data of task {spec.name!r} "
                             f"(task_kwargs {dict(spec.kwargs)}, task_path {spec.path}): "
                             f"{e}") from e
  if task.prompt_options.chat_template:
    # IFD scores a target without its prompt, which a chat template's turn does not allow.
    raise CurationInputError("task", "curation does not take chat_template prompts")
  train = train[:n_train or None]
  if "heuristic" in methods and train:
    try:
      task.difficulty(train[0])
    except NotImplementedError as e:
      raise CurationInputError("methods", f"heuristic: {e}") from e
  return CurationSetup(
      task=task, model_path=model_path, train_examples=tuple(train),
      test_examples=tuple(test[:n_test or None]),
      sampling=evaluation.with_task_stop(sampling, task),
      ifd_examples=tuple(test[:n_ifd or None]),
      train_config=train_config or get_preset("curation_default"),
      eval_batch_size=eval_batch_size)


# ----------------------------------------------------------------------------- selection


PerplexityScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


def ifd_scores(task: Task, examples: Sequence[Example], scorer: PerplexityScorer) -> np.ndarray:
  """Instruction-Following Difficulty (Li et al.) of each example: the perplexity of the
  target given the question over the perplexity of the target alone.

  Args:
    task: renders prompts and targets.
    examples: the examples to score.
    scorer: `scorer(prompts, targets)` -> perplexities (N,); an empty prompt scores the
      target alone.

  Returns:
    (N,) float64 IFD scores (NaN where either perplexity is undefined).
  """
  prompts = [task.format_prompt(ex.question) for ex in examples]
  targets = [task.format_target(ex) for ex in examples]
  conditional = np.asarray(scorer(prompts, targets), np.float64)
  unconditional = np.asarray(scorer([""] * len(examples), targets), np.float64)
  with np.errstate(divide="ignore", invalid="ignore"):
    return conditional / unconditional


def model_perplexity_scorer(model, tokenizer, *, batch_size: int = 16,
                            max_length: int | None = None,
                            append_eos: bool = False) -> PerplexityScorer:
  """A PerplexityScorer over `memdyn_jax.evaluation.scoring.score_texts` (targets
  truncated to fit)."""
  from memdyn_jax.evaluation import scoring

  def scorer(prompts: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    out = np.full(len(prompts), np.nan)
    for rec in scoring.score_texts(model, tokenizer, prompts, targets, batch_size=batch_size,
                                   max_length=max_length, overlength="truncate",
                                   append_eos=append_eos):
      out[rec.index] = rec.perplexity
    return out

  return scorer


def top_fraction(scores, fraction: float, seed: int = 0) -> np.ndarray:
  """Indices (ascending) of the `fraction` of examples with the highest scores.

  Keeps round(fraction * N) examples (at least 1). NaN scores rank last; ties are broken
  by a seeded random order, so a heuristic with few distinct values (MATH levels) does not
  favour the dataset's order.
  """
  s = np.asarray(scores, np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"scores must be a non-empty 1-D array, got shape {s.shape}")
  if not 0 < fraction <= 1:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  k = max(1, int(round(fraction * s.size)))
  ties = np.random.default_rng(seed).permutation(s.size)
  order = np.lexsort((ties, -np.nan_to_num(s, nan=-np.inf)))  # last key = primary
  return np.sort(order[:k])


def draw_sources(pool: Sequence[Example], rng: random.Random):
  """Yields sources from `pool` forever, each pass a fresh shuffle: n draws use every
  example floor(n / |pool|) or ceil(n / |pool|) times."""
  while True:
    order = list(pool)
    rng.shuffle(order)
    yield from order


# ----------------------------------------------------------------------------- generators


class Generator(Protocol):
  """Makes new training examples from source examples.

  `generate(sources, rng, existing)` returns one entry per source: a new Example derived
  from it, or None when it cannot make another one from that source (the loop then draws
  another source). `existing` is the current training set; new ids must not clash with it.
  """

  name: str

  def generate(self, sources: Sequence[Example], rng: random.Random,
               existing: Sequence[Example]) -> list[Example | None]:
    ...


@dataclasses.dataclass
class SyntheticArithGenerator:
  """synthetic_arith: fresh problems of the source's template ("fresh", never a key of any
  generated split nor of the current set) or the source reworded ("rephrase")."""

  task: Any  # SyntheticArithTask
  mode: str = "fresh"
  attempts: int = 50

  def __post_init__(self):
    if self.mode not in ("fresh", "rephrase"):
      raise ValueError(f"mode must be 'fresh' or 'rephrase', got {self.mode!r}")

  @property
  def name(self) -> str:
    return f"synthetic_{self.mode}"

  def generate(self, sources, rng, existing):
    make = self.task.fresh_like if self.mode == "fresh" else self.task.rephrase
    field = (lambda ex: ex.meta.get("key")) if self.mode == "fresh" else (
        lambda ex: ex.question)
    ids = {ex.id for ex in existing}
    seen = {field(ex) for ex in existing}
    out: list[Example | None] = []
    for src in sources:
      new = None
      for _ in range(self.attempts):
        try:
          candidate = make(src, rng)
        except ValueError:  # the template's problem space is used up
          break
        if candidate.id not in ids and field(candidate) not in seen:
          new = candidate
          break
      if new is not None:
        ids.add(new.id)
        seen.add(field(new))
      out.append(new)
    return out


@dataclasses.dataclass(frozen=True)
class Rephrasing:
  """One user-supplied rephrasing of a training example (a row of the jsonl)."""

  source_id: str
  question: str
  target: str | None
  answer: str | None
  where: str  # "path:line"


def read_rephrasings(path: str) -> dict[str, list[Rephrasing]]:
  """Reads a jsonl of rephrasings: one object per line with "id" (the example id) and
  "question", optionally "target" and "answer" (default: the source's).

  Returns:
    example id -> its rephrasings in file order (exact duplicates dropped).

  Raises:
    DataError: a malformed line (names `path:line`), or a file with no rephrasing.
  """
  if not os.path.isfile(path):
    raise DataError(f"{path}: no such rephrasings file")
  out: dict[str, list[Rephrasing]] = {}
  for lineno, rec in read_jsonl(path, required=("id", "question")):
    where = f"{path}:{lineno}"
    if not isinstance(rec["id"], str) or not rec["id"]:
      raise DataError(f"{where}: 'id' must be a non-empty string (an example id)")
    if not isinstance(rec["question"], str) or not rec["question"].strip():
      raise DataError(f"{where}: 'question' must be a non-empty string")
    for key in ("target", "answer"):
      if key in rec and not (isinstance(rec[key], str) and rec[key].strip()):
        raise DataError(f"{where}: {key!r} must be a non-empty string when given")
    item = Rephrasing(rec["id"], rec["question"].strip(), rec.get("target"),
                      rec.get("answer"), where)
    known = out.setdefault(item.source_id, [])
    if all((r.question, r.target, r.answer) != (item.question, item.target, item.answer)
           for r in known):
      known.append(item)
  if not out:
    raise DataError(f"{path}: no rephrasings")
  return out


@dataclasses.dataclass
class JsonlRephrasings:
  """Rephrasings supplied by the user (e.g. written by an external LLM, offline), keyed by
  example id; each is used at most once. Example `k` of source `s` gets id
  `s/rephrase-k`."""

  path: str
  name: str = "jsonl_rephrase"

  def __post_init__(self):
    self.by_id = read_rephrasings(self.path)

  def generate(self, sources, rng, existing):
    del rng  # the file decides: rephrasings are used in file order
    taken = {ex.id for ex in existing}
    out: list[Example | None] = []
    for src in sources:
      new = None
      for k, r in enumerate(self.by_id.get(src.id, ())):
        new_id = f"{src.id}/rephrase-{k}"
        if new_id not in taken:
          new = Example(id=new_id, question=r.question,
                        target=r.target if r.target is not None else src.target,
                        answer=r.answer if r.answer is not None else src.answer,
                        meta={**src.meta, "source_id": src.id, "rephrasing": r.where})
          taken.add(new_id)
          break
      out.append(new)
    return out


REPHRASE_PROMPT = ("Rewrite the following math problem in different words. Keep every "
                   "number and what is asked unchanged.\n\nProblem: {question}\n"
                   "Rewritten problem:")
_NUMBER_RE = re.compile(r"\d+(?:\.\d+)?")


@dataclasses.dataclass
class ModelRephraser:
  """A local model prompted to rephrase each source question (no network).

  The new example keeps the source's target and answer, so a rephrasing is accepted only
  when it is non-empty, differs from the question and (with `require_numbers`) still
  contains every number of the question. Failed sources are resampled with new seeds up to
  `attempts` times, then reported as None.

  Attributes:
    model: a `memdyn_jax.models` causal LM.
    tokenizer: its tokenizer.
    params: sampling parameters (n is forced to 1; `seed` is drawn per attempt).
    prompt_format: the prompt, with a `{question}` field.
    require_numbers: reject rephrasings that drop a number of the question.
    attempts: sampling rounds per call.
    batch_size: prompts per compiled program.
    sample_fn: `memdyn_jax.evaluation.sampling.sample` (replaceable in tests).
  """

  model: Any
  tokenizer: Any
  params: SamplingParams = SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=256,
                                          stop=("\n\n",))
  prompt_format: str = REPHRASE_PROMPT
  require_numbers: bool = True
  attempts: int = 3
  batch_size: int = 8
  sample_fn: Callable | None = None
  name: str = "model_rephrase"

  def _valid(self, text: str, src: Example) -> bool:
    if not text or text == src.question.strip():
      return False
    return not self.require_numbers or (set(_NUMBER_RE.findall(src.question))
                                        <= set(_NUMBER_RE.findall(text)))

  def generate(self, sources, rng, existing):
    from memdyn_jax.evaluation import sampling

    sample = self.sample_fn or sampling.sample
    taken = {ex.id for ex in existing}
    out: list[Example | None] = [None] * len(sources)
    pending = list(range(len(sources)))
    for _ in range(self.attempts):
      if not pending:
        break
      params = dataclasses.replace(self.params, n=1, seed=rng.randrange(2**31))
      prompts = [self.prompt_format.format(question=sources[i].question) for i in pending]
      completions = sample(self.model, self.tokenizer, prompts, params,
                           batch_size=self.batch_size)
      still = []
      for i, samples in zip(pending, completions):
        src, text = sources[i], samples[0].text.strip()
        new_id = f"{src.id}/rephrase-{_short_hash(text)}"
        if self._valid(text, src) and new_id not in taken:
          taken.add(new_id)
          out[i] = Example(id=new_id, question=text, target=src.target, answer=src.answer,
                           meta={**src.meta, "source_id": src.id, "generator": self.name})
        else:
          still.append(i)
      pending = still
    return out


GENERATORS = ("fresh", "rephrase", "jsonl", "model")


def make_generator(kind: str, task: Task, *, rephrasings: str | None = None,
                   rephrase_model: str | None = None, prompt_format: str = REPHRASE_PROMPT,
                   batch_size: int = 8) -> Generator:
  """The generator of new examples named `kind` (one of GENERATORS).

  Args:
    kind: "fresh" or "rephrase" (`SyntheticArithGenerator`, synthetic_arith only), "jsonl"
      (`JsonlRephrasings` of the file `rephrasings`) or "model" (`ModelRephraser` of
      `rephrase_model`: a local HF directory, .gguf, hub id or 'embedded').
    task: the study's task.
    rephrasings: the jsonl of kind "jsonl".
    rephrase_model: the model of kind "model".
    prompt_format: kind "model": the prompt, with a `{question}` field.
    batch_size: kind "model": prompts per compiled sampling program.

  Raises:
    CurationInputError: field "generator" (a kind that does not fit the task),
      "rephrasings" (none given for "jsonl", or a malformed file, naming its line) or
      "rephrase_model" (none given for "model", or a model that cannot be found).
  """
  if kind not in GENERATORS:
    raise CurationInputError("generator", f"{kind!r} is not one of {list(GENERATORS)}")
  if kind in ("fresh", "rephrase"):
    if not task.procedural:
      raise CurationInputError("generator", f"{kind} is for tasks that make new problems, "
                               f"like synthetic_arith, not {task.name!r}")
    return SyntheticArithGenerator(task, mode=kind)
  field, source = (("rephrasings", rephrasings) if kind == "jsonl"
                   else ("rephrase_model", rephrase_model))
  if not source:
    raise CurationInputError(field, f"is required with generator {kind!r}")
  if kind == "jsonl":
    try:
      return JsonlRephrasings(source)
    except DataError as e:  # names the file and line
      raise CurationInputError("rephrasings", str(e)) from e
  from memdyn_jax import models
  from memdyn_jax.train import task_run
  try:
    path = task_run.resolve_model(source)
  except task_run.TaskRunError as e:
    raise CurationInputError("rephrase_model", e.message) from e
  model, _ = models.from_pretrained(path)
  return ModelRephraser(model, models.load_tokenizer(path), prompt_format=prompt_format,
                        batch_size=batch_size)


def collect_examples(generator: Generator, pool: Sequence[Example], n: int,
                     rng: random.Random, existing: Sequence[Example]
                     ) -> tuple[list[Example], list[str]]:
  """`n` new examples generated from sources drawn evenly from `pool` (Algorithm 1 line 8).

  A source the generator can no longer use is dropped from the draw.

  Returns:
    (new examples, the id of each one's source).

  Raises:
    CurationError: the pool is empty or used up before `n` examples were made.
  """
  if not pool:
    raise CurationError("no source example to generate from")
  exhausted: set[str] = set()
  new: list[Example] = []
  sources: list[str] = []
  taken = {ex.id for ex in existing}
  draws = draw_sources(pool, rng)
  while len(new) < n:
    if len(exhausted) == len({ex.id for ex in pool}):
      raise CurationError(
          f"generator {generator.name!r} made {len(new)} of the {n} examples asked for: "
          f"every one of the {len(pool)} source examples is used up (supply more "
          "rephrasings or choose another generator)")
    batch = []
    while len(batch) < n - len(new):
      src = next(draws)
      if src.id not in exhausted:
        batch.append(src)
    made = generator.generate(batch, rng, list(existing) + new)
    if len(made) != len(batch):
      raise CurationError(f"generator {generator.name!r} returned {len(made)} entries for "
                          f"{len(batch)} sources")
    for src, ex in zip(batch, made):
      if ex is None or ex.id in taken:
        exhausted.add(src.id)
      else:
        taken.add(ex.id)
        new.append(ex)
        sources.append(src.id)
  return new, sources


# ----------------------------------------------------------------------------- efficiency


def examples_to_reach(sizes, accuracies, target: float) -> float:
  """Training-set size at which a curve first reaches `target` accuracy, by linear
  interpolation between its points (sorted by size); NaN if it never does. A curve whose
  first point already reaches the target gives that point's size."""
  x = np.asarray(sizes, np.float64)
  y = np.asarray(accuracies, np.float64)
  if x.shape != y.shape or x.ndim != 1 or x.size == 0:
    raise ValueError(f"sizes and accuracies must be equal-length non-empty 1-D, got "
                     f"{x.shape} and {y.shape}")
  order = np.argsort(x, kind="stable")
  x, y = x[order], y[order]
  hits = np.flatnonzero(y >= target)
  if hits.size == 0:
    return math.nan
  i = int(hits[0])
  if i == 0:
    return float(x[0])
  x0, x1, y0, y1 = x[i - 1], x[i], y[i - 1], y[i]
  return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))


@dataclasses.dataclass(frozen=True)
class EfficiencyRatio:
  """How many more examples a baseline needs to match a reference method's accuracy.

  Attributes:
    target_accuracy: the reference's accuracy to match (its final point by default).
    reference_examples: examples the reference needs to first reach it.
    baseline_examples: examples the baseline needs (NaN: never reached).
    ratio: baseline_examples / reference_examples (NaN: never reached).
    ratio_lower_bound: when never reached, the baseline's largest size over
      reference_examples (the ratio exceeds it); else equal to ratio.
  """

  target_accuracy: float
  reference_examples: float
  baseline_examples: float
  ratio: float
  ratio_lower_bound: float


def data_efficiency_ratio(reference: tuple[Sequence[float], Sequence[float]],
                          baseline: tuple[Sequence[float], Sequence[float]],
                          target_accuracy: float | None = None) -> EfficiencyRatio:
  """Data-efficiency ratio at matched accuracy (Kang et al. Fig. 8: "2x sample efficiency").

  Args:
    reference: (sizes, accuracies) of the curated method (PreMemAcc).
    baseline: (sizes, accuracies) of the method compared with.
    target_accuracy: accuracy to match; default the reference's accuracy at its largest size.

  Returns:
    An EfficiencyRatio.
  """
  ref_x = np.asarray(reference[0], np.float64)
  if target_accuracy is None:
    target_accuracy = float(np.asarray(reference[1], np.float64)[np.argmax(ref_x)])
  n_ref = examples_to_reach(*reference, target_accuracy)
  n_base = examples_to_reach(*baseline, target_accuracy)
  ratio = n_base / n_ref if not math.isnan(n_base) else math.nan
  bound = ratio if not math.isnan(n_base) else float(np.max(baseline[0])) / n_ref
  return EfficiencyRatio(float(target_accuracy), n_ref, n_base, ratio, bound)


# ----------------------------------------------------------------------------- training rounds


@dataclasses.dataclass(frozen=True)
class RoundEval:
  """One trained set, evaluated.

  Attributes:
    run_dir: the training run.
    n_examples: rows trained on (over-length examples dropped).
    test_accuracy: mean sampled accuracy on the test examples at the last checkpoint.
    train_premem: D_train example id -> PreMemAcc at the last checkpoint (when asked).
  """

  run_dir: str
  n_examples: int
  test_accuracy: float
  train_premem: Mapping[str, float] | None = None


def _short_hash(text: str, n: int = 10) -> str:
  return hashlib.sha256(text.encode("utf-8")).hexdigest()[:n]


def _ids_hash(examples: Sequence[Example]) -> str:
  return _short_hash("\n".join(ex.id for ex in examples), 16)


def set_run_dir(out_dir: str, examples: Sequence[Example]) -> str:
  """Where the run of this exact training set (ids, in order) lives."""
  return os.path.join(out_dir, RUNS_DIR, f"n{len(examples)}_{_ids_hash(examples)[:12]}")


def _eval_config(setup: CurationSetup) -> dict[str, Any]:
  return {"sampling": dataclasses.asdict(setup.sampling), "task": setup.task.name,
          "test_ids": _ids_hash(setup.test_examples)}


def train_and_evaluate(setup: CurationSetup, examples: Sequence[Example], run_dir: str, *,
                       premem_examples: Sequence[Example] = (),
                       memorization_perplexity: float = math.inf,
                       tokenizer=None, progress: bool = False) -> RoundEval:
  """Fine-tunes the base model on `examples` and evaluates it (resumable).

  Test accuracy is measured at the last checkpoint; with `premem_examples`, those examples
  are also evaluated at every checkpoint and their final PreMemAcc returned.
  """
  from memdyn_jax.train import checkpoints
  from memdyn_jax import evaluation, models
  from memdyn_jax.report import analysis, collect
  from memdyn_jax.train import loop

  tokenizer = tokenizer or models.load_tokenizer(setup.model_path, padding_side="right")
  cfg = setup.checkpointed_config()
  data, ids = loop.task_train_data(tokenizer, setup.task, list(examples), cfg)
  steps = checkpoints.list_steps(run_dir) if os.path.isdir(run_dir) else []
  if not steps or steps[-1] < cfg.total_steps(data.num_examples):
    loop.train(cfg, data, setup.model_path, run_dir, progress=progress,
               async_checkpoints=False)
    steps = checkpoints.list_steps(run_dir)
  try:
    records_lib.check_config(run_dir, _eval_config(setup), task_stop=setup.task.stop)
  except records_lib.EvalConfigMismatchError as e:
    raise CurationError(str(e)) from e
  test = evaluation.EvalUnit("test", setup.test_examples, greedy=False)
  train = evaluation.EvalUnit("train", tuple(premem_examples), greedy=False)
  common = dict(batch_size=setup.eval_batch_size, progress=progress)
  if premem_examples and len(steps) > 1:
    evaluation.evaluate_units(run_dir, setup.task, tokenizer, [train], setup.sampling,
                            steps=steps[:-1], **common)
  evaluation.evaluate_units(run_dir, setup.task, tokenizer,
                          [train, test] if premem_examples else [test], setup.sampling,
                          steps=steps[-1:], **common)
  run = collect.load_run(run_dir)
  test_acc = float(run.units["test"].at(steps[-1:]).mean("accuracy")[0])
  premem = None
  if premem_examples:
    matrix = run.units["train"]
    _, values = analysis.train_premem(run, memorization_perplexity)
    premem = {i: float(v) for i, v in zip(matrix.example_ids, values[-1])}
  return RoundEval(run_dir, len(ids), test_acc, premem)


def ifd_difficulty(setup: CurationSetup, cfg: CurationConfig, out_dir: str, *,
                   progress: bool = False) -> dict[str, float]:
  """IFD score of every D_train example under a model fine-tuned `cfg.ifd_epochs` epochs on
  `setup.ifd_examples` (cached in `<out>/ifd/scores.json`)."""
  from memdyn_jax import models
  from memdyn_jax.train import loop

  path = os.path.join(out_dir, IFD_DIR, IFD_SCORES_FILE)
  key = {"train_ids": _ids_hash(setup.train_examples),
         "ifd_ids": _ids_hash(setup.ifd_examples), "epochs": cfg.ifd_epochs}
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      cached = json.load(f)
    if cached["key"] == key:
      return cached["scores"]
  if not setup.ifd_examples:
    raise CurationError("method 'ifd' needs ifd_examples (the test split the IFD model is "
                        "fine-tuned on)")
  tokenizer = models.load_tokenizer(setup.model_path, padding_side="right")
  train_cfg = setup.train_config.replace(num_epochs=cfg.ifd_epochs, max_steps=0,
                                         save_every_epochs=0.0, save_every_steps=0)
  data, _ = loop.task_train_data(tokenizer, setup.task, list(setup.ifd_examples), train_cfg)
  result = loop.train(train_cfg, data, setup.model_path, os.path.join(out_dir, IFD_DIR, "model"),
                      progress=progress, async_checkpoints=False)
  scorer = model_perplexity_scorer(result.model, tokenizer, batch_size=setup.eval_batch_size,
                                   max_length=train_cfg.max_length,
                                   append_eos=train_cfg.append_eos)
  scores = ifd_scores(setup.task, setup.train_examples, scorer)
  out = {ex.id: float(s) for ex, s in zip(setup.train_examples, scores)}
  fileio.atomic_write_text(path, json.dumps({"key": key, "scores": out}, indent=1) + "\n")
  return out


# ----------------------------------------------------------------------------- the loop


@dataclasses.dataclass(frozen=True)
class CurationResult:
  """A method's finished study: one row per round (see `run_curation`)."""

  method: str
  rounds: tuple[dict[str, Any], ...]

  def curve(self) -> tuple[np.ndarray, np.ndarray]:
    """(training-set sizes, test accuracies), one point per round."""
    return (np.asarray([r["n_examples"] for r in self.rounds], np.float64),
            np.asarray([r["test_accuracy"] for r in self.rounds], np.float64))


def _example_row(ex: Example) -> dict[str, Any]:
  return {"id": ex.id, "question": ex.question, "target": ex.target, "answer": ex.answer,
          "meta": dict(ex.meta)}


def _read_examples(path: str) -> list[Example]:
  return [Example(id=r["id"], question=r["question"], target=r["target"], answer=r["answer"],
                  meta=r.get("meta", {}))
          for _, r in read_jsonl(path, required=("id", "question", "target", "answer"))]


def _state_identity(setup: CurationSetup, cfg: CurationConfig, generator: Generator
                    ) -> dict[str, Any]:
  """What a method's finished rounds depend on; a resumed study must match it."""
  return json.loads(json.dumps({
      "config": dataclasses.asdict(cfg), "generator": generator.name, "task": setup.task.name,
      "model_path": os.path.abspath(setup.model_path),
      "train_ids": _ids_hash(setup.train_examples), "eval": _eval_config(setup),
      "train_config": setup.checkpointed_config().to_dict()}))


def load_state(out_dir: str, method: str) -> dict[str, Any] | None:
  """A method's saved state (None if it has not started)."""
  path = os.path.join(out_dir, method, STATE_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _pool(method: str, setup: CurationSetup, cfg: CurationConfig, out_dir: str,
          evaluated: RoundEval, progress: bool) -> tuple[list[Example], dict[str, Any]]:
  """P'_i: the source examples of this round, and what the state records about them."""
  train = list(setup.train_examples)
  if method == "iid":
    return train, {}
  if method == "premem":
    pm = evaluated.train_premem or {}
    pool = [ex for ex in train if pm.get(ex.id, 0.0) < cfg.premem_cutoff]
    info = {"train_premem_mean": float(np.mean(list(pm.values()))) if pm else math.nan,
            "n_below_cutoff": len(pool)}
    if not pool:  # every example is learnt robustly: nothing to prioritize
      info["fallback"] = f"no example below PreMemAcc {cfg.premem_cutoff}: i.i.d. sources"
      pool = train
    return pool, info
  if method == "ifd":
    by_id = ifd_difficulty(setup, cfg, out_dir, progress=progress)
    scores = [by_id.get(ex.id, math.nan) for ex in train]
  else:
    scores = [setup.task.difficulty(ex) for ex in train]
  keep = top_fraction(scores, cfg.keep_fraction, seed=cfg.seed)
  return [train[i] for i in keep], {}


def run_curation(setup: CurationSetup, cfg: CurationConfig, generator: Generator, out_dir: str,
                 *, progress: bool = False,
                 log: Callable[[str], None] | None = None) -> CurationResult:
  """Runs (or resumes) one method's curation study: Algorithm 1 or a baseline.

  Round i (0..n) trains from the base model on D_train plus the examples added so far and
  records its test accuracy; rounds before the last then pick sources (P'_i, by method) and
  add `additions_per_iteration` generated examples.

  Each finished round is appended to `<out>/<method>/state.json` (atomically, after its
  `added_NNN.jsonl`), so a re-run skips finished rounds.

  Args:
    setup: what the methods share.
    cfg: the method's settings.
    generator: makes new examples from sources.
    out_dir: the study's folder.
    progress: progress bars of training and evaluation.
    log: optional `log(message)` after each round.

  Returns:
    The CurationResult: per round, n_examples, test_accuracy, run (relative to out_dir),
    n_added (examples added after it), sources (their source ids), pool_size and, for
    "premem", train_premem_mean and n_below_cutoff.

  Raises:
    CurationError: the saved state was made with other settings, the generator cannot
      make the examples asked for, or a run's records were made with other evaluation
      settings.
    DataError: a damaged `added_NNN.jsonl` (names the file and line).
    checkpoints.RunMismatchError: a run directory holds a run of other settings.
    checkpoints.CheckpointReadError: a checkpoint on disk cannot be read.
  """
  from memdyn_jax import models

  cfg = cfg.resolved(setup.task.name, len(setup.train_examples))
  method_dir = os.path.join(out_dir, cfg.method)
  identity = _state_identity(setup, cfg, generator)
  state = load_state(out_dir, cfg.method) or {"identity": identity, "rounds": []}
  if state["identity"] != identity:
    diffs = sorted(k for k in set(identity) | set(state["identity"])
                   if identity.get(k) != state["identity"].get(k))
    raise CurationError(f"{os.path.join(method_dir, STATE_FILE)} was made with other "
                        f"settings ({', '.join(diffs)} differ); use another output folder")
  added: list[Example] = []
  for r in state["rounds"]:
    if r.get("added_file"):
      added += _read_examples(os.path.join(method_dir, r["added_file"]))
  tokenizer = models.load_tokenizer(setup.model_path, padding_side="right")
  premem_examples = setup.train_examples if cfg.method == "premem" else ()
  for i in range(len(state["rounds"]), cfg.iterations + 1):
    examples = list(setup.train_examples) + added
    evaluated = train_and_evaluate(
        setup, examples, set_run_dir(out_dir, examples),
        premem_examples=premem_examples if i < cfg.iterations else (),
        memorization_perplexity=cfg.memorization_perplexity, tokenizer=tokenizer,
        progress=progress)
    row: dict[str, Any] = {"round": i, "n_examples": evaluated.n_examples,
                           "test_accuracy": evaluated.test_accuracy,
                           "run": os.path.relpath(evaluated.run_dir, out_dir), "n_added": 0}
    if i < cfg.iterations:
      pool, info = _pool(cfg.method, setup, cfg, out_dir, evaluated, progress)
      rng = random.Random(f"{cfg.seed}/{cfg.method}/{i}")
      new, sources = collect_examples(generator, pool, cfg.additions_per_iteration, rng,
                                      examples)
      name = f"added_{i + 1:03d}.jsonl"
      fileio.atomic_write_text(
          os.path.join(method_dir, name),
          "".join(json.dumps(_example_row(ex)) + "\n" for ex in new))
      row.update(info, pool_size=len(pool), n_added=len(new), added_file=name,
                 sources=sources)
      added += new
    state["rounds"].append(row)
    fileio.atomic_write_text(os.path.join(method_dir, STATE_FILE),
                                  json.dumps(state, indent=1) + "\n")
    if log is not None:
      log(f"{cfg.method}: round {i}: {row['n_examples']} examples, test accuracy "
          f"{row['test_accuracy']:.3f}" + (f", +{row['n_added']} added" if row["n_added"]
                                           else ""))
  return CurationResult(cfg.method, tuple(state["rounds"]))


def run_study(setup: CurationSetup, configs: Sequence[CurationConfig], generator: Generator,
              out_dir: str, *, progress: bool = False,
              log: Callable[[str], None] | None = None) -> tuple[list[CurationResult], str]:
  """Runs (or resumes) each method's study in turn (`run_curation`), then writes the
  report (`write_report`) into `out_dir`.

  Returns:
    (the methods' CurationResults, the path of report.md).

  Raises:
    CurationError: a method's study cannot go on (any error `run_curation` raises), named
      with its method.
  """
  from memdyn_jax.train import checkpoints

  os.makedirs(out_dir, exist_ok=True)
  results = []
  for cfg in configs:
    try:
      results.append(run_curation(setup, cfg, generator, out_dir, progress=progress, log=log))
    except (CurationError, DataError, checkpoints.RunMismatchError,
            checkpoints.CheckpointReadError) as e:
      raise CurationError(f"method {cfg.method!r}: {e}") from e
  return results, write_report(out_dir, results, setup)


def seed_dir(out_dir: str, seed: int) -> str:
  """Where one seed's repetition of a multi-seed study lives."""
  return os.path.join(out_dir, f"{SEED_DIR_PREFIX}{seed}")


def seeded(setup: CurationSetup, configs: Sequence[CurationConfig], seed: int
           ) -> tuple[CurationSetup, list[CurationConfig]]:
  """One repetition of a study: `seed` drives the source draws, the generator and the
  fine-tuning (data order), so repetitions differ in everything a seed touches."""
  return (dataclasses.replace(setup, train_config=setup.train_config.replace(seed=seed)),
          [dataclasses.replace(c, seed=seed) for c in configs])


def run_seeds(setup: CurationSetup, configs: Sequence[CurationConfig], generator: Generator,
              out_dir: str, seeds: Sequence[int], *, confidence: float = 0.95,
              progress: bool = False, log: Callable[[str], None] | None = None
              ) -> tuple[dict[int, list[CurationResult]], str]:
  """Runs (or resumes) the study once per seed (`seeded`, `run_study`) and writes the
  report across seeds.

  One seed writes its study into `out_dir` itself; several write each into
  `seed_dir(out_dir, seed)` (with its own report) and the mean curves, their
  `confidence` bands across seeds and the efficiency ratios into `out_dir`
  (`write_seeds_report`).

  Returns:
    ({seed: that seed's CurationResults}, the path of the top report.md).

  Raises:
    CurationConfigError: field "seeds": none, or repeated.
    CurationError: as `run_study`.
  """
  seeds = [int(s) for s in seeds]
  if not seeds or len(set(seeds)) != len(seeds):
    raise CurationConfigError("seeds", f"needs one or more distinct seeds, got {seeds}")
  if len(seeds) == 1:
    results, report = run_study(*seeded(setup, configs, seeds[0]), generator, out_dir,
                                progress=progress, log=log)
    return {seeds[0]: results}, report
  by_seed = {}
  for seed in seeds:
    one_setup, one_configs = seeded(setup, configs, seed)
    by_seed[seed], _ = run_study(
        one_setup, one_configs, generator, seed_dir(out_dir, seed), progress=progress,
        log=None if log is None else (lambda m, s=seed: log(f"seed {s}: {m}")))
  return by_seed, write_seeds_report(out_dir, by_seed, setup, confidence=confidence)


def curve_rows(results: Sequence[CurationResult]) -> list[dict[str, Any]]:
  """One row per (method, round): the sample-efficiency curves as a table."""
  keys = ("n_examples", "test_accuracy", "n_added", "pool_size", "train_premem_mean",
          "n_below_cutoff")
  return [{"method": res.method, "round": r["round"], **{k: r.get(k, math.nan) for k in keys}}
          for res in results for r in res.rounds]


def efficiency_rows(results: Sequence[CurationResult], reference: str = "premem"
                    ) -> list[dict[str, Any]]:
  """Data-efficiency ratio of `reference` against every other method (empty without it)."""
  by_method = {res.method: res for res in results}
  if reference not in by_method:
    return []
  rows = []
  for res in results:
    if res.method == reference:
      continue
    eff = data_efficiency_ratio(by_method[reference].curve(), res.curve())
    rows.append({"baseline": res.method, **dataclasses.asdict(eff)})
  return rows



def mean_band(values, confidence: float = 0.95) -> tuple[float, float, float]:
  """(mean, low, high): the Student-t interval of the mean of per-seed values (the spread
  of repetitions, test-sampling noise included); NaN bounds for a single value."""
  from scipy import stats

  v = np.asarray(values, np.float64)
  mean = float(v.mean())
  if v.size < 2:
    return mean, math.nan, math.nan
  half = float(stats.t.ppf(0.5 + confidence / 2, v.size - 1) * v.std(ddof=1) / math.sqrt(v.size))
  return mean, mean - half, mean + half


def mean_curves(by_seed: Mapping[int, Sequence[CurationResult]]
                ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """Each method's curve averaged over seeds, round by round (sizes and accuracies)."""
  out = {}
  for method in [r.method for r in next(iter(by_seed.values()))]:
    curves = [next(r for r in results if r.method == method).curve()
              for results in by_seed.values()]
    rounds = min(len(c[0]) for c in curves)
    out[method] = (np.mean([c[0][:rounds] for c in curves], axis=0),
                   np.mean([c[1][:rounds] for c in curves], axis=0))
  return out


def seed_curve_rows(by_seed: Mapping[int, Sequence[CurationResult]], confidence: float = 0.95
                    ) -> list[dict[str, Any]]:
  """One row per (method, round) across seeds: mean test accuracy, its band and each
  seed's value."""
  rows = []
  for method, (sizes, _) in mean_curves(by_seed).items():
    for i, size in enumerate(sizes):
      accs = {seed: next(r for r in results if r.method == method).rounds[i]["test_accuracy"]
              for seed, results in by_seed.items()}
      mean, low, high = mean_band(list(accs.values()), confidence)
      pools = [next(r for r in results if r.method == method).rounds[i].get("pool_size")
               for results in by_seed.values()]
      rows.append({"method": method, "round": i, "n_examples": float(size),
                   "test_accuracy": mean, "band_low": low, "band_high": high,
                   **{f"seed_{s}": a for s, a in accs.items()},
                   # How selective the method's sources were: D_train examples drawn from.
                   "pool_size": (float(np.mean(pools)) if None not in pools else math.nan)})
  return rows


def seed_efficiency_rows(by_seed: Mapping[int, Sequence[CurationResult]],
                         reference: str = "premem") -> list[dict[str, Any]]:
  """Data-efficiency ratio of `reference` against each baseline: on the seed-mean curves,
  and each seed's own."""
  curves = mean_curves(by_seed)
  if reference not in curves:
    return []
  per_seed = {seed: {r["baseline"]: r for r in efficiency_rows(results, reference)}
              for seed, results in by_seed.items()}
  rows = []
  for method, curve in curves.items():
    if method == reference:
      continue
    eff = data_efficiency_ratio(curves[reference], curve)
    rows.append({"baseline": method, **dataclasses.asdict(eff),
                 **{f"ratio_seed_{s}": per_seed[s][method]["ratio_lower_bound"]
                    for s in by_seed}})
  return rows


def write_seeds_report(out: str, by_seed: Mapping[int, Sequence[CurationResult]],
                       setup: CurationSetup, confidence: float = 0.95) -> str:
  """The study across seeds, into `out`: curve.csv (`seed_curve_rows`), efficiency.csv
  (`seed_efficiency_rows`), sample_efficiency.png (mean curves with their bands),
  summary.json and report.md.

  Returns:
    The path of report.md.
  """
  from memdyn_jax.report import markdown, plots

  curve = seed_curve_rows(by_seed, confidence)
  efficiency = seed_efficiency_rows(by_seed)
  markdown.write_csv(os.path.join(out, "curve.csv"), curve)
  if efficiency:
    markdown.write_csv(os.path.join(out, "efficiency.csv"), efficiency)
  curves = mean_curves(by_seed)
  bands = {m: (np.asarray([r["band_low"] for r in curve if r["method"] == m]),
               np.asarray([r["band_high"] for r in curve if r["method"] == m]))
           for m in curves}
  seeds = list(by_seed)
  png = plots.sample_efficiency(
      curves, os.path.join(out, "sample_efficiency.png"), bands=bands,
      title=f"{setup.task.name}: test accuracy, mean of {len(seeds)} seeds")
  summary = {"task": setup.task.name, "seeds": seeds, "confidence": confidence,
             "n_train": len(setup.train_examples), "n_test": len(setup.test_examples),
             "curves": {m: [r for r in curve if r["method"] == m] for m in curves},
             "efficiency": {r["baseline"]: r for r in efficiency},
             "per_seed": {str(s): [{"method": r.method, "rounds": list(r.rounds)}
                                   for r in results] for s, results in by_seed.items()}}
  markdown.write_json(os.path.join(out, SUMMARY_FILE), summary)
  rounds = len(next(iter(curves.values()))[0]) - 1
  return _report(
      out, f"Data curation on {setup.task.name} (Kang et al. Sec. 5.2), {len(seeds)} seeds",
      f"{len(setup.train_examples)} original training examples, {rounds} rounds of "
      f"additions, {len(setup.test_examples)} test examples; every round fine-tunes the "
      f"base model afresh on the current set. Seeds {seeds}: each seed draws its own "
      f"sources and new examples and its own fine-tuning data order "
      f"({SEED_DIR_PREFIX}<seed>/ holds each seed's study and report). Bands: "
      f"{100 * confidence:g}% Student-t intervals of the mean over seeds.",
      png, curve, efficiency,
      "Examples each baseline needs (linear interpolation along its mean curve) to reach "
      "the accuracy PreMemAcc curation's mean curve ends with; ratio = baseline / "
      "PreMemAcc, NaN = never reached (then the ratio is above ratio_lower_bound); "
      "ratio_seed_<s>: the same on each seed's own curves (lower bound where never "
      "reached).", curve_heading="Test accuracy vs training examples (mean over seeds)")


def _report(out: str, title: str, intro: str, png: str, curve, efficiency, how: str, *,
            curve_heading: str = "Test accuracy vs training examples") -> str:
  """report.md of a curation study: the plot, the curve table and the efficiency table."""
  from memdyn_jax.report import markdown

  report = markdown.Report(title)
  report.paragraph(intro)
  report.image(png, "sample efficiency", out)
  report.heading(curve_heading)
  report.table(curve)
  report.heading("Data efficiency at matched accuracy")
  if efficiency:
    report.paragraph(how)
    report.table(efficiency)
  else:
    report.paragraph("Not computed: run the 'premem' method with at least one baseline.")
  return report.write(os.path.join(out, "report.md"))


def write_report(out: str, results: Sequence[CurationResult], setup: CurationSetup) -> str:
  """Writes the study's tables, plot and report into `out`.

  Files: curve.csv (`curve_rows`), efficiency.csv (`efficiency_rows`, when "premem" and a
  baseline ran), sample_efficiency.png (test accuracy vs training examples per method),
  summary.json (those figures and every round) and report.md.

  Returns:
    The path of report.md.
  """
  from memdyn_jax.report import markdown, plots

  curve = curve_rows(results)
  efficiency = efficiency_rows(results)
  markdown.write_csv(os.path.join(out, "curve.csv"), curve)
  if efficiency:
    markdown.write_csv(os.path.join(out, "efficiency.csv"), efficiency)
  png = plots.sample_efficiency({r.method: r.curve() for r in results},
                                os.path.join(out, "sample_efficiency.png"),
                                title=f"{setup.task.name}: test accuracy vs training examples")
  markdown.write_json(os.path.join(out, SUMMARY_FILE), {
      "task": setup.task.name, "n_train": len(setup.train_examples),
      "n_test": len(setup.test_examples), "curve": curve,
      "efficiency": {r["baseline"]: r for r in efficiency},
      "rounds": {r.method: list(r.rounds) for r in results}})
  rounds = max(len(r.rounds) for r in results) - 1  # round 0 adds nothing
  return _report(
      out, f"Data curation on {setup.task.name} (Kang et al. Sec. 5.2)",
      f"{len(setup.train_examples)} original training examples, {rounds} rounds of "
      f"additions, {len(setup.test_examples)} test examples; every round fine-tunes the "
      "base model afresh on the current set.", png, curve, efficiency,
      "Examples each baseline needs (linear interpolation along its curve) to reach the "
      "accuracy PreMemAcc curation ends with; ratio = baseline / PreMemAcc. NaN = never "
      "reached: the ratio is above the lower bound.")
