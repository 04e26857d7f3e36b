"""Examples, prompt templates and the Task interface shared by every dataset.

Data flows one way: a Task loads `Example`s, renders prompt and target text with a
`PromptTemplate`, and grades model completions. Tokenization lives in `tokenize.py`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import types
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence


@dataclasses.dataclass(frozen=True)
class Example:
  """One training or evaluation example.

  Attributes:
    id: stable identifier, unique within a task (e.g. "gsm8k/train/17").
    question: the problem text, without any template.
    target: the reference solution trace (what SFT trains on), without template.
    answer: the reference final answer as a string (e.g. "72", "\\frac{1}{2}").
    meta: free-form extra fields (MATH level/subject, synthetic difficulty, ...).
  """

  id: str
  question: str
  target: str
  answer: str
  meta: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class PromptTemplate:
  """How a question and a solution are rendered to text.

  The default is Kang et al.'s reference code: prompt `question + "\\nAnswer:"`,
  target `" " + solution + "\\nDone."`, generation stops at `"\\nDone."`.
  The stop text is part of the target, so scoring the target includes it.
  """

  prompt_format: str = "{question}\nAnswer:"
  target_format: str = " {solution}\nDone."
  stop: tuple[str, ...] = ("\nDone.",)

  def prompt(self, question: str, perturbation: str | None = None) -> str:
    text = self.prompt_format.format(question=question)
    if perturbation:
      # Perturbations are answer preambles appended after the prompt (Kang et al. Fig. 6).
      text = text + " " + perturbation
    return text

  def target(self, solution: str) -> str:
    return self.target_format.format(solution=solution)


DEFAULT_TEMPLATE = PromptTemplate()


@dataclasses.dataclass(frozen=True)
class ChatTemplate(PromptTemplate):
  """Renders the prompt with a tokenizer's own chat template (for instruct models).

  The prompt is `tokenizer.apply_chat_template([system?, user], add_generation_prompt=True,
  tokenize=False)` with the user turn `prompt_format.format(question=...)`. A perturbation is
  appended verbatim after the generation prompt (it starts the assistant turn; no space,
  since generation prompts end in a newline or a special token). The target has no leading
  space for the same reason; tokenize with `append_eos=True` so the assistant turn ends.

  Attributes:
    tokenizer: a Hugging Face tokenizer whose `chat_template` is set.
    system: optional system message.
  """

  prompt_format: str = "{question}"
  target_format: str = "{solution}"
  stop: tuple[str, ...] = ()
  # Excluded from eq/hash/repr: tokenizers are large and unhashable.
  tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
  system: str | None = None

  def prompt(self, question: str, perturbation: str | None = None) -> str:
    if self.tokenizer is None:
      raise ValueError("ChatTemplate needs a tokenizer")
    messages = [{"role": "system", "content": self.system}] if self.system else []
    messages.append({"role": "user", "content": self.prompt_format.format(question=question)})
    text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    if perturbation:
      text = text + perturbation
    return text


@dataclasses.dataclass(frozen=True)
class GradeResult:
  """Outcome of grading one completion.

  Attributes:
    correct: the extracted answer matches the reference.
    parsed: the extracted answer, or None when the completion was unparseable (no answer
      marker found). `parsed is None` tells "unparseable" apart from "wrong".
  """

  correct: bool
  parsed: str | None

  @property
  def unparseable(self) -> bool:
    return self.parsed is None


class DataError(ValueError):
  """Bad input data: malformed file, missing field, empty split. Names file and line."""


def resolve_split_path(path: str, split: str) -> str:
  """Returns the jsonl file for `split`: `path` itself, or `path/{split}.jsonl` for a folder."""
  file = os.path.join(path, f"{split}.jsonl") if os.path.isdir(path) else path
  if not os.path.isfile(file):
    raise DataError(f"{file}: no such data file (split {split!r})")
  return file


def load_hub_dataset(name: str, config: str | None, split: str):
  """`datasets.load_dataset(name, config, split=split)`, with one clear DataError when the Hub
  cannot be reached (offline, or the dataset is gone): the fix is a local path. Where the
  Hub does not answer, only the local cache is read (`memdyn_jax.hub`), so this fails at
  once.

  Tasks whose `load` takes `path` read local jsonl without the Hub; binaries pass it as
  --task_path.
  """
  import datasets  # Deferred: only Hub loading needs it, and it is slow to import.

  from memdyn_jax import hub
  # Without network, datasets would retry for ~30 s: offline mode fails at once (a cached
  # copy still loads).
  with hub.offline_unless_reachable() as offline:
    try:
      return datasets.load_dataset(name, config, split=split)
    # requests' and datasets' not-found errors are OSErrors.
    except (OSError, ConnectionError) as e:
      if offline:
        raise DataError(f"cannot load {name}[{config}/{split}]: {offline}, and the local "
                        "cache (HF_HOME) does not hold it; pass a local jsonl file or folder "
                        "as the task path (--task_path)") from e
      raise DataError(f"cannot load {name}[{config}/{split}] from the Hugging Face Hub "
                      f"({type(e).__name__}); offline, pass a local jsonl file or folder as "
                      f"the task path (--task_path)") from e


def ensure_nonempty(examples: Sequence[Example], source: str) -> None:
  """Raises DataError if a split loaded no examples; an empty split is always a mistake."""
  if not examples:
    raise DataError(f"{source}: empty split (no examples)")


def write_jsonl(path, records: Iterable[Mapping[str, Any]]):
  """Writes one JSON object per line (the inverse of `read_jsonl`); returns `path`."""
  with open(path, "w", encoding="utf-8") as f:
    for record in records:
      f.write(json.dumps(record) + "\n")
  return path


def read_jsonl(path: str, required: Sequence[str] = ()) -> Iterator[tuple[int, dict]]:
  """Yields (line_number, record) from a jsonl file; errors name `path:line`."""
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
      if not isinstance(record, dict):
        raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(record).__name__}")
      missing = [k for k in required if k not in record]
      if missing:
        raise DataError(f"{path}:{lineno}: missing field(s) {missing}")
      yield lineno, record


class Task:
  """Interface of a reasoning task. Subclasses set `name` and implement the methods."""

  name: str = ""
  template: PromptTemplate = DEFAULT_TEMPLATE
  # PreMemAcc memorization threshold on Kang et al.'s log(log(perplexity)) scale: their
  # reference code's GSM8K value (-2.3, perplexity 1.105); MATH overrides it (-1.7).
  memorization_loglog_threshold: float = -2.3
  # Sampling for accuracy (Kang et al.'s reference settings): GSM8K's, which tasks
  # without their own use; `memdyn_jax.evaluation.default_sampling` reads it.
  sampling_defaults: Mapping[str, Any] = types.MappingProxyType(
      dict(temperature=0.8, top_p=0.95, max_new_tokens=512, n=5))
  # Fraction of examples IFD/heuristic curation keeps (Kang et al. App. C: GSM8K 50%).
  curation_keep_fraction: float = 0.5
  # The task makes new problems on demand (`fresh_like`, `rephrase`), so curation can
  # collect examples without a rephrasing model.
  procedural: bool = False

  def load(self, split: str, path: str | None = None) -> list[Example]:
    raise NotImplementedError

  def format_prompt(self, question: str, perturbation: str | None = None) -> str:
    return self.template.prompt(question, perturbation)

  def format_target(self, example: Example) -> str:
    return self.template.target(example.target)

  @property
  def stop(self) -> tuple[str, ...]:
    return self.template.stop

  def extract_answer(self, text: str) -> str | None:
    raise NotImplementedError

  def grade(self, completion_text: str, reference_answer: str) -> bool:
    raise NotImplementedError

  def difficulty(self, example: Example) -> float:
    """Kang et al.'s heuristic difficulty (App. C), larger = harder; NaN ranks last.

    Raises:
      NotImplementedError: the task has no heuristic.
    """
    raise NotImplementedError(f"task {self.name!r} has no difficulty heuristic")

  def grade_detailed(self, completion_text: str, reference_answer: str) -> GradeResult:
    """Grades and reports the parsed answer, so callers can count unparseable outputs."""
    parsed = self.extract_answer(completion_text)
    if parsed is None:
      return GradeResult(correct=False, parsed=None)
    return GradeResult(correct=self.grade(completion_text, reference_answer), parsed=parsed)


_REGISTRY: dict[str, Callable[..., Task]] = {}


class UnknownTaskError(ValueError):
  """A task name no task is registered under; the message names the known ones."""

  def __init__(self, name: Any):
    super().__init__(f"unknown task {name!r}; known: {sorted(_REGISTRY)}")


def register_task(name: str):
  """Class decorator: makes a Task constructible by `get_task(name, **kwargs)`."""

  def wrap(cls):
    _REGISTRY[name] = cls
    cls.name = name
    return cls

  return wrap


def get_task(name: str, **kwargs) -> Task:
  """A new task of the registered name, built with `kwargs`.

  Raises:
    UnknownTaskError: no task of that (exact) name.
  """
  if name not in _REGISTRY:
    raise UnknownTaskError(name)
  return _REGISTRY[name](**kwargs)


def task_names() -> list[str]:
  return sorted(_REGISTRY)


def task_class(task_name: str | None) -> type[Task]:
  """The registered class of a task name; the `Task` base (GSM8K's defaults) for an unknown
  or unnamed one. Reads class-level rules without building the task."""
  return _REGISTRY.get(task_name, Task)


def memorization_threshold(task_name: str | None) -> float:
  """The task's default PreMemAcc threshold in perplexity units, exp(exp(t)) of its
  `memorization_loglog_threshold` (no instance needed); GSM8K's for an unknown or unnamed
  task."""
  return math.exp(math.exp(task_class(task_name).memorization_loglog_threshold))
