"""Tests of the synthetic_arith task, its pre-training corpus and its tokenizer."""
import dataclasses
import json
import random
import re
import time

import numpy as np
import pytest

from memdyn_jax.tasks import base
from memdyn_jax.tasks import synthetic_arith as sa
from memdyn_jax.tasks import synthetic_corpus as sc

_ANNOT = re.compile(r"(\d+)([-+*/])(\d+)=<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")


def _check_trace(trace, answer):
  """Independent checker: every annotation exact, final line `#### answer`."""
  body, final = trace.rsplit("\n", 1)
  assert final == f"#### {answer}"
  found = _ANNOT.findall(body)
  assert found and len(found) == body.count("<<") == body.count("\n") + 1
  for a, op, b, a2, op2, b2, c, c2 in found:
    assert (a, op, b, c) == (a2, op2, b2, c2)
    a, b, c = int(a), int(b), int(c)
    if op == "/":
      assert a == b * c
    else:
      assert {"+": a + b, "-": a - b, "*": a * b}[op] == c
  assert int(found[-1][-1]) == int(answer)


@pytest.fixture(scope="module")
def task():
  return sa.SyntheticArithTask(seed=0, n_train=1500, n_test=300, n_ood=300)


@pytest.fixture(scope="module")
def data(task):
  return {s: task.load(s) for s in sa.SPLITS}


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory, task):
  return sc.build_tokenizer(str(tmp_path_factory.mktemp("tok")), seed=0, task=task)


# -- generation -------------------------------------------------------------------------


def test_registered_and_sizes(data):
  task = base.get_task("synthetic_arith", n_train=5, n_test=3, n_ood=2)
  assert isinstance(task, sa.SyntheticArithTask) and task.name == "synthetic_arith"
  assert "synthetic_arith" in base.task_names()
  assert [len(task.load(s)) for s in sa.SPLITS] == [5, 3, 2]
  assert [len(data[s]) for s in sa.SPLITS] == [1500, 300, 300]
  ids = [e.id for s in sa.SPLITS for e in data[s]]
  assert len(set(ids)) == len(ids) and ids[0] == "synthetic_arith/train/0"


def test_targets_and_all_traces_evaluate_to_answer(task, data):
  for split in sa.SPLITS:
    for e in data[split]:
      _check_trace(e.target, e.answer)
      assert sa.verify_trace(e.target, e.answer)
      assert int(e.answer) == sa.problem_of(e).answer
  for e in data["train"][:200] + data["ood"][:50]:
    for t in task.traces(e):
      _check_trace(t, e.answer)


def test_traces_distinct_and_target_first(task, data):
  multi = [e for e in data["train"] + data["test"] if e.meta["n_steps"] > 1]
  with_alternatives = 0
  for e in multi[:400]:
    traces = task.traces(e)
    assert traces[0] == e.target and len(set(traces)) == len(traces) <= 64
    with_alternatives += len(traces) >= 2
  assert with_alternatives >= 0.8 * len(multi[:400])
  # Small trace spaces are enumerated exhaustively.
  small = next(e for e in data["train"] if 2 < e.meta["n_traces"] <= 64)
  assert len(task.traces(small, max_traces=64)) <= small.meta["n_traces"]
  assert len(task.traces(data["ood"][0], max_traces=5)) == 5


def test_trace_variants_differ_in_order_operands_and_connectors(data):
  problem = next(sa.problem_of(e) for e in data["train"]
                 if {"buy_groups", "lose"} <= {ev.kind for ev in sa.problem_of(e).events})
  orders = sa.step_orders(problem)
  assert len(orders) >= 2  # products inline vs hoisted
  steps = orders[0]
  n_swap = sum(s.op in "+*" for s in steps)
  plain = sa.render_trace(problem, steps, [0] * (len(steps) - 1), [False] * n_swap)
  swapped = sa.render_trace(problem, steps, [0] * (len(steps) - 1), [True] * n_swap)
  so = sa.render_trace(problem, steps, [1] * (len(steps) - 1), [False] * n_swap)
  assert len({plain, swapped, so}) == 3 and "\nSo " in so and "\nThen " in plain
  for t in (plain, swapped, so):
    _check_trace(t, problem.answer)
  assert sa.target_trace(problem) == sa.target_trace(problem)  # hash-chosen, stable
  assert sa.target_trace(problem) in sa.all_traces(problem, max_traces=10**6)


