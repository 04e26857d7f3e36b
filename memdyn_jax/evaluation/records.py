"""Evaluation records of a run: one atomic jsonl file per (step, split[, perturbation]).

Layout under a run directory:

    eval/config.json                       what was evaluated (task, sampling, subsets);
                                           compared on every re-run.
    eval/step_00000012/train.jsonl         one JSON object per example
    eval/step_00000012/perturbed@First.jsonl
    eval/step_00000012/checkpoint.json     per-checkpoint (not per-example) values, e.g.
                                           the gradient variance and its settings
    eval/step_00000012/units.json          rows and bytes of each record file written

Files are strict JSON (no NaN/Infinity tokens, which strict readers reject): a non-finite
float is written as null and read back as NaN (the readers here do that for every top-level
null except the text fields in `NULLABLE_TEXT_KEYS`; +inf therefore also reads as NaN).

A record file is written to a temporary name and renamed into place, so it exists only
once complete: a killed evaluation leaves either the whole file or none. Its row and byte
counts then go to the step's units.json; a unit is done when its file exists with the size
recorded there, so a file damaged later (lines lost, truncated) is evaluated again by a
re-run and refused by `load_records`, never read as a smaller unit. A file written but not
yet in units.json (a kill between the two writes) is evaluated again too. Steps evaluated
before units.json existed have none; their files are trusted as they are. Perturbations are
percent-encoded in file names ("We know that" -> "We%20know%20that"), so names round-trip.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse
from typing import Any, Iterable, Mapping

from memdyn_jax.fileio import atomic_write_json, atomic_write_text, dumps_strict

EVAL_DIR = "eval"
CONFIG_FILE = "config.json"
CHECKPOINT_FILE = "checkpoint.json"
UNITS_FILE = "units.json"
# Keys of checkpoint.json: the gradient variance (Kang et al. App. B.1) and what it was
# measured with (memdyn_jax.evaluation.gradient_variance.settings).
GRADIENT_VARIANCE = "gradient_variance"
GRADIENT_VARIANCE_SETTINGS = "gradient_variance_settings"
DISTANCE_FROM_INIT = "distance_from_init"
# Top-level record keys whose null is a real None (no perturbation, no greedy text), not a
# non-finite float.
NULLABLE_TEXT_KEYS = frozenset({"perturbation", "greedy_text", "category"})
_STEP_RE = re.compile(r"^step_(\d+)$")
_SUFFIX = ".jsonl"


class EvalConfigMismatchError(ValueError):
  """The eval directory holds records made with a different evaluation configuration."""


class DamagedRecordsError(ValueError):
  """A record file differs from what was written (lines lost or truncated); `path` names it.
  experiments/evaluate.py evaluates it again."""

  def __init__(self, path: str, detail: str):
    super().__init__(f"{path}: {detail}; it was damaged after it was written: run "
                     f"experiments/evaluate.py on this run again to redo it")
    self.path = path


def eval_dir(run_dir: str, name: str = EVAL_DIR) -> str:
  """The records folder of a run (`name` lets several evaluations coexist)."""
  return os.path.join(os.path.abspath(run_dir), name)


def unit_name(split: str, perturbation: str | None = None) -> str:
  """File stem of one unit: the split, plus "@<percent-encoded perturbation>"."""
  if not split or "@" in split or "/" in split:
    raise ValueError(f"split must be a non-empty name without '@' or '/', got {split!r}")
  if perturbation:
    return f"{split}@{urllib.parse.quote(perturbation, safe='')}"
  return split


def parse_unit_name(stem: str) -> tuple[str, str | None]:
  """Inverse of `unit_name`: (split, perturbation or None)."""
  split, sep, pert = stem.partition("@")
  return split, (urllib.parse.unquote(pert) if sep else None)


def record_path(run_dir: str, step: int, split: str, perturbation: str | None = None, *,
                name: str = EVAL_DIR) -> str:
  """Where the records of (step, split, perturbation) live."""
  return os.path.join(eval_dir(run_dir, name), f"step_{int(step):08d}",
                      unit_name(split, perturbation) + _SUFFIX)


def _nan_for_null(row: dict[str, Any]) -> dict[str, Any]:
  """Inverse of the writers' null for a non-finite float, on a row's top-level values."""
  return {k: (float("nan") if v is None and k not in NULLABLE_TEXT_KEYS else v)
          for k, v in row.items()}


def write_records(run_dir: str, step: int, split: str, rows: Iterable[Mapping[str, Any]],
                  perturbation: str | None = None, *, name: str = EVAL_DIR) -> str:
  """Writes one unit's records atomically; each row gets run, step, split, perturbation.

  Args:
    run_dir: the training run directory.
    step: checkpoint step.
    split: split name.
    rows: per-example dicts (e.g. `ExampleRecord.to_dict()`).
    perturbation: the unit's perturbation, or None.
    name: eval folder name.

  Returns:
    The path written.

  Raises:
    ValueError: no rows (an empty unit would later read as done).
  """
  run = os.path.basename(os.path.abspath(run_dir))
  lines = []
  for row in rows:
    out = dict(row)
    out.update(run=run, step=int(step), split=split, perturbation=perturbation)
    lines.append(dumps_strict(out, sort_keys=True))
  if not lines:
    raise ValueError(f"no records for step {step}, split {unit_name(split, perturbation)!r}")
  path = record_path(run_dir, step, split, perturbation, name=name)
  text = "\n".join(lines) + "\n"
  atomic_write_text(path, text)
  units_path = os.path.join(os.path.dirname(path), UNITS_FILE)
  units = _read_units(units_path) or {}
  units[unit_name(split, perturbation)] = {"rows": len(lines), "bytes": len(text.encode())}
  atomic_write_json(units_path, units, indent=1, sort_keys=True)
  return path


def _read_units(path: str) -> dict[str, Any] | None:
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def unit_state(run_dir: str, step: int, split: str, perturbation: str | None = None, *,
               name: str = EVAL_DIR) -> str:
  """"done", "missing" (no file, or written but not yet in units.json) or "damaged" (its
  size differs from what was written)."""
  path = record_path(run_dir, step, split, perturbation, name=name)
  if not os.path.exists(path):
    return "missing"
  units = _read_units(os.path.join(os.path.dirname(path), UNITS_FILE))
  if units is None:
    return "done"  # evaluated before units.json: nothing to check against
  entry = units.get(unit_name(split, perturbation))
  if entry is None:
    return "missing"
  return "done" if os.path.getsize(path) == entry["bytes"] else "damaged"


def read_jsonl(path: str) -> list[dict[str, Any]]:
  """All JSON objects of a record file, top-level nulls read as NaN (`NULLABLE_TEXT_KEYS`
  excepted); older files' NaN/Infinity tokens are accepted too. Errors name path:line."""
  rows = []
  with open(path, encoding="utf-8") as f:
    for lineno, line in enumerate(f, 1):
      if line.strip():
        try:
          rows.append(_nan_for_null(json.loads(line)))
        except json.JSONDecodeError as e:
          raise ValueError(f"{path}:{lineno}: malformed JSON ({e.msg})") from e
  return rows


