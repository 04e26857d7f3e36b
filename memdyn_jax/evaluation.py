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

Per checkpoint, optionally, the gradient variance over fixed train minibatches (Kang et al.
App. B.1; `memdyn_jax.gradient_variance`), stored in `step_<n>/checkpoint.json`.

Both primitives (`sampling.sample`, `scoring.score_texts`) compile per shape bucket and
reuse programs across checkpoints of the same architecture, so evaluating a second
checkpoint costs no compilation.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from memdyn_jax import checkpoints
from memdyn_jax import gradient_variance as gv_lib
from memdyn_jax import records as records_lib
from memdyn_jax import sampling, scoring
from memdyn_jax.gradient_variance import GradientVarianceConfig
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
                      score_targets: bool = True, keep_texts: bool = False
                      ) -> list[ExampleRecord]:
  """Samples, grades and scores `examples` with `model`; one record per example.

  Sampling stops at the task's stop strings unless `params.stop` is set. Targets are scored
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
    append_eos: score an EOS after the target (as when trained with it).
    greedy: also decode greedily (same budget and stops) and record the greedy response's
      correctness and likelihood (ATC).
    score_targets: teacher-force the target trace (off for perturbed prompts, whose target
      score equals the unperturbed one).
    keep_texts: store the sample and greedy texts in the records.

  Returns:
    One ExampleRecord per example, in input order.

  Raises:
    ValueError: no examples.
  """
  if not examples:
    raise ValueError(f"no examples to evaluate for split {split!r}")
  if not params.stop:
    params = dataclasses.replace(params, stop=tuple(task.stop))
  prompts = [task.format_prompt(ex.question, perturbation) for ex in examples]
  completions = sampling.sample(model, tokenizer, prompts, params, batch_size=batch_size,
                                mesh=mesh)
  greedy_out = [None] * len(examples)
  if greedy:
    gparams = dataclasses.replace(params, temperature=0.0, top_p=1.0, top_k=0, min_p=0.0, n=1)
    greedy_out = [c[0] for c in sampling.sample(model, tokenizer, prompts, gparams,
                                                batch_size=batch_size, mesh=mesh)]
  by_index = {}
  if score_targets:
    clean_prompts = [task.format_prompt(ex.question) for ex in examples]
    targets = [task.format_target(ex) for ex in examples]
    scores = scoring.score_texts(model, tokenizer, clean_prompts, targets,
                                 batch_size=batch_size, max_length=max_length,
                                 overlength="truncate", mesh=mesh, append_eos=append_eos)
    by_index = {s.index: s for s in scores}
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



# ----------------------------------------------------------------------------- whole runs

# Kang et al.'s reference sampling settings per task; others fall back to GSM8K's.
TASK_SAMPLING_DEFAULTS: dict[str, dict[str, Any]] = {
    "gsm8k": dict(temperature=0.8, top_p=0.95, max_new_tokens=512, n=5),
    "math": dict(temperature=0.8, top_p=1.0, max_new_tokens=1024, n=5),
    # Synthetic traces are < 200 tokens; a shorter budget keeps CPU runs quick.
    "synthetic_arith": dict(temperature=0.8, top_p=0.95, max_new_tokens=256, n=5),
}


def default_sampling(task_name: str, **overrides) -> sampling.SamplingParams:
  """The task's default SamplingParams (Kang et al.), with non-None `overrides` applied."""
  kwargs = dict(TASK_SAMPLING_DEFAULTS.get(task_name, TASK_SAMPLING_DEFAULTS["gsm8k"]))
  kwargs.update({k: v for k, v in overrides.items() if v is not None})
  return sampling.SamplingParams(**kwargs)


EXAMPLES_FILE = "examples.json"


def read_examples_listing(run_dir: str) -> dict[str, Any] | None:
  """The run's examples.json (task, task_kwargs, split, ids of the training rows), or None."""
  file = os.path.join(run_dir, EXAMPLES_FILE)
  if not os.path.exists(file):
    return None
  with open(file, encoding="utf-8") as f:
    return json.load(f)


def trained_examples(run_dir: str, task: Task, split: str | None = None,
                     path: str | None = None) -> list[Example]:
  """The rows of a run's training data, in training-row order (a `data_fraction` < 1 run
  draws from a subset of them: `drawn_examples`).

  Uses `run_dir/examples.json` (written by experiments/train.py: row index -> example id)
  when present; otherwise the task's whole `split` (default "train").

  Raises:
    ValueError: examples.json names ids the task does not produce (a different
      --task_kwargs / --task_path than at training time).
  """
  listing = read_examples_listing(run_dir)
  file = os.path.join(run_dir, EXAMPLES_FILE)
  split = split or (listing or {}).get("split", "train")
  examples = task.load(split, path)
  if listing is None:
    return examples
  by_id = {ex.id: ex for ex in examples}
  missing = [i for i in listing["ids"] if i not in by_id]
  if missing:
    raise ValueError(f"{file}: {len(missing)} trained example ids (e.g. {missing[0]!r}) are "
                     f"not in task {task.name!r} split {split!r}; use the task arguments "
                     "the run was trained with")
  return [by_id[i] for i in listing["ids"]]