def test_verify_trace_rejects_bad_traces():
  good = "Tom has 3+4=<<3+4=7>>7 apples.\nSo Tom has 7*2=<<7*2=14>>14 apples.\n#### 14"
  assert sa.verify_trace(good) and sa.verify_trace(good, 14) and sa.verify_trace(good, "14")
  assert not sa.verify_trace(good, 15)
  assert not sa.verify_trace(good.replace("=14>>14", "=15>>15"))  # wrong arithmetic
  assert not sa.verify_trace(good.replace("#### 14", "#### 7"))  # answer is not last result
  assert not sa.verify_trace(good.replace("<<7*2", "<<7*3"))  # annotation mismatches text
  assert not sa.verify_trace("Tom has 3 apples.\n#### 3")  # no computation
  assert not sa.verify_trace("Tom has 3+4=<<3+4=7>>7 apples.")  # no final answer
  assert sa.verify_trace("8/2=<<8/2=4>>4\n#### 4") and not sa.verify_trace("9/2=<<9/2=4>>4\n#### 4")


def test_splits_disjoint_by_key(data):
  keys = {s: [sa.problem_of(e).key for e in data[s]] for s in sa.SPLITS}
  for s in sa.SPLITS:
    assert len(set(keys[s])) == len(keys[s])  # deduplicated within split too
    assert keys[s] == [e.meta["key"] for e in data[s]]
  assert not set(keys["train"]) & set(keys["test"])
  assert not set(keys["ood"]) & (set(keys["train"]) | set(keys["test"]))


def test_deterministic_and_seed_dependent(data):
  again = sa.SyntheticArithTask(seed=0, n_train=1500, n_test=300, n_ood=300)
  assert all(again.load(s) == data[s] for s in sa.SPLITS)
  other = sa.SyntheticArithTask(seed=1, n_train=1500, n_test=300, n_ood=300)
  assert other.load("train") != data["train"]
  # Held-out splits do not move when the training set grows; train is a prefix.
  bigger = sa.SyntheticArithTask(seed=0, n_train=2000, n_test=300, n_ood=300)
  assert bigger.load("test") == data["test"] and bigger.load("ood") == data["ood"]
  assert bigger.load("train")[:1500] == data["train"]


def test_levels_bounds_and_ood_shift(task, data):
  for split in sa.SPLITS:
    levels = {e.meta["level"] for e in data[split]}
    for e in data[split]:
      p = sa.problem_of(e)
      assert e.meta["level"] == e.meta["n_steps"] == len(p.events)
      numbers = [int(n) for n in re.findall(r"\d+", e.question + e.target)]
      assert min(p.values()) >= 1 and min(numbers) >= 1
      bound = task.max_value if split == "ood" else task.train_max_value
      assert max(p.values()) <= bound and max(numbers) <= bound
      if split == "ood":
        assert max(p.values()) > task.train_max_value  # larger numbers than train
    if split == "ood":
      assert levels == {5, 6}
    else:
      assert levels == {1, 2, 3, 4}
  assert task.max_value == 60 and task.train_max_value == 40


def test_ood_phrasings_unseen(data):
  def pattern(template):
    # A template as a regex: placeholders match words or numbers.
    parts = re.split(r"\{\w+\}", template)
    return re.compile(r"[\w]+".join(re.escape(p) for p in parts))
  ood = [pattern(t) for ts in sa.PHRASINGS["ood"].values() for t in ts]
  train = [pattern(t) for ts in sa.PHRASINGS["train"].values() for t in ts]
  for e in data["train"] + data["test"]:
    assert not [p.pattern for p in ood if p.search(e.question)]
  for e in data["ood"]:
    assert not [p.pattern for p in train if p.search(e.question)]
  assert all(e.meta["spec"]["pool"] == "ood" for e in data["ood"])
  assert all(e.meta["spec"]["pool"] == "train" for e in data["train"] + data["test"])


def test_generation_speed():
  start = time.process_time()  # CPU time: robust to other jobs sharing the machine
  sa.SyntheticArithTask(seed=3, n_train=10_000, n_test=0, n_ood=0).load("train")
  assert time.process_time() - start < 5.0  # ~1 s on one core


