"""Tokenization convention: separate prompt/target encoding, masks, BOS/EOS, overlength, padding."""
from __future__ import annotations

import copy
import logging

import numpy as np
import pytest

from memdyn_jax.tasks import (
    ChatTemplate,
    DataError,
    Example,
    TokenizedBatch,
    encode_example,
    get_task,
    tokenize_examples,
    tokenize_task_examples,
    tokenizer_adds_bos,
)

PROMPT = "Natalia sold 48 clips in April. How many in May?\nAnswer:"
TARGET = " Natalia sold 48/2 = 24 clips in May.\n#### 24\nDone."


def _ids(tokenizer, text):
  return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.fixture(params=["no_bos", "bos"])
def tokenizer(request, tokenizer_no_bos, tokenizer_bos):
  return {"no_bos": tokenizer_no_bos, "bos": tokenizer_bos}[request.param]


def test_tokenizer_adds_bos(tokenizer_no_bos, tokenizer_bos):
  assert not tokenizer_adds_bos(tokenizer_no_bos)
  assert tokenizer_adds_bos(tokenizer_bos)


def test_target_mask_covers_exactly_the_target(tokenizer):
  ids, mask = encode_example(tokenizer, PROMPT, TARGET, max_length=None)
  assert ids.dtype == np.int32 and mask.dtype == np.int32 and ids.shape == mask.shape
  assert tokenizer.decode(ids[mask == 1]) == TARGET
  prompt_part = ids[mask == 0]
  if tokenizer_adds_bos(tokenizer):
    assert prompt_part[0] == tokenizer.bos_token_id
    prompt_part = prompt_part[1:]
  assert tokenizer.decode(prompt_part) == PROMPT
  # The target is one contiguous block at the end.
  assert mask.tolist() == [0] * (len(ids) - int(mask.sum())) + [1] * int(mask.sum())


def test_ids_are_separate_encodings_concatenated(tokenizer):
  ids, _ = encode_example(tokenizer, PROMPT, TARGET, max_length=None)
  bos = [tokenizer.bos_token_id] if tokenizer_adds_bos(tokenizer) else []
  assert ids.tolist() == bos + _ids(tokenizer, PROMPT) + _ids(tokenizer, TARGET)


def test_bos_handling(tokenizer_no_bos, tokenizer_bos):
  bos = tokenizer_bos.bos_token_id
  ids, _ = encode_example(tokenizer_no_bos, PROMPT, TARGET, max_length=None)
  assert ids[0] != bos and ids[0] == _ids(tokenizer_no_bos, PROMPT)[0]
  ids, mask = encode_example(tokenizer_no_bos, PROMPT, TARGET, max_length=None, add_bos=True)
  assert ids[0] == bos and mask[0] == 0
  ids, _ = encode_example(tokenizer_bos, PROMPT, TARGET, max_length=None)
  assert ids[0] == bos and ids[1] != bos
  ids, _ = encode_example(tokenizer_bos, PROMPT, TARGET, max_length=None, add_bos=False)
  assert ids[0] != bos
  # A prompt that already starts with BOS text (chat templates do this) gets no second BOS.
  ids, _ = encode_example(tokenizer_bos, "<s>" + PROMPT, TARGET, max_length=None)
  assert ids[0] == bos and ids[1] != bos


def test_append_eos_is_a_target_token(tokenizer):
  ids, mask = encode_example(tokenizer, PROMPT, TARGET, max_length=None, append_eos=True)
  assert ids[-1] == tokenizer.eos_token_id and mask[-1] == 1
  assert tokenizer.decode(ids[mask == 1][:-1]) == TARGET


def test_loss_on_prompt_masks_everything_but_bos(tokenizer_bos, tokenizer_no_bos):
  ids, mask = encode_example(tokenizer_bos, PROMPT, TARGET, max_length=None,
                             loss_on_prompt=True)
  assert mask[0] == 0 and mask[1:].all()
  _, mask = encode_example(tokenizer_no_bos, PROMPT, TARGET, max_length=None,
                           loss_on_prompt=True)
  assert mask.all()


# --- over-length ----------------------------------------------------------------------


def test_overlength_single_example(tokenizer_bos):
  full, _ = encode_example(tokenizer_bos, PROMPT, TARGET, max_length=None)
  n_prompt = 1 + len(_ids(tokenizer_bos, PROMPT))
  limit = n_prompt + 3
  assert encode_example(tokenizer_bos, PROMPT, TARGET, max_length=limit) is None
  ids, mask = encode_example(tokenizer_bos, PROMPT, TARGET, max_length=limit,
                             overlength="truncate")
  assert ids.tolist() == full[:limit].tolist()
  assert mask.tolist() == [0] * n_prompt + [1] * 3
  with pytest.raises(DataError, match=rf"ex7.*{len(full)} tokens.*prompt {n_prompt}.*{limit}"):
    encode_example(tokenizer_bos, PROMPT, TARGET, max_length=limit, overlength="error",
                   example_id="ex7")
  # Exactly fitting is not over-length.
  ids, _ = encode_example(tokenizer_bos, PROMPT, TARGET, max_length=len(full),
                          overlength="error")
  assert len(ids) == len(full)


