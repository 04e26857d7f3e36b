"""Instruction SFT task: record formats, loss_on_prompt flag, grading, bad input; ChatTemplate."""
from __future__ import annotations

import copy

import pytest

from memdyn_jax.tasks import ChatTemplate, DataError, GradeResult, get_task, write_jsonl
from memdyn_jax.tasks.sft import render_history

# A minimal Jinja chat template in the usual shape (roles as tags, generation prompt).
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture
def chat_tokenizer(tokenizer_no_bos):
  tok = copy.deepcopy(tokenizer_no_bos)  # Keep the session fixture unmodified.
  tok.chat_template = CHAT_TEMPLATE
  return tok


def test_prompt_response_records(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [
      {"prompt": "Write a haiku.", "response": "Leaves fall.", "category": "poetry"},
      {"prompt": "Say hi.", "response": "Hi!"},
  ])
  first, second = get_task("sft").load("train", str(tmp_path))
  assert (first.id, first.question, first.target, first.answer) == (
      "sft/train/0", "Write a haiku.", "Leaves fall.", "Leaves fall.")
  assert first.meta["category"] == "poetry" and second.meta["category"] == ""
  assert "loss_on_prompt" not in first.meta


def test_messages_records_use_last_assistant_turn(tmp_path):
  single = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": "Hi?"},
                         {"role": "assistant", "content": "Hello."}]}
  multi = {"messages": [{"role": "user", "content": "A?"},
                        {"role": "assistant", "content": "a."},
                        {"role": "user", "content": "B?"},
                        {"role": "assistant", "content": "b."},
                        {"role": "user", "content": "ignored trailing turn"}],
           "category": "chat"}
  write_jsonl(tmp_path / "train.jsonl", [single, multi])
  first, second = get_task("sft").load("train", str(tmp_path / "train.jsonl"))
  assert first.question == "Be brief.\n\nHi?" and first.target == "Hello."
  assert second.question == "User: A?\n\nAssistant: a.\n\nUser: B?"
  assert second.target == "b." and second.meta["category"] == "chat"
  assert len(second.meta["messages"]) == 3


def test_sharegpt_conversations(tmp_path):
  record = {"conversations": [{"from": "human", "value": "Q?"}, {"from": "gpt", "value": "A."}]}
  write_jsonl(tmp_path / "test.jsonl", [record])
  (ex,) = get_task("sft").load("test", str(tmp_path))
  assert (ex.question, ex.target) == ("Q?", "A.")
  assert ex.meta["messages"] == ({"role": "user", "content": "Q?"},)


def test_render_history():
  assert render_history([]) == ""
  assert render_history([{"role": "user", "content": "x"}]) == "x"
  assert render_history([{"role": "assistant", "content": "a"},
                         {"role": "user", "content": "x"}]) == "Assistant: a\n\nUser: x"


def test_response_only_false_marks_loss_on_prompt(tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [{"prompt": "p", "response": "r"}])
  (ex,) = get_task("sft", response_only=False).load("train", str(tmp_path))
  assert ex.meta["loss_on_prompt"] is True


def test_grade_exact_match_after_strip():
  task = get_task("sft")
  assert task.extract_answer("  Leaves fall.\nDone. more") == "Leaves fall."
  assert task.extract_answer(" \n") is None
  assert task.grade(" Leaves fall.\nDone.", "Leaves fall.")
  assert task.grade("Leaves fall.  ", " Leaves fall.")
  assert not task.grade("Leaves fall!", "Leaves fall.")
  assert task.grade_detailed("", "x") == GradeResult(correct=False, parsed=None)
  assert task.grade_detailed("y", "x") == GradeResult(correct=False, parsed="y")


def test_load_needs_a_path():
  with pytest.raises(ValueError, match="path"):
    get_task("sft").load("train")


def test_malformed_json_names_file_and_line(tmp_path):
  (tmp_path / "train.jsonl").write_text('{"prompt": "p", "response": "r"}\n{"prompt": \n')
  with pytest.raises(DataError, match=r"train\.jsonl:2"):
    get_task("sft").load("train", str(tmp_path))


@pytest.mark.parametrize("record,match", [
    ({"prompt": "p"}, r"train\.jsonl:1.*'response'"),
    ({"response": "r"}, r"train\.jsonl:1.*'prompt'"),
    ({"text": "t"}, r"train\.jsonl:1.*'prompt'.*'messages'"),
    ({"messages": [{"role": "user"}]}, r"train\.jsonl:1.*'content'"),
    ({"messages": [{"role": "user", "content": "q"}]}, r"train\.jsonl:1.*no assistant"),
    ({"conversations": [{"from": "human"}]}, r"train\.jsonl:1.*'value'"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, r"train\.jsonl:1.*'bot'"),
    ({"messages": "hello"}, r"train\.jsonl:1.*list"),
])
def test_bad_records(tmp_path, record, match):
  write_jsonl(tmp_path / "train.jsonl", [record])
  with pytest.raises(DataError, match=match):
    get_task("sft").load("train", str(tmp_path))


def test_empty_split(tmp_path):
  (tmp_path / "train.jsonl").write_text("\n\n")
  with pytest.raises(DataError, match="empty split"):
    get_task("sft").load("train", str(tmp_path))


# --- chat template --------------------------------------------------------------------


def test_chat_template_renders_with_generation_prompt(chat_tokenizer):
  template = ChatTemplate(tokenizer=chat_tokenizer)
  assert template.prompt("Hi?") == "<|user|>\nHi?\n<|assistant|>\n"
  assert template.prompt("Hi?", "First") == "<|user|>\nHi?\n<|assistant|>\nFirst"
  assert template.target("Hello.") == "Hello."
  assert template.stop == ()
  with_system = ChatTemplate(tokenizer=chat_tokenizer, system="Be brief.",
                             prompt_format="Question: {question}")
  assert with_system.prompt("Hi?") == (
      "<|system|>\nBe brief.\n<|user|>\nQuestion: Hi?\n<|assistant|>\n")


def test_chat_template_as_task_template(chat_tokenizer, tmp_path):
  write_jsonl(tmp_path / "train.jsonl", [{"prompt": "Hi?", "response": "Hello."}])
  task = get_task("sft", template=ChatTemplate(tokenizer=chat_tokenizer))
  (ex,) = task.load("train", str(tmp_path))
  assert task.format_prompt(ex.question) == "<|user|>\nHi?\n<|assistant|>\n"
  assert task.format_target(ex) == "Hello."
  gsm = get_task("gsm8k", template=ChatTemplate(tokenizer=chat_tokenizer))
  assert gsm.format_prompt("2+2?", "We know that").endswith("<|assistant|>\nWe know that")


def test_chat_template_needs_tokenizer():
  with pytest.raises(ValueError, match="tokenizer"):
    ChatTemplate().prompt("x")
