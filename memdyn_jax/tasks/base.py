"""Examples, prompt templates and the Task interface shared by every dataset.

Data flows one way: a Task loads `Example`s, renders prompt and target text with a
`PromptTemplate`, and grades model completions. Tokenization lives in `tokenize.py`.
"""
from __future__ import annotations

import dataclasses
import json
import os
import types
from typing import Any, Callable, ClassVar, Iterable, Iterator, Mapping, Sequence

from memdyn_jax.metrics import premem


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

  Few-shot examples (`shots`, (question, solution) pairs) are rendered in the same format,
  each as its prompt and target, followed by `fewshot_delimiter`, before the question (as
  lm-evaluation-harness does for GSM8K).
  """

  prompt_format: str = "{question}\nAnswer:"
  target_format: str = " {solution}\nDone."
  stop: tuple[str, ...] = ("\nDone.",)
  fewshot_delimiter: str = "\n\n"
  # Targets are tokenized on their own (`tokenize.py`'s convention); a chat template's are
  # the tokens its text gets after the prompt, in one joint tokenization.
  joint_target: ClassVar[bool] = False

  def prompt(self, question: str, perturbation: str | None = None,
             shots: Sequence[tuple[str, str]] = ()) -> str:
    text = "".join(self.prompt_format.format(question=q) + self.target(solution)
                   + self.fewshot_delimiter for q, solution in shots)
    text += self.prompt_format.format(question=question)
    if perturbation:
      # Perturbations are answer preambles appended after the prompt (Kang et al. Fig. 6).
      text = text + " " + perturbation
    return text

  def target(self, solution: str) -> str:
    return self.target_format.format(solution=solution)


DEFAULT_TEMPLATE = PromptTemplate()


class ChatTemplateError(ValueError):
  """A chat template that cannot render a task's prompts: no tokenizer, a tokenizer without
  a chat template, a template that refuses the conversation (e.g. a system turn), or one
  whose assistant turn does not continue its generation prompt."""


# Stands in for the assistant's content when the template's assistant turn is measured.
_CONTENT_SENTINEL = "MEMDYN_ASSISTANT_CONTENT_7f3a"


@dataclasses.dataclass(frozen=True)
class ChatTemplate(PromptTemplate):
  """Renders the prompt with a tokenizer's own chat template (for instruct models).

  The prompt is `tokenizer.apply_chat_template([system?, shots..., user],
  add_generation_prompt=True, tokenize=False)` with the user turn
  `prompt_format.format(question=...)`; few-shot examples are prior user/assistant turns.
  The target is the rest of the conversation's text up to the end of the assistant turn:
  what the template writes between the generation prompt and the content (`turn_prefix`,
  usually nothing), the solution, and the template's end-of-turn text (`end_of_turn`, e.g.
  `<|im_end|>`; the whitespace after it is not part of the target), measured once by
  rendering a conversation with a placeholder answer. So the target starts exactly where
  the assistant turn starts, and prompt + target is the template's own text.

  Targets are tokenized jointly with their prompt (`joint_target`), so prompt tokens +
  target tokens are the tokenization of the conversation's text (`tokenize.py`). A target
  that ends the turn is not followed by EOS (the end of turn is the stop); sampling stops
  at the end of turn: as a token where it is a special token (`stop_token_ids`, the
  tokenizer's EOS too), else as a stop string (`turn_stop`). A perturbation is appended
  verbatim after the generation prompt (it starts the assistant turn; no space, since
  generation prompts end in a newline or a special token).

  Attributes:
    tokenizer: a Hugging Face tokenizer whose `chat_template` is set; None renders nothing
      (the task of a run made with `chat_template=True` before it has the tokenizer).
    system: optional system message.
    turn_prefix: (derived) text the template writes before the assistant's content.
    end_of_turn: (derived) text the template ends the assistant turn with ("" for none).
    turn_stop: (derived) `(end_of_turn,)` when it is not one special token, else ().
    stop_token_ids: (derived) the end-of-turn token and EOS when the end of turn is one
      special token; else None (the tokenizer's EOS).
  """

  prompt_format: str = "{question}"
  target_format: str = "{solution}"
  stop: tuple[str, ...] = ()
  # Excluded from eq/hash/repr: tokenizers are large and unhashable.
  tokenizer: Any = dataclasses.field(default=None, compare=False, repr=False)
  system: str | None = None
  turn_prefix: str = dataclasses.field(default="", init=False)
  end_of_turn: str = dataclasses.field(default="", init=False)
  turn_stop: tuple[str, ...] = dataclasses.field(default=(), init=False)
  stop_token_ids: tuple[int, ...] | None = dataclasses.field(default=None, init=False)
  joint_target: ClassVar[bool] = True

  def __post_init__(self):
    if self.tokenizer is None:
      return
    messages = self._messages("Q", ())
    prompt = self._render(messages, generation_prompt=True)
    full = self._render(messages + [{"role": "assistant", "content": _CONTENT_SENTINEL}],
                        generation_prompt=False)
    turn = full[len(prompt):] if full.startswith(prompt) else ""
    if _CONTENT_SENTINEL not in turn:
      raise ChatTemplateError(
          "the chat template's assistant turn does not continue its generation prompt "
          f"(prompt {prompt[-40:]!r}, conversation {full[-80:]!r}), so no target can start "
          "where the prompt ends")
    prefix, after = turn.split(_CONTENT_SENTINEL, 1)
    end = after.rstrip()
    object.__setattr__(self, "turn_prefix", prefix)
    object.__setattr__(self, "end_of_turn", end)
    if not end.strip():
      return
    ids = self.tokenizer(end.strip(), add_special_tokens=False)["input_ids"]
    # A special token is dropped from decoded text, where a stop string cannot see it.
    if len(ids) == 1 and self.tokenizer.decode(ids, skip_special_tokens=True) == "":
      eos = self.tokenizer.eos_token_id
      object.__setattr__(self, "stop_token_ids",
                         (ids[0],) + ((eos,) if eos is not None and eos != ids[0] else ()))
    else:
      object.__setattr__(self, "turn_stop", (end.strip(),))

  def _messages(self, question: str, shots: Sequence[tuple[str, str]]) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": self.system}] if self.system else []
    for q, solution in shots:
      messages += [{"role": "user", "content": self.prompt_format.format(question=q)},
                   {"role": "assistant", "content": self.target_format.format(solution=solution)}]
    messages.append({"role": "user", "content": self.prompt_format.format(question=question)})
    return messages

  def _render(self, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if self.tokenizer is None:
      raise ChatTemplateError("ChatTemplate needs a tokenizer (a task made with "
                              "chat_template=True: call task.prepare_prompts(tokenizer))")
    import jinja2  # transformers' dependency; only its error type is needed here
    try:
      return self.tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt,
                                                tokenize=False)
    except (ValueError, jinja2.TemplateError) as e:  # no template set; a template's refusal
      raise ChatTemplateError(f"the tokenizer's chat template cannot render the prompt: {e}"
                              ) from e

  def prompt(self, question: str, perturbation: str | None = None,
             shots: Sequence[tuple[str, str]] = ()) -> str:
    text = self._render(self._messages(question, shots), generation_prompt=True)
    if perturbation:
      text = text + perturbation
    return text

  def target(self, solution: str) -> str:
    return self.turn_prefix + self.target_format.format(solution=solution) + self.end_of_turn


@dataclasses.dataclass(frozen=True)
class PromptOptions:
  """How a task's prompts are built beyond its template; task keyword arguments of the same
  names (`get_task`), so a run records them with its task arguments.

  Attributes:
    chat_template: render prompts with the tokenizer's own chat template (instruct models):
      the question is the user turn, the target the assistant turn (`ChatTemplate`).
    system_prompt: system message of the chat template (only with chat_template).
    num_fewshot: worked train examples (prompt and target in the task's format; with the
      chat template, prior user/assistant turns) before the question: the first K of a
      seeded shuffle of the train split, skipping any with the example's own question.
    fewshot_seed: seed of that shuffle.
  """

  chat_template: bool = False
  system_prompt: str | None = None
  num_fewshot: int = 0
  fewshot_seed: int = 1234

  def __post_init__(self):
    if not isinstance(self.chat_template, bool):
      raise ValueError(f"chat_template must be true or false, got {self.chat_template!r}")
    for name in ("num_fewshot", "fewshot_seed"):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
    if self.system_prompt is not None and not isinstance(self.system_prompt, str):
      raise ValueError(f"system_prompt must be a string, got {self.system_prompt!r}")
    if self.system_prompt and not self.chat_template:
      raise ValueError("system_prompt needs chat_template")

  def to_kwargs(self) -> dict[str, Any]:
    """The task keyword arguments of the options that are not the default (what a run
    records: zero-shot prompts without a chat template record nothing)."""
    default = PromptOptions()
    return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
            if getattr(self, f.name) != getattr(default, f.name)}


PROMPT_OPTION_NAMES = tuple(f.name for f in dataclasses.fields(PromptOptions))


def split_prompt_kwargs(kwargs: Mapping[str, Any]) -> tuple[dict[str, Any], PromptOptions]:
  """(the task constructor's own keyword arguments, the `PromptOptions` among `kwargs`).

  Raises:
    ValueError: a bad prompt option (the message starts with its name).
  """
  own = {k: v for k, v in kwargs.items() if k not in PROMPT_OPTION_NAMES}
  return own, PromptOptions(**{k: v for k, v in kwargs.items() if k in PROMPT_OPTION_NAMES})


def canonical_task_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """`kwargs` with the prompt options at their defaults left out, so an explicit default
  (`num_fewshot=0`) is recorded as the same task as an omitted one."""
  own, options = split_prompt_kwargs(kwargs)
  return {**own, **options.to_kwargs()}


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


class PromptSetupError(ValueError):
  """A task asked for prompts that need what it was not given (`Task.prepare_prompts`)."""


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
  # GSM8K value (`metrics.premem`, the rule's home); MATH overrides it.
  memorization_loglog_threshold: float = premem.GSM8K_LOGLOG_THRESHOLD
  # Sampling for accuracy (Kang et al.'s reference settings): GSM8K's, which tasks
  # without their own use; `memdyn_jax.evaluation.default_sampling` reads it.
  sampling_defaults: Mapping[str, Any] = types.MappingProxyType(
      dict(temperature=0.8, top_p=0.95, max_new_tokens=512, n=5))
  # Fraction of examples IFD/heuristic curation keeps (Kang et al. App. C: GSM8K 50%).
  curation_keep_fraction: float = 0.5
  # The task makes new problems on demand (`fresh_like`, `rephrase`), so curation can
  # collect examples without a rephrasing model.
  procedural: bool = False

  # Few-shot examples and the chat template (`get_task`'s prompt options); `prepare_prompts`
  # gives them the tokenizer and the train split (with its seeded order) the shots come from.
  prompt_options: PromptOptions = PromptOptions()
  _fewshot_pool: tuple[list[Example], Any] | None = None

  def load(self, split: str, path: str | None = None) -> list[Example]:
    raise NotImplementedError

  def prepare_prompts(self, tokenizer: Any = None, path: str | None = None) -> "Task":
    """Gives the task what its `prompt_options` need before it renders a prompt: the
    tokenizer whose chat template renders them (`chat_template`; without one, rendering
    raises ChatTemplateError) and the train split the few-shot examples come from
    (`num_fewshot`: loaded here from `path`; None = the task's own source, as `load`).
    Nothing is needed for zero-shot prompts in the task's template. Returns the task.

    Raises:
      ChatTemplateError: the tokenizer's chat template cannot render the task's prompts.
      DataError, FileNotFoundError: the train split does not load.
    """
    options = self.prompt_options
    if options.chat_template and tokenizer is not None:
      self.template = ChatTemplate(tokenizer=tokenizer, system=options.system_prompt)
    if options.num_fewshot:
      import numpy as np  # Deferred: the legacy RandomState stream is stable across versions.
      train = self.load("train", path)
      order = np.random.RandomState(options.fewshot_seed).permutation(len(train))
      self._fewshot_pool = (train, order)
    return self

  def fewshot_examples(self, question: str) -> list[Example]:
    """The `num_fewshot` examples shown before `question`: the first of a shuffle of the
    train split (seeded with `fewshot_seed`) whose question is not `question`, so an
    example never sees itself (nor a duplicate of its question); the same for every other
    question. [] when zero-shot.

    Raises:
      PromptSetupError: few-shot before `prepare_prompts`.
      DataError: the train split has too few other examples.
    """
    k = self.prompt_options.num_fewshot
    if not k:
      return []
    if self._fewshot_pool is None:
      raise PromptSetupError(f"task {self.name!r} takes num_fewshot={k} examples from its "
                             "train split: call task.prepare_prompts(path=...) first")
    train, order = self._fewshot_pool
    shots = []
    for i in order:
      if train[i].question != question:
        shots.append(train[i])
        if len(shots) == k:
          return shots
    raise DataError(f"task {self.name!r}: num_fewshot={k} but the train split has only "
                    f"{len(shots)} example(s) with another question")

  def format_prompt(self, question: str, perturbation: str | None = None) -> str:
    shots = [(ex.question, ex.target) for ex in self.fewshot_examples(question)]
    return self.template.prompt(question, perturbation, shots=shots)

  def format_target(self, example: Example) -> str:
    return self.template.target(example.target)

  @property
  def stop(self) -> tuple[str, ...]:
    """Stop strings of sampling (overridable: `--stop`)."""
    return self.template.stop

  @property
  def turn_stop(self) -> tuple[str, ...]:
    """Stop strings that always end a sample, whatever `--stop` says: a chat template's end
    of turn where it is not a special token."""
    return getattr(self.template, "turn_stop", ())

  @property
  def stop_token_ids(self) -> tuple[int, ...] | None:
    """Token ids that end a sample; None = the tokenizer's EOS."""
    return getattr(self.template, "stop_token_ids", None)

  @property
  def end_of_turn(self) -> str:
    """The text that ends every target ("" for none): a target that has one is not
    followed by EOS."""
    return getattr(self.template, "end_of_turn", "")

  @property
  def joint_target(self) -> bool:
    """Targets are tokenized jointly with their prompt (`tokenize.py`)."""
    return self.template.joint_target

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
  """A new task of the registered name, built with `kwargs`: the task constructor's own,
  and any `PromptOptions` (chat_template, system_prompt, num_fewshot, fewshot_seed), which
  every task takes. A task with prompt options renders prompts after `prepare_prompts`.

  Raises:
    UnknownTaskError: no task of that (exact) name.
    ValueError: a bad prompt option.
  """
  if name not in _REGISTRY:
    raise UnknownTaskError(name)
  own, options = split_prompt_kwargs(kwargs)
  task = _REGISTRY[name](**own)
  if options != PromptOptions():
    task.prompt_options = options
    if options.chat_template:  # rendered once the tokenizer is given (`prepare_prompts`)
      task.template = ChatTemplate(system=options.system_prompt)
  return task


def task_names() -> list[str]:
  return sorted(_REGISTRY)


def task_class(task_name: str | None) -> type[Task]:
  """The registered class of a task name; the `Task` base (GSM8K's defaults) for an unknown
  or unnamed one. Reads class-level rules without building the task."""
  return _REGISTRY.get(task_name, Task)


def memorization_threshold(task_name: str | None) -> float:
  """The task's default PreMemAcc threshold in perplexity units: its
  `memorization_loglog_threshold` through `premem.loglog_to_perplexity` (no instance
  needed); GSM8K's for an unknown or unnamed task."""
  return premem.loglog_to_perplexity(task_class(task_name).memorization_loglog_threshold)
