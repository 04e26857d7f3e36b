"""Prompt options: few-shot examples and chat templates, and the prompt/target boundary they
keep (training, scoring and sampling tokenize the same target after the same prompt)."""
from __future__ import annotations

import copy
import re

import numpy as np
import pytest

from memdyn_jax import evaluation, testing
from memdyn_jax.tasks import (
    ChatTemplate,
    ChatTemplateError,
    Example,
    PromptSetupError,
    TargetBoundaryError,
    canonical_task_kwargs,
    encode_example,
    get_task,
    tokenize_task_examples,
    write_jsonl,
)

# GSM8K-format records: five train problems, one test problem.
TRAIN = [
    ("Tom has 3 apples and buys 2 more. How many apples does he have?",
     "Tom has 3+2=<<3+2=5>>5 apples.\n#### 5"),
    ("A box holds 4 pens. How many pens are in 2 boxes?",
     "2 boxes hold 2*4=<<2*4=8>>8 pens.\n#### 8"),
    ("Sam had 10 dollars and spent 4. How much is left?",
     "Sam has 10-4=<<10-4=6>>6 dollars.\n#### 6"),
    ("Ann reads 5 pages a day. How many pages in 3 days?",
     "Ann reads 5*3=<<5*3=15>>15 pages.\n#### 15"),
    ("Natalia sold 48 clips in April and half as many in May. How many in May?",
     "Natalia sold 48/2=<<48/2=24>>24 clips in May.\n#### 24"),
]
TEST = [("Weng earns $12 an hour. How much for 2 hours?",
         "Weng earns 12*2=<<12*2=24>>24.\n#### 24")]


@pytest.fixture
def gsm8k_mini(tmp_path):
  for split, rows in (("train", TRAIN), ("test", TEST)):
    write_jsonl(tmp_path / f"{split}.jsonl", [{"question": q, "answer": a} for q, a in rows])
  return str(tmp_path)


def fewshot_task(path, **kwargs):
  return get_task("gsm8k", num_fewshot=2, **kwargs).prepare_prompts(path=path)


# --- few-shot ---------------------------------------------------------------------------


def test_fewshot_prompt_is_exact(gsm8k_mini):
  """K=2 (seed 1234 shuffles the five train problems to 4, 0, 1, 2, 3): each shot in the
  task's format (prompt, target with its "\\nDone."), a blank line, then the question."""
  task = fewshot_task(gsm8k_mini)
  (ex,) = task.load("test", gsm8k_mini)
  assert task.format_prompt(ex.question) == (
      "Natalia sold 48 clips in April and half as many in May. How many in May?\n"
      "Answer: Natalia sold 48/2=<<48/2=24>>24 clips in May.\n#### 24\nDone.\n\n"
      "Tom has 3 apples and buys 2 more. How many apples does he have?\n"
      "Answer: Tom has 3+2=<<3+2=5>>5 apples.\n#### 5\nDone.\n\n"
      "Weng earns $12 an hour. How much for 2 hours?\nAnswer:")
  # The target and a perturbation are the zero-shot ones (the preamble after the cue).
  assert task.format_target(ex) == " Weng earns 12*2=<<12*2=24>>24.\n#### 24\nDone."
  assert task.format_prompt(ex.question, "First").endswith("2 hours?\nAnswer: First")


def test_readme_fewshot_prompt_is_the_real_one(gsm8k_dir):
  """README's few-shot prompt of GSM8K's first test example is what the task renders."""
  from conftest import REPO_ROOT
  readme = (REPO_ROOT / "README.md").read_text()
  section = readme.split("**Few-shot prompts", 1)[1]
  shown = re.search(r"```text\n(.*?)\n```", section, re.S).group(1)
  task = fewshot_task(str(gsm8k_dir))
  ex = task.load("test", str(gsm8k_dir))[0]
  assert shown == task.format_prompt(ex.question)
  assert [s.id for s in task.fewshot_examples(ex.question)] == [
      "gsm8k/train/6248", "gsm8k/train/1556"]


