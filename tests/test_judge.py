"""Pairwise judge: verdicts and interval math on known counts, both-orders averaging against
a position-biased stub, the reference-answer and callable judges, and the local-model judge
end to end on a tiny model."""
from __future__ import annotations

import math
import re

import numpy as np
import pytest

from memdyn_jax.evaluation import judge as judge_lib
from memdyn_jax.tasks import synthetic_arith as sa

# ----------------------------------------------------------------------------- statistics


def test_verdicts_counts_and_win_rate_with_ties_as_half():
  scores = [2.0, -1.0, 0.05, 0.0, -0.05, 3.0]
  assert judge_lib.verdicts(scores, 0.1).tolist() == [1, -1, 0, 0, 0, 1]
  assert judge_lib.verdicts(scores).tolist() == [1, -1, 1, 0, -1, 1]  # margin 0: only 0 ties
  r = judge_lib.summarize(scores, tie_margin=0.1)
  assert (r.wins, r.ties, r.losses, r.n) == (2, 3, 1, 6)
  assert r.win_rate == pytest.approx((2 + 1.5) / 6)
  assert r.decisive_win_rate == pytest.approx(2 / 3)
  assert r.win_rate_low < r.win_rate < r.win_rate_high
  assert r.mean_score == pytest.approx(np.mean(scores))
  assert r.to_dict()["n"] == 6
  with pytest.raises(ValueError, match="finite"):
    judge_lib.verdicts([1.0, float("nan")])
  with pytest.raises(ValueError, match="tie_margin"):
    judge_lib.verdicts([1.0], -0.1)
  with pytest.raises(ValueError, match="no judged items"):
    judge_lib.summarize([])


def test_wilson_interval_on_known_counts():
  z2 = 1.959963984540054 ** 2
  # 0 of n: the interval is [0, z²/(n + z²)] in closed form; n of n mirrors it.
  assert judge_lib.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)))
  assert judge_lib.wilson_interval(10, 10) == pytest.approx((1 - z2 / (10 + z2), 1.0))
  # 8 of 10 at 95%: the textbook (0.490, 0.943).
  low, high = judge_lib.wilson_interval(8, 10)
  assert (round(low, 3), round(high, 3)) == (0.490, 0.943)
  # Symmetric around 1/2, narrower with more data and with less confidence.
  low, high = judge_lib.wilson_interval(50, 100)
  assert low + high == pytest.approx(1.0)
  assert high - low > np.subtract(*judge_lib.wilson_interval(500, 1000)[::-1])
  assert high - low > np.subtract(*judge_lib.wilson_interval(50, 100, 0.8)[::-1])
  assert all(math.isnan(x) for x in judge_lib.wilson_interval(0, 0))
  with pytest.raises(ValueError):
    judge_lib.wilson_interval(11, 10)


def test_wilson_matches_scipy():
  stats = pytest.importorskip("scipy.stats")
  for k, n, conf in [(3, 17, 0.95), (41, 100, 0.9), (1, 2, 0.99)]:
    ci = stats.binomtest(k, n).proportion_ci(confidence_level=conf, method="wilson")
    assert judge_lib.wilson_interval(k, n, conf) == pytest.approx((ci.low, ci.high))


def test_sign_test_on_known_counts():
  assert judge_lib.sign_test_p(9, 1) == pytest.approx(2 * 11 / 1024)
  assert judge_lib.sign_test_p(1, 9) == judge_lib.sign_test_p(9, 1)
  assert judge_lib.sign_test_p(5, 5) == 1.0 and judge_lib.sign_test_p(0, 0) == 1.0
  # Ties do not enter: 9 wins, 1 loss and 50 ties gives the same p.
  r = judge_lib.summarize([1.0] * 9 + [-1.0] + [0.0] * 50)
  assert r.sign_test_p == pytest.approx(2 * 11 / 1024)


# ----------------------------------------------------------------------------- stub judges

QUALITY = {"good": 2.0, "fine": 1.0, "bad": 0.0}
ITEMS = [("p0", "good", "bad"), ("p1", "bad", "good"), ("p2", "fine", "fine"),
         ("p3", "fine", "bad"), ("p4", "bad", "fine")]
TRUE = [1, -1, 0, 1, -1]  # verdicts from the quality order


def _unzip(items):
  return [list(x) for x in zip(*items)]


