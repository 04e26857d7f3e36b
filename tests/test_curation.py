"""Data curation (Kang et al. Algorithm 1): IFD and heuristic selection, generators,
the efficiency ratio, one round end to end for every method, resume, and the binary."""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import random
import shutil

import numpy as np
import pytest

from memdyn_jax.studies import curation
from memdyn_jax.evaluation import sampling
from memdyn_jax import testing
from memdyn_jax.tasks import DataError, Example, write_jsonl
from memdyn_jax.tasks import synthetic_arith as sa

from conftest import run_binary

TASK_KWARGS = {"n_train": 24, "n_test": 8, "n_ood": 2, "max_steps": 2}


def ex(i: str, question: str = "q", target: str = "t", answer: str = "1", **meta) -> Example:
  return Example(id=i, question=question, target=target, answer=answer, meta=meta)


# ----------------------------------------------------------------------------- selection


class _Task:
  """Renders prompt "Q:<question>" and target "<target>" (all a stub scorer needs)."""

  name = "stub"

  def format_prompt(self, question, perturbation=None):
    return f"Q:{question}"

  def format_target(self, example):
    return example.target


def test_ifd_is_conditional_over_unconditional_perplexity_and_keeps_the_top_share():
  examples = [ex(f"e{i}", question=f"q{i}", target=f"t{i}") for i in range(6)]
  conditional = {"t0": 2.0, "t1": 3.0, "t2": 1.0, "t3": 4.0, "t4": 9.0, "t5": 1.5}
  unconditional = {"t0": 4.0, "t1": 3.0, "t2": 5.0, "t3": 2.0, "t4": math.nan, "t5": 1.0}
  calls = []

  def scorer(prompts, targets):
    calls.append(list(prompts))
    table = unconditional if prompts[0] == "" else conditional
    return np.array([table[t] for t in targets])

  scores = curation.ifd_scores(_Task(), examples, scorer)
  assert calls[0] == [f"Q:q{i}" for i in range(6)] and calls[1] == [""] * 6
  np.testing.assert_allclose(scores, [0.5, 1.0, 0.2, 2.0, math.nan, 1.5])
  # Ranking e3 (2.0) > e5 (1.5) > e1 (1.0) > e0 (0.5) > e2 (0.2) > e4 (NaN, last).
  np.testing.assert_array_equal(curation.top_fraction(scores, 0.5), [1, 3, 5])
  np.testing.assert_array_equal(curation.top_fraction(scores, 0.34), [3, 5])
  np.testing.assert_array_equal(curation.top_fraction(scores, 5 / 6), [0, 1, 2, 3, 5])
  np.testing.assert_array_equal(curation.top_fraction(scores, 0.01), [3])  # at least one
  with pytest.raises(ValueError, match="fraction"):
    curation.top_fraction(scores, 0.0)


def test_top_fraction_breaks_ties_by_seed_not_by_order():
  levels = np.array([3, 1, 3, 3, 2, 3, 1, 3])  # five examples tie at the top level
  picks = {tuple(curation.top_fraction(levels, 0.5, seed=s)) for s in range(20)}
  assert all(len(p) == 4 and set(p) <= {0, 2, 3, 5, 7} for p in picks)
  assert len(picks) > 1  # the tie is not always cut at the same place
  assert curation.top_fraction(levels, 0.5, seed=3).tolist() == (
      curation.top_fraction(levels, 0.5, seed=3).tolist())


# ----------------------------------------------------------------------------- generators


def test_synthetic_fresh_generator_makes_new_valid_problems():
  task = sa.SyntheticArithTask(**TASK_KWARGS)
  train = task.load("train")
  taken = task.keys("train") | task.keys("test") | task.keys("ood")
  gen = curation.SyntheticArithGenerator(task, mode="fresh")
  sources = train[:5] + train[:5]  # the same source twice must still give distinct problems
  new = gen.generate(sources, random.Random(0), train)
  assert all(n is not None for n in new)
  keys = [n.meta["key"] for n in new]
  assert len(set(keys)) == len(keys) and not set(keys) & taken
  for src, n in zip(sources, new):
    assert sa.verify_trace(n.target, n.answer)
    assert n.meta["template"] == src.meta["template"] and n.meta["source_id"] == src.id
  assert len({n.id for n in new} | {e.id for e in train}) == len(new) + len(train)

  reworded = curation.SyntheticArithGenerator(task, mode="rephrase").generate(
      train[:3], random.Random(1), train)
  for src, n in zip(train[:3], reworded):
    assert n.question != src.question and (n.answer, n.target) == (src.answer, src.target)