def test_config_validation_and_sampling_errors():
  with pytest.raises(ValueError):
    sa.SyntheticArithTask(max_steps=4, ood_steps=(3, 5))
  with pytest.raises(ValueError):
    sa.SyntheticArithTask(max_value=60, train_max_value=70)
  with pytest.raises(ValueError):
    sa.SyntheticArithTask().load("validation")
  with pytest.raises(ValueError):
    sa.SyntheticArithTask().keys("dev")
  with pytest.raises(ValueError):  # 20 halvings cannot stay >= 2 below 60
    sa.sample_problem(random.Random(0), 20, 60, "train", kinds=["share"] * 20, max_tries=50)
  with pytest.raises(ValueError):
    sa.sample_problem(random.Random(0), 2, 60, "train", kinds=["gain"])
  with pytest.raises(ValueError):  # the whole 1-step space is smaller than this
    sa.SyntheticArithTask(max_steps=1, ood_steps=(2, 2), n_train=100_000, n_test=0,
                          n_ood=0).load("train")


def test_sample_problem_and_render_question():
  rng = random.Random(7)
  p = sa.sample_problem(rng, 3, 40, "train", kinds=["gain", "times", "sell_groups"],
                        phrasings=(1, [0, 1, 2], 2))
  assert [e.kind for e in p.events] == ["gain", "times", "sell_groups"]
  q = sa.render_question(p)
  assert q.startswith(f"{p.name} starts with {p.start} {p.obj}.")
  assert q.endswith(f"How many {p.obj} does {p.name} have in total?")
  assert sa.template_key(p) == "train:i1:gain0,times1,sell_groups2:a2"
  assert sa.Problem.from_spec(json.loads(json.dumps(p.to_spec()))) == p
  with pytest.raises(base.DataError):
    sa.Problem.from_spec({"name": "Tom"})


def test_example_meta(data):
  e = data["train"][0]
  assert set(e.meta) >= {"split", "level", "n_steps", "n_lines", "key", "template",
                         "n_traces", "spec"}
  assert e.meta["n_lines"] == e.target.count("\n")
  json.dumps(dict(e.meta))  # serializable
  with pytest.raises(base.DataError):
    sa.problem_of(dataclasses.replace(e, meta={}))


# -- grading ------------------------------------------------------------------------


def test_extract_answer_and_grade(task, data):
  assert task.extract_answer("So 3+4=7.\n#### 7\nDone.") == "7"
  assert task.extract_answer("#### 1,200") == "1200"
  assert task.extract_answer("####12") == "12"
  assert task.extract_answer("#### 012") == "12"
  assert task.extract_answer("#### 7.0") == "7"
  assert task.extract_answer("#### 7.5") is None
  assert task.extract_answer("The answer is 42.") == "42"
  assert task.extract_answer("#### 5 then #### 6") == "5"  # first marker wins
  assert task.extract_answer("#### -3") == "-3"
  assert task.extract_answer("no answer here") is None
  assert task.extract_answer("#### x") is None
  e = data["test"][0]
  assert task.grade(task.format_target(e), e.answer)
  assert task.grade(" #### 11\nDone.", "11") and not task.grade("#### 12", "11")
  assert not task.grade("garbage", "11")
  assert task.grade_detailed("garbage", "11").unparseable
  assert task.grade_detailed("#### 12", "11") == base.GradeResult(correct=False, parsed="12")
  with pytest.raises(ValueError):
    task.grade("#### 1", "one")


# -- persistence ---------------------------------------------------------------------------


def test_save_load_roundtrip(task, data, tmp_path):
  path = str(tmp_path / "test.jsonl")
  task.save_jsonl(data["test"], path)
  loaded = task.load("test", path)
  assert loaded == data["test"]
  assert task.traces(loaded[3]) == task.traces(data["test"][3])


def test_load_errors(task, tmp_path):
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"id": "a", "question": "q", "target": "t"}\n')
  with pytest.raises(base.DataError, match="bad.jsonl:1"):
    task.load("train", str(bad))
  bad.write_text('{"id": "a", "question": "q", "target": "t", "answer": "1", "meta": 3}\n')
  with pytest.raises(base.DataError, match="meta"):
    task.load("train", str(bad))
  bad.write_text("\n")
  with pytest.raises(base.DataError, match="empty"):
    task.load("train", str(bad))


