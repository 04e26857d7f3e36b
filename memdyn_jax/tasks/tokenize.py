"""Tokenization of (prompt, target) pairs: THE convention shared by the trainer and scorer.

Convention:
  * Prompt and target text are tokenized SEPARATELY, each without special tokens, and
    concatenated:

        ids = [BOS] + tok(prompt) + tok(target) + [EOS]

    so the prompt/target boundary is identical in training and scoring, and no token ever
    spans it. Targets start with a space (" {solution}..."), so byte-level BPE tokenizers
    split there naturally. (SentencePiece tokenizers that add a dummy prefix may tokenize a
    separately-encoded target slightly differently from the joint string; the convention
    still holds, it is just not the joint tokenization.)
  * BOS is prepended when the tokenizer's own encoding of text adds it (detected by
    encoding "a" with `add_special_tokens=True`), or when `add_bos=True`; `add_bos=False`
    never adds it. It is not added twice when the prompt text already starts with it
    (chat templates often write BOS themselves).
  * EOS is appended only with `append_eos=True` (it counts as a target token); not after a
    target that ends a chat template's turn (`Task.end_of_turn`: the end of turn is the stop).
  * Chat templates (`joint_target=True`, `Task.joint_target`): the target's tokens are those
    it gets after the prompt when both are tokenized together,

        tok(target) := tok(prompt + target)[len(tok(prompt)):]

    so prompt tokens + target tokens are exactly the tokenization of the conversation's text
    (SentencePiece tokenizers would otherwise give a separately-encoded target a prefix
    space), while the prompt keeps its own tokens (what sampling conditions on). Where the
    joint tokenization does not start with the prompt's tokens, a token spans the boundary
    (a template whose generation prompt ends in a space, say) and the example is refused
    (`TargetBoundaryError`).
  * `target_mask` is 1 exactly on the target tokens (EOS included). With
    `loss_on_prompt=True` it is 1 on every token except BOS, whose prediction is undefined.
    Position t of the mask says whether token t is predicted (from positions < t) under the
    loss.

Over-length examples (longer than `max_length` tokens in all) follow `overlength`:
  * "drop": the example is removed and counted in `n_dropped`;
  * "truncate": the TARGET is cut from the right to fit (the prompt is never cut). If the
    prompt alone (with BOS) leaves no room for a target token, the example is dropped;
  * "error": raise DataError naming the example and the lengths.
Drops and truncations are always logged.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np
from absl import logging

from memdyn_jax.errors import ContextLengthError
from memdyn_jax.tasks.base import DataError, Example, Task

OVERLENGTH_POLICIES = ("drop", "truncate", "error")

_OK, _TRUNCATED, _DROPPED = "ok", "truncated", "dropped"


class OverlongExampleError(DataError, ContextLengthError):
  """An example longer than `max_length` under overlength="error"; names the example."""


class TargetBoundaryError(DataError):
  """A prompt and target that share a token in their joint tokenization (no token boundary
  where the target starts); names the example."""


@dataclasses.dataclass(frozen=True)
class TokenizedBatch:
  """A padded batch of token ids and masks (numpy, int32).

  Attributes:
    input_ids: (N, T) token ids, padded with the tokenizer's pad id (else EOS, else 0).
    attention_mask: (N, T) 1 on real tokens, 0 on padding.
    target_mask: (N, T) 1 on tokens under the loss (see the module docstring).
    kept_indices: (N,) index into the input lists of each row (drops leave gaps).
    n_dropped: how many input examples were dropped as over-length.
    n_truncated: how many kept examples had their target truncated.
  """

  input_ids: np.ndarray
  attention_mask: np.ndarray
  target_mask: np.ndarray
  kept_indices: np.ndarray
  n_dropped: int
  n_truncated: int


def tokenizer_adds_bos(tokenizer: Any) -> bool:
  """Whether `tokenizer`'s normal encoding of text starts with its BOS token."""
  bos = tokenizer.bos_token_id
  if bos is None:
    return False
  ids = tokenizer("a", add_special_tokens=True)["input_ids"]
  return bool(ids) and ids[0] == bos


def _bos_id(tokenizer: Any, add_bos: bool | None) -> int | None:
  if add_bos is None:
    return tokenizer.bos_token_id if tokenizer_adds_bos(tokenizer) else None
  if not add_bos:
    return None
  if tokenizer.bos_token_id is None:
    raise ValueError("add_bos=True but the tokenizer has no BOS token")
  return tokenizer.bos_token_id


def _eos_id(tokenizer: Any, append_eos: bool) -> int | None:
  if not append_eos:
    return None
  if tokenizer.eos_token_id is None:
    raise ValueError("append_eos=True but the tokenizer has no EOS token")
  return tokenizer.eos_token_id