def test_jsonl_rephrasings_are_used_once_each(tmp_path):
  path = write_jsonl(tmp_path / "r.jsonl", [
      {"id": "a", "question": "Alice has 3 pens."},
      {"id": "a", "question": "Alice owns 3 pens.", "target": "3 pens\n#### 3", "answer": "3"},
      {"id": "a", "question": "Alice has 3 pens."},  # exact duplicate: dropped
      {"id": "zzz", "question": "not in the training set"}])
  gen = curation.JsonlRephrasings(str(path))
  src = ex("a", question="A has 3 pens.", target="src target", answer="3", level=2)
  first = gen.generate([src, src], random.Random(0), [src])
  assert [n.id for n in first] == ["a/rephrase-0", "a/rephrase-1"]
  assert first[0].target == "src target" and first[1].target == "3 pens\n#### 3"
  assert first[0].meta == {"level": 2, "source_id": "a", "rephrasing": f"{path}:1"}
  # Once both are in the set the source is used up; an unknown source has none.
  assert gen.generate([src, ex("b")], random.Random(0), [src, *first]) == [None, None]


@pytest.mark.parametrize("line,message", [
    ('{"id": "a", "question": "ok"}\n{"id": "a" "question": "x"}', r"r\.jsonl:2: malformed JSON"),
    ('{"id": "a"}', r"r\.jsonl:1: missing field\(s\) \['question'\]"),
    ('{"id": 7, "question": "x"}', r"r\.jsonl:1: 'id' must be a non-empty string"),
    ('\n{"id": "a", "question": "  "}', r"r\.jsonl:2: 'question' must be a non-empty"),
    ('{"id": "a", "question": "x", "target": 3}', r"r\.jsonl:1: 'target' must be"),
    ('', r"r\.jsonl: no rephrasings"),
])
def test_jsonl_rephrasings_errors_name_file_and_line(tmp_path, line, message):
  path = tmp_path / "r.jsonl"
  path.write_text(line + "\n")
  with pytest.raises(DataError, match=message):
    curation.JsonlRephrasings(str(path))


def test_model_rephraser_keeps_numbers_and_resamples_failures():
  seeds = []

  def fake_sample(model, tokenizer, prompts, params, batch_size):
    seeds.append(params.seed)
    assert params.n == 1 and all(p.startswith("Rewrite") for p in prompts)
    replies = {1: ["Bo now has 4 cats and 2 dogs.", "Cy has 5 cats."],  # 2nd drops a number
               2: ["Cy owns 5 cats and 6 dogs."]}[len(seeds)]
    return [[sampling.Completion(t, (), np.zeros(0), np.zeros(0), "stop_string")]
            for t in replies]

  gen = curation.ModelRephraser(model=None, tokenizer=None, sample_fn=fake_sample, attempts=2)
  b = ex("b", question="Bo has 4 cats and 2 dogs.", answer="6")
  c = ex("c", question="Cy has 5 cats and 6 dogs.", answer="11")
  out = gen.generate([b, c], random.Random(0), [b, c])
  assert out[0].question == "Bo now has 4 cats and 2 dogs." and out[0].answer == "6"
  assert out[1].question == "Cy owns 5 cats and 6 dogs." and out[1].target == c.target
  assert len(seeds) == 2 and seeds[0] != seeds[1]
  gen = curation.ModelRephraser(model=None, tokenizer=None, attempts=1,
                                sample_fn=lambda *a, **k: [[sampling.Completion(
                                    "Bo has 4 cats and 2 dogs.", (), np.zeros(0), np.zeros(0),
                                    "length")]])
  assert gen.generate([b], random.Random(0), [b]) == [None]  # unchanged text is no rephrasing


class _OneEach:
  """Makes one example per source id, then reports the source used up."""

  name = "one_each"

  def generate(self, sources, rng, existing):
    ids = {e.id for e in existing}
    return [None if f"{s.id}/new" in ids else ex(f"{s.id}/new") for s in sources]