class PositionBiasedStub:
  """Prefers the better response by its quality gap, plus `bias` for whatever is shown first."""

  def __init__(self, bias: float):
    self.bias = bias
    self.calls = []

  def __call__(self, prompts, a, b, references=None):
    self.calls.append((list(a), list(b)))
    return np.array([QUALITY[x] - QUALITY[y] + self.bias for x, y in zip(a, b)])


def test_both_orders_cancels_position_bias():
  prompts, a, b = _unzip(ITEMS)
  stub = PositionBiasedStub(bias=5.0)
  # One order: the bias swamps quality, the first response always wins.
  assert judge_lib.verdicts(stub(prompts, a, b)).tolist() == [1] * 5
  both = judge_lib.BothOrders(stub)
  scores = both(prompts, a, b)
  assert judge_lib.verdicts(scores).tolist() == TRUE
  np.testing.assert_allclose(scores, [QUALITY[x] - QUALITY[y] for _, x, y in ITEMS])
  assert stub.calls[-1] == (b, a)  # the second pass swaps the responses
  np.testing.assert_allclose(both(prompts, b, a), -scores)  # antisymmetric
  forward, swapped = both.scores_by_order(prompts, a, b)
  assert judge_lib.position_bias(forward, swapped) == pytest.approx(5.0)
  r = judge_lib.compare(both, prompts, a, b)
  assert (r.wins, r.ties, r.losses) == (2, 1, 2)


class ReadingLabelScorer:
  """A stub LM: reads the two responses out of the rendered judge prompt and gives
  log p(label) = quality of the response that label names, + `bias` for label A."""

  def __init__(self, template: judge_lib.JudgeTemplate, bias: float):
    self.template, self.bias = template, bias
    self.seen = []
    pattern = re.escape(template.text).replace(r"\{prompt\}", "(.*)")
    pattern = pattern.replace(r"\{response_a\}", "(.*)").replace(r"\{response_b\}", "(.*)")
    self.pattern = re.compile(pattern, re.S)

  def __call__(self, prompts, labels):
    self.seen.append((list(prompts), list(labels)))
    out = []
    for text, label in zip(prompts, labels):
      _, a, b = self.pattern.fullmatch(text).groups()
      if label == self.template.label_a:
        out.append(QUALITY[a] + self.bias)
      else:
        assert label == self.template.label_b
        out.append(QUALITY[b])
    return np.array(out)


def test_likelihood_judge_on_a_stub_scorer_with_position_bias():
  template = judge_lib.JudgeTemplate()
  scorer = ReadingLabelScorer(template, bias=3.0)
  prompts, a, b = _unzip(ITEMS)
  one_order = judge_lib.LikelihoodJudge(scorer, template)
  np.testing.assert_allclose(one_order(prompts, a, b),
                             [QUALITY[x] - QUALITY[y] + 3.0 for _, x, y in ITEMS])
  texts, labels = scorer.seen[-1]
  assert labels == [" A"] * 5 + [" B"] * 5 and texts[:5] == texts[5:]
  assert texts[0].endswith("The better response is from assistant")
  assert "[User Instruction]\np0\n" in texts[0]
  both = judge_lib.BothOrders(one_order)
  assert judge_lib.verdicts(both(prompts, a, b), 0.1).tolist() == TRUE
  # Responses are clipped before rendering.
  clipped = judge_lib.LikelihoodJudge(scorer, template, clip=lambda t: t[:3])
  with pytest.raises(KeyError, match="'goo'"):
    clipped(["p"], ["good"], ["bad"])


def test_template_checks_fields_and_labels():
  with pytest.raises(ValueError, match="response_b"):
    judge_lib.JudgeTemplate(text="{prompt} {response_a}")
  with pytest.raises(ValueError, match="labels"):
    judge_lib.JudgeTemplate(label_a=" A", label_b=" A")
  t = judge_lib.JudgeTemplate(text="{prompt}|{response_a}|{response_b}|")
  assert t.render("q", "{x}", "b") == "q|{x}|b|"  # braces in responses are kept verbatim


