"""`FieldError`: a bad value of a named setting, which the binaries report as one line
`--<flag>: <message>` (`memdyn_jax.cli.usage_error`)."""
from __future__ import annotations


class FieldError(ValueError):
  """A bad setting; `field` names it (a config field, usually also the CLI flag)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.message = message
