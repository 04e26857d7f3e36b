"""Merged checkpoints beside the trajectories they were merged from (Ruan et al.).

A merged model is a run directory whose run.json carries

    "merge": {"method": str, "sources": [{"run_dir": str, "step": int}, ...], ...}

(experiments/merge.py); it is evaluated like any run. Ruan et al. propose merging
checkpoints to mitigate over-memorization, so each merged model is compared with three
checkpoints of each source trajectory: its last one, its best-test-accuracy one and the one
the over-memorization rule selects, on test accuracy and perplexity, perturbed-prompt
(robustness) and OOD accuracy, and sample diversity. Merged models are not trajectories:
they never enter PreMemAcc calibration or the sweep-level fits.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Any, Mapping, Sequence

import numpy as np

from memdyn_jax.report.analysis import MERGE_KEY, is_merged
from memdyn_jax.report.collect import RunRecords

PERTURBED_PREFIX = "perturbed_accuracy["
COMPARED = ("test_accuracy", "test_perplexity", "perturbed_accuracy", "ood_accuracy",
            "test_distinct_2", "test_unique_answers", "test_unique_traces")


@dataclasses.dataclass(frozen=True)
class MergeSources:
  """What one merged run was made from.

  Attributes:
    run: the merged run's name.
    method: merge method ("linear", "ties", ...).
    sources: source trajectory name -> steps merged from it (ascending; a source without
      a step counts as its last checkpoint, step None is left out).
    unmatched: source run directories that are not runs of the sweep.
  """

  run: str
  method: str
  sources: dict[str, tuple[int, ...]]
  unmatched: tuple[str, ...]


def _candidates(source_dir: str, merged_dir: str) -> list[str]:
  # Absolute, or relative to where merge.py may have run: beside the merged run, inside it.
  if os.path.isabs(source_dir):
    return [os.path.realpath(source_dir)]
  return [os.path.realpath(os.path.join(base, source_dir))
          for base in (os.path.dirname(merged_dir), merged_dir, os.getcwd())]


def merge_sources(merged: RunRecords, trajectories: Sequence[RunRecords]) -> MergeSources:
  """Resolves a merged run's sources to trajectories of the sweep (by path, else by name).

  Raises:
    ValueError: run.json's "merge" entry is malformed (message names the run).
  """
  info = merged.info.get(MERGE_KEY)
  if not isinstance(info, Mapping) or not isinstance(info.get("sources"), list):
    raise ValueError(f"{merged.run_dir}/run.json: 'merge' must be an object with a "
                     "'sources' list")
  by_path = {os.path.realpath(t.run_dir): t.name for t in trajectories}
  by_name = {t.name: t.name for t in trajectories}
  sources: dict[str, set[int]] = {}
  unmatched = []
  for src in info["sources"]:
    if not isinstance(src, Mapping) or not isinstance(src.get("run_dir"), str):
      raise ValueError(f"{merged.run_dir}/run.json: each merge source needs a 'run_dir'")
    path = src["run_dir"]
    name = next((by_path[c] for c in _candidates(path, merged.run_dir) if c in by_path),
                by_name.get(os.path.basename(os.path.normpath(path))))
    if name is None:
      unmatched.append(path)
      continue
    steps = sources.setdefault(name, set())
    if src.get("step") is not None:
      steps.add(int(src["step"]))
  return MergeSources(merged.name, str(info.get("method", "")),
                      {k: tuple(sorted(v)) for k, v in sources.items()}, tuple(unmatched))


def perturbed_accuracy(row: Mapping[str, Any]) -> float:
  """Mean accuracy over a checkpoint row's perturbed prompts (NaN without any)."""
  vals = [v for k, v in row.items() if k.startswith(PERTURBED_PREFIX)
          and isinstance(v, float) and math.isfinite(v)]
  return float(np.mean(vals)) if vals else math.nan


def _finite(row: Mapping[str, Any], key: str) -> bool:
  v = row.get(key, math.nan)
  return isinstance(v, (int, float)) and math.isfinite(v)