def test_reference_answer_judge_uses_the_task_grader():
  task = sa.SyntheticArithTask(seed=0, n_train=2, n_test=3, n_ood=2, max_steps=1)
  exs = task.load("test")
  right = [task.format_target(e) for e in exs]
  wrong = [" so\n#### 100000\nDone."] * 3
  prompts = [e.question for e in exs]
  refs = [e.answer for e in exs]
  judge = judge_lib.ReferenceAnswerJudge(task)
  a = [right[0], wrong[1], right[2]]
  b = [wrong[0], right[1], right[2]]
  assert judge(prompts, a, b, refs).tolist() == [1.0, -1.0, 0.0]
  assert judge(prompts, wrong, wrong, refs).tolist() == [0.0] * 3  # both wrong: tie
  r = judge_lib.compare(judge, prompts, a, b, refs)
  assert (r.wins, r.ties, r.losses) == (1, 1, 1)
  with pytest.raises(ValueError, match="reference"):
    judge(prompts, a, b)
  with pytest.raises(ValueError, match="differ in length"):
    judge(prompts, a, b[:2], refs)


def test_callable_judge_adapter_for_external_judges():
  verdict = {("good", "bad"): "A", ("bad", "good"): " b ", ("fine", "fine"): "tie",
             ("fine", "bad"): "[[A]]", ("bad", "fine"): 0.25}
  prompts, a, b = _unzip(ITEMS)
  calls = []

  def external(prompt, x, y):
    calls.append(prompt)
    v = verdict[(x, y)]
    return "A" if v == "[[A]]" else v

  judge = judge_lib.CallableJudge(external)
  assert judge(prompts, a, b).tolist() == [1.0, -1.0, 0.0, 1.0, 0.25]
  assert calls == prompts
  with pytest.raises(ValueError, match="'maybe'"):
    judge_lib.CallableJudge(lambda *_: "maybe")(["p"], ["x"], ["y"])
  # An external judge that always picks the first position: both orders make it a tie.
  always_first = judge_lib.BothOrders(judge_lib.CallableJudge(lambda *_: "A"))
  assert judge_lib.summarize(always_first(prompts, a, b)).ties == 5


# ----------------------------------------------------------------------------- local model


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  from memdyn_jax import models, testing

  task = sa.SyntheticArithTask(seed=0, n_train=8, n_test=4, n_ood=2, max_steps=1)
  path = testing.save_tiny_task_model(str(tmp_path_factory.mktemp("judge") / "m"), task)
  model, _ = models.from_pretrained(path)
  return model, models.load_tokenizer(path, padding_side="right"), task


COMPACT = judge_lib.JudgeTemplate(
    text="Question: {prompt}\nFirst: {response_a}\nSecond: {response_b}\nBetter:")


def test_local_model_judge_end_to_end(tiny_model):
  from memdyn_jax.evaluation import scoring

  model, tok, task = tiny_model
  exs = task.load("test")
  prompts = [e.question for e in exs]
  a = [task.format_target(e) for e in exs]
  b = [" I do not know.", " 7", a[2], " The answer is 3."]
  judge = judge_lib.local_model_judge(model, tok, COMPACT, max_response_tokens=64, batch_size=4)
  scores = judge(prompts, a, b)
  assert scores.shape == (4,) and np.all(np.isfinite(scores))
  assert scores[2] == 0.0  # identical responses: exactly indifferent, a tie at any margin

  # By hand, one item at a time: log p(" A") - log p(" B") in each order, averaged.
  def label_logp(text, label):
    (rec,) = scoring.score_texts(model, tok, [text], [label], batch_size=1)
    return rec.sum_logprob

  for i in (0, 1, 3):
    fwd = COMPACT.render(prompts[i], a[i], b[i])
    swp = COMPACT.render(prompts[i], b[i], a[i])
    expected = 0.5 * ((label_logp(fwd, " A") - label_logp(fwd, " B"))
                      - (label_logp(swp, " A") - label_logp(swp, " B")))
    assert scores[i] == pytest.approx(expected, abs=1e-4)
  np.testing.assert_allclose(judge(prompts, b, a), -scores, atol=1e-5)
  r = judge_lib.compare(judge, prompts, a, b, tie_margin=1e-3)
  assert r.n == 4 and r.ties >= 1


def test_local_model_judge_clips_long_responses(tiny_model):
  model, tok, _ = tiny_model
  long = " 1+1=2." * 200  # far past the 256-token window
  clipped = judge_lib.local_model_judge(model, tok, COMPACT, max_response_tokens=40)
  assert np.isfinite(clipped(["q"], [long], ["short"])).all()
  unclipped = judge_lib.local_model_judge(model, tok, COMPACT, max_response_tokens=10_000)
  with pytest.raises(ValueError, match="max_response_tokens"):
    unclipped(["q"], [long], ["short"])