def test_fewshot_never_shows_the_example_itself(gsm8k_mini):
  task = fewshot_task(gsm8k_mini)
  train = task.load("train", gsm8k_mini)
  for ex in train:
    shots = task.fewshot_examples(ex.question)
    assert len(shots) == 2 and ex.id not in {s.id for s in shots}
    assert ex.question not in task.format_prompt(ex.question)[:-len(ex.question) - 9]
  # The first two of the shuffle, except for themselves: they get the next one.
  assert [s.id for s in task.fewshot_examples(TEST[0][0])] == ["gsm8k/train/4", "gsm8k/train/0"]
  assert [s.id for s in task.fewshot_examples(train[4].question)] == [
      "gsm8k/train/0", "gsm8k/train/1"]
  assert [s.id for s in task.fewshot_examples(train[0].question)] == [
      "gsm8k/train/4", "gsm8k/train/1"]


def test_fewshot_is_deterministic_and_seeded(gsm8k_mini):
  question = TEST[0][0]
  first = fewshot_task(gsm8k_mini).format_prompt(question)
  assert fewshot_task(gsm8k_mini).format_prompt(question) == first
  # Another seed, other shots; the shots of one question do not depend on others rendered.
  other = fewshot_task(gsm8k_mini, fewshot_seed=0)
  assert other.format_prompt(question) != first
  assert [s.id for s in other.fewshot_examples(question)] == ["gsm8k/train/2", "gsm8k/train/0"]


def test_fewshot_errors(gsm8k_mini):
  with pytest.raises(PromptSetupError, match="prepare_prompts"):
    get_task("gsm8k", num_fewshot=2).format_prompt("q")
  with pytest.raises(ValueError, match="only 4 example"):
    get_task("gsm8k", num_fewshot=5).prepare_prompts(path=gsm8k_mini).format_prompt(TRAIN[0][0])
  for bad in ({"num_fewshot": -1}, {"num_fewshot": "2"}, {"chat_template": 1},
              {"system_prompt": "Be brief."}):
    with pytest.raises(ValueError, match=next(iter(bad))):
      get_task("gsm8k", **bad)


def test_prompt_options_are_task_kwargs():
  """Every task takes them; defaults are not stated, so an explicit default is the same
  task as an omitted one."""
  assert canonical_task_kwargs({"strip_calculator": True, "num_fewshot": 0,
                                "chat_template": False, "fewshot_seed": 1234}) == {
                                    "strip_calculator": True}
  assert canonical_task_kwargs({"num_fewshot": 3, "seed": 1}) == {"seed": 1, "num_fewshot": 3}
  task = get_task("synthetic_arith", n_train=6, n_test=2, n_ood=2, max_steps=1, num_fewshot=1)
  task.prepare_prompts()  # the task's own train split (generated here)
  ex = task.load("test")[0]
  shot = task.fewshot_examples(ex.question)[0]
  assert task.format_prompt(ex.question) == (
      f"{shot.question}\nAnswer: {shot.target}\nDone.\n\n{ex.question}\nAnswer:")


def test_fewshot_training_keeps_the_target_boundary(gsm8k_mini, tokenizer_bos):
  """Tokenized for training, a few-shot example's target tokens are exactly its target (the
  shots are prompt, not loss), its prompt tokens the few-shot prompt."""
  task = fewshot_task(gsm8k_mini)
  examples = task.load("train", gsm8k_mini)
  batch = tokenize_task_examples(tokenizer_bos, task, examples, max_length=None,
                                 append_eos=True)
  for row, ex in enumerate(examples):
    ids, mask = batch.input_ids[row], batch.target_mask[row]
    real = batch.attention_mask[row] == 1
    target = ids[mask == 1]
    assert target[-1] == tokenizer_bos.eos_token_id
    assert tokenizer_bos.decode(target[:-1]) == task.format_target(ex)
    prompt = ids[real & (mask == 0)]
    assert prompt[0] == tokenizer_bos.bos_token_id
    assert tokenizer_bos.decode(prompt[1:]) == task.format_prompt(ex.question)


# --- chat templates -----------------------------------------------------------------------


def chat_tokenizer(base, template=testing.CHATML_TEMPLATE, special=True):
  tok = copy.deepcopy(base)  # Keep the session fixture unmodified.
  if special:
    tok.add_tokens(list(testing.CHATML_TOKENS), special_tokens=True)
  tok.chat_template = template
  return tok


def conversation_ids(tok, messages, answer):
  """HF's own tokenization of the conversation up to the end of the answer's turn."""
  text = tok.apply_chat_template(messages + [{"role": "assistant", "content": answer}],
                                 tokenize=False)
  end = text.index(answer) + len(answer) + len("<|im_end|>")
  return tok(text[:end], add_special_tokens=False)["input_ids"]