def _assemble(prompt_ids: Sequence[int], target_ids: Sequence[int], *, bos: int | None,
              eos: int | None, max_length: int | None, overlength: str, loss_on_prompt: bool,
              name: str) -> tuple[np.ndarray | None, np.ndarray | None, str]:
  """Builds (ids, target_mask, status) for one example under the convention."""
  head = list(prompt_ids)
  if bos is not None and not (head and head[0] == bos):
    head = [bos] + head
  tail = list(target_ids) + ([eos] if eos is not None else [])
  total = len(head) + len(tail)
  status = _OK
  if max_length is not None and total > max_length:
    if overlength == "error":
      raise OverlongExampleError(f"{name}: {total} tokens (prompt {len(head)}, target "
                                 f"{len(tail)}) exceed max_length {max_length}")
    if overlength == "truncate" and len(head) < max_length:
      tail = tail[:max_length - len(head)]
      status = _TRUNCATED
    else:
      return None, None, _DROPPED
  ids = np.asarray(head + tail, dtype=np.int32)
  mask = np.zeros(len(ids), dtype=np.int32)
  mask[len(head):] = 1
  if loss_on_prompt:
    mask[:] = 1
    if bos is not None:
      mask[0] = 0
  return ids, mask, status


def _target_ids(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                prompt_ids: Sequence[Sequence[int]], joint: bool,
                names: Sequence[str]) -> list[list[int]]:
  """Each target's tokens: its own encoding, or with `joint` what follows the prompt's
  tokens in the encoding of prompt + target (module docstring)."""
  if not joint:
    return tokenizer(list(targets), add_special_tokens=False)["input_ids"]
  full = tokenizer([p + t for p, t in zip(prompts, targets)], add_special_tokens=False)
  out = []
  for prompt, head, ids, name in zip(prompts, prompt_ids, full["input_ids"], names):
    if list(ids[:len(head)]) != list(head):
      raise TargetBoundaryError(
          f"{name}: a token spans the prompt/target boundary in their joint tokenization "
          f"(the prompt ends {prompt[-24:]!r}), so the target cannot start on a token of its "
          "own; a chat template's generation prompt must end where a token ends")
    out.append(list(ids[len(head):]))
  return out


def _check_policy(overlength: str) -> None:
  if overlength not in OVERLENGTH_POLICIES:
    raise ValueError(f"overlength must be one of {OVERLENGTH_POLICIES}, got {overlength!r}")


def encode_example(tokenizer: Any, prompt_text: str, target_text: str, *,
                   max_length: int | None, overlength: str = "drop",
                   add_bos: bool | None = None, append_eos: bool = False,
                   loss_on_prompt: bool = False, joint_target: bool = False,
                   example_id: str | None = None) -> tuple[np.ndarray, np.ndarray] | None:
  """Encodes one (prompt, target) pair under the convention.

  Args:
    tokenizer: a Hugging Face tokenizer.
    prompt_text: rendered prompt.
    target_text: rendered target.
    max_length: maximum total tokens (BOS/EOS included); None for no limit.
    overlength: "drop", "truncate" or "error" (module docstring).
    add_bos: None = as the tokenizer does; True/False force.
    append_eos: append the EOS token to the target.
    loss_on_prompt: put the prompt under the loss too.
    joint_target: the target's tokens are those after the prompt's in their joint
      tokenization (chat templates; module docstring).
    example_id: names the example in errors and logs.

  Returns:
    (input_ids, target_mask), int32 arrays of equal length; None if dropped.

  Raises:
    TargetBoundaryError: with `joint_target`, a token spans the boundary.
  """
  _check_policy(overlength)
  name = example_id or "example"
  prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
  (target_ids,) = _target_ids(tokenizer, [prompt_text], [target_text], [prompt_ids],
                              joint_target, [name])
  ids, mask, status = _assemble(prompt_ids, target_ids, bos=_bos_id(tokenizer, add_bos),
                                eos=_eos_id(tokenizer, append_eos), max_length=max_length,
                                overlength=overlength, loss_on_prompt=loss_on_prompt, name=name)
  if status != _OK:
    logging.warning("%s: over max_length %s, %s", name, max_length, status)
  return None if ids is None else (ids, mask)


