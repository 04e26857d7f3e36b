"""Pairwise judging of two systems' responses to the same prompts (Ge et al. Sec. 4.1).

A judge is any callable

    judge(prompts, responses_a, responses_b, references=None) -> scores (N,)

returning one preference score per item: > 0 prefers response A, < 0 prefers B, 0 is
indifferent (the `PairwiseJudge` protocol). `references` are the items' reference answers
for judges that use them (None otherwise). Scores become verdicts with a tie margin:
win (A better) when score > margin, loss when score < -margin, tie otherwise.

Judges here:

  * `ReferenceAnswerJudge(task)`: for tasks with answers, the task's grader decides:
    score = correct(A) - correct(B), so a correct response beats an incorrect one and
    two responses that are both right (or both wrong) tie.
  * `LikelihoodJudge`: a local causal LM reads a judge prompt (`JudgeTemplate`, Ge et al.
    Fig. 4 in spirit) ending where the verdict goes, and the score is the log-odds
    log p(" A" | prompt) - log p(" B" | prompt), teacher-forced through
    `memdyn_jax.evaluation.scoring` (batched, jitted; no sampling). `local_model_judge(model,
    tokenizer)` builds one and wraps it in `BothOrders`.
  * `BothOrders(judge)`: asks in both orders (A/B swapped) and averages,
    0.5 · (s(a, b) - s(b, a)). A constant preference for the first (or second) position
    cancels exactly; so does any order-independent offset. The result is antisymmetric:
    swapping the two systems flips every score.
  * `CallableJudge(fn)`: the adapter for an external judge such as an API model. `fn(prompt,
    response_a, response_b)` returns "A", "B", "tie" (or "C", Ge et al.'s tie token) or a
    number; the adapter maps them to 1 / -1 / 0. Nothing in this package calls out; to
    use GPT-4 as Ge et al. did, write `fn` around your own client, e.g.

        def gpt4(prompt, a, b):
          reply = my_client.complete(JudgeTemplate().render(prompt, a, b))  # your code
          return "A" if "[[A]]" in reply else "B" if "[[B]]" in reply else "tie"

        judge = BothOrders(CallableJudge(gpt4))

Statistics (`summarize`, `compare`): counts of wins / ties / losses (from A's side) and

  * win rate with ties counted as half a win, (W + T/2) / n, with a Wilson score interval
    on W + T/2 successes out of n. Per-item outcomes {0, 1/2, 1} have variance at most
    p(1 - p), so the binomial interval is conservative with ties;
  * decisive win rate W / (W + L) (ties left out) with its Wilson interval;
  * a two-sided exact sign test of W against L (ties dropped): the p-value of "neither
    system is preferred".
"""
from __future__ import annotations

import dataclasses
import math
import statistics
from typing import Any, Callable, Protocol, Sequence

import numpy as np

from memdyn_jax.errors import ContextLengthError

WIN, TIE, LOSS = 1, 0, -1


class PairwiseJudge(Protocol):
  """Preference scores for a batch of (prompt, response A, response B) items."""

  def __call__(self, prompts: Sequence[str], responses_a: Sequence[str],
               responses_b: Sequence[str],
               references: Sequence[str] | None = None) -> np.ndarray: ...


def _check_batch(prompts, responses_a, responses_b, references=None) -> int:
  n = len(prompts)
  lengths = {"prompts": n, "responses_a": len(responses_a), "responses_b": len(responses_b)}
  if references is not None:
    lengths["references"] = len(references)
  if len(set(lengths.values())) != 1:
    raise ValueError(f"judge inputs differ in length: {lengths}")
  return n


# ----------------------------------------------------------------------------- statistics


def verdicts(scores, tie_margin: float = 0.0) -> np.ndarray:
  """Per-item WIN (1) / TIE (0) / LOSS (-1) from A's side: |score| <= margin is a tie.

  Raises:
    ValueError: a negative margin or a non-finite score (a judge must decide every item).
  """
  s = np.asarray(scores, np.float64).reshape(-1)
  if tie_margin < 0:
    raise ValueError(f"tie_margin must be >= 0, got {tie_margin}")
  if not np.all(np.isfinite(s)):
    raise ValueError(f"judge scores must be finite; item {int(np.argmin(np.isfinite(s)))} "
                     "is not")
  return np.where(s > tie_margin, WIN, np.where(s < -tie_margin, LOSS, TIE)).astype(np.int8)


