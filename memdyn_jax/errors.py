"""Error types every stage shares.

`FieldError`: a bad value of a named setting, which the binaries report as one line
`--<flag>: <message>` (`memdyn_jax.cli.usage_error`). `ContextLengthError`: an input that
does not fit the model's context window or a length budget."""
from __future__ import annotations


class FieldError(ValueError):
  """A bad setting; `field` names it (a config field, usually also the CLI flag)."""

  def __init__(self, field: str, message: str):
    super().__init__(f"{field}: {message}")
    self.field = field
    self.message = message


class ContextLengthError(ValueError):
  """An input (prompt, prompt + new tokens, scored sequence) does not fit the model's
  context window or the length budget it was given."""