def drawn_examples(run_dir: str, trained: Sequence[Example]) -> list[Example]:
  """Of a run's training rows (`trained_examples`), those its sampler draws from: the fixed
  subset of a `data_fraction` < 1 run (subset.json), else all. A run's train split is scored
  on these, so its memorization and PreMemAcc cover only examples it has seen.

  Raises:
    checkpoints.RunDirError: subset.json is damaged or names rows the run does not have.
  """
  indices = checkpoints.read_subset(run_dir)
  if indices is None:
    return list(trained)
  bad = [i for i in indices if not 0 <= i < len(trained)]
  if bad:
    raise checkpoints.RunDirError(f"{run_dir}/{checkpoints.SUBSET_FILE} names row {bad[0]}; "
                                  f"the run's training data has rows 0..{len(trained) - 1}")
  return [trained[i] for i in indices]


def subset(examples: Sequence[Example], n: int, seed: int = 0) -> list[Example]:
  """A seeded random subset of `n` examples in their original order (all when n <= 0 or
  n >= len); the same (examples, n, seed) always gives the same subset."""
  if n <= 0 or n >= len(examples):
    return list(examples)
  keep = np.sort(np.random.RandomState(seed).choice(len(examples), n, replace=False))
  return [examples[i] for i in keep]


@dataclasses.dataclass(frozen=True)
class EvalUnit:
  """One (split, perturbation) evaluated at every checkpoint.

  Attributes:
    split: label of the records ("train", "test", "ood", "perturbed").
    examples: the examples.
    perturbation: answer preamble, or None.
    greedy: also decode greedily (ATC score).
    score_targets: teacher-force the target trace.
  """

  split: str
  examples: tuple[Example, ...]
  perturbation: str | None = None
  greedy: bool = True
  score_targets: bool = True


@dataclasses.dataclass(frozen=True)
class StepTiming:
  """Wall-clock seconds spent on one checkpoint: restoring it, evaluating its units and
  measuring its gradient variance (0 when not measured)."""

  step: int
  load_s: float
  eval_s: float
  units: int
  gradient_variance_s: float = 0.0


