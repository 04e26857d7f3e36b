"""Per-example evaluation of one checkpoint: sample-and-grade accuracy plus target scores.

For each example (Kang et al. Sec. 3; Ge et al. Sec. 2; Ruan et al.):
  * `n` sampled completions graded by the task: accuracy = fraction correct, unparseable
    counted apart from wrong;
  * the teacher-forced score of the exact target trace (stop text included): perplexity,
    exact memorization (response and full), mean predictive entropy, summed log-prob;
  * optionally one greedy completion, its correctness and its likelihood (the ATC score of
    Kang et al. App. B.3);
  * the mean raw-model entropy at the sampled tokens (nucleus sampling) next to the
    teacher-forced entropy of the target (Ge et al. Table 1);
  * diversity among the n samples: distinct-1/2, unique final answers, unique traces;
  * the example's category metadata (`example_meta`), for per-category data maps (Ge et al.).

A run's checkpoints are evaluated by `memdyn_jax.evaluation.run`, which calls
`evaluate_examples` per (checkpoint, unit). Both primitives (`sampling.sample`, `scoring.score_texts`) compile per shape bucket and
reuse programs across checkpoints of the same architecture, so evaluating a second
checkpoint costs no compilation.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from memdyn_jax.evaluation import sampling, scoring
from memdyn_jax.metrics import diversity
from memdyn_jax.tasks.base import Example, Task

_NAN = float("nan")


@dataclasses.dataclass(frozen=True)
class ExampleRecord:
  """Evaluation of one example at one checkpoint (one row of `run_dir/eval/` records).

  Attributes:
    example_id: the task's example id.
    split: "train", "test", "ood", "perturbed", ...
    accuracy: fraction of the n samples graded correct.
    n_samples: samples drawn.
    n_unparseable: samples with no parseable final answer.
    perplexity: of the target trace (stop text included); NaN when not scored.
    exact_memorization: fraction of target tokens predicted by argmax (Ge et al. Eq. 1).
    mean_entropy: mean teacher-forced predictive entropy over target tokens.
    perturbation: the answer preamble sampled from, or None.
    exact_memorization_full: the same over prompt and response tokens.
    target_sum_logprob: sum of target-token log-probs.
    n_target_tokens: target tokens scored.
    sampled_entropy: mean raw-model entropy at the sampled tokens, over all samples
      (Ge et al. Table 1, "nucleus sampling").
    sampled_mean_logprob: mean raw-model log-prob of the sampled tokens.
    mean_sample_tokens: mean generated tokens per sample.
    distinct_1, distinct_2: distinct-n over the samples' whitespace tokens.
    unique_answers: distinct parsed final answers among the samples.
    unique_traces: distinct sample texts (whitespace-normalized).
    greedy_correct: 1.0/0.0 for the greedy completion; NaN when not run.
    greedy_unparseable: the greedy completion had no parseable answer.
    greedy_sum_logprob: log-likelihood of the greedy completion (ATC score).
    greedy_mean_logprob: its mean token log-prob.
    greedy_n_tokens: its length in tokens.
    answers: parsed answer of each sample (None = unparseable).
    texts: sample texts (only when asked for).
    greedy_text: the greedy completion's text (only when texts are asked for).
    category: the example's primary category, "key=value" (`example_category`).
    meta: the example's category metadata (`example_meta`).
  """

  example_id: str
  split: str
  accuracy: float
  n_samples: int
  n_unparseable: int
  perplexity: float
  exact_memorization: float
  mean_entropy: float
  perturbation: str | None = None
  exact_memorization_full: float = _NAN
  target_sum_logprob: float = _NAN
  n_target_tokens: int = 0
  sampled_entropy: float = _NAN
  sampled_mean_logprob: float = _NAN
  mean_sample_tokens: float = _NAN
  distinct_1: float = _NAN
  distinct_2: float = _NAN
  unique_answers: int = 0
  unique_traces: int = 0
  greedy_correct: float = _NAN
  greedy_unparseable: bool = False
  greedy_sum_logprob: float = _NAN
  greedy_mean_logprob: float = _NAN
  greedy_n_tokens: int = 0
  answers: tuple[str | None, ...] = ()
  texts: tuple[str, ...] = ()
  greedy_text: str | None = None
  category: str = ""
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out["answers"], out["texts"] = list(self.answers), list(self.texts)
    out["meta"] = dict(self.meta)
    return out

  @classmethod
  def from_dict(cls, row: Mapping[str, Any]) -> "ExampleRecord":
    """Inverse of `to_dict`; keys that are not fields (run, step, ...) are ignored."""
    kwargs = {k: row[k] for k in _FIELDS if k in row}
    for key in ("answers", "texts"):
      if key in kwargs:
        kwargs[key] = tuple(kwargs[key])
    return cls(**kwargs)


_FIELDS = tuple(f.name for f in dataclasses.fields(ExampleRecord))

# Example.meta keys that name a category (Ge et al. summarize data maps per category):
# sft "category", MATH "subject" and "level", synthetic_arith "level" (= reasoning steps)
# and "n_lines" (trace lines). Order = precedence of the primary category.
CATEGORY_KEYS = ("category", "subject", "level", "n_lines")
_GSM8K_ANSWER_LINE = "####"


def solution_lines(target: str) -> int:
  """Non-empty lines of a solution trace, not counting a GSM8K "#### answer" line."""
  return sum(1 for line in target.splitlines()
             if line.strip() and not line.lstrip().startswith(_GSM8K_ANSWER_LINE))


def example_meta(example: Example) -> dict[str, Any]:
  """The compact category metadata of an example: its scalar `CATEGORY_KEYS` fields.

  Tasks without any (GSM8K) get "n_lines", the number of solution lines, a proxy for the
  number of reasoning steps.
  """
  meta = {k: example.meta[k] for k in CATEGORY_KEYS
          if isinstance(example.meta.get(k), (str, int, float, bool)) and example.meta[k] != ""}
  if not meta:
    meta["n_lines"] = solution_lines(example.target)
  return meta


def example_category(meta: Mapping[str, Any]) -> str:
  """The primary category "key=value" of `example_meta` output ("" when it is empty)."""
  key = next((k for k in CATEGORY_KEYS if k in meta), None)
  return "" if key is None else f"{key}={meta[key]}"


def _mean_over_tokens(arrays: Sequence[np.ndarray]) -> float:
  total = sum(int(a.size) for a in arrays)
  if not total:
    return _NAN
  return float(sum(float(np.sum(a, dtype=np.float64)) for a in arrays) / total)


def evaluate_examples(model, tokenizer, task: Task, examples: Sequence[Example], split: str, *,
                      params: sampling.SamplingParams, perturbation: str | None = None,
                      batch_size: int = 16, max_length: int | None = None, mesh=None,
                      append_eos: bool = False, greedy: bool = False,
                      score_targets: bool = True, keep_texts: bool = False,
                      progress: Callable[[str, int, int, int], None] | None = None
                      ) -> list[ExampleRecord]:
  """Samples, grades and scores `examples` with `model`; one record per example.

  Sampling stops at `params.stop` (`default_sampling` gives the task's). Targets are scored
  with the unperturbed prompt's template (a perturbation only affects sampling).

  Args:
    model: a `memdyn_jax.models` causal LM.
    tokenizer: its tokenizer.
    task: grades completions and renders prompts/targets.
    examples: the examples to evaluate.
    split: split label written into the records.
    params: sampling parameters of the n samples.
    perturbation: answer preamble appended to the prompt (Kang et al. Fig. 6).
    batch_size: prompts per compiled sampling/scoring program.
    max_length: scoring window (tokens); default the model's.
    mesh: device mesh for sampling and scoring.
    append_eos: score an EOS after the target (as when trained with it; never after a
      chat template's end of turn).
    greedy: also decode greedily (same budget and stops) and record the greedy response's
      correctness and likelihood (ATC).
    score_targets: teacher-force the target trace (off for perturbed prompts, whose target
      score equals the unperturbed one).
    keep_texts: store the sample and greedy texts in the records.
    progress: `progress(phase, done, total, tokens)` as the work goes: phase "sampling",
      "greedy" (after each batch of prompts: prompts done of `total`, tokens generated so
      far) or "scoring" (at its start and end).

  Returns:
    One ExampleRecord per example, in input order.

  Raises:
    ValueError: no examples.
  """
  if not examples:
    raise ValueError(f"no examples to evaluate for split {split!r}")
  n = len(examples)

  def phase(name: str):
    return None if progress is None else (lambda done, tokens: progress(name, done, n, tokens))

  prompts = [task.format_prompt(ex.question, perturbation) for ex in examples]
  completions = sampling.sample(model, tokenizer, prompts, params, batch_size=batch_size,
                                mesh=mesh, progress=phase("sampling"))
  greedy_out = [None] * len(examples)
  if greedy:
    gparams = dataclasses.replace(params, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, n=1)
    greedy_out = [c[0] for c in sampling.sample(model, tokenizer, prompts, gparams,
                                                batch_size=batch_size, mesh=mesh,
                                                progress=phase("greedy"))]
  by_index = {}
  if score_targets:
    if progress is not None:
      progress("scoring", 0, n, 0)
    clean_prompts = [task.format_prompt(ex.question) for ex in examples]
    targets = [task.format_target(ex) for ex in examples]
    scores = scoring.score_texts(model, tokenizer, clean_prompts, targets,
                                 batch_size=batch_size, max_length=max_length,
                                 overlength="truncate", mesh=mesh,
                                 append_eos=append_eos and not task.end_of_turn,
                                 joint_target=task.joint_target)
    by_index = {s.index: s for s in scores}
    if progress is not None:
      progress("scoring", n, n, 0)
  records = []
  for i, (ex, samples) in enumerate(zip(examples, completions)):
    grades = [task.grade_detailed(c.text, ex.answer) for c in samples]
    answers = tuple(g.parsed for g in grades)
    texts = [c.text for c in samples]
    div = diversity.sample_diversity(texts, list(answers))
    s = by_index.get(i)
    g = greedy_out[i]
    ggrade = task.grade_detailed(g.text, ex.answer) if g is not None else None
    meta = example_meta(ex)
    records.append(ExampleRecord(
        example_id=ex.id, split=split,
        accuracy=float(np.mean([gr.correct for gr in grades])) if grades else _NAN,
        n_samples=len(grades), n_unparseable=sum(gr.unparseable for gr in grades),
        perplexity=s.perplexity if s else _NAN,
        exact_memorization=s.exact_memorization if s else _NAN,
        mean_entropy=s.mean_entropy if s else _NAN,
        perturbation=perturbation,
        exact_memorization_full=s.exact_memorization_full if s else _NAN,
        target_sum_logprob=s.sum_logprob if s else _NAN,
        n_target_tokens=s.n_target_tokens if s else 0,
        sampled_entropy=_mean_over_tokens([c.entropies for c in samples]),
        sampled_mean_logprob=_mean_over_tokens([c.logprobs for c in samples]),
        mean_sample_tokens=float(np.mean([len(c.token_ids) for c in samples])),
        distinct_1=div.distinct_1, distinct_2=div.distinct_2,
        unique_answers=div.unique_answers, unique_traces=div.unique_traces,
        greedy_correct=float(ggrade.correct) if ggrade else _NAN,
        greedy_unparseable=bool(ggrade.unparseable) if ggrade else False,
        greedy_sum_logprob=float(np.sum(g.logprobs, dtype=np.float64)) if g else _NAN,
        greedy_mean_logprob=(float(np.mean(g.logprobs)) if g and len(g.logprobs) else _NAN),
        greedy_n_tokens=len(g.token_ids) if g else 0,
        answers=answers,
        texts=tuple(texts) if keep_texts else (),
        greedy_text=g.text if (g is not None and keep_texts) else None,
        category=example_category(meta), meta=meta))
  return records


def _column(records: Sequence[ExampleRecord], name: str) -> np.ndarray:
  return np.asarray([getattr(r, name) for r in records], np.float64)


def _nanmean(x: np.ndarray) -> float:
  # All-NaN columns (e.g. no greedy pass) summarize to NaN without a warning.
  return float(np.nanmean(x)) if (~np.isnan(x)).any() else _NAN


def summarize(records: Sequence[ExampleRecord]) -> dict[str, float]:
  """Dataset means of the per-example fields.

  Perplexity is the mean of per-example perplexities (an infinite one makes it inf).
  Fields that were not computed (NaN throughout) summarize to NaN.

  Raises:
    ValueError: no records.
  """
  if not records:
    raise ValueError("no records to summarize")
  out = {name: _nanmean(_column(records, name)) for name in (
      "accuracy", "perplexity", "exact_memorization", "exact_memorization_full",
      "mean_entropy", "sampled_entropy", "distinct_1", "distinct_2", "unique_answers",
      "unique_traces", "greedy_correct", "greedy_sum_logprob")}
  out["unparseable_rate"] = float(_column(records, "n_unparseable").sum()
                                  / max(_column(records, "n_samples").sum(), 1))
  out["n_examples"] = len(records)
  return out


# ---------------------------------------------------------------- sampling and subsets


def default_sampling(task: Task | str, **overrides) -> sampling.SamplingParams:
  """The task's default SamplingParams: its `sampling_defaults` (Kang et al.'s) and its
  stop strings (its template's, `"\\nDone."` by default), with non-None `overrides`
  applied (`stop=()`: none). The one place a task's stop strings join its sampling, so
  what is recorded is what ran. A Task with a chat template also stops at its end of turn
  whatever the overrides say: its stop token ids (`Task.stop_token_ids`, unless
  `stop_token_ids` is given) or its stop string (`Task.turn_stop`, added to the others).

  Args:
    task: a Task, or the exact name of a registered task (its class's rules and default
      template).
    **overrides: SamplingParams fields.

  Raises:
    UnknownTaskError: `task` is neither a Task nor a registered name (names the known ones).
    ValueError: a bad override (the message starts with the field's name).
  """
  from memdyn_jax import tasks  # registers every task, so `task_names` knows the name
  if isinstance(task, Task):
    defaults, stop = task.sampling_defaults, task.stop
  elif isinstance(task, str) and task in tasks.task_names():
    cls = tasks.task_class(task)
    defaults, stop = cls.sampling_defaults, cls.template.stop
  else:
    raise tasks.UnknownTaskError(task)
  kwargs = {**defaults, "stop": tuple(stop)}
  if isinstance(task, Task):
    kwargs["stop_token_ids"] = task.stop_token_ids
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  if isinstance(task, Task) and task.turn_stop:
    stop = (kwargs["stop"],) if isinstance(kwargs["stop"], str) else tuple(kwargs["stop"])
    kwargs["stop"] = stop + tuple(s for s in task.turn_stop if s not in stop)
  return sampling.SamplingParams(**kwargs)


def with_task_stop(params: sampling.SamplingParams, task: Task) -> sampling.SamplingParams:
  """`params` with the task's stop strings where it names none (`default_sampling`), for
  studies that take their own SamplingParams."""
  fields = dataclasses.asdict(params)
  return default_sampling(task, **{**fields, "stop": fields["stop"] or None})


def subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
  """A seeded random subset of `n` examples in their original order (all when n <= 0 or
  n >= len); the same (examples, n, seed) always gives the same subset."""
  if n <= 0 or n >= len(examples):
    return list(examples)
  keep = np.sort(np.random.RandomState(seed).choice(len(examples), n, replace=False))
  return [examples[i] for i in keep]
