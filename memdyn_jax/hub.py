"""The Hugging Face Hub, reachable or not: on a machine without network a Hub id fails at
once, in one line, instead of after huggingface_hub's retries (about 30 s for a dataset,
a minute for a tokenizer).

`offline_unless_reachable()` probes the Hub's endpoint once per process (one HEAD request,
`PROBE_TIMEOUT_S` at most); where it cannot be reached, the block runs in the libraries'
offline mode (what `HF_HUB_OFFLINE=1` does), so what the local cache holds still loads and
anything else fails without a network call. A user's own `HF_HUB_OFFLINE=1` is honoured
without a probe.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator

PROBE_TIMEOUT_S = 5.0


class HubUnreachableError(FileNotFoundError):
  """A Hub id that the local cache does not hold, asked for where the Hub is not used."""


_probed: dict[str, str | None] = {}  # endpoint -> why it cannot be reached (None: it can)


def endpoint() -> str:
  """The Hub endpoint huggingface_hub uses (`HF_ENDPOINT`, default https://huggingface.co)."""
  from huggingface_hub import constants
  return constants.ENDPOINT


def offline_reason() -> str | None:
  """Why the Hub is not used from this process, or None when it is: offline mode was asked
  for (`HF_HUB_OFFLINE`), or the endpoint did not answer the probe (asked once per
  process and endpoint)."""
  from huggingface_hub import constants
  if constants.HF_HUB_OFFLINE:
    return "offline mode is on (HF_HUB_OFFLINE)"
  url = endpoint()
  if url not in _probed:
    from huggingface_hub.utils import get_session
    try:  # any answer, even an error status, means the Hub can be reached
      get_session().head(url, timeout=PROBE_TIMEOUT_S)
      _probed[url] = None
    # The session's transport errors (connection refused, no DNS, timeout) are not one
    # public class across huggingface_hub versions: any failure of the probe means the Hub
    # cannot be used from here.
    except Exception as e:  # noqa: BLE001
      _probed[url] = f"the Hub ({url}) cannot be reached ({type(e).__name__}: {e})"
  return _probed[url]


@contextlib.contextmanager
def offline_unless_reachable() -> Iterator[str | None]:
  """Runs the block in huggingface_hub's (and datasets', where imported) offline mode when
  `offline_reason()` says the Hub is not used; yields that reason, or None when the Hub is
  used normally. The libraries' settings are restored afterwards."""
  reason = offline_reason()
  if reason is None:
    yield None
    return
  from huggingface_hub import constants
  # Both libraries read the setting at call time from these module attributes (copied
  # from the environment at import, so setting HF_HUB_OFFLINE now would change nothing).
  targets = [constants] + [m for m in (sys.modules.get("datasets.config"),) if m is not None]
  saved = [t.HF_HUB_OFFLINE for t in targets]
  for t in targets:
    t.HF_HUB_OFFLINE = True
  try:
    yield reason
  finally:
    for t, value in zip(targets, saved):
      t.HF_HUB_OFFLINE = value