def _evaluated(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
  """The rows with a test accuracy (all rows when none has one)."""
  return [r for r in rows if _finite(r, "test_accuracy")] or list(rows)


def merged_row(rows: Sequence[Mapping[str, Any]]) -> Mapping[str, Any] | None:
  """The checkpoint row that stands for a merged model: its last evaluated one."""
  rows = _evaluated(rows)
  return rows[-1] if rows else None


def comparison_rows(merged_runs: Sequence[RunRecords], trajectories: Sequence[RunRecords],
                    rows: Sequence[Mapping[str, Any]],
                    selected: Mapping[str, int | None]) -> list[dict[str, Any]]:
  """The merge table: per merged run and source trajectory, the merged model, then the
  trajectory's last, best-test-accuracy and over-memorization-selected checkpoints.

  Args:
    merged_runs: the merged runs of the sweep.
    trajectories: the trajectories of the sweep.
    rows: `analysis.checkpoint_rows` of every run (merged ones included).
    selected: trajectory name -> step chosen by the over-memorization rule (absent or
      None when no test curve).

  Returns:
    Rows with merged_run, method, source_run, source_steps, model ("merged", "last",
    "best_test_accuracy", "overmem_selected"), step and the COMPARED columns. A merged run
    none of whose sources is in the sweep gets its merged row only (source_run "–").
  """
  by_run: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    by_run.setdefault(r["run"], []).append(r)
  out = []

  def add(m: MergeSources, source: str, label: str, row: Mapping[str, Any] | None):
    if row is None:
      return
    entry = {"merged_run": m.run, "method": m.method, "source_run": source,
             "source_steps": " ".join(str(s) for s in m.sources.get(source, ())),
             "model": label, "step": int(row["step"])}
    for col in COMPARED:
      entry[col] = (perturbed_accuracy(row) if col == "perturbed_accuracy"
                    else float(row.get(col, math.nan)))
    out.append(entry)

  for merged in merged_runs:
    m = merge_sources(merged, trajectories)
    mine = merged_row(by_run.get(merged.name, []))
    for source in m.sources or {"–": ()}:
      add(m, source, "merged", mine)
      traj = _evaluated(by_run.get(source, []))
      if not traj:
        continue
      add(m, source, "last", traj[-1])
      best = max(traj, key=lambda r: r.get("test_accuracy", -math.inf)
                 if _finite(r, "test_accuracy") else -math.inf)  # first max on ties
      add(m, source, "best_test_accuracy", best)
      step = selected.get(source)
      add(m, source, "overmem_selected",
          next((r for r in traj if r["step"] == step), None) if step is not None else None)
  return out


def summary_rows(comparison: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """Per (merged run, source run) of `comparison_rows`: the merged model's test accuracy and
  perplexity beside its source trajectory's last checkpoint."""
  out = []
  for row in comparison:
    if row["model"] != "merged":
      continue
    last = next((r for r in comparison if r["merged_run"] == row["merged_run"]
                 and r["source_run"] == row["source_run"] and r["model"] == "last"), {})
    out.append({"merged_run": row["merged_run"], "method": row["method"],
                "source_run": row["source_run"], "source_steps": row["source_steps"],
                "test_accuracy": row["test_accuracy"], "test_perplexity": row["test_perplexity"],
                "source_test_accuracy": last.get("test_accuracy", math.nan),
                "source_test_perplexity": last.get("test_perplexity", math.nan)})
  return out


def plot_markers(merged_runs: Sequence[RunRecords], trajectories: Sequence[RunRecords],
                 rows: Sequence[Mapping[str, Any]]) -> dict[str, list[dict[str, Any]]]:
  """Merged models to mark on each source trajectory's over-memorization curves.

  Returns:
    trajectory name -> [{"label", "step", "test_perplexity", "test_accuracy"}]: the
    marker sits at the last step merged from that trajectory (its last step when the
    sources name none).
  """
  by_run: dict[str, list[Mapping[str, Any]]] = {}
  for r in rows:
    by_run.setdefault(r["run"], []).append(r)
  out: dict[str, list[dict[str, Any]]] = {}
  for merged in merged_runs:
    m = merge_sources(merged, trajectories)
    row = merged_row(by_run.get(merged.name, []))
    if row is None:
      continue
    for source, steps in m.sources.items():
      traj = by_run.get(source, [])
      if not traj:
        continue
      out.setdefault(source, []).append(dict(
          label=f"{m.run} ({m.method})" if m.method else m.run,
          step=steps[-1] if steps else traj[-1]["step"],
          test_perplexity=float(row.get("test_perplexity", math.nan)),
          test_accuracy=float(row.get("test_accuracy", math.nan))))
  return out


def split_runs(runs: Sequence[RunRecords]) -> tuple[list[RunRecords], list[RunRecords]]:
  """(trajectories, merged runs) of a sweep, each in input order."""
  return [r for r in runs if not is_merged(r)], [r for r in runs if is_merged(r)]
