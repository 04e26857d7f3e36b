"""Open-ended instruction SFT data (Ge et al. setting): memorization of free-form responses.

Accepted jsonl records (one per line):
  * `{"prompt": ..., "response": ..., "category": ...}` (`category` optional);
  * `{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}`;
  * `{"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}` (ShareGPT).

For dialogues the target is the LAST assistant turn and the question is everything before
it: a single user turn (optionally preceded by a system turn) is used as is; longer histories
are flattened to "User: ...\\n\\nAssistant: ...\\n\\nUser: ..." text. The structured history is
kept in `meta["messages"]`.

`response_only=False` puts the whole dialogue under the loss: such examples carry
`meta["loss_on_prompt"] = True`, which `tokenize.tokenize_task_examples` turns into a
target_mask over prompt and target tokens alike.

Open SFT has no short answer: `answer` is the response itself, and grading is an exact
string match of the completion (cut at the template's stop text) against it after stripping
surrounding whitespace. That measures verbatim regeneration, not correctness.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from memdyn_jax.tasks.base import (
    DEFAULT_TEMPLATE,
    DataError,
    Example,
    PromptTemplate,
    Task,
    ensure_nonempty,
    read_jsonl,
    register_task,
    resolve_split_path,
)

# ShareGPT speaker names -> chat roles.
_SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                   "system": "system"}


def _turns(record: Mapping[str, Any], where: str) -> list[dict[str, str]]:
  """Normalizes `messages` / `conversations` to [{"role", "content"}] with chat role names."""
  if "messages" in record:
    raw, role_key, content_key, roles = record["messages"], "role", "content", None
  else:
    raw, role_key, content_key, roles = record["conversations"], "from", "value", _SHAREGPT_ROLES
  if not isinstance(raw, list):
    raise DataError(f"{where}: dialogue must be a list of turns")
  turns = []
  for i, turn in enumerate(raw):
    if not isinstance(turn, dict):
      raise DataError(f"{where}: turn {i} is not an object")
    missing = [k for k in (role_key, content_key) if k not in turn]
    if missing:
      raise DataError(f"{where}: turn {i} missing field(s) {missing}")
    role = turn[role_key]
    if roles is not None:
      if role not in roles:
        raise DataError(f"{where}: turn {i} has unknown speaker {role!r}")
      role = roles[role]
    if not isinstance(turn[content_key], str):
      raise DataError(f"{where}: turn {i} content must be a string")
    turns.append({"role": role, "content": turn[content_key]})
  return turns


def render_history(turns: Sequence[Mapping[str, str]]) -> str:
  """Plain-text rendering of the dialogue before the target turn.

  A lone user turn (with or without a system turn before it) renders as its content, so
  single-turn dialogues match the `{prompt, response}` form.
  """
  if not turns:
    return ""
  *head, last = turns
  if last["role"] == "user" and all(t["role"] == "system" for t in head):
    return "\n\n".join([t["content"] for t in head] + [last["content"]])
  return "\n\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


@register_task("sft")
class SFTTask(Task):
  """Instruction SFT task.

  Args:
    response_only: the loss covers only the response (True) or the whole dialogue (False).
    template: prompt/target rendering.
  """

  def __init__(self, response_only: bool = True, template: PromptTemplate = DEFAULT_TEMPLATE):
    self.response_only = response_only
    self.template = template

  def load(self, split: str, path: str | None = None) -> list[Example]:
    """Loads `path` (a jsonl file or a folder with `{split}.jsonl`); there is no Hub default."""
    if path is None:
      raise ValueError("the sft task needs a local jsonl path")
    file = resolve_split_path(path, split)
    examples = [self._example(split, i, f"{file}:{lineno}", record)
                for i, (lineno, record) in enumerate(read_jsonl(file))]
    ensure_nonempty(examples, file)
    return examples

  def _example(self, split: str, index: int, where: str, record: Mapping[str, Any]) -> Example:
    meta: dict[str, Any] = {"category": record.get("category", "")}
    if "messages" in record or "conversations" in record:
      turns = _turns(record, where)
      last = max((i for i, t in enumerate(turns) if t["role"] == "assistant"), default=None)
      if last is None:
        raise DataError(f"{where}: dialogue has no assistant turn")
      history = turns[:last]
      question, response = render_history(history), turns[last]["content"]
      meta["messages"] = tuple(history)
    elif "prompt" in record or "response" in record:
      missing = [k for k in ("prompt", "response") if k not in record]
      if missing:
        raise DataError(f"{where}: missing field(s) {missing}")
      question, response = record["prompt"], record["response"]
      if not isinstance(question, str) or not isinstance(response, str):
        raise DataError(f"{where}: 'prompt' and 'response' must be strings")
    else:
      raise DataError(f"{where}: missing field(s): need 'prompt'+'response', 'messages' or "
                      "'conversations'")
    if not self.response_only:
      meta["loss_on_prompt"] = True
    return Example(id=f"sft/{split}/{index}", question=question, target=response,
                   answer=response, meta=meta)

  def extract_answer(self, text: str) -> str | None:
    """The completion up to the first stop text, stripped; None if that is empty."""
    for stop in self.stop:
      text = text.split(stop, 1)[0]
    text = text.strip()
    return text or None

  def grade(self, completion_text: str, reference_answer: str) -> bool:
    """Exact match after whitespace strip: did the model regenerate the response verbatim?"""
    parsed = self.extract_answer(completion_text)
    return parsed is not None and parsed == reference_answer.strip()