def test_collect_examples_draws_evenly_and_replaces_used_up_sources():
  pool = [ex(f"p{i}") for i in range(3)]
  new, sources = curation.collect_examples(_OneEach(), pool, 3, random.Random(0), pool)
  assert sorted(sources) == ["p0", "p1", "p2"] and [e.id for e in new] == [
      f"{s}/new" for s in sources]
  with pytest.raises(curation.CurationError, match="made 3 of the 4 examples"):
    curation.collect_examples(_OneEach(), pool, 4, random.Random(0), pool)


def test_make_generator_picks_the_kind_and_names_the_bad_input(tmp_path):
  task = sa.SyntheticArithTask(**TASK_KWARGS)
  assert curation.make_generator("rephrase", task).name == "synthetic_rephrase"
  path = write_jsonl(tmp_path / "r.jsonl", [{"id": "a", "question": "Alice has 3 pens."}])
  assert isinstance(curation.make_generator("jsonl", task, rephrasings=str(path)),
                    curation.JsonlRephrasings)
  (tmp_path / "bad.jsonl").write_text('{"id": 3}\n')
  from memdyn_jax.tasks import GSM8KTask
  gsm8k = GSM8KTask()
  for kind, kwargs, field, needle in [
      ("fresh", {}, "generator", "like synthetic_arith, not 'gsm8k'"),
      ("jsonl", {}, "rephrasings", "is required with generator 'jsonl'"),
      ("jsonl", {"rephrasings": str(tmp_path / "bad.jsonl")}, "rephrasings",
       "bad.jsonl:1: missing field(s) ['question']"),
      ("model", {}, "rephrase_model", "is required with generator 'model'"),
      ("model", {"rephrase_model": str(tmp_path / "no_model")}, "rephrase_model", "no_model")]:
    with pytest.raises(curation.CurationInputError) as e:
      curation.make_generator(kind, gsm8k if kind == "fresh" else task, **kwargs)
    assert e.value.field == field and needle in e.value.message, e.value


def test_load_setup_cuts_the_splits_and_names_bad_data(tmp_path):
  from memdyn_jax.train.task_run import TaskSpec
  params = sampling.SamplingParams(max_new_tokens=4)
  setup = curation.load_setup(TaskSpec("synthetic_arith", TASK_KWARGS), "m", sampling=params,
                              methods=curation.METHODS, n_train=5, n_test=3, n_ifd=2)
  assert (len(setup.train_examples), len(setup.test_examples), len(setup.ifd_examples)) == (
      5, 3, 2)
  assert setup.train_config.to_dict() == curation.CurationSetup(
      setup.task, "m", setup.train_examples, setup.test_examples, params).train_config.to_dict()
  with pytest.raises(curation.CurationInputError) as e:
    curation.load_setup(TaskSpec("gsm8k", path=str(tmp_path / "nope")), "m", sampling=params,
                        methods=("iid",))
  assert e.value.field == "task" and "nope" in e.value.message


# ----------------------------------------------------------------------------- efficiency


def test_examples_to_reach_interpolates_the_first_crossing():
  sizes, accs = [100, 200, 300], [0.3, 0.5, 0.7]
  assert curation.examples_to_reach(sizes, accs, 0.6) == pytest.approx(250)
  assert curation.examples_to_reach(sizes, accs, 0.5) == pytest.approx(200)
  assert curation.examples_to_reach(sizes, accs, 0.2) == 100  # reached at the first point
  assert math.isnan(curation.examples_to_reach(sizes, accs, 0.8))
  # Unsorted input and a dip: the first crossing counts.
  assert curation.examples_to_reach([300, 100, 200], [0.4, 0.2, 0.6], 0.4) == pytest.approx(
      150)


def test_data_efficiency_ratio_on_known_curves():
  premem = ([100, 150, 200], [0.3, 0.5, 0.6])
  iid = ([100, 150, 200, 300, 400], [0.3, 0.4, 0.45, 0.55, 0.65])
  r = curation.data_efficiency_ratio(premem, iid)
  assert r.target_accuracy == 0.6 and r.reference_examples == 200
  assert r.baseline_examples == pytest.approx(350) and r.ratio == pytest.approx(1.75)
  assert r.ratio_lower_bound == r.ratio
  short = curation.data_efficiency_ratio(premem, ([100, 150, 300], [0.3, 0.35, 0.5]))
  assert math.isnan(short.ratio) and math.isnan(short.baseline_examples)
  assert short.ratio_lower_bound == pytest.approx(1.5)
  # At a lower target the reference reaches it by interpolation too.
  mid = curation.data_efficiency_ratio(premem, iid, target_accuracy=0.4)
  assert mid.reference_examples == pytest.approx(125) and mid.baseline_examples == 150


