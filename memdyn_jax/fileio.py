"""Crash-safe file writes, shared by every stage that owns files in a run directory.

A file written here exists only once complete: text goes to a temporary file in the same
folder, is flushed to disk, and is renamed over the target (atomic on POSIX), so a killed
process leaves the old file or the new one, never a torn one. JSON is strict (no NaN or
Infinity tokens, which strict readers reject): non-finite floats are written as null.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from typing import IO, Any, Callable, Iterator, Mapping


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """A file to write (text "w", utf-8, or binary "wb") that appears at `path` only when the
  block completes: it is a temporary file in the same folder, flushed to disk and renamed
  over `path`. An exception in the block removes it and leaves `path` as it was."""
  if mode not in ("w", "wb"):
    raise ValueError(f"mode must be 'w' or 'wb', got {mode!r}")
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
  try:
    with os.fdopen(fd, mode, encoding="utf-8" if mode == "w" else None) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; run files are meant to be shared
    os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the whole new one
  except BaseException:  # noqa: BLE001 - cleans up, then re-raises
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  """Writes `text` to `path` atomically (`atomic_open`)."""
  with atomic_open(path) as f:
    f.write(text)


def strict_json_value(value: Any) -> Any:
  """`value` with numpy scalars as Python numbers and every non-finite float (nested too)
  as None, ready for strict JSON."""
  if isinstance(value, Mapping):
    return {str(k): strict_json_value(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict_json_value(v) for v in value]
  if hasattr(value, "item") and not isinstance(value, (str, bytes)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


def dumps_strict(value: Any, **kwargs) -> str:
  """`json.dumps` that writes non-finite floats as null (never NaN/Infinity tokens)."""
  return json.dumps(strict_json_value(value), allow_nan=False, **kwargs)


def atomic_write_json(path: str, value: Any, **kwargs) -> str:
  """Writes `value` as strict JSON (`dumps_strict(value, **kwargs)` + newline) atomically;
  returns `path`."""
  atomic_write_text(path, dumps_strict(value, **kwargs) + "\n")
  return path


def replace_dir(make: Callable[[str], Any], final: str):
  """Runs `make(tmp_dir)` in a fresh folder beside `final`, then puts it in place of
  `final` (an existing one is replaced whole: nothing stale of it survives). A failure in
  `make` leaves `final` as it was. Returns what `make` returned.

  The swap is two renames (old out, new in); a kill between them leaves `final` absent
  and the complete new folder under a `.tmp-` name, never a mix of the two.
  """
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
  try:
    result = make(tmp)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are meant to be shared
    old = None
    if os.path.exists(final):
      old = tempfile.mkdtemp(prefix=".old-" + os.path.basename(final) + "-", dir=parent)
      os.rmdir(old)
      os.replace(final, old)
    os.replace(tmp, final)
    if old:
      shutil.rmtree(old, ignore_errors=True)
    return result
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