# -- curation helpers --------------------------------------------------------------------------


def test_rephrase(task, data):
  for i, e in enumerate(data["train"][:100] + data["ood"][:30]):
    rng = random.Random(i) if i % 2 else np.random.default_rng(i)
    r = task.rephrase(e, rng)
    assert r.question != e.question
    assert r.answer == e.answer and r.target == e.target
    assert r.meta["key"] == e.meta["key"] and r.meta["split"] == e.meta["split"]
    assert r.meta["spec"]["pool"] == e.meta["spec"]["pool"]
    assert r.meta["source_id"] == e.id and r.id != e.id
    _check_trace(r.target, r.answer)
  e = data["train"][0]
  assert task.rephrase(e, 5) == task.rephrase(e, 5)  # deterministic given the rng
  with pytest.raises(TypeError):
    task.rephrase(e, "seed")


def test_fresh_like(task, data):
  taken = set().union(*(task.keys(s) for s in sa.SPLITS))
  for i, e in enumerate(data["train"][:60] + data["ood"][:20]):
    f = task.fresh_like(e, random.Random(i))
    assert f.meta["template"] == e.meta["template"] and f.meta["level"] == e.meta["level"]
    assert f.meta["key"] not in taken and f.meta["split"] == e.meta["split"]
    assert f.meta["source_id"] == e.id
    _check_trace(f.target, f.answer)
    if e.meta["split"] == "ood":
      assert max(sa.problem_of(f).values()) > task.train_max_value


# -- pre-training corpus ----------------------------------------------------------------------------


def test_corpus_excludes_split_problems(task, data):
  docs = sc.corpus_documents(3000, seed=0, task=task)
  assert {d.kind for d in docs} == set(sc.DOC_KINDS)
  problem_docs = [d for d in docs if d.kind == "problems"]
  assert len(problem_docs) > 1000
  corpus_keys = {d.key for d in problem_docs}
  for split in sa.SPLITS:
    assert not corpus_keys & task.keys(split)
  text = "\n".join(d.text for d in docs)
  assert not [e for e in data["test"] + data["ood"] if e.question in text]
  for d in problem_docs[:300]:
    question, solution = d.text.split("\nAnswer: ")
    assert solution.endswith("\nDone.")
    sol = solution[: -len("\nDone.")]
    _check_trace(sol, task.extract_answer(sol))


def test_corpus_content_and_determinism(task):
  docs = sc.corpus_documents(400, seed=1, task=task)
  assert docs == sc.corpus_documents(400, seed=1, task=task)
  assert [d.text for d in docs] == sc.pretraining_corpus(400, seed=1, task=task)
  assert sc.pretraining_corpus(50, seed=2, task=task) != sc.pretraining_corpus(50, 1, task)
  for d in docs:
    if d.kind == "facts":
      for line in d.text.split("\n"):
        expr, c = re.match(r"(\d+[-+*/]\d+)=(?:<<.*>>)?(\d+)$", line).groups()
        a, op, b = re.match(r"(\d+)([-+*/])(\d+)", expr).groups()
        assert eval(f"{a}{op}{b}") == int(c) and int(c) <= task.max_value
    assert ("####" in d.text) == (d.kind == "problems")
  only_facts = sc.pretraining_corpus(20, 0, task, mix={"facts": 1.0})
  assert all("=" in t and "Answer" not in t for t in only_facts)
  with pytest.raises(ValueError):
    sc.pretraining_corpus(5, 0, task, mix={"poems": 1.0})


def test_number_word():
  assert [sc.number_word(n) for n in (0, 7, 13, 20, 42, 99)] == [
      "zero", "seven", "thirteen", "twenty", "forty-two", "ninety-nine"]
  with pytest.raises(ValueError):
    sc.number_word(100)


# -- tokenizer -----------------------------------------------------------------------------------