def _result(method: str, accs, sizes=(100, 150, 200)) -> curation.CurationResult:
  return curation.CurationResult(method, tuple(
      {"round": i, "n_examples": n, "test_accuracy": a} for i, (n, a) in
      enumerate(zip(sizes, accs))))


def test_seed_curves_average_rounds_with_a_student_t_band_and_ratios_per_seed():
  by_seed = {0: [_result("premem", [0.3, 0.5, 0.6]), _result("iid", [0.3, 0.4, 0.5])],
             1: [_result("premem", [0.3, 0.6, 0.7]), _result("iid", [0.3, 0.5, 0.6])]}
  rows = curation.seed_curve_rows(by_seed)
  assert [(r["method"], r["round"]) for r in rows] == [
      ("premem", 0), ("premem", 1), ("premem", 2), ("iid", 0), ("iid", 1), ("iid", 2)]
  last = rows[2]
  assert (last["seed_0"], last["seed_1"]) == (0.6, 0.7)
  # Two seeds: mean 0.65, sd 0.0707, t(0.975, 1) = 12.706 -> half-width 0.635.
  assert last["test_accuracy"] == pytest.approx(0.65)
  assert last["band_high"] - last["test_accuracy"] == pytest.approx(12.7062 * 0.05, rel=1e-4)
  assert rows[0]["band_low"] == rows[0]["band_high"] == pytest.approx(0.3)  # no spread
  eff, = curation.seed_efficiency_rows(by_seed)
  # Mean curves: premem [0.3, 0.55, 0.65], iid [0.3, 0.45, 0.55] -> iid never reaches 0.65.
  assert eff["baseline"] == "iid" and math.isnan(eff["ratio"])
  assert eff["ratio_lower_bound"] == pytest.approx(1.0)
  assert eff["ratio_seed_0"] == pytest.approx(1.0) and eff["ratio_seed_1"] == pytest.approx(1.0)
  mean, low, high = curation.mean_band([0.5])
  assert mean == 0.5 and math.isnan(low) and math.isnan(high)


def test_run_seeds_repeats_the_study_per_seed_and_reports_across_them(tmp_path, monkeypatch):
  setup = curation.CurationSetup(
      task=sa.SyntheticArithTask(**TASK_KWARGS), model_path="unused",
      train_examples=(ex("a"), ex("b")), test_examples=(ex("c"),),
      sampling=sampling.SamplingParams())
  calls = []

  def fake_study(one_setup, configs, generator, out_dir, **_):
    calls.append((one_setup.train_config.seed, [c.seed for c in configs], out_dir))
    s = one_setup.train_config.seed
    return [_result(c.method, [0.2, 0.3 + 0.1 * s]) for c in configs], "unused"

  monkeypatch.setattr(curation, "run_study", fake_study)
  configs = [curation.CurationConfig(method=m, iterations=1) for m in ("premem", "iid")]
  out = str(tmp_path)
  by_seed, report = curation.run_seeds(setup, configs, None, out, [3, 5])
  assert calls == [(3, [3, 3], os.path.join(out, "seed_3")),
                   (5, [5, 5], os.path.join(out, "seed_5"))]
  assert sorted(by_seed) == [3, 5] and report == os.path.join(out, "report.md")
  summary = json.load(open(os.path.join(out, "summary.json")))
  assert summary["seeds"] == [3, 5]
  assert [r["test_accuracy"] for r in summary["curves"]["premem"]] == pytest.approx([0.2, 0.7])
  assert "iid" in summary["efficiency"]
  assert "![sample efficiency](sample_efficiency.png)" in open(report).read()
  calls.clear()
  curation.run_seeds(setup, configs, None, out, [7])  # one seed: the study itself, in out
  assert calls == [(7, [7, 7], out)]
  with pytest.raises(curation.CurationConfigError, match="seeds"):
    curation.run_seeds(setup, configs, None, out, [1, 1])


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
  """A tiny random Llama with the synthetic_arith tokenizer, saved as an HF directory."""
  return testing.save_tiny_task_model(str(tmp_path_factory.mktemp("curation_base")),
                                      sa.SyntheticArithTask(**TASK_KWARGS))


