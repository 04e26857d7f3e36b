"""fileio.replace_dir replaces only its own earlier outputs: never a user's folder."""
from __future__ import annotations

import os

import pytest

from memdyn_jax import fileio


def _write(folder, name, text="x"):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, name), "w") as f:
    f.write(text)


def _make(name):
  return lambda d: _write(d, name)


def test_replace_dir_writes_a_marked_folder_and_replaces_its_own_output(tmp_path):
  out, src = str(tmp_path / "out"), str(tmp_path / "run")
  fileio.replace_dir(_make("a.txt"), out, kind="export", source=src)
  assert sorted(os.listdir(out)) == [fileio.OUTPUT_MARKER, "a.txt"]
  assert fileio.read_output_marker(out) == {"written_by": "memdyn_jax", "kind": "export",
                                            "source": os.path.abspath(src)}
  fileio.replace_dir(_make("b.txt"), out, kind="export", source=src)
  assert sorted(os.listdir(out)) == [fileio.OUTPUT_MARKER, "b.txt"]  # replaced whole
  assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old folder left


def test_an_empty_folder_is_filled(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  fileio.replace_dir(_make("a.txt"), str(out), kind="export")
  assert "a.txt" in os.listdir(out)


@pytest.mark.parametrize("setup,needle", [
    ("user", "not an earlier export"),
    ("other_source", "an earlier export of"),
    ("other_kind", "an earlier analysis of"),
    ("file", "is not a folder"),
])
def test_anything_else_is_refused_and_kept(tmp_path, setup, needle):
  out, src = str(tmp_path / "out"), str(tmp_path / "run")
  if setup == "user":
    _write(out, "notes.txt", "mine")
  elif setup == "other_source":
    fileio.replace_dir(_make("a.txt"), out, kind="export", source=str(tmp_path / "other"))
  elif setup == "other_kind":
    fileio.replace_dir(_make("a.txt"), out, kind="analysis", source=src)
  else:
    _write(str(tmp_path), "out", "a file")
  before = sorted(os.listdir(tmp_path))
  contents = sorted(os.listdir(out)) if os.path.isdir(out) else None
  made = []
  with pytest.raises(fileio.NotReplaceableError, match=needle) as e:
    fileio.replace_dir(lambda d: made.append(d), out, kind="export", source=src)
  assert "nothing was deleted" in str(e.value) and str(e.value).startswith(out)
  assert not made  # refused before any work
  assert sorted(os.listdir(tmp_path)) == before
  if contents is not None:
    assert sorted(os.listdir(out)) == contents


@pytest.mark.parametrize("where", ["source", "parent"])
def test_a_folder_holding_the_source_is_refused_even_if_marked(tmp_path, where):
  run = tmp_path / "sweep" / "run"
  _write(str(run), "run.json")
  out = run if where == "source" else tmp_path / "sweep"
  fileio.mark_output(str(out), "export", str(run))  # even a marker cannot make it replaceable
  with pytest.raises(fileio.NotReplaceableError, match="the input of this export"):
    fileio.replace_dir(_make("a.txt"), str(out), kind="export", source=str(run))
  assert (run / "run.json").exists()


def test_also_replaces_recognises_unmarked_earlier_outputs(tmp_path):
  out = str(tmp_path / "out")
  _write(out, "report.md")
  is_old = lambda d: os.listdir(d) == ["report.md"]  # noqa: E731
  fileio.replace_dir(_make("new.md"), out, kind="analysis", also_replaces=is_old)
  assert "new.md" in os.listdir(out)


def test_a_folder_taken_while_make_ran_is_not_replaced(tmp_path):
  out = str(tmp_path / "out")

  def make(d):
    _write(d, "a.txt")
    _write(out, "notes.txt", "appeared meanwhile")

  with pytest.raises(fileio.NotReplaceableError):
    fileio.replace_dir(make, out, kind="export")
  assert os.listdir(out) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["out"]