def list_done(run_dir: str, *, name: str = EVAL_DIR) -> set[tuple[int, str, str | None]]:
  """The (step, split, perturbation) units whose record files are complete."""
  root = eval_dir(run_dir, name)
  done = set()
  if not os.path.isdir(root):
    return done
  for entry in os.listdir(root):
    m = _STEP_RE.match(entry)
    if not m or not os.path.isdir(os.path.join(root, entry)):
      continue
    for fname in os.listdir(os.path.join(root, entry)):
      if fname.endswith(_SUFFIX) and not fname.startswith(".tmp-"):
        unit = (int(m.group(1)), *parse_unit_name(fname[:-len(_SUFFIX)]))
        if unit_state(run_dir, *unit, name=name) == "done":
          done.add(unit)
  return done


def is_done(run_dir: str, step: int, split: str, perturbation: str | None = None, *,
            name: str = EVAL_DIR) -> bool:
  """Whether the unit's record file exists as it was written (see `unit_state`)."""
  return unit_state(run_dir, step, split, perturbation, name=name) == "done"


def load_records(run_dir: str, *, name: str = EVAL_DIR) -> list[dict[str, Any]]:
  """Every record of a run, ordered by (step, split, perturbation, file order).

  Raises:
    DamagedRecordsError: a record file lost lines or bytes since it was written.
  """
  root = eval_dir(run_dir, name)
  for entry in sorted(os.listdir(root)) if os.path.isdir(root) else ():
    m = _STEP_RE.match(entry)
    units = _read_units(os.path.join(root, entry, UNITS_FILE)) if m else None
    for unit, written in (units or {}).items():
      path = os.path.join(root, entry, unit + _SUFFIX)
      if not os.path.exists(path):
        raise DamagedRecordsError(path, f"missing ({written['rows']} rows were written)")
      if os.path.getsize(path) != written["bytes"]:
        raise DamagedRecordsError(path, f"{os.path.getsize(path)} bytes, {written['bytes']} "
                                  f"were written ({written['rows']} rows)")
  rows = []
  for step, split, pert in sorted(list_done(run_dir, name=name),
                                  key=lambda u: (u[0], u[1], u[2] or "")):
    rows.extend(read_jsonl(record_path(run_dir, step, split, pert, name=name)))
  return rows


