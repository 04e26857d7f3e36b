"""Per-example evaluation of one checkpoint: sample-and-grade accuracy plus target scores.

For each example: `n` sampled completions graded by the task (accuracy = fraction correct,
unparseable counted apart from wrong), and the teacher-forced score of the exact target
trace (perplexity, exact memorization, mean entropy) under the same prompt/target
convention as training. Both primitives (`sampling.sample`, `scoring.score_texts`) compile
per shape bucket and reuse programs across checkpoints of the same architecture.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np

from memdyn_jax import sampling, scoring
from memdyn_jax.tasks.base import Example, Task


@dataclasses.dataclass(frozen=True)
class ExampleRecord:
  """Evaluation of one example at one checkpoint (one row of `run_dir/eval/` records)."""

  example_id: str
  split: str
  accuracy: float  # fraction of the n samples graded correct
  n_samples: int
  n_unparseable: int
  perplexity: float  # of the target trace (stop text included)
  exact_memorization: float  # fraction of target tokens predicted by argmax (Ge et al.)
  mean_entropy: float  # mean teacher-forced predictive entropy over target tokens
  perturbation: str | None = None

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def evaluate_examples(model, tokenizer, task: Task, examples: Sequence[Example], split: str, *,
                      params: sampling.SamplingParams, perturbation: str | None = None,
                      batch_size: int = 16, max_length: int | None = None, mesh=None,
                      append_eos: bool = False) -> list[ExampleRecord]:
  """Samples, grades and scores `examples` with `model`; one record per example.

  Sampling stops at the task's stop strings unless `params.stop` is set. Targets are scored
  with the unperturbed prompt's template (a perturbation only affects sampling).
  """
  if not examples:
    raise ValueError(f"no examples to evaluate for split {split!r}")
  if not params.stop:
    params = dataclasses.replace(params, stop=tuple(task.stop))
  prompts = [task.format_prompt(ex.question, perturbation) for ex in examples]
  completions = sampling.sample(model, tokenizer, prompts, params, batch_size=batch_size,
                                mesh=mesh)
  clean_prompts = [task.format_prompt(ex.question) for ex in examples]
  targets = [task.format_target(ex) for ex in examples]
  scores = scoring.score_texts(model, tokenizer, clean_prompts, targets, batch_size=batch_size,
                               max_length=max_length, overlength="truncate", mesh=mesh,
                               append_eos=append_eos)
  by_index = {s.index: s for s in scores}
  records = []
  for i, (ex, samples) in enumerate(zip(examples, completions)):
    grades = [task.grade_detailed(c.text, ex.answer) for c in samples]
    s = by_index.get(i)
    records.append(ExampleRecord(
        example_id=ex.id, split=split,
        accuracy=float(np.mean([g.correct for g in grades])) if grades else float("nan"),
        n_samples=len(grades), n_unparseable=sum(g.unparseable for g in grades),
        perplexity=s.perplexity if s else float("nan"),
        exact_memorization=s.exact_memorization if s else float("nan"),
        mean_entropy=s.mean_entropy if s else float("nan"),
        perturbation=perturbation))
  return records


def summarize(records: Sequence[ExampleRecord]) -> dict[str, float]:
  """Dataset means: accuracy, perplexity (mean of per-example), exact memorization, entropy."""
  if not records:
    raise ValueError("no records to summarize")
  col = lambda name: np.asarray([getattr(r, name) for r in records], np.float64)
  return {"accuracy": float(np.nanmean(col("accuracy"))),
          "perplexity": float(np.nanmean(col("perplexity"))),
          "exact_memorization": float(np.nanmean(col("exact_memorization"))),
          "mean_entropy": float(np.nanmean(col("mean_entropy"))),
          "unparseable_rate": float(col("n_unparseable").sum() / max(col("n_samples").sum(), 1)),
          "n_examples": len(records)}
