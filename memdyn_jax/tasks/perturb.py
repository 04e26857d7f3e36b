"""Prompt perturbations: answer preambles that probe whether a memorized solution survives.

Following Kang et al. (Fig. 6), a perturbation is a short preamble such as "First" placed
at the start of the answer: with the default template the prompt becomes
"<question>\\nAnswer: First" and the model continues from there. Rendering is the task
template's job (`PromptTemplate.prompt` / `ChatTemplate.prompt`); this module enumerates
(example, perturbation) pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

from memdyn_jax.tasks.base import DEFAULT_TEMPLATE, Example, PromptTemplate, Task

DEFAULT_PERTURBATIONS: tuple[str, ...] = ("First", "We know that")


@dataclasses.dataclass(frozen=True)
class PerturbedPrompt:
  """One prompt to generate from.

  Attributes:
    example_index: position of the example in the input list.
    example_id: the example's id.
    perturbation: the preamble used, or None for the unperturbed prompt.
    prompt: the rendered prompt text.
  """

  example_index: int
  example_id: str
  perturbation: str | None
  prompt: str


def format_prompt(question: str, perturbation: str | None = None,
                  template: PromptTemplate = DEFAULT_TEMPLATE) -> str:
  """Renders `question` with the preamble after the answer cue ("...\\nAnswer: First")."""
  return template.prompt(question, perturbation)


def expand_perturbations(
    examples: Sequence[Example],
    perturbations: Sequence[str | None] = DEFAULT_PERTURBATIONS,
    *,
    task: Task | None = None,
    template: PromptTemplate = DEFAULT_TEMPLATE,
    include_unperturbed: bool = False,
) -> list[PerturbedPrompt]:
  """Every example under every perturbation, example-major.

  Args:
    examples: the examples to perturb.
    perturbations: preambles; None (or "") means "no perturbation".
    task: if given, its `format_prompt` renders the prompt (and `template` is ignored).
    template: used when no task is given.
    include_unperturbed: also emit the plain prompt first for each example.

  Returns:
    len(examples) * (len(perturbations) + include_unperturbed) prompts.
  """
  variants = ([None] if include_unperturbed else []) + [p or None for p in perturbations]
  render = task.format_prompt if task is not None else template.prompt
  return [
      PerturbedPrompt(example_index=i, example_id=ex.id, perturbation=p,
                      prompt=render(ex.question, p))
      for i, ex in enumerate(examples)
      for p in variants
  ]
