"""memdyn_jax.signals: stop signals at once or after saving, nested, and never swallowed."""
from __future__ import annotations

import gc
import os
import signal
import sys
import time

import pytest

from memdyn_jax import signals


def wait_for_the_signal(seconds: float = 5.0) -> None:
  deadline = time.time() + seconds
  while time.time() < deadline:
    time.sleep(0.01)
  pytest.fail("the stop signal never arrived")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_at_once_raises_one_line_and_restores_the_handlers(signum):
  before = {s: signal.getsignal(s) for s in signals.STOP_SIGNALS}
  with pytest.raises(signals.StopRequested) as info:
    with signals.StopSignals(at_once="before training started: nothing to save"):
      os.kill(os.getpid(), signum)
      wait_for_the_signal()
  assert info.value.signum == signum
  assert str(info.value) == (f"stopped by {signal.Signals(signum).name} before training "
                             "started: nothing to save")
  assert isinstance(info.value, KeyboardInterrupt)  # Ctrl-C semantics for other code
  assert {s: signal.getsignal(s) for s in signals.STOP_SIGNALS} == before


def test_a_graceful_block_inside_a_fired_one_starts_fired():
  """A sweep's SIGTERM while a cell loads its model: the cell's training, entered after,
  must stop after its first step, not train to the end."""
  with signals.StopSignals() as outer:
    os.kill(os.getpid(), signal.SIGTERM)
    assert outer.signum == signal.SIGTERM
    with signals.StopSignals() as inner:
      assert inner.signum == signal.SIGTERM


def test_a_block_entered_inside_a_fired_at_once_one_raises_again():
  """The StopRequested of an at-once block was swallowed somewhere: the work's next block
  raises it, instead of running."""
  outer = signals.StopSignals(at_once="while loading: nothing to save")
  outer.__enter__()
  try:
    outer.signum = signal.SIGINT  # fired; its exception went missing
    with pytest.raises(signals.StopRequested, match="stopped by SIGINT while loading"):
      with signals.StopSignals():
        pytest.fail("entered")
  finally:
    outer.__exit__()


def test_a_stop_swallowed_by_a_gc_callback_is_sent_again(monkeypatch):
  """JAX's garbage-collection callback swallowed the KeyboardInterrupt of a Ctrl-C in the
  first seconds (only printed as unraisable): the run trained to its end. The swallowed
  StopRequested prints nothing and its signal is sent again."""
  reports = []
  monkeypatch.setattr(sys, "unraisablehook", reports.append)
  sent = []

  def callback(phase, info):
    if phase == "start" and not sent:
      sent.append(True)
      os.kill(os.getpid(), signal.SIGINT)  # its handler runs in here, and raises in here

  with pytest.raises(signals.StopRequested):
    with signals.StopSignals(at_once="while loading"):
      gc.callbacks.append(callback)
      try:
        gc.collect()
      finally:
        gc.callbacks.remove(callback)
      wait_for_the_signal()
  assert sent and reports == []