def test_tokenizer_roundtrip(task, data, tokenizer):
  texts = []
  for split in sa.SPLITS:
    for e in data[split]:
      texts.append(task.format_prompt(e.question) + task.format_target(e))
  texts += [t for e in data["train"][:50] for t in task.traces(e, max_traces=8)]
  texts += ["a  b\n\n c\t#### 7\nDone.", " <<12*3=36>>36", "\nAnswer:", "x" * 3 + " \n "]
  for text in texts:
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_prompt_target_boundary(task, data, tokenizer):
  # Encoding prompt and target separately gives the same tokens as encoding them jointly.
  for e in data["train"][:200] + data["ood"][:50]:
    prompt, target = task.format_prompt(e.question), task.format_target(e)
    joint = tokenizer(prompt + target, add_special_tokens=False)["input_ids"]
    parts = (tokenizer(prompt, add_special_tokens=False)["input_ids"]
             + tokenizer(target, add_special_tokens=False)["input_ids"])
    assert joint == parts


def test_tokenizer_digits_are_single_tokens(tokenizer):
  digit_ids = [tokenizer.convert_tokens_to_ids(str(d)) for d in range(10)]
  assert tokenizer.unk_token_id not in digit_ids and len(set(digit_ids)) == 10
  for token in tokenizer.get_vocab():
    assert not re.search(r"\d", token) or len(token) == 1  # no merge contains a digit
  ids = tokenizer("Tom has 1234+56=<<1234+56=1290>>1290", add_special_tokens=False)["input_ids"]
  digits = [i for i in ids if i in digit_ids]
  assert len(digits) == 4 + 2 + 4 + 2 + 4 + 4


def test_tokenizer_specials_size_and_determinism(tmp_path, task, tokenizer):
  assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token,
          tokenizer.unk_token) == ("<s>", "</s>", "<pad>", "<unk>")
  assert 200 <= len(tokenizer) <= 520
  again = sc.build_tokenizer(str(tmp_path / "again"), seed=0, task=task)
  assert again.get_vocab() == tokenizer.get_vocab()
  from transformers import AutoTokenizer
  loaded = AutoTokenizer.from_pretrained(str(tmp_path / "again"))
  text = task.format_prompt(task.load("test")[0].question)
  assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
  small = sc.build_tokenizer(None, seed=0, vocab_size=256, n_docs=300, task=task)
  assert len(small) == 256
  assert small.decode(small("So 12-5=<<12-5=7>>7.\n#### 7")["input_ids"],
                      skip_special_tokens=True) == "So 12-5=<<12-5=7>>7.\n#### 7"


def test_tokenizer_whole_numbers(task, data):
  tok = sc.build_tokenizer(None, seed=0, n_docs=400, task=task, whole_numbers=99)
  vocab = tok.get_vocab()
  for n in range(100):
    assert tok(str(n), add_special_tokens=False)["input_ids"] == [vocab[str(n)]]
  for token in vocab:  # digit runs never merge with anything else
    assert not re.search(r"\d", token) or token.isdigit()
  text = "Tom has 14 coins.\n3*12=<<3*12=36>>36\n#### 1290"
  ids = tok(text, add_special_tokens=False)["input_ids"]
  assert vocab["14"] in ids and vocab["36"] in ids
  assert tok.decode(ids) == text
  for e in data["test"][:30]:  # prompt/target boundary as in the digit tokenizer
    prompt, target = task.format_prompt(e.question), task.format_target(e)
    assert (tok(prompt + target, add_special_tokens=False)["input_ids"]
            == tok(prompt, add_special_tokens=False)["input_ids"]
            + tok(target, add_special_tokens=False)["input_ids"])
  with pytest.raises(ValueError, match="vocab_size"):
    sc.build_tokenizer(None, seed=0, vocab_size=300, n_docs=50, task=task, whole_numbers=99)


def test_fact_chains_carry_the_previous_result(task):
  docs = sc.corpus_documents(300, seed=3, task=task, mix={"facts": 1.0}, chain_fraction=1.0)
  for d in docs:
    previous = None
    for line in d.text.split("\n"):
      expr, c = re.match(r"(\d+[-+*/]\d+)=(?:<<.*>>)?(\d+)$", line).groups()
      a, op, b = re.match(r"(\d+)([-+*/])(\d+)", expr).groups()
      assert eval(f"{a}{op}{b}") == int(c) and 0 <= int(c) <= task.max_value
      assert previous is None or int(a) == previous
      previous = int(c)
  plain = sc.corpus_documents(300, seed=3, task=task, mix={"facts": 1.0})
  assert [d.text for d in plain] != [d.text for d in docs]