def test_truncate_never_cuts_the_prompt(tokenizer_no_bos):
  n_prompt = len(_ids(tokenizer_no_bos, PROMPT))
  for limit in (n_prompt, n_prompt - 2):
    assert encode_example(tokenizer_no_bos, PROMPT, TARGET, max_length=limit,
                          overlength="truncate") is None
  ids, mask = encode_example(tokenizer_no_bos, PROMPT, TARGET, max_length=n_prompt + 1,
                             overlength="truncate")
  assert len(ids) == n_prompt + 1 and mask.sum() == 1


def test_batch_overlength_policies(tokenizer_no_bos, caplog):
  tok = tokenizer_no_bos
  prompts = ["Q: one?\nAnswer:", PROMPT, "Q: two?\nAnswer:"]
  targets = [" 1\nDone.", TARGET, " 2\nDone."]
  short = max(len(_ids(tok, p + t)) for p, t in zip(prompts[::2], targets[::2]))
  limit = len(_ids(tok, PROMPT)) + 4
  assert short <= limit

  with caplog.at_level(logging.WARNING):
    dropped = tokenize_examples(tok, prompts, targets, limit, "drop")
  assert dropped.kept_indices.tolist() == [0, 2]
  assert (dropped.n_dropped, dropped.n_truncated) == (1, 0)
  assert dropped.input_ids.shape == (2, short)
  assert "1 dropped" in caplog.text

  caplog.clear()
  with caplog.at_level(logging.WARNING):
    truncated = tokenize_examples(tok, prompts, targets, limit, "truncate")
  assert truncated.kept_indices.tolist() == [0, 1, 2]
  assert (truncated.n_dropped, truncated.n_truncated) == (0, 1)
  assert truncated.input_ids.shape == (3, limit)
  assert truncated.target_mask[1].sum() == 4
  assert "1 target-truncated" in caplog.text

  with pytest.raises(DataError, match=r"'b'.*index 1.*exceed max_length"):
    tokenize_examples(tok, prompts, targets, limit, "error", example_ids=["a", "b", "c"])
  with pytest.raises(DataError, match=r"example index 1"):
    tokenize_examples(tok, prompts, targets, limit, "error")


# --- padding --------------------------------------------------------------------------


def test_right_and_left_padding(tokenizer_bos):
  tok = tokenizer_bos
  prompts, targets = ["Q: one?\nAnswer:", PROMPT], [" 1\nDone.", TARGET]
  singles = [encode_example(tok, p, t, max_length=None) for p, t in zip(prompts, targets)]
  lengths = [len(ids) for ids, _ in singles]
  width = max(lengths)
  pad = tok.pad_token_id

  right = tokenize_examples(tok, prompts, targets, None)
  assert isinstance(right, TokenizedBatch)
  assert right.input_ids.shape == right.attention_mask.shape == right.target_mask.shape
  assert right.input_ids.shape == (2, width)
  assert all(a.dtype == np.int32 for a in (right.input_ids, right.attention_mask,
                                           right.target_mask))
  for row, (ids, mask) in enumerate(singles):
    n = len(ids)
    assert right.input_ids[row, :n].tolist() == ids.tolist()
    assert right.target_mask[row, :n].tolist() == mask.tolist()
    assert (right.input_ids[row, n:] == pad).all()
    assert right.attention_mask[row].tolist() == [1] * n + [0] * (width - n)
    assert not right.target_mask[row, n:].any()

  left = tokenize_examples(tok, prompts, targets, None, padding_side="left", pad_to=width + 3)
  assert left.input_ids.shape == (2, width + 3)
  for row, (ids, mask) in enumerate(singles):
    n = len(ids)
    assert left.input_ids[row, -n:].tolist() == ids.tolist()
    assert left.target_mask[row, -n:].tolist() == mask.tolist()
    assert (left.input_ids[row, :-n] == pad).all()
    assert left.attention_mask[row].tolist() == [0] * (width + 3 - n) + [1] * n
    # Left padding keeps every target ending at the last column (generation continues there).
    assert tok.decode(left.input_ids[row][left.target_mask[row] == 1]) == targets[row]