def tiny_setup(base: str) -> curation.CurationSetup:
  """The study `STUDY_FLAGS` describe, built in-process."""
  from memdyn_jax import evaluation
  from memdyn_jax.train.config import get_preset

  task = sa.SyntheticArithTask(**TASK_KWARGS)
  test = task.load("test")
  return curation.CurationSetup(
      task=task, model_path=base, train_examples=tuple(task.load("train")[:16]),
      test_examples=tuple(test[:4]), ifd_examples=tuple(test),
      sampling=evaluation.default_sampling("synthetic_arith", n=1, max_new_tokens=6),
      train_config=get_preset("curation_default", learning_rate=1e-2, num_epochs=2.0,
                              global_batch_size=8, warmup_steps=1, max_length=256),
      eval_batch_size=8)


STUDY_FLAGS = ("--task=synthetic_arith", f"--task_kwargs={json.dumps(TASK_KWARGS)}",
               "--n_train=16", "--n_test=4", "--iterations=1", "--additions_per_iteration=4",
               "--learning_rate=1e-2", "--num_epochs=2", "--global_batch_size=8",
               "--warmup_steps=1", "--max_length=256", "--n_samples=1", "--max_new_tokens=6",
               "--batch_size=8", "--noprogress")


def run_cli(*args):
  return run_binary("curate.py", *args)


@pytest.fixture(scope="module")
def study(base_model, tmp_path_factory):
  """(out_dir, {method: CurationResult}): one round of additions for every method."""
  setup = tiny_setup(base_model)
  gen = curation.SyntheticArithGenerator(setup.task)
  out = str(tmp_path_factory.mktemp("curation") / "study")
  results = {}
  for method in curation.METHODS:
    cfg = curation.CurationConfig(method=method, iterations=1, additions_per_iteration=4)
    results[method] = curation.run_curation(setup, cfg, gen, out)
  return out, results


def test_one_iteration_of_every_method_end_to_end(study):
  out, results = study
  setup = tiny_setup(os.path.dirname(out))  # only its examples are used here
  train_ids = {e.id for e in setup.train_examples}
  round0 = {r.rounds[0]["run"] for r in results.values()}
  assert len(round0) == 1  # the shared first run is trained once
  for method, res in results.items():
    first, last = res.rounds
    assert (first["round"], first["n_examples"], first["n_added"]) == (0, 16, 4)
    assert (last["round"], last["n_examples"], last["n_added"]) == (1, 20, 0)
    assert 0 <= first["test_accuracy"] <= 1 and 0 <= last["test_accuracy"] <= 1
    assert set(first["sources"]) <= train_ids and len(first["sources"]) == 4
    added = [json.loads(x) for x in open(os.path.join(out, method, first["added_file"]))]
    assert [a["meta"]["source_id"] for a in added] == first["sources"]
    assert not {a["id"] for a in added} & train_ids
    np.testing.assert_array_equal(res.curve()[0], [16, 20])
  # PreMemAcc: the train set was evaluated at both checkpoints (epochs 1 and 2).
  pm = results["premem"].rounds[0]
  assert pm["pool_size"] == (pm["n_below_cutoff"] or 16)
  steps = sorted(os.listdir(os.path.join(out, pm["run"], "eval")))
  assert [s for s in steps if s.startswith("step_")] == ["step_00000002", "step_00000004"]
  # IFD / heuristic draw from the kept half only.
  assert results["ifd"].rounds[0]["pool_size"] == results["heuristic"].rounds[0]["pool_size"] == 8
  scores = json.load(open(os.path.join(out, "ifd", "scores.json")))["scores"]
  assert set(scores) == train_ids and all(np.isfinite(list(scores.values())))
  hard = sorted(scores, key=scores.get)[-8:]
  assert set(results["ifd"].rounds[0]["sources"]) <= set(hard)
  steps_of = {e.id: e.meta["n_steps"] for e in setup.train_examples}
  cut = sorted(steps_of.values())[-8]
  assert all(steps_of[s] >= cut for s in results["heuristic"].rounds[0]["sources"])
  rows = curation.curve_rows(list(results.values()))
  assert len(rows) == 8 and {r["method"] for r in rows} == set(curation.METHODS)
  eff = curation.efficiency_rows(list(results.values()))
  assert [r["baseline"] for r in eff] == ["iid", "ifd", "heuristic"]


