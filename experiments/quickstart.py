"""Quickstart: a small memorization-dynamics study on the embedded default, offline on a CPU.

  python experiments/quickstart.py --output_dir=/tmp/memdyn_quickstart

Builds (and caches) the embedded base model, fine-tunes it over a learning-rate x epochs
grid plus a half-data run, evaluates the checkpoints, and writes report.md with plots and
CSV tables (`memdyn_jax.studies.quickstart`; the flags are `QuickstartConfig`'s fields).
"""
from __future__ import annotations

import os

from absl import flags

from memdyn_jax import cli
from memdyn_jax.studies.quickstart import QuickstartConfig, QuickstartError

FLAG_NAMES = cli.define_dataclass_flags(QuickstartConfig, help_format="{doc}")
FLAGS = flags.FLAGS


def main() -> int:
  try:
    config = QuickstartConfig(**cli.dataclass_kwargs_from_flags(QuickstartConfig, FLAG_NAMES))
  except QuickstartError as e:
    raise cli.usage_error(e, FLAG_NAMES) from None
  cli.check_output_dir(config.output_dir)
  import jax

  from memdyn_jax.studies import embedded, quickstart
  # Re-runs reuse compiled programs too (train steps, sampling and scoring buckets).
  jax.config.update("jax_compilation_cache_dir",
                    os.path.join(embedded.default_cache_dir(), "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from memdyn_jax.studies import sweep
  try:
    report = quickstart.run_study(config)
  except sweep.SweepStopped as e:
    print(f"quickstart.py: run {e.cell}: {cli.stopped_note(e.signum)}", flush=True)
    return cli.exit_status(e.signum)
  print(f"report written to {report}")
  return 0


if __name__ == "__main__":
  cli.run_binary("quickstart.py", main)