def test_pad_to_too_short_and_empty_batch(tokenizer_no_bos):
  with pytest.raises(ValueError, match="pad_to"):
    tokenize_examples(tokenizer_no_bos, [PROMPT], [TARGET], None, pad_to=3)
  empty = tokenize_examples(tokenizer_no_bos, [], [], 16, pad_to=16)
  assert empty.input_ids.shape == (0, 16) and empty.kept_indices.shape == (0,)
  all_dropped = tokenize_examples(tokenizer_no_bos, [PROMPT], [TARGET], 2)
  assert all_dropped.input_ids.shape == (0, 0) and all_dropped.n_dropped == 1


def test_pad_id_falls_back_to_eos(tokenizer_no_bos):
  tok = copy.deepcopy(tokenizer_no_bos)
  tok.pad_token = None
  batch = tokenize_examples(tok, ["a", "a b c d"], [" x", " y"], None)
  assert batch.input_ids[0, -1] == tok.eos_token_id


def test_argument_validation(tokenizer_no_bos):
  tok = tokenizer_no_bos
  with pytest.raises(ValueError, match="overlength"):
    tokenize_examples(tok, ["a"], [" b"], 8, "cut")
  with pytest.raises(ValueError, match="overlength"):
    encode_example(tok, "a", " b", max_length=8, overlength="cut")
  with pytest.raises(ValueError, match="padding_side"):
    tokenize_examples(tok, ["a"], [" b"], 8, padding_side="middle")
  with pytest.raises(ValueError, match="targets"):
    tokenize_examples(tok, ["a", "b"], [" b"], 8)
  with pytest.raises(ValueError, match="loss_on_prompt"):
    tokenize_examples(tok, ["a"], [" b"], 8, loss_on_prompt=[True, False])
  no_specials = copy.deepcopy(tok)
  no_specials.bos_token = None
  no_specials.eos_token = None
  with pytest.raises(ValueError, match="BOS"):
    encode_example(no_specials, "a", " b", max_length=None, add_bos=True)
  with pytest.raises(ValueError, match="EOS"):
    encode_example(no_specials, "a", " b", max_length=None, append_eos=True)


# --- tasks end to end -----------------------------------------------------------------


def test_tokenize_task_examples_with_loss_on_prompt_flags(tokenizer_bos):
  task = get_task("sft")
  examples = [Example("a", "Say hi.", "Hi!", "Hi!"),
              Example("b", "Say bye.", "Bye!", "Bye!", meta={"loss_on_prompt": True})]
  batch = tokenize_task_examples(tokenizer_bos, task, examples, max_length=64,
                                 append_eos=True)
  row0 = batch.input_ids[0][batch.target_mask[0] == 1]
  assert tokenizer_bos.decode(row0[:-1]) == " Hi!\nDone." and row0[-1] == tokenizer_bos.eos_token_id
  n1 = int(batch.attention_mask[1].sum())
  assert batch.target_mask[1, 0] == 0 and batch.target_mask[1, 1:n1].all()

  perturbed = tokenize_task_examples(tokenizer_bos, get_task("gsm8k"), examples[:1],
                                     max_length=64, perturbation="First")
  prompt_ids = perturbed.input_ids[0][(perturbed.target_mask[0] == 0)
                                      & (perturbed.attention_mask[0] == 1)]
  assert tokenizer_bos.decode(prompt_ids[1:]) == "Say hi.\nAnswer: First"


def test_chat_template_prompt_with_bos_in_template(tokenizer_bos):
  tok = copy.deepcopy(tokenizer_bos)
  # Llama-style: the chat template itself writes the BOS text.
  tok.chat_template = ("{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] "
                       "{{ m['content'] }}\n{% endfor %}[assistant]")
  template = ChatTemplate(tokenizer=tok)
  prompt = template.prompt("Hi?")
  assert prompt == "<s>[user] Hi?\n[assistant]"
  ids, mask = encode_example(tok, prompt, " Hello.", max_length=None, append_eos=True)
  assert ids[0] == tok.bos_token_id and ids[1] != tok.bos_token_id
  assert tok.decode(ids[mask == 1][:-1]) == " Hello."


def test_real_gsm8k_targets_round_trip(gsm8k_dir, tokenizer_bos):
  task = get_task("gsm8k")
  examples = task.load("test", str(gsm8k_dir))[:200]
  batch = tokenize_task_examples(tokenizer_bos, task, examples, max_length=None,
                                 append_eos=True)
  assert batch.n_dropped == 0 and batch.kept_indices.tolist() == list(range(200))
  for row, ex in enumerate(examples):
    target_ids = batch.input_ids[row][batch.target_mask[row] == 1]
    assert target_ids[-1] == tokenizer_bos.eos_token_id
    assert tokenizer_bos.decode(target_ids[:-1]) == task.format_target(ex)
