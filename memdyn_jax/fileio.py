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


# Written into every folder `replace_dir` makes: what wrote it and from what. A folder is
# replaced only when this marker says it is an earlier output of the same writer and
# source, so pointing an output flag at a run, its parent or a user's folder never deletes
# it.
OUTPUT_MARKER = ".memdyn-output.json"


class NotReplaceableError(FileExistsError):
  """An existing folder that `replace_dir` will not replace, since nothing says it is an
  earlier output of the same writer. Nothing was deleted."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"{path} {reason}; nothing was deleted: choose a new folder, or remove "
                     "it yourself if it is no longer needed")
    self.path = path


def _marker(kind: str, source: str | None) -> dict[str, Any]:
  return {"written_by": "memdyn_jax", "kind": kind,
          "source": None if source is None else os.path.abspath(source)}


def mark_output(folder: str, kind: str, source: str | None = None) -> None:
  """Makes `folder` (if needed) and writes the output marker saying `kind` from `source`
  wrote it, so `check_replaceable` lets that writer replace or remove it later."""
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, OUTPUT_MARKER), "w", encoding="utf-8") as f:
    json.dump(_marker(kind, source), f, indent=2)
    f.write("\n")


def read_output_marker(folder: str) -> dict[str, Any] | None:
  """The marker `replace_dir` wrote in `folder`, or None (none, or unreadable)."""
  try:
    with open(os.path.join(folder, OUTPUT_MARKER), encoding="utf-8") as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  return marker if isinstance(marker, dict) else None


def check_replaceable(final: str, kind: str, source: str | None = None,
                      also_replaces: Callable[[str], bool] | None = None) -> None:
  """Raises `NotReplaceableError` unless `replace_dir(..., final, kind=kind, source=source)`
  may put a new folder in place of `final`: it does not exist, is an empty folder, or is an
  earlier output of the same `kind` and `source` (its marker), or `also_replaces(final)`
  recognises it (outputs written before markers existed). `final` must never hold
  `source` itself."""
  final = os.path.abspath(final)
  if source is not None:
    src = os.path.abspath(source)
    if src == final or src.startswith(final.rstrip(os.sep) + os.sep):
      raise NotReplaceableError(final, f"holds {src}, the input of this {kind}")
  if not os.path.lexists(final):
    return
  if not os.path.isdir(final) or os.path.islink(final):
    raise NotReplaceableError(final, "exists and is not a folder")
  entries = sorted(os.listdir(final))
  if not entries:
    return
  marker = read_output_marker(final)
  if marker is not None and marker.get("kind") == kind and (
      source is None or marker.get("source") == os.path.abspath(source)):
    return
  if marker is None and also_replaces is not None and also_replaces(final):
    return
  shown = ", ".join(entries[:4]) + (f", ... ({len(entries)} entries)" if len(entries) > 4 else "")
  what = (f"an earlier {marker.get('kind')} of {marker.get('source')}" if marker
          else f"not an earlier {kind}" + (f" of {os.path.abspath(source)}" if source else ""))
  raise NotReplaceableError(final, f"exists and is {what} (it holds {shown})")


def replace_dir(make: Callable[[str], Any], final: str, *, kind: str,
                source: str | None = None, also_replaces: Callable[[str], bool] | None = None):
  """Runs `make(tmp_dir)` in a fresh folder beside `final`, marks it as an output of `kind`
  from `source` (`OUTPUT_MARKER`), then puts it in place of `final`: an existing one is
  replaced whole (nothing stale of it survives) only if `check_replaceable` allows it,
  checked before `make` runs and again before the swap. A failure in `make` leaves `final`
  as it was. Returns what `make` returned.

  The swap is two renames (old out, new in); a kill between them leaves `final` absent
  and the complete new folder under a `.tmp-` name, never a mix of the two.

  Raises:
    NotReplaceableError: `final` exists and is not an earlier output of this writer.
  """
  check_replaceable(final, kind, source, also_replaces)
  parent = os.path.dirname(os.path.abspath(final))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=".tmp-" + os.path.basename(final) + "-", dir=parent)
  try:
    result = make(tmp)
    mark_output(tmp, kind, source)
    os.chmod(tmp, 0o755)  # mkdtemp makes 0700; outputs are meant to be shared
    check_replaceable(final, kind, source, also_replaces)  # `make` may have taken hours
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