def wilson_interval(successes: float, n: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval of a proportion successes / n ((nan, nan) when n = 0).

  center = (p + z²/2n) / (1 + z²/n), half-width = z √(p(1-p)/n + z²/4n²) / (1 + z²/n),
  with z the two-sided normal quantile of `confidence`.
  """
  if not 0 < confidence < 1:
    raise ValueError(f"confidence must be in (0, 1), got {confidence}")
  if n < 0 or not 0 <= successes <= n:
    raise ValueError(f"need 0 <= successes <= n, got {successes} of {n}")
  if n == 0:
    return (math.nan, math.nan)
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2)
  p = successes / n
  denom = 1 + z * z / n
  center = (p + z * z / (2 * n)) / denom
  half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
  return (max(0.0, center - half), min(1.0, center + half))


def sign_test_p(wins: int, losses: int) -> float:
  """Two-sided exact binomial (sign) test of wins vs losses under p = 1/2 (1.0 if none)."""
  n = wins + losses
  if n == 0:
    return 1.0
  k = min(wins, losses)
  tail = sum(math.comb(n, i) for i in range(k + 1)) / 2.0 ** n
  return min(1.0, 2 * tail)


@dataclasses.dataclass(frozen=True)
class PairwiseResult:
  """Outcome of a pairwise comparison, from system A's side (module docstring).

  Attributes:
    wins, ties, losses: item counts.
    win_rate: (wins + ties / 2) / n.
    win_rate_low, win_rate_high: its Wilson interval.
    decisive_win_rate: wins / (wins + losses); NaN with no decisive item.
    decisive_low, decisive_high: its Wilson interval.
    sign_test_p: two-sided sign test p-value of wins vs losses.
    mean_score: mean preference score.
    confidence: level of the intervals.
    tie_margin: scores within this distance of 0 were ties.
  """

  wins: int
  ties: int
  losses: int
  win_rate: float
  win_rate_low: float
  win_rate_high: float
  decisive_win_rate: float
  decisive_low: float
  decisive_high: float
  sign_test_p: float
  mean_score: float
  confidence: float
  tie_margin: float

  @property
  def n(self) -> int:
    return self.wins + self.ties + self.losses

  def to_dict(self) -> dict[str, Any]:
    return {**dataclasses.asdict(self), "n": self.n}


def summarize(scores, *, tie_margin: float = 0.0, confidence: float = 0.95) -> PairwiseResult:
  """Counts, win rates with Wilson intervals and the sign test of per-item scores.

  Raises:
    ValueError: no scores, a non-finite score, a negative margin or a bad confidence.
  """
  s = np.asarray(scores, np.float64).reshape(-1)
  if not s.size:
    raise ValueError("no judged items")
  v = verdicts(s, tie_margin)
  wins, ties, losses = (int(np.sum(v == x)) for x in (WIN, TIE, LOSS))
  n = s.size
  decisive = wins + losses
  low, high = wilson_interval(wins + ties / 2, n, confidence)
  d_low, d_high = wilson_interval(wins, decisive, confidence)
  return PairwiseResult(
      wins=wins, ties=ties, losses=losses, win_rate=(wins + ties / 2) / n,
      win_rate_low=low, win_rate_high=high,
      decisive_win_rate=wins / decisive if decisive else math.nan,
      decisive_low=d_low, decisive_high=d_high,
      sign_test_p=sign_test_p(wins, losses), mean_score=float(s.mean()),
      confidence=float(confidence), tie_margin=float(tie_margin))


def compare(judge: PairwiseJudge, prompts: Sequence[str], responses_a: Sequence[str],
            responses_b: Sequence[str], references: Sequence[str] | None = None, *,
            tie_margin: float = 0.0, confidence: float = 0.95) -> PairwiseResult:
  """Judges every item and summarizes (system A = `responses_a`)."""
  _check_batch(prompts, responses_a, responses_b, references)
  scores = judge(prompts, responses_a, responses_b, references)
  return summarize(scores, tie_margin=tie_margin, confidence=confidence)


# ----------------------------------------------------------------------------- judges


class BothOrders:
  """Judges each item as (A, B) and as (B, A) and averages: 0.5 · (s(a, b) - s(b, a)).

  Cancels position bias: a judge that adds β to every first-position response's score
  gives s(a, b) = q(a, b) + β and s(b, a) = q(b, a) + β, so the average is
  (q(a, b) - q(b, a)) / 2 whatever β is.
  """

  def __init__(self, judge: PairwiseJudge):
    self.judge = judge

  def scores_by_order(self, prompts, responses_a, responses_b, references=None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(s(a, b), s(b, a)): the raw scores of the two presentation orders."""
    _check_batch(prompts, responses_a, responses_b, references)
    forward = np.asarray(self.judge(prompts, responses_a, responses_b, references), np.float64)
    swapped = np.asarray(self.judge(prompts, responses_b, responses_a, references), np.float64)
    return forward, swapped

  def __call__(self, prompts, responses_a, responses_b, references=None) -> np.ndarray:
    forward, swapped = self.scores_by_order(prompts, responses_a, responses_b, references)
    return 0.5 * (forward - swapped)


def position_bias(forward: np.ndarray, swapped: np.ndarray) -> float:
  """Mean preference for whichever response is shown first: mean of (s(a,b) + s(b,a)) / 2."""
  return float(np.mean(0.5 * (np.asarray(forward) + np.asarray(swapped))))


class ReferenceAnswerJudge:
  """The task's grader as judge: score = correct(A) - correct(B) in {-1, 0, 1}."""

  def __init__(self, task):
    self.task = task

  def __call__(self, prompts, responses_a, responses_b, references=None) -> np.ndarray:
    if references is None:
      raise ValueError("ReferenceAnswerJudge needs the items' reference answers")
    _check_batch(prompts, responses_a, responses_b, references)
    grade = lambda text, ref: float(self.task.grade(text, ref))
    return np.asarray([grade(a, r) - grade(b, r)
                       for a, b, r in zip(responses_a, responses_b, references)], np.float64)


_VERDICT_WORDS = {"a": 1.0, "b": -1.0, "tie": 0.0, "c": 0.0}


class CallableJudge:
  """Adapter for an external judge `fn(prompt, response_a, response_b)` called per item.

  `fn` returns "A" / "B" / "tie" (or "C", case and surrounding whitespace ignored) or a
  number (a preference score); see the module docstring for wrapping an API model.
  """

  def __init__(self, fn: Callable[[str, str, str], Any]):
    self.fn = fn

  def __call__(self, prompts, responses_a, responses_b, references=None) -> np.ndarray:
    _check_batch(prompts, responses_a, responses_b, references)
    out = []
    for i, item in enumerate(zip(prompts, responses_a, responses_b)):
      v = self.fn(*item)
      if isinstance(v, str):
        if v.strip().lower() not in _VERDICT_WORDS:
          raise ValueError(f"judge verdict for item {i} is {v!r}; expected one of "
                           f"{sorted(_VERDICT_WORDS)} or a number")
        v = _VERDICT_WORDS[v.strip().lower()]
      out.append(float(v))
    return np.asarray(out, np.float64)


DEFAULT_JUDGE_PROMPT = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by "
    "two AI assistants to the user instruction displayed below. Choose the assistant that "
    "follows the instruction and answers it better. Do not let the order or the length of "
    "the responses influence your decision.\n\n"
    "[User Instruction]\n{prompt}\n\n"
    "[The Start of Assistant A's Response]\n{response_a}\n[The End of Assistant A's Response]"
    "\n\n[The Start of Assistant B's Response]\n{response_b}\n"
    "[The End of Assistant B's Response]\n\nThe better response is from assistant")