def test_chat_prompt_target_and_stop(tokenizer_no_bos, gsm8k_mini):
  tok = chat_tokenizer(tokenizer_no_bos)
  task = get_task("gsm8k", chat_template=True).prepare_prompts(tok)
  (ex,) = task.load("test", gsm8k_mini)
  assert task.format_prompt(ex.question) == (
      "<|im_start|>user\nWeng earns $12 an hour. How much for 2 hours?<|im_end|>\n"
      "<|im_start|>assistant\n")
  # The target starts where the assistant turn starts and ends with its end of turn.
  assert task.format_target(ex) == "Weng earns 12*2=<<12*2=24>>24.\n#### 24<|im_end|>"
  im_end = tok.convert_tokens_to_ids("<|im_end|>")
  assert task.end_of_turn == "<|im_end|>" and task.turn_stop == ()
  assert task.stop == () and task.stop_token_ids == (im_end, tok.eos_token_id)
  params = evaluation.default_sampling(task, stop=("\n\n",))
  assert params.stop == ("\n\n",) and params.stop_token_ids == (im_end, tok.eos_token_id)
  # Graded as GSM8K: the answer line is in the assistant's turn.
  assert task.grade(task.format_target(ex), ex.answer)


@pytest.mark.parametrize("with_bos", [False, True])
def test_chat_tokens_are_the_conversations(tokenizer_no_bos, tokenizer_bos, gsm8k_mini,
                                           with_bos):
  """prompt tokens + target tokens == HF's tokenization of the conversation's text up to
  the end of the turn: no EOS after it (append_eos), BOS once where the template writes it."""
  base = tokenizer_bos if with_bos else tokenizer_no_bos
  template = ("{{ bos_token }}" if with_bos else "") + testing.CHATML_TEMPLATE
  tok = chat_tokenizer(base, template)
  task = get_task("gsm8k", chat_template=True).prepare_prompts(tok)
  examples = task.load("train", gsm8k_mini)
  batch = tokenize_task_examples(tok, task, examples, max_length=None, append_eos=True)
  for row, ex in enumerate(examples):
    n = int(batch.attention_mask[row].sum())
    ids, mask = batch.input_ids[row][:n], batch.target_mask[row][:n]
    want = conversation_ids(tok, [{"role": "user", "content": ex.question}], ex.target)
    assert ids.tolist() == want
    assert (ids == tok.bos_token_id).sum() == int(with_bos)
    assert tok.decode(ids[mask == 1]) == task.format_target(ex)
    assert tok.decode(ids[mask == 0]) == task.format_prompt(ex.question)


