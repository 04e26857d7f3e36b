"""Synthetic multi-step arithmetic word problems: the offline stand-in for GSM8K.

A problem is a protagonist holding a count of objects, followed by 1-8 events that
change it (gain, lose, buy or sell groups, multiply, share). Questions are rendered
from several phrasings per event; solutions are GSM8K-style traces with one line
per computation, each annotated `a op b=<<a op b=c>>c`, ending in `#### N`.

Each problem admits many valid traces (operand order of commutative operations,
the connector opening each line, and the order of independent steps); one of them,
chosen by a hash of the problem, is the training target, so the perplexity of the
target and the accuracy of the answer can come apart.

Numbers are small (every start value, operand, intermediate and answer lies in
[1, bound]) so a sub-million-parameter model can learn the arithmetic. Splits:
"train" and "test" have 1..max_steps events and values <= train_max_value;
"ood" has more events, values up to max_value (at least one above the train bound)
and phrasings never used in train/test. Splits are disjoint by canonical problem key.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import random
import re
import types
from collections.abc import Sequence
from typing import Any, Iterable, Mapping

from memdyn_jax.tasks.base import (DataError, Example, Task, read_jsonl, register_task,
                                   write_jsonl)

SPLITS = ("train", "test", "ood")

NAMES = (
    ("Tom", "he"), ("Ann", "she"), ("Sam", "he"), ("Mia", "she"), ("Ben", "he"),
    ("Lily", "she"), ("Max", "he"), ("Zoe", "she"), ("Leo", "he"), ("Emma", "she"),
    ("Jack", "he"), ("Nina", "she"),
)
OBJECTS = (
    "apples", "pears", "eggs", "marbles", "stickers", "cookies", "pens", "cards",
    "shells", "coins", "books", "plums",
)
CONTAINERS = ("bags", "boxes", "packs", "baskets", "jars", "crates")
CONNECTORS = ("Then ", "So ", "Now ")

_PRONOUNS = {
    "he": {"S": "He", "he": "he", "his": "his", "His": "His", "him": "him"},
    "she": {"S": "She", "he": "she", "his": "her", "His": "Her", "him": "her"},
}
_GENDER = dict(NAMES)

# Question phrasings. Train/test draw from "train"; OOD draws only from "ood", whose
# wordings never occur in train/test (nor in the pre-training corpus).
PHRASINGS: Mapping[str, Mapping[str, tuple[str, ...]]] = {
    "train": {
        "intro": ("{name} has {x} {obj}.", "{name} starts with {x} {obj}.",
                  "{name} owns {x} {obj}."),
        "ask": ("How many {obj} does {name} have now?",
                "How many {obj} does {name} have at the end?",
                "How many {obj} does {name} have in total?"),
        "gain": ("{S} finds {k} more {obj}.", "{other} gives {him} {k} {obj}.",
                 "{S} gets {k} more {obj} from {other}."),
        "lose": ("{S} gives {k} {obj} to {other}.", "{S} sells {k} of {his} {obj}.",
                 "{S} loses {k} {obj}."),
        "buy_groups": ("{S} buys {k} {container} of {m} {obj}.",
                       "{S} buys {k} {container} with {m} {obj} in each.",
                       "{other} gives {him} {k} {container}, each holding {m} {obj}."),
        "sell_groups": ("{S} sells {k} {container} of {m} {obj}.",
                        "{S} fills {k} {container} with {m} {obj} each and gives them away.",
                        "{S} gives {other} {k} {container} of {m} {obj}."),
        "times": ("{S} ends up with {k} times as many {obj}.",
                  "{S} multiplies {his} {obj} by {k}.",
                  "The number of {obj} {he} has grows {k} times."),
        "share": ("{S} splits {his} {obj} into {k} equal piles and keeps one pile.",
                  "{S} divides {his} {obj} equally into {k} groups and keeps one group.",
                  "{S} keeps one out of every {k} {obj}."),
    },
    "ood": {
        "intro": ("At first, {name} keeps {x} {obj}.",
                  "In the morning, {name} counts {x} {obj}."),
        "ask": ("What is the number of {obj} that {name} ends up with?",
                "Count the {obj} {name} holds at the end."),
        "gain": ("{S} picks up another {k} {obj}.",
                 "Later, {k} extra {obj} are added to {his} pile."),
        "lose": ("{other} takes {k} {obj} from {him}.", "Sadly, {k} of the {obj} go missing."),
        "buy_groups": ("{S} orders {k} {container} that contain {m} {obj} each.",
                       "A delivery brings {k} {container} of {m} {obj} to {him}."),
        "sell_groups": ("{S} ships {k} {container} holding {m} {obj} each.",
                        "{other} purchases {k} {container} of {m} {obj} from {him}."),
        "times": ("{His} pile of {obj} becomes {k} times as big.",
                  "Each of {his} {obj} is replaced by {k} {obj}."),
        "share": ("{S} shares {his} {obj} equally among {k} children, {him}self included, "
                  "and keeps {his} share.",
                  "{S} puts {his} {obj} into {k} equal {container} and keeps just one of them."),
    },
}

KINDS = ("gain", "lose", "buy_groups", "sell_groups", "times", "share")
_ADDITIVE = {"gain": 1, "buy_groups": 1, "lose": -1, "sell_groups": -1}
_GROUPED = ("buy_groups", "sell_groups")
_OP = {"gain": "+", "buy_groups": "+", "lose": "-", "sell_groups": "-", "times": "*",
       "share": "/"}
_GROUP_K = range(2, 6)  # how many containers
_GROUP_M = range(2, 10)  # objects per container: single digits keep products learnable
_FACTORS = range(2, 6)  # multiply / share factors

_ANNOTATION_RE = re.compile(r"(\d+)([-+*/])(\d+)=<<(\d+)([-+*/])(\d+)=(\d+)>>(\d+)")
_HASH_ANSWER_RE = re.compile(r"####\s*(-?[\d,]*\d(?:\.\d+)?)")
_ANSWER_IS_RE = re.compile(r"[Tt]he answer is:?\s*\$?(-?[\d,]*\d(?:\.\d+)?)")


@dataclasses.dataclass(frozen=True)
class Event:
  """One change to the protagonist's count.

  Attributes:
    kind: one of KINDS.
    args: (k,) for gain/lose/times/share, (k, m) for buy_groups/sell_groups.
    phrasing: index into the phrasing pool of this kind.
  """

  kind: str
  args: tuple[int, ...]
  phrasing: int


@dataclasses.dataclass(frozen=True)
class Problem:
  """A fully specified word problem (numbers, operations, names and wording)."""

  name: str
  obj: str
  container: str
  other: str
  start: int
  events: tuple[Event, ...]
  intro: int
  ask: int
  pool: str  # "train" or "ood" phrasing pool
  bound: int  # every value of the problem lies in [1, bound]

  @property
  def key(self) -> str:
    """Canonical key: the arithmetic skeleton (start, kinds, operands); no wording."""
    parts = [str(self.start)] + [f"{e.kind}:{'x'.join(map(str, e.args))}" for e in self.events]
    return "|".join(parts)

  @property
  def answer(self) -> int:
    return _run(self.start, self.events)[-1]

  def values(self) -> list[int]:
    """Every number in the problem: start, operands, products and running totals."""
    vals = [self.start]
    for e in self.events:
      vals.extend(e.args)
      if e.kind in _GROUPED:
        vals.append(e.args[0] * e.args[1])
    return vals + _run(self.start, self.events)

  def to_spec(self) -> dict[str, Any]:
    # Written out by hand: dataclasses.asdict deep-copies and is slow at 10k problems.
    return {"name": self.name, "obj": self.obj, "container": self.container,
            "other": self.other, "start": self.start,
            "events": [[e.kind, list(e.args), e.phrasing] for e in self.events],
            "intro": self.intro, "ask": self.ask, "pool": self.pool, "bound": self.bound}

  @classmethod
  def from_spec(cls, spec: Mapping[str, Any]) -> "Problem":
    try:
      events = tuple(Event(k, tuple(int(a) for a in args), int(p)) for k, args, p in spec["events"])
      fields = {f.name: spec[f.name] for f in dataclasses.fields(cls) if f.name != "events"}
    except (KeyError, TypeError, ValueError) as e:
      raise DataError(f"bad synthetic_arith problem spec ({e!r}): {spec!r}") from e
    return cls(events=events, **fields)


@dataclasses.dataclass(frozen=True)
class _Step:
  """One trace line: a product of a group event or an update of the running total."""

  kind: str  # "prod" or "state"
  a: int
  op: str
  b: int
  c: int


def _apply(x: int, kind: str, args: tuple[int, ...]) -> int:
  b = args[0] * args[1] if kind in _GROUPED else args[0]
  op = _OP[kind]
  if op == "+":
    return x + b
  if op == "-":
    return x - b
  if op == "*":
    return x * b
  return x // b


def _run(start: int, events: Iterable[Event]) -> list[int]:
  """Running totals after each event."""
  out, x = [], start
  for e in events:
    x = _apply(x, e.kind, e.args)
    out.append(x)
  return out


def _feasible_args(kind: str, x: int, bound: int) -> Sequence[tuple[int, ...]]:
  """All operands of `kind` keeping every value in [1, bound], from running total x."""
  if kind == "gain":
    return _Singletons(2, bound - x + 1)
  if kind == "lose":
    return _Singletons(2, x)
  if kind == "buy_groups":
    return _GROUP_PAIRS[:bisect.bisect_right(_GROUP_PRODUCTS, bound - x)]
  if kind == "sell_groups":
    return _GROUP_PAIRS[:bisect.bisect_left(_GROUP_PRODUCTS, x)]
  if kind == "times":
    return [(k,) for k in _FACTORS if x * k <= bound]
  if kind == "share":
    return [(k,) for k in _FACTORS if x % k == 0 and x // k >= 2]
  raise ValueError(f"unknown event kind {kind!r}")


class _Singletons(Sequence):
  """Lazy sequence (lo,), ..., (hi - 1,): avoids building lists in the sampling loop."""

  def __init__(self, lo: int, hi: int):
    self._range = range(lo, max(lo, hi))

  def __len__(self) -> int:
    return len(self._range)

  def __getitem__(self, i):
    return (self._range[i],)


_GROUP_PAIRS = sorted(((k, m) for k in _GROUP_K for m in _GROUP_M), key=lambda p: p[0] * p[1])
_GROUP_PRODUCTS = [k * m for k, m in _GROUP_PAIRS]


def _as_random(rng: Any) -> random.Random:
  """Accepts random.Random, numpy Generator or int seed; returns a random.Random."""
  if isinstance(rng, random.Random):
    return rng
  if isinstance(rng, int):
    return random.Random(rng)
  if hasattr(rng, "integers"):  # numpy Generator
    return random.Random(int(rng.integers(0, 2**63 - 1)))
  raise TypeError(f"expected random.Random, numpy Generator or int, got {type(rng).__name__}")


def _stable_hash(text: str) -> str:
  # Python's hash() is salted per process; styles and ids must be reproducible.
  return hashlib.sha1(text.encode("utf-8")).hexdigest()


def sample_problem(rng: random.Random, n_steps: int, bound: int, pool: str,
                   kinds: Sequence[str] | None = None,
                   phrasings: tuple[int, Sequence[int], int] | None = None,
                   min_peak: int = 0, max_tries: int = 2000) -> Problem:
  """Draws a random problem.

  Args:
    rng: source of randomness.
    n_steps: number of events.
    bound: every value of the problem lies in [1, bound].
    pool: phrasing pool, "train" or "ood".
    kinds: if given, the event kinds in order (len n_steps); else drawn among feasible.
    phrasings: if given, (intro, per-event phrasings, ask) indices to reuse.
    min_peak: require some value of the problem to exceed this (OOD's larger numbers).
    max_tries: rejection-sampling budget.

  Returns:
    The problem.

  Raises:
    ValueError: if no problem satisfying the constraints was found.
  """
  table = PHRASINGS[pool]
  if kinds is not None and len(kinds) != n_steps:
    raise ValueError(f"kinds has {len(kinds)} entries, expected {n_steps}")
  for _ in range(max_tries):
    start = x = rng.randint(2, bound)
    events = []
    for i in range(n_steps):
      if kinds is None:
        options = [(k, _feasible_args(k, x, bound)) for k in KINDS]
        options = [o for o in options if o[1]]
        if not options:
          break
        kind, args_list = rng.choice(options)
      else:
        kind, args_list = kinds[i], _feasible_args(kinds[i], x, bound)
        if not args_list:
          break
      args = rng.choice(args_list)
      phr = phrasings[1][i] if phrasings else rng.randrange(len(table[kind]))
      events.append(Event(kind, args, phr))
      x = _apply(x, kind, args)
    else:
      name, _ = rng.choice(NAMES)
      problem = Problem(
          name=name, obj=rng.choice(OBJECTS), container=rng.choice(CONTAINERS),
          other=rng.choice([n for n, _ in NAMES if n != name]),
          start=start, events=tuple(events),
          intro=phrasings[0] if phrasings else rng.randrange(len(table["intro"])),
          ask=phrasings[2] if phrasings else rng.randrange(len(table["ask"])),
          pool=pool, bound=bound)
      if max(problem.values()) > min_peak:
        return problem
  raise ValueError(f"no problem with {n_steps} steps, bound {bound}, kinds {kinds} "
                   f"and peak > {min_peak} found in {max_tries} tries")


def render_question(problem: Problem) -> str:
  """The question text of a problem in its chosen phrasings."""
  table = PHRASINGS[problem.pool]
  fill = dict(_PRONOUNS[_GENDER[problem.name]], name=problem.name, obj=problem.obj,
              container=problem.container, other=problem.other)
  parts = [table["intro"][problem.intro].format(x=problem.start, **fill)]
  for e in problem.events:
    m = e.args[1] if len(e.args) > 1 else None
    parts.append(table[e.kind][e.phrasing].format(k=e.args[0], m=m, **fill))
  parts.append(table["ask"][problem.ask].format(**fill))
  return " ".join(parts)


def _arrange(events: Sequence[Event], arrangement: str) -> list[int]:
  """Event indices in trace order: runs of additive events may be reordered."""
  if arrangement == "story":
    return list(range(len(events)))
  first = 1 if arrangement == "gains_first" else -1
  order, run = [], []
  for i, e in enumerate(events):
    if e.kind in _ADDITIVE:
      run.append(i)
      continue
    order.extend(sorted(run, key=lambda j: _ADDITIVE[events[j].kind] != first))
    run = []
    order.append(i)
  return order + sorted(run, key=lambda j: _ADDITIVE[events[j].kind] != first)


def _steps(problem: Problem, hoist: bool, arrangement: str) -> tuple[_Step, ...] | None:
  """Trace lines for one step order; None if an intermediate leaves [1, bound].

  Step orders: products of group events are hoisted to the top or computed inline,
  crossed with how runs of consecutive additive events are arranged (addition
  commutes, so gains or losses may come first as long as values stay in bounds).
  """
  x, prods, lines = problem.start, [], []
  for i in _arrange(problem.events, arrangement):
    e = problem.events[i]
    b = e.args[0]
    if e.kind in _GROUPED:
      b = e.args[0] * e.args[1]
      prod = _Step("prod", e.args[0], "*", e.args[1], b)
      (prods if hoist else lines).append(prod)
    c = _apply(x, e.kind, e.args)
    if not 1 <= c <= problem.bound:
      return None
    lines.append(_Step("state", x, _OP[e.kind], b, c))
    x = c
  return tuple(prods + lines)


def step_orders(problem: Problem) -> list[tuple[_Step, ...]]:
  """The distinct valid step orders of a problem; the story order comes first."""
  has_groups = any(e.kind in _GROUPED for e in problem.events)
  arrangements = []
  for arrangement in ("story", "gains_first", "losses_first"):
    order = _arrange(problem.events, arrangement)
    if all(order != o for _, o in arrangements):  # skip arrangements that change nothing
      arrangements.append((arrangement, order))
  out = []
  for hoist in ((False, True) if has_groups else (False,)):
    for arrangement, _ in arrangements:
      steps = _steps(problem, hoist, arrangement)
      if steps is not None and steps not in out:
        out.append(steps)
  return out


def _n_swappable(steps: Sequence[_Step]) -> int:
  return sum(s.op in "+*" for s in steps)


def render_trace(problem: Problem, steps: Sequence[_Step], connectors: Sequence[int],
                 swaps: Sequence[bool]) -> str:
  """Renders a trace.

  Args:
    problem: the problem.
    steps: one of `step_orders(problem)`.
    connectors: index into CONNECTORS for every line but the first.
    swaps: for each commutative (+ or *) line, whether to write its operands swapped.

  Returns:
    Lines `... a op b=<<a op b=c>>c obj.` joined by newlines, then `#### answer`.
  """
  lines, si = [], 0
  for j, s in enumerate(steps):
    a, b = s.a, s.b
    if s.op in "+*":
      if swaps[si]:
        a, b = b, a
      si += 1
    expr = f"{a}{s.op}{b}"
    calc = f"{expr}=<<{expr}={s.c}>>{s.c} {problem.obj}."
    conn = CONNECTORS[connectors[j - 1]] if j else ""
    if s.kind == "prod":
      body = f"{'the' if conn else 'The'} {s.a} {problem.container} hold {calc}"
    else:
      body = f"{problem.name} has {calc}"
    lines.append(conn + body)
  lines.append(f"#### {steps[-1].c}")
  return "\n".join(lines)


def _random_trace(problem: Problem, rng: random.Random,
                  orders: Sequence[tuple[_Step, ...]] | None = None) -> str:
  steps = rng.choice(orders or step_orders(problem))
  return render_trace(problem, steps, [rng.randrange(len(CONNECTORS)) for _ in steps[1:]],
                      [rng.random() < 0.5 for _ in range(_n_swappable(steps))])


def target_trace(problem: Problem, orders: Sequence[tuple[_Step, ...]] | None = None) -> str:
  """The training target: one valid trace, chosen by a stable hash of the problem key.

  It depends only on the arithmetic skeleton, so rephrasings share the target style
  while its connectors/operand orders are unpredictable without memorization.
  `orders` (= step_orders(problem)) may be passed to save recomputing them.
  """
  return _random_trace(problem, random.Random(_stable_hash("target/" + problem.key)), orders)


def all_traces(problem: Problem, max_traces: int = 64) -> list[str]:
  """Valid traces of a problem, the target first.

  All of them if there are at most `max_traces`; otherwise a deterministic sample of
  `max_traces` distinct traces covering every step order.
  """
  orders = step_orders(problem)
  target = target_trace(problem, orders)
  n_lines, n_swaps = len(orders[0]), _n_swappable(orders[0])
  total = len(orders) * len(CONNECTORS) ** (n_lines - 1) * 2**n_swaps
  out = {target: None}
  if total <= max_traces:
    for steps in orders:
      for conn in itertools.product(range(len(CONNECTORS)), repeat=n_lines - 1):
        for swaps in itertools.product((False, True), repeat=n_swaps):
          out.setdefault(render_trace(problem, steps, conn, swaps))
    return list(out)
  rng = random.Random(_stable_hash("traces/" + problem.key))
  for steps in orders:  # every order represented before filling up at random
    if len(out) < max_traces:
      out.setdefault(render_trace(problem, steps, [rng.randrange(3) for _ in steps[1:]],
                                  [rng.random() < 0.5 for _ in range(n_swaps)]))
  for _ in range(20 * max_traces):
    if len(out) >= max_traces:
      break
    out.setdefault(_random_trace(problem, rng, orders))
  return list(out)


def verify_trace(trace: str, answer: int | str | None = None) -> bool:
  """Checks a trace: every `a op b=<<a op b=c>>c` is exact and `#### N` is the last c.

  Args:
    trace: solution text (target or model completion; text after `#### N` is ignored).
    answer: if given, N must equal it too.

  Returns:
    True iff there is at least one annotation, all annotations are correct and
    consistent with the written expression, and the final answer matches.
  """
  head, sep, _ = trace.partition("####")
  if not sep or head.count("<<") != len(_ANNOTATION_RE.findall(head)):
    return False
  results = []
  for a, op, b, a2, op2, b2, c, c2 in _ANNOTATION_RE.findall(head):
    a, b, c = int(a), int(b), int(c)
    if (a, op, b) != (int(a2), op2, int(b2)) or c != int(c2):
      return False
    want = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if b and a % b == 0 else None}[op]
    if want != c:
      return False
    results.append(c)
  final = _parse_int(_HASH_ANSWER_RE.search(trace))
  if not results or final is None or final != results[-1]:
    return False
  return answer is None or final == int(answer)


def _parse_int(match: re.Match | None) -> int | None:
  if match is None:
    return None
  text = match.group(1).replace(",", "")
  if "." in text:
    whole, frac = text.split(".")
    if frac.strip("0"):
      return None  # answers are integers; a fractional one cannot be right
    text = whole
  return int(text)


@register_task("synthetic_arith")
class SyntheticArithTask(Task):
  """Procedurally generated multi-step word problems (offline GSM8K stand-in).

  Example meta fields: split, level (= n_steps), n_steps, n_lines, key (canonical
  problem key), template (kinds and phrasings), n_traces (size of the trace space),
  spec (the full Problem, from which `traces`, `rephrase` and `fresh_like` work).
  """

  procedural = True
  # Traces are < 200 tokens: a shorter budget than GSM8K's keeps CPU runs quick.
  sampling_defaults = types.MappingProxyType(
      dict(temperature=0.8, top_p=0.95, max_new_tokens=256, n=5))

  def __init__(self, seed: int = 0, n_train: int = 2000, n_test: int = 500,
               n_ood: int = 500, max_steps: int = 4,
               ood_steps: tuple[int, int] | None = None, max_value: int = 60,
               train_max_value: int | None = None):
    """Configures the task; data is generated lazily on first use.

    Args:
      seed: generation seed (same seed and sizes -> identical data).
      n_train, n_test, n_ood: split sizes.
      max_steps: train/test have 1..max_steps events, uniformly.
      ood_steps: inclusive (lo, hi) events for OOD; default (max_steps+1, max_steps+2).
      max_value: bound on every value of OOD problems.
      train_max_value: bound for train/test; default 2/3 of max_value, so OOD
        numbers are larger but still bounded.
    """
    self.seed = seed
    self.sizes = {"train": n_train, "test": n_test, "ood": n_ood}
    self.max_steps = max_steps
    self.ood_steps = ood_steps or (max_steps + 1, max_steps + 2)
    self.max_value = max_value
    self.train_max_value = train_max_value or max(12, round(max_value * 2 / 3))
    if not 1 <= max_steps <= self.ood_steps[0] - 1 or self.ood_steps[0] > self.ood_steps[1]:
      raise ValueError(f"need 1 <= max_steps < ood_steps[0] <= ood_steps[1], "
                       f"got max_steps={max_steps}, ood_steps={self.ood_steps}")
    if self.train_max_value > max_value or self.train_max_value < 12:
      raise ValueError(f"need 12 <= train_max_value <= max_value, got "
                       f"{self.train_max_value}, {max_value}")
    self._splits: dict[str, list[Example]] | None = None
    self._taken: frozenset[str] | None = None

  # -- generation ----------------------------------------------------------------


  def difficulty(self, example: Example) -> float:
    """The number of events (steps) of the problem."""
    return float(example.meta["n_steps"])
  def split_config(self, split: str) -> dict[str, Any]:
    """Sampling settings of a split: step range, bound, phrasing pool, min_peak."""
    if split == "ood":
      return {"steps": self.ood_steps, "bound": self.max_value, "pool": "ood",
              "min_peak": self.train_max_value}
    if split in ("train", "test"):
      return {"steps": (1, self.max_steps), "bound": self.train_max_value, "pool": "train",
              "min_peak": 0}
    raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")

  def _sample(self, rng: random.Random, split: str, n_steps: int | None = None,
              **kwargs) -> Problem:
    cfg = self.split_config(split)
    n = n_steps if n_steps is not None else rng.randint(*cfg["steps"])
    return sample_problem(rng, n, cfg["bound"], cfg["pool"], min_peak=cfg["min_peak"], **kwargs)

  def _generate(self) -> dict[str, list[Example]]:
    # Test first, so held-out data does not shift when n_train changes; train then
    # rejects any problem whose key was already drawn.
    seen: set[str] = set()
    splits = {}
    for split in ("test", "ood", "train"):
      rng = random.Random(f"synthetic_arith/{self.seed}/{split}")
      examples = []
      misses = 0  # consecutive duplicates: many in a row means the space is used up
      while len(examples) < self.sizes[split]:
        problem = self._sample(rng, split)
        if problem.key in seen:
          misses += 1
          if misses > 5000:
            raise ValueError(f"split {split!r}: problem space exhausted after "
                             f"{len(examples)} unique problems; lower its size")
          continue
        misses = 0
        seen.add(problem.key)
        examples.append(self.make_example(problem, f"{self.name}/{split}/{len(examples)}",
                                          split))
      splits[split] = examples
    return splits

  def make_example(self, problem: Problem, example_id: str, split: str,
                   **meta: Any) -> Example:
    """Wraps a Problem into an Example with its target trace and metadata."""
    orders = step_orders(problem)
    n_lines = len(orders[0])
    return Example(
        id=example_id, question=render_question(problem), target=target_trace(problem, orders),
        answer=str(problem.answer),
        meta={"split": split, "level": len(problem.events), "n_steps": len(problem.events),
              "n_lines": n_lines, "key": problem.key,
              "template": template_key(problem),
              "n_traces": len(orders) * len(CONNECTORS)**(n_lines - 1)
                          * 2**_n_swappable(orders[0]),
              "spec": problem.to_spec(), **meta})

  def _all(self) -> dict[str, list[Example]]:
    if self._splits is None:
      self._splits = self._generate()
    return self._splits

  def keys(self, split: str) -> set[str]:
    """Canonical problem keys of a generated split."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return {e.meta["key"] for e in self._all()[split]}

  # -- Task interface --------------------------------------------------------------

  def load(self, split: str, path: str | None = None) -> list[Example]:
    """Examples of a split: generated, or read from a jsonl written by `save_jsonl`."""
    if split not in SPLITS:
      raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if path is None:
      return list(self._all()[split])
    examples = []
    for lineno, rec in read_jsonl(path, required=("id", "question", "target", "answer")):
      meta = rec.get("meta", {})
      if not isinstance(meta, dict):
        raise DataError(f"{path}:{lineno}: meta must be an object")
      examples.append(Example(id=str(rec["id"]), question=rec["question"],
                              target=rec["target"], answer=str(rec["answer"]), meta=meta))
    if not examples:
      raise DataError(f"{path}: empty split {split!r}")
    return examples

  def save_jsonl(self, examples: Iterable[Example], path: str) -> None:
    """Writes examples as jsonl, readable by `load(split, path)`."""
    write_jsonl(path, ({"id": e.id, "question": e.question, "target": e.target,
                        "answer": e.answer, "meta": dict(e.meta)} for e in examples))

  def extract_answer(self, text: str) -> str | None:
    """Integer after the first `####` (else after "The answer is"); None if absent."""
    match = _HASH_ANSWER_RE.search(text) or _ANSWER_IS_RE.search(text)
    value = _parse_int(match)
    return None if value is None else str(value)

  def grade(self, completion_text: str, reference_answer: str) -> bool:
    """Numeric equality of the extracted answer with the reference."""
    pred = self.extract_answer(completion_text)
    try:
      ref = int(str(reference_answer).replace(",", "").strip())
    except ValueError:
      raise ValueError(f"reference answer {reference_answer!r} is not an integer") from None
    return pred is not None and int(pred) == ref

  # -- traces and curation --------------------------------------------------------------

  def traces(self, example: Example, max_traces: int = 64) -> list[str]:
    """Valid reasoning traces of an example's problem; `example.target` comes first."""
    return all_traces(problem_of(example), max_traces)

  def rephrase(self, example: Example, rng: Any) -> Example:
    """Same problem (numbers, operations, names, answer, target) in different words.

    Args:
      example: an example of this task (its meta must hold the spec).
      rng: random.Random, numpy Generator or int seed.

    Returns:
      A new Example whose question differs from the original.
    """
    rng = _as_random(rng)
    problem = problem_of(example)
    table = PHRASINGS[problem.pool]
    for _ in range(100):
      new = dataclasses.replace(
          problem, intro=rng.randrange(len(table["intro"])),
          ask=rng.randrange(len(table["ask"])),
          events=tuple(dataclasses.replace(e, phrasing=rng.randrange(len(table[e.kind])))
                       for e in problem.events))
      question = render_question(new)
      if question != example.question:
        break
    else:
      raise ValueError(f"could not rephrase {example.id}")
    tag = _stable_hash(question)[:8]
    split = example.meta.get("split", "train")
    return self.make_example(new, f"{example.id}/rephrase-{tag}", split, source_id=example.id)

  def fresh_like(self, example: Example, rng: Any) -> Example:
    """A new problem with the same template (event kinds, phrasings) and level.

    The new problem's key is in none of the generated splits (and differs from the
    example's), so it is genuinely new data and never leaks held-out problems.

    Args:
      example: an example of this task (its meta must hold the spec).
      rng: random.Random, numpy Generator or int seed.

    Returns:
      The new Example (id derived from the example's).
    """
    rng = _as_random(rng)
    problem = problem_of(example)
    split = example.meta.get("split", "train")
    cfg = self.split_config(split)
    if self._taken is None:  # cached: curation loops call this thousands of times
      self._taken = frozenset().union(*(self.keys(s) for s in SPLITS))
    taken = self._taken | {problem.key}
    kinds = [e.kind for e in problem.events]
    phrasings = (problem.intro, [e.phrasing for e in problem.events], problem.ask)
    for _ in range(200):
      new = sample_problem(rng, len(kinds), cfg["bound"], problem.pool, kinds=kinds,
                           phrasings=phrasings, min_peak=cfg["min_peak"])
      if new.key not in taken:
        tag = _stable_hash(new.key)[:8]
        return self.make_example(new, f"{example.id}/fresh-{tag}", split,
                                 source_id=example.id)
    raise ValueError(f"no fresh problem like {example.id} found")


def template_key(problem: Problem) -> str:
  """Template identity: phrasing pool, intro/ask indices and per-event kind/phrasing."""
  events = ",".join(f"{e.kind}{e.phrasing}" for e in problem.events)
  return f"{problem.pool}:i{problem.intro}:{events}:a{problem.ask}"


def problem_of(example: Example) -> Problem:
  """The Problem behind a synthetic_arith Example (from meta["spec"])."""
  spec = example.meta.get("spec")
  if spec is None:
    raise DataError(f"{example.id}: meta has no 'spec'; not a synthetic_arith example")
  return Problem.from_spec(spec)