class JudgePromptTooLongError(ContextLengthError):
  """A rendered judge prompt does not fit the judge model (`model_label_scorer`)."""


@dataclasses.dataclass(frozen=True)
class JudgeTemplate:
  """The judge prompt and the two verdict continuations whose likelihoods are compared.

  Attributes:
    text: format string with {prompt}, {response_a} and {response_b}; it ends where the
      verdict token goes.
    label_a, label_b: the continuations meaning "A is better" / "B is better".
  """

  text: str = DEFAULT_JUDGE_PROMPT
  label_a: str = " A"
  label_b: str = " B"

  def __post_init__(self):
    missing = [k for k in ("{prompt}", "{response_a}", "{response_b}") if k not in self.text]
    if missing:
      raise ValueError(f"judge template lacks {missing}")
    if not self.label_a or self.label_a == self.label_b:
      raise ValueError(f"labels must be two different non-empty strings, got "
                       f"{self.label_a!r}, {self.label_b!r}")

  def render(self, prompt: str, response_a: str, response_b: str) -> str:
    return self.text.format(prompt=prompt, response_a=response_a, response_b=response_b)


# (judge prompts, continuations) -> summed log-prob of each continuation given its prompt.
LabelScorer = Callable[[Sequence[str], Sequence[str]], np.ndarray]