def evaluate_run(run_dir: str, task: Task, tokenizer, units: Sequence[EvalUnit],
                 params: sampling.SamplingParams, *, steps: Sequence[int] | None = None,
                 include_base: bool = False, batch_size: int = 16,
                 max_length: int | None = None, append_eos: bool | None = None, mesh=None,
                 keep_texts: bool = False, progress: bool = True,
                 name: str = records_lib.EVAL_DIR, log=None,
                 grad_variance: GradientVarianceConfig | None = None,
                 grad_variance_examples: Sequence[Example] | None = None,
                 should_stop: Callable[[], bool] | None = None) -> list[StepTiming]:
  """Evaluates every pending (checkpoint, unit) of a run and writes its records atomically.

  Units whose record files already exist are skipped, and a checkpoint with nothing
  pending is not even restored. Every checkpoint shares one architecture and the same
  batch/bucket shapes, so the sampling, scoring and gradient programs compiled for the
  first one are reused for the rest.

  Args:
    run_dir: the training run directory.
    task: the run's task.
    tokenizer: the base model's tokenizer.
    units: what to evaluate at each checkpoint.
    params: sampling parameters.
    steps: checkpoint steps; default all complete ones.
    include_base: also evaluate the base model, as step 0.
    batch_size: prompts per compiled program.
    max_length, append_eos: scoring convention; default the run's training config.
    mesh: device mesh; default the first local device.
    keep_texts: store sample texts in the records.
    progress: tqdm bar over (checkpoint, unit) pairs.
    name: eval folder name under `run_dir`.
    log: optional `log(message)` called after each checkpoint.
    grad_variance: also measure each checkpoint's gradient variance (Kang et al. App. B.1)
      into `step_<n>/checkpoint.json`; a checkpoint whose stored value was measured with
      the same settings is skipped, one with other settings is measured again.
    grad_variance_examples: the train examples its minibatches are drawn from; default
      the examples of the "train" unit.
    should_stop: checked after each unit's records are written; when it returns True the
      evaluation stops there (what is written stays; a re-run continues), e.g. the flag of
      `train.loop.StopSignals` on SIGTERM / Ctrl-C.

  Returns:
    A StepTiming per checkpoint evaluated (skipped ones are absent).

  Raises:
    FileNotFoundError: not a run directory, or it has no checkpoint.
    ValueError: a requested step is not a checkpoint; too few gradient-variance examples.
  """
  import tqdm

  from memdyn_jax import checkpoints

  info = checkpoints.read_run_info(run_dir)
  cfg = info["config"]
  available = checkpoints.list_steps(run_dir)
  if not available:
    raise FileNotFoundError(f"{run_dir} has no complete checkpoint")
  wanted = list(available) if steps is None else [int(s) for s in steps]
  bad = [s for s in wanted if s not in available and not (s == 0 and include_base)]
  if bad:
    raise ValueError(f"{run_dir} has no checkpoint at step(s) {bad}; steps: {available}")
  if include_base and 0 not in wanted:
    wanted = [0] + wanted
  max_length = max_length or cfg.get("max_length")
  append_eos = cfg.get("append_eos", False) if append_eos is None else append_eos
  pending = [(s, u) for s in sorted(set(wanted)) for u in units
             if not records_lib.is_done(run_dir, s, u.split, u.perturbation, name=name)]
  gv_batches, gv_settings, gv_pending = None, None, set()
  if grad_variance is not None:
    if grad_variance_examples is None:
      grad_variance_examples = next((u.examples for u in units if u.split == "train"), ())
    gv_batches = gv_lib.make_minibatches(tokenizer, task, grad_variance_examples,
                                         grad_variance, max_length=max_length,
                                         append_eos=append_eos)
    gv_settings = gv_lib.settings(grad_variance, gv_batches)
    gv_pending = {s for s in set(wanted) if records_lib.read_checkpoint_stats(
        run_dir, s, name=name).get(records_lib.GRADIENT_VARIANCE_SETTINGS) != gv_settings}
  timings = []
  bar = tqdm.tqdm(total=len(pending), disable=not progress, desc=os.path.basename(run_dir),
                  unit="unit")
  try:
    for step in sorted({s for s, _ in pending} | gv_pending):
      t0 = time.perf_counter()
      model = _load_step(run_dir, step, info, mesh)
      load_s = time.perf_counter() - t0
      gv_s = 0.0
      if step in gv_pending:
        t1 = time.perf_counter()
        value = gv_lib.checkpoint_gradient_variance(model, gv_batches, mesh=mesh,
                                                    ddof=grad_variance.ddof)
        records_lib.update_checkpoint_stats(
            run_dir, step, {records_lib.GRADIENT_VARIANCE: value,
                            records_lib.GRADIENT_VARIANCE_SETTINGS: gv_settings}, name=name)
        gv_s = time.perf_counter() - t1
      todo = [u for s, u in pending if s == step]
      t1 = time.perf_counter()
      for unit in todo:
        bar.set_postfix(step=step,
                        split=records_lib.unit_name(unit.split, unit.perturbation))
        recs = evaluate_examples(
            model, tokenizer, task, unit.examples, unit.split, params=params,
            perturbation=unit.perturbation, batch_size=batch_size, max_length=max_length,
            mesh=mesh, append_eos=append_eos, greedy=unit.greedy,
            score_targets=unit.score_targets, keep_texts=keep_texts)
        records_lib.write_records(run_dir, step, unit.split, [r.to_dict() for r in recs],
                                  unit.perturbation, name=name)
        bar.update(1)
        if should_stop is not None and should_stop():
          break
      timing = StepTiming(step, load_s, time.perf_counter() - t1, len(todo), gv_s)
      timings.append(timing)
      if log is not None:
        log(f"step {step}: restored in {timing.load_s:.1f}s, {timing.units} unit(s) "
            f"evaluated in {timing.eval_s:.1f}s"
            + (f", gradient variance in {gv_s:.1f}s" if step in gv_pending else ""))
      del model
      if should_stop is not None and should_stop():
        break
  finally:
    bar.close()
  return timings


def _load_step(run_dir: str, step: int, info: Mapping[str, Any], mesh):
  """The model of checkpoint `step`; step 0 without a checkpoint is the base model."""
  import jax

  from memdyn_jax import checkpoints, sharding
  from memdyn_jax.models import hf_io
  from memdyn_jax.train.config import TrainConfig

  if step == 0 and 0 not in checkpoints.list_steps(run_dir):
    cfg = TrainConfig.from_dict(info["config"])
    mesh = mesh if mesh is not None else sharding.make_mesh(devices=jax.local_devices()[:1])
    return checkpoints.load_base_model(hf_io.resolve_checkpoint_dir(info["model"]["path"]),
                                       cfg, mesh)
  model, _ = checkpoints.restore(run_dir, step, mesh)
  return model