def tokenize_examples(tokenizer: Any, prompts: Sequence[str], targets: Sequence[str],
                      max_length: int | None, overlength: str = "drop",
                      pad_to: int | None = None, padding_side: str = "right", *,
                      add_bos: bool | None = None, append_eos: bool = False,
                      loss_on_prompt: bool | Sequence[bool] = False,
                      joint_target: bool = False,
                      example_ids: Sequence[str] | None = None) -> TokenizedBatch:
  """Encodes and pads many (prompt, target) pairs under the convention.

  Args:
    tokenizer: a Hugging Face tokenizer.
    prompts: rendered prompts.
    targets: rendered targets, same length as `prompts`.
    max_length: maximum tokens per example; None for no limit.
    overlength: "drop", "truncate" or "error".
    pad_to: row length T; None pads to the longest kept example. Must fit every row.
    padding_side: "right" (training, scoring) or "left" (batched generation).
    add_bos: None = as the tokenizer does; True/False force.
    append_eos: append EOS to every target.
    loss_on_prompt: one flag for all examples, or one per example.
    joint_target: targets are tokenized jointly with their prompts (chat templates).
    example_ids: names examples in errors (default: their index).

  Returns:
    A TokenizedBatch.

  Raises:
    TargetBoundaryError: with `joint_target`, a token spans an example's boundary.
  """
  _check_policy(overlength)
  if padding_side not in ("right", "left"):
    raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
  if len(prompts) != len(targets):
    raise ValueError(f"{len(prompts)} prompts but {len(targets)} targets")
  n = len(prompts)
  flags = [loss_on_prompt] * n if isinstance(loss_on_prompt, bool) else list(loss_on_prompt)
  if len(flags) != n:
    raise ValueError(f"{len(flags)} loss_on_prompt flags for {n} examples")
  bos, eos = _bos_id(tokenizer, add_bos), _eos_id(tokenizer, append_eos)
  names = [f"example {example_ids[i]!r} (index {i})" if example_ids else f"example index {i}"
           for i in range(n)]
  # One batched call per side: fast tokenizers parallelize it.
  prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"] if n else []
  target_ids = (_target_ids(tokenizer, prompts, targets, prompt_ids, joint_target, names)
                if n else [])

  rows, masks, kept = [], [], []
  n_dropped = n_truncated = 0
  for i in range(n):
    name = names[i]
    ids, mask, status = _assemble(prompt_ids[i], target_ids[i], bos=bos, eos=eos,
                                  max_length=max_length, overlength=overlength,
                                  loss_on_prompt=bool(flags[i]), name=name)
    if status == _DROPPED:
      n_dropped += 1
      continue
    n_truncated += status == _TRUNCATED
    rows.append(ids)
    masks.append(mask)
    kept.append(i)
  if n_dropped or n_truncated:
    logging.warning("tokenize_examples: %d of %d examples over max_length %s: %d dropped, "
                    "%d target-truncated", n_dropped + n_truncated, n, max_length, n_dropped,
                    n_truncated)

  longest = max((len(r) for r in rows), default=0)
  width = longest if pad_to is None else pad_to
  if width < longest:
    raise ValueError(f"pad_to={pad_to} is shorter than the longest example ({longest} tokens)")
  pad_id = next((t for t in (tokenizer.pad_token_id, tokenizer.eos_token_id) if t is not None), 0)
  input_ids = np.full((len(rows), width), pad_id, dtype=np.int32)
  attention = np.zeros((len(rows), width), dtype=np.int32)
  target = np.zeros((len(rows), width), dtype=np.int32)
  for r, (ids, mask) in enumerate(zip(rows, masks)):
    span = slice(0, len(ids)) if padding_side == "right" else slice(width - len(ids), width)
    input_ids[r, span] = ids
    attention[r, span] = 1
    target[r, span] = mask
  return TokenizedBatch(input_ids=input_ids, attention_mask=attention, target_mask=target,
                        kept_indices=np.asarray(kept, dtype=np.int32), n_dropped=n_dropped,
                        n_truncated=int(n_truncated))


def tokenize_task_examples(tokenizer: Any, task: Task, examples: Sequence[Example], *,
                           max_length: int | None, overlength: str = "drop",
                           perturbation: str | None = None, pad_to: int | None = None,
                           padding_side: str = "right", add_bos: bool | None = None,
                           append_eos: bool = False) -> TokenizedBatch:
  """Renders examples with `task`'s template and tokenizes them.

  `meta["loss_on_prompt"]` (set by the sft task with `response_only=False`) puts that
  example's prompt under the loss. A chat template's targets are tokenized jointly with
  their prompts and, where they end the turn, get no EOS (module docstring).
  """
  return tokenize_examples(
      tokenizer,
      [task.format_prompt(ex.question, perturbation) for ex in examples],
      [task.format_target(ex) for ex in examples],
      max_length, overlength, pad_to, padding_side, add_bos=add_bos,
      append_eos=append_eos and not task.end_of_turn,
      loss_on_prompt=[bool(ex.meta.get("loss_on_prompt", False)) for ex in examples],
      joint_target=task.joint_target, example_ids=[ex.id for ex in examples])