def test_resume_skips_finished_rounds_and_refuses_changed_settings(base_model, study, tmp_path,
                                                                   monkeypatch):
  from memdyn_jax.evaluation import examples as example_eval
  from memdyn_jax.train import loop

  out = str(tmp_path / "study")
  shutil.copytree(study[0], out)
  first = study[1]["iid"]
  setup = tiny_setup(base_model)
  gen = curation.SyntheticArithGenerator(setup.task)
  cfg = curation.CurationConfig(method="iid", iterations=1, additions_per_iteration=4)

  def forbidden(*a, **k):
    raise AssertionError("a finished round was redone")

  monkeypatch.setattr(loop, "train", forbidden)
  monkeypatch.setattr(example_eval, "evaluate_examples", forbidden)
  assert curation.run_curation(setup, cfg, gen, out).rounds == first.rounds
  # Round 1 unfinished (state lost after its run trained): only its bookkeeping is redone.
  state_path = os.path.join(out, "iid", curation.STATE_FILE)
  state = json.load(open(state_path))
  state["rounds"] = state["rounds"][:1]
  with open(state_path, "w") as f:
    json.dump(state, f)
  assert curation.run_curation(setup, cfg, gen, out).rounds == first.rounds
  changed = dataclasses.replace(cfg, additions_per_iteration=5)
  with pytest.raises(curation.CurationError,
                     match=r"iid/state.json was made with other settings \(config differ\)"):
    curation.run_curation(setup, changed, gen, out)


def test_binary_resumes_the_study_and_writes_curve_table_and_plot(base_model, study, tmp_path):
  out = str(tmp_path / "study")
  shutil.copytree(study[0], out)
  proc = run_cli(f"--model={base_model}", f"--output_dir={out}", *STUDY_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = list(csv.DictReader(open(os.path.join(out, "curve.csv"))))
  assert [(r["method"], r["round"], r["n_examples"]) for r in rows] == [
      (m, str(i), str(n)) for m in curation.METHODS for i, n in ((0, 16), (1, 20))]
  assert {r["test_accuracy"] for r in rows if r["round"] == "0"} == {
      str(study[1]["iid"].rounds[0]["test_accuracy"])}
  eff = list(csv.DictReader(open(os.path.join(out, "efficiency.csv"))))
  assert [r["baseline"] for r in eff] == ["iid", "ifd", "heuristic"]
  report = open(os.path.join(out, "report.md")).read()
  assert "![sample efficiency](sample_efficiency.png)" in report and "| premem | 1 | 20 |" in report
  assert os.path.getsize(os.path.join(out, "sample_efficiency.png")) > 1000


def test_binary_rejects_bad_flags_and_malformed_rephrasings(base_model, tmp_path):
  proc = run_cli(f"--model={base_model}", "--task=synthetic_arith", "--output_dir=x",
                 "--methods=premem,bogus")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "curate.py: error: --methods: unknown method(s) ['bogus']; choose from "
      "['premem', 'iid', 'ifd', 'heuristic']"]
  data = tmp_path / "gsm8k"
  data.mkdir()
  rows = [{"question": f"Ann has {i} pens. How many?", "answer": f"She has {i}.\n#### {i}"}
          for i in range(3)]
  write_jsonl(data / "train.jsonl", rows)
  write_jsonl(data / "test.jsonl", rows)
  common = (f"--model={base_model}", "--task=gsm8k", f"--task_path={data}",
            f"--output_dir={tmp_path / 'out'}")
  proc = run_cli(*common, "--seeds=1,1")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "curate.py: error: --seeds: needs distinct integers, got ['1', '1']")
  proc = run_cli(*common)
  assert proc.returncode == 2 and proc.stderr.strip() == (
      "curate.py: error: --rephrasings or --rephrase_model is required for task 'gsm8k' "
      "(nothing here may use the network)")
  bad = tmp_path / "rephrasings.jsonl"
  bad.write_text('{"id": "gsm8k/train/0", "question": "Ann owns 0 pens."}\n{"id": 3}\n')
  proc = run_cli(*common, f"--rephrasings={bad}")
  assert proc.returncode == 2 and proc.stderr.strip() == (
      f"curate.py: error: --rephrasings: {bad}:2: missing field(s) ['question']")
  assert not os.path.exists(tmp_path / "out")
