"""Evaluation records of runs gathered into per-split (checkpoint, example) matrices."""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping, Sequence

import numpy as np

from memdyn_jax.evaluation import records as records_lib

RUN_INFO = "run.json"


@dataclasses.dataclass(frozen=True, eq=False)
class SplitMatrix:
  """Per-example fields of one unit (split[@perturbation]) at the checkpoints that have it.

  Attributes:
    steps: (C,) checkpoint steps, ascending.
    example_ids: the N examples present at every one of those checkpoints, in file order.
    fields: numeric field name -> (C, N) float64 array.
    meta: per example, its category metadata (`evaluation.example_meta`; {} in records
      written before it existed).
  """

  steps: np.ndarray
  example_ids: tuple[str, ...]
  fields: dict[str, np.ndarray]
  meta: tuple[Mapping[str, Any], ...] = ()

  def at(self, steps: Sequence[int]) -> "SplitMatrix":
    """The rows of the given steps (each must be present)."""
    index = {int(s): i for i, s in enumerate(self.steps)}
    rows = [index[int(s)] for s in steps]
    return SplitMatrix(np.asarray(steps, np.int64), self.example_ids,
                       {k: v[rows] for k, v in self.fields.items()}, self.meta)

  def mean(self, field: str) -> np.ndarray:
    """(C,) mean over examples, ignoring NaN (NaN where every value is NaN)."""
    x = self.fields[field]
    out = np.full(x.shape[0], np.nan)
    ok = ~np.isnan(x)
    counts = ok.sum(axis=1)
    sums = np.where(ok, x, 0.0).sum(axis=1)
    np.divide(sums, counts, out=out, where=counts > 0)
    return out

  def corpus_perplexity(self) -> np.ndarray:
    """(C,) token-level perplexity exp(-Σ log p / Σ tokens) over the split's targets."""
    lp = self.fields["target_sum_logprob"]
    n = self.fields["n_target_tokens"]
    ok = ~np.isnan(lp)
    tokens = np.where(ok, n, 0).sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
      return np.where(tokens > 0, np.exp(-np.where(ok, lp, 0).sum(axis=1) / tokens), np.nan)


@dataclasses.dataclass(frozen=True, eq=False)
class RunRecords:
  """All evaluation records of one run.

  Attributes:
    name: the run directory's basename.
    run_dir: its absolute path.
    info: run.json.
    units: unit name ("train", "test", "perturbed@First", ...) -> SplitMatrix.
    checkpoint_stats: step -> per-checkpoint values (e.g. "gradient_variance").
  """

  name: str
  run_dir: str
  info: dict[str, Any]
  units: dict[str, SplitMatrix]
  checkpoint_stats: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

  def steps(self) -> np.ndarray:
    """Every step with any records, ascending."""
    return np.asarray(sorted({int(s) for u in self.units.values() for s in u.steps}), np.int64)

  def common_steps(self, *units: str) -> np.ndarray:
    """Steps present in every named unit (empty if a unit is missing)."""
    sets = [set(int(s) for s in self.units[u].steps) if u in self.units else set()
            for u in units]
    return np.asarray(sorted(set.intersection(*sets)) if sets else [], np.int64)

  def perturbations(self) -> list[str]:
    """Perturbed unit names, sorted."""
    return sorted(u for u in self.units if u.startswith("perturbed@"))


def find_runs(sweep_dir: str, *, name: str = records_lib.EVAL_DIR) -> list[str]:
  """Run directories with evaluation records: `sweep_dir` itself if it is one, else its
  immediate subdirectories that are, sorted by name.

  Raises:
    FileNotFoundError: `sweep_dir` does not exist or holds no evaluated run.
  """
  if not os.path.isdir(sweep_dir):
    raise FileNotFoundError(f"{sweep_dir}: no such directory")
  is_run = lambda d: (os.path.exists(os.path.join(d, RUN_INFO))
                      and os.path.isdir(records_lib.eval_dir(d, name)))
  if is_run(sweep_dir):
    return [os.path.abspath(sweep_dir)]
  runs = [os.path.abspath(os.path.join(sweep_dir, d)) for d in sorted(os.listdir(sweep_dir))]
  runs = [d for d in runs if os.path.isdir(d) and is_run(d)]
  if not runs:
    raise FileNotFoundError(f"{sweep_dir} holds no run directory with {name}/ records "
                            "(run experiments/evaluate.py first)")
  return runs


def _matrix(rows: list[dict[str, Any]]) -> SplitMatrix:
  by_step: dict[int, dict[str, dict[str, Any]]] = {}
  order: list[str] = []
  for r in rows:
    by_step.setdefault(int(r["step"]), {})[r["example_id"]] = r
    if r["example_id"] not in order:
      order.append(r["example_id"])
  steps = sorted(by_step)
  ids = [i for i in order if all(i in by_step[s] for s in steps)]
  sample = rows[0]
  numeric = [k for k, v in sample.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"]
  numeric += [k for k, v in sample.items() if isinstance(v, bool)]
  fields = {k: np.asarray([[float(by_step[s][i].get(k, np.nan)) for i in ids] for s in steps],
                          np.float64).reshape(len(steps), len(ids)) for k in numeric}
  meta = tuple(dict(by_step[steps[0]][i].get("meta") or {}) for i in ids) if steps else ()
  return SplitMatrix(np.asarray(steps, np.int64), tuple(ids), fields, meta)


def load_run(run_dir: str, *, name: str = records_lib.EVAL_DIR) -> RunRecords:
  """Gathers a run's records into SplitMatrix per unit.

  Raises:
    FileNotFoundError: not a run directory.
  """
  import json
  path = os.path.join(run_dir, RUN_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{run_dir} is not a training run directory (no {RUN_INFO})")
  with open(path) as f:
    info = json.load(f)
  by_unit: dict[str, list[dict[str, Any]]] = {}
  for r in records_lib.load_records(run_dir, name=name):
    by_unit.setdefault(records_lib.unit_name(r["split"], r.get("perturbation")), []).append(r)
  units = {u: _matrix(rows) for u, rows in sorted(by_unit.items())}
  return RunRecords(os.path.basename(os.path.abspath(run_dir)), os.path.abspath(run_dir),
                    info, units, records_lib.load_checkpoint_stats(run_dir, name=name))