def stated_stop(config: Mapping[str, Any], task_stop: Iterable[str]) -> dict[str, Any]:
  """A recorded configuration with the stop strings its sampling ran with: records written
  before `default_sampling` stated the task's stop strings say `"stop": []` under
  "sampling" where the evaluation applied the task's (`task_stop`)."""
  config = dict(config)
  sampling = config.get("sampling")
  if isinstance(sampling, Mapping) and sampling.get("stop") == []:
    config["sampling"] = {**sampling, "stop": list(task_stop)}
  return config


def check_config(run_dir: str, config: Mapping[str, Any], *, name: str = EVAL_DIR,
                 task_stop: Iterable[str] = ()) -> None:
  """Records `config` for the eval folder, or checks that it matches the recorded one. A
  record from before the sampling record stated the stop strings is read with `task_stop`
  (`stated_stop`) and, when it matches, rewritten to state them.

  Raises:
    EvalConfigMismatchError: the folder was made with another configuration; the message
      names every differing key.
  """
  path = os.path.join(eval_dir(run_dir, name), CONFIG_FILE)
  config = json.loads(dumps_strict(dict(config), sort_keys=True))  # tuples -> lists
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      recorded = json.load(f)
    old = stated_stop(recorded, task_stop)
    keys = sorted(set(old) | set(config))
    diffs = [f"{k}: {old.get(k, '<absent>')!r} -> {config.get(k, '<absent>')!r}"
             for k in keys if old.get(k, "<absent>") != config.get(k, "<absent>")]
    if diffs:
      raise EvalConfigMismatchError(
          f"{path} was made with a different evaluation configuration ("
          + "; ".join(diffs) + "); use another eval folder name")
    if old == recorded:
      return
  atomic_write_json(path, config, indent=2, sort_keys=True)


def read_config(run_dir: str, *, name: str = EVAL_DIR) -> dict[str, Any] | None:
  """The recorded evaluation configuration, or None."""
  path = os.path.join(eval_dir(run_dir, name), CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def checkpoint_stats_path(run_dir: str, step: int, *, name: str = EVAL_DIR) -> str:
  """Where the per-checkpoint values of `step` live."""
  return os.path.join(eval_dir(run_dir, name), f"step_{int(step):08d}", CHECKPOINT_FILE)


def read_checkpoint_stats(run_dir: str, step: int, *, name: str = EVAL_DIR) -> dict[str, Any]:
  """The per-checkpoint values of `step` ({} when none were written)."""
  path = checkpoint_stats_path(run_dir, step, name=name)
  if not os.path.exists(path):
    return {}
  with open(path, encoding="utf-8") as f:
    try:
      return _nan_for_null(json.load(f))
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: malformed JSON ({e.msg})") from e


def update_checkpoint_stats(run_dir: str, step: int, values: Mapping[str, Any], *,
                            name: str = EVAL_DIR) -> str:
  """Adds `values` to the per-checkpoint values of `step` (same keys replaced), atomically.

  Returns:
    The path written.
  """
  stats = read_checkpoint_stats(run_dir, step, name=name)
  stats.update(values)
  path = checkpoint_stats_path(run_dir, step, name=name)
  atomic_write_json(path, stats, indent=2, sort_keys=True)
  return path


def load_checkpoint_stats(run_dir: str, *, name: str = EVAL_DIR) -> dict[int, dict[str, Any]]:
  """step -> per-checkpoint values, for every step that has some."""
  root = eval_dir(run_dir, name)
  out = {}
  if not os.path.isdir(root):
    return out
  for entry in sorted(os.listdir(root)):
    m = _STEP_RE.match(entry)
    if m and os.path.exists(os.path.join(root, entry, CHECKPOINT_FILE)):
      out[int(m.group(1))] = read_checkpoint_stats(run_dir, int(m.group(1)), name=name)
  return out
