"""Stop signals: SIGTERM (preemption, a cluster's time limit) and SIGINT (Ctrl-C), without JAX.

`StopSignals` has two modes, and nests (the innermost holds):

  * graceful, `StopSignals(on_signal=...)`: the signal sets a flag that a loop checks between
    units of work, so it saves and stops; a second SIGINT stops at once (`StopRequested`).
  * at once, `StopSignals(at_once=...)`: the signal raises `StopRequested` where it arrives,
    as Python's KeyboardInterrupt does; for stretches with nothing to save (a binary's
    start-up: `cli.run_binary` holds one from the start).

Python may swallow the exception a handler raises: one raised inside a garbage-collection
callback (JAX registers one) is only reported as unraisable, and a Ctrl-C in a binary's
first seconds was lost that way (the run trained to its end). An at-once block therefore
drops that report and sends the signal again, and a fired block is remembered: a block
entered inside a fired graceful one starts fired, one entered inside a fired at-once one
raises its `StopRequested` again.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class StopRequested(KeyboardInterrupt):
  """A stop signal acted on at once: the work in progress is not saved (what was written
  before stays: every writer here writes atomically). A KeyboardInterrupt, so code that
  treats Ctrl-C specially treats it alike. str(): the one-line account a binary prints.

  Attributes:
    signum: the signal.
  """

  def __init__(self, signum: int, message: str):
    super().__init__(message)
    self.signum = int(signum)


def signal_name(signum: int) -> str:
  return signal.Signals(signum).name


def _resend_swallowed_stops() -> None:
  """Installs (once) an unraisable hook that, for a swallowed StopRequested, prints nothing
  and sends its signal again from a helper thread (the handler then runs in the main
  thread's own code); every other report goes to the hook that was there."""
  previous = sys.unraisablehook
  if getattr(previous, "_memdyn_resends_stops", False):
    return

  def hook(unraisable):
    if isinstance(unraisable.exc_value, StopRequested):
      threading.Timer(0.01, os.kill, (os.getpid(), unraisable.exc_value.signum)).start()
    else:
      previous(unraisable)

  hook._memdyn_resends_stops = True
  sys.unraisablehook = hook


class StopSignals:
  """Turns SIGTERM and SIGINT into a flag (graceful) or a `StopRequested` (at once), while
  the block runs; installed on the main thread only (elsewhere a no-op). See the module.

  Args:
    on_signal: graceful mode: what the work does now, logged with the signal's name
      ("SIGTERM received: <on_signal>").
    at_once: if given, the at-once mode: the account that follows "stopped by <SIGNAL>" in
      the StopRequested (e.g. "before training started: nothing to save; ...").
  """

  def __init__(self, on_signal: str = "will checkpoint and stop after the current step", *,
               at_once: str | None = None):
    self.on_signal = on_signal
    self.at_once = at_once
    self.signum: int | None = None
    self._old = {}

  @property
  def fired(self) -> bool:
    return self.signum is not None

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      return self
    if self.at_once is not None:
      _resend_swallowed_stops()
    self._old = {s: signal.signal(s, self._handle) for s in STOP_SIGNALS}
    outer = getattr(self._old[signal.SIGINT], "__self__", None)
    if isinstance(outer, StopSignals) and outer.fired:  # a signal the work has not answered
      if outer.at_once is not None:
        self.__exit__()
        raise outer.stop_requested()
      self.signum = outer.signum
    return self

  def stop_requested(self) -> StopRequested:
    """The StopRequested of the signal received (at-once mode)."""
    return StopRequested(self.signum, f"stopped by {signal_name(self.signum)} {self.at_once}")

  def _handle(self, signum, frame):
    if self.at_once is not None:
      self.signum = signum
      raise self.stop_requested()
    if signum == signal.SIGINT and self.signum == signal.SIGINT:
      raise StopRequested(signum, "stopped by a second SIGINT (Ctrl-C) without saving the work "
                          "in progress; re-run the same command to continue")
    log.warning("%s received: %s%s", signal_name(signum), self.on_signal,
                " (Ctrl-C again stops at once, without saving)" if signum == signal.SIGINT
                else "")
    self.signum = signum

  def __exit__(self, *exc):
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}
