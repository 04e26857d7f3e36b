"""Shared plumbing of the absl binaries in `experiments/`: every user error (bad flag,
bad input) is one line `PROG: error: ...` on stderr and exit status 2."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn

from absl import app, flags, logging


class UsageError(Exception):
  """A one-line user error."""


def fail(prog: str, message: str) -> NoReturn:
  print(f"{prog}: error: {message}", file=sys.stderr)
  sys.exit(2)


def run_binary(prog: str, run: Callable[[], int]) -> None:
  """`app.run` with one-line errors for flag parsing and `UsageError`; `run()` is the
  binary's body and returns its exit status."""

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, str(e).splitlines()[0])

  def main(argv):
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    if len(argv) > 1:
      fail(prog, f"unexpected arguments {argv[1:]}")
    try:
      sys.exit(run())
    except UsageError as e:
      fail(prog, str(e))

  app.run(main, flags_parser=parse_flags)