class LikelihoodJudge:
  """One presentation order scored by a language model's verdict likelihoods.

  score = log p(label_a | judge prompt) - log p(label_b | judge prompt), in nats: a
  log-odds between the two verdicts (multi-token labels are summed over their tokens).
  Wrap in `BothOrders` to cancel position bias (`local_model_judge` does).

  Args:
    label_scorer: summed log-probs of continuations given prompts (`model_label_scorer`,
      or a stub in tests).
    template: the judge prompt and labels.
    clip: applied to each response before rendering (e.g. a token budget).
  """

  def __init__(self, label_scorer: LabelScorer, template: JudgeTemplate = JudgeTemplate(),
               clip: Callable[[str], str] | None = None):
    self.label_scorer = label_scorer
    self.template = template
    self.clip = clip or (lambda text: text)

  def __call__(self, prompts, responses_a, responses_b, references=None) -> np.ndarray:
    n = _check_batch(prompts, responses_a, responses_b, references)
    if n == 0:
      return np.zeros(0, np.float64)
    texts = [self.template.render(p, self.clip(a), self.clip(b))
             for p, a, b in zip(prompts, responses_a, responses_b)]
    labels = [self.template.label_a] * n + [self.template.label_b] * n
    logp = np.asarray(self.label_scorer(texts + texts, labels), np.float64)
    return logp[:n] - logp[n:]


def model_label_scorer(model, tokenizer, *, batch_size: int = 16, max_length: int | None = None,
                       mesh=None) -> LabelScorer:
  """A `LabelScorer` from a `memdyn_jax.models` LM via `scoring.score_texts` (jitted,
  length-bucketed batches; the label is tokenized after the prompt as in training)."""
  from memdyn_jax.evaluation import scoring

  def score(prompts: Sequence[str], labels: Sequence[str]) -> np.ndarray:
    try:
      recs = scoring.score_texts(model, tokenizer, prompts, labels, batch_size=batch_size,
                                 max_length=max_length, overlength="error", mesh=mesh)
    except ContextLengthError as e:
      raise JudgePromptTooLongError(f"judge prompt too long for the judge model ({e}); lower "
                                    "max_response_tokens or shorten the template") from e
    return np.asarray([r.sum_logprob for r in recs], np.float64)

  return score


def token_clip(tokenizer, max_tokens: int) -> Callable[[str], str]:
  """Cuts a text to its first `max_tokens` tokens (texts within budget are unchanged)."""
  if max_tokens < 1:
    raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")

  def clip(text: str) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    return text if len(ids) <= max_tokens else tokenizer.decode(ids[:max_tokens])

  return clip


def local_model_judge(model, tokenizer, template: JudgeTemplate = JudgeTemplate(), *,
                      max_response_tokens: int = 256, batch_size: int = 16,
                      max_length: int | None = None, mesh=None) -> BothOrders:
  """A `LikelihoodJudge` on a local model, asked in both orders (position bias cancelled).

  Scores are log-odds in nats; a tie margin of ~0.1 treats near-indifference as a tie.
  Each item costs four teacher-forced rows (two orders x two labels).
  """
  scorer = model_label_scorer(model, tokenizer, batch_size=batch_size, max_length=max_length,
                              mesh=mesh)
  return BothOrders(LikelihoodJudge(scorer, template, token_clip(tokenizer, max_response_tokens)))