def test_chat_target_is_tokenized_jointly(tmp_path):
  """A SentencePiece-like tokenizer (Metaspace: a separately encoded text gets a prefix
  space) tokenizes a target on its own otherwise than after its prompt: the target's tokens
  are those of the conversation."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  from transformers import PreTrainedTokenizerFast

  raw = Tokenizer(models.BPE(unk_token="<unk>"))
  raw.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
  raw.decoder = decoders.Metaspace(prepend_scheme="first")
  raw.train_from_iterator([q + " " + a for q, a in TRAIN * 5] + ["\n#=<>+*/"],
                          trainers.BpeTrainer(vocab_size=300, show_progress=False,
                                              special_tokens=["<unk>", "</s>",
                                                              *testing.CHATML_TOKENS]))
  tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token="</s>", unk_token="<unk>")
  tok.chat_template = testing.CHATML_TEMPLATE
  task = get_task("gsm8k", chat_template=True).prepare_prompts(tok)
  prompt, target = task.format_prompt(TRAIN[4][0]), task.format_target(
      Example("x", TRAIN[4][0], TRAIN[4][1], "24"))
  alone = tok(target, add_special_tokens=False)["input_ids"]
  ids, mask = encode_example(tok, prompt, target, max_length=None, joint_target=True)
  assert ids[mask == 1].tolist() != alone  # "▁Natalia" alone, "Natalia" in the turn
  assert ids.tolist() == conversation_ids(tok, [{"role": "user", "content": TRAIN[4][0]}],
                                          TRAIN[4][1])


def test_chat_boundary_inside_a_token_is_refused(tokenizer_no_bos, gsm8k_mini):
  """A generation prompt ending in a space: " sold" is one token of the conversation, so no
  target can start on a token of its own."""
  tok = chat_tokenizer(tokenizer_no_bos, "{% for m in messages %}{{ m['role'] }}: "
                       "{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}"
                       "assistant: {% endif %}", special=False)
  task = get_task("gsm8k", chat_template=True).prepare_prompts(tok)
  examples = task.load("test", gsm8k_mini)
  examples = [Example("e", ex.question, "sold 48 clips.", "48") for ex in examples]
  with pytest.raises(TargetBoundaryError, match="'e'.*spans the prompt/target boundary"):
    tokenize_task_examples(tok, task, examples, max_length=None)


def test_chat_end_of_turn_as_text(tokenizer_no_bos):
  """An end of turn that is no special token (decoded text shows it) stops as a string,
  added to any other stop; one without an end of turn has neither (EOS ends it)."""
  tok = chat_tokenizer(tokenizer_no_bos, special=False)
  task = get_task("gsm8k", chat_template=True).prepare_prompts(tok)
  assert task.turn_stop == ("<|im_end|>",) and task.stop_token_ids is None
  assert evaluation.default_sampling(task, stop=("\n\n",)).stop == ("\n\n", "<|im_end|>")
  plain = get_task("gsm8k", chat_template=True).prepare_prompts(chat_tokenizer(
      tokenizer_no_bos, "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n"
      "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"))
  assert plain.end_of_turn == "" and plain.turn_stop == () and plain.stop_token_ids is None
  assert plain.format_target(Example("x", "q", "Hi.", "1")) == "Hi."


def test_chat_fewshot_shots_are_prior_turns(tokenizer_no_bos, gsm8k_mini):
  tok = chat_tokenizer(tokenizer_no_bos)
  task = get_task("gsm8k", chat_template=True, num_fewshot=2,
                  system_prompt="Solve it.").prepare_prompts(tok, gsm8k_mini)
  (ex,) = task.load("test", gsm8k_mini)
  assert task.format_prompt(ex.question) == (
      "<|im_start|>system\nSolve it.<|im_end|>\n"
      f"<|im_start|>user\n{TRAIN[4][0]}<|im_end|>\n"
      f"<|im_start|>assistant\n{TRAIN[4][1]}<|im_end|>\n"
      f"<|im_start|>user\n{TRAIN[0][0]}<|im_end|>\n"
      f"<|im_start|>assistant\n{TRAIN[0][1]}<|im_end|>\n"
      f"<|im_start|>user\n{TEST[0][0]}<|im_end|>\n<|im_start|>assistant\n")
  batch = tokenize_task_examples(tok, task, [ex], max_length=None, append_eos=True)
  assert tok.decode(batch.input_ids[0][batch.target_mask[0] == 1]) == task.format_target(ex)


def test_chat_template_errors(tokenizer_no_bos):
  with pytest.raises(ChatTemplateError, match="prepare_prompts"):
    get_task("gsm8k", chat_template=True).format_prompt("q")
  with pytest.raises(ChatTemplateError, match="chat_template is not set"):
    get_task("gsm8k", chat_template=True).prepare_prompts(copy.deepcopy(tokenizer_no_bos))
  refuses = chat_tokenizer(tokenizer_no_bos, "{% if messages[0]['role'] == 'system' %}"
                           "{{ raise_exception('System role not supported') }}{% endif %}"
                           + testing.CHATML_TEMPLATE)
  with pytest.raises(ChatTemplateError, match="System role not supported"):
    ChatTemplate(tokenizer=refuses, system="Be brief.")
  # A template that writes nothing of the assistant's turn after the generation prompt.
  with pytest.raises(ChatTemplateError, match="does not continue its generation prompt"):
    ChatTemplate(tokenizer=chat_tokenizer(tokenizer_no_bos, "{{ messages[0]['content'] }}"))


def test_chat_scores_match_training_tokens(tokenizer_no_bos):
  """The scorer's joint tokenization is the trainer's (same ids, same mask)."""
  tok = chat_tokenizer(tokenizer_no_bos)
  task = get_task("gsm8k", chat_template=True).prepare_prompts(tok)
  examples = [Example(f"e{i}", q, a, "0") for i, (q, a) in enumerate(TRAIN)]
  batch = tokenize_task_examples(tok, task, examples, max_length=None)
  from memdyn_jax.tasks import tokenize_examples
  again = tokenize_examples(tok, [task.format_prompt(e.question) for e in examples],
                            [task.format_target(e) for e in examples], None,
                            joint_target=True)
  np.testing.assert_array_equal(batch.input_ids, again.input_ids)
  np.testing.assert_array_equal(batch.target_mask, again.target_mask)
