"""Markdown tables, CSV files and the report document."""
from __future__ import annotations

import csv
import math
import os
from typing import Any, Mapping, Sequence

from memdyn_jax import fileio


def format_value(x: Any, digits: int = 3) -> str:
  """Floats to `digits` decimals (scientific when large or tiny), NaN as "–", others str."""
  if isinstance(x, bool) or x is None:
    return "" if x is None else str(x)
  if isinstance(x, float):
    if math.isnan(x):
      return "–"
    if math.isinf(x):
      return "inf" if x > 0 else "-inf"
    if x != 0 and (abs(x) >= 1e5 or abs(x) < 10 ** -digits):
      return f"{x:.{digits}g}"
    return f"{x:.{digits}f}"
  return str(x)


def columns_of(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """Column names in first-seen order over all rows."""
  cols: list[str] = []
  for r in rows:
    cols += [k for k in r if k not in cols]
  return cols


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
          digits: int = 3) -> str:
  """A GitHub-flavoured Markdown table ("_(no rows)_" when empty); missing cells are "–"."""
  if not rows:
    return "_(no rows)_"
  cols = list(columns) if columns else columns_of(rows)
  esc = lambda s: s.replace("|", "\\|")
  lines = ["| " + " | ".join(esc(c) for c in cols) + " |",
           "|" + "|".join("---" for _ in cols) + "|"]
  for r in rows:
    lines.append("| " + " | ".join(esc(format_value(r.get(c, math.nan), digits)) for c in cols)
                 + " |")
  return "\n".join(lines)


def write_csv(path: str, rows: Sequence[Mapping[str, Any]],
              columns: Sequence[str] | None = None) -> str:
  """Writes rows as CSV atomically (NaN cells empty); returns the path."""
  import io
  cols = list(columns) if columns else columns_of(rows)
  buf = io.StringIO()
  writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
  writer.writeheader()
  for r in rows:
    writer.writerow({c: ("" if isinstance(r.get(c), float) and math.isnan(r[c]) else r.get(c, ""))
                     for c in cols})
  fileio.atomic_write_text(path, buf.getvalue())
  return path


def write_json(path: str, data: Mapping[str, Any]) -> str:
  """Writes `data` as indented strict JSON atomically (NaN/inf as null); returns the path."""
  return fileio.atomic_write_json(path, data, indent=2)


class Report:
  """A Markdown document built section by section, written atomically."""

  def __init__(self, title: str):
    self._parts = [f"# {title}", ""]

  def heading(self, text: str, level: int = 2) -> None:
    self._parts += ["#" * level + " " + text, ""]

  def paragraph(self, text: str) -> None:
    self._parts += [text, ""]

  def table(self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None,
            digits: int = 3) -> None:
    self._parts += [table(rows, columns, digits), ""]

  def image(self, path: str, alt: str, relative_to: str) -> None:
    self._parts += [f"![{alt}]({os.path.relpath(path, relative_to)})", ""]

  def text(self) -> str:
    return "\n".join(self._parts)

  def write(self, path: str) -> str:
    fileio.atomic_write_text(path, self.text())
    return path
