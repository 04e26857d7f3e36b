"""Builds the embedded base model: tokenizer, pre-training, export, probes, manifest.

  python experiments/build_embedded.py --output_dir=memdyn_jax/assets/embedded

This is the one command that produced the shipped base (its manifest records the spec, wall
time, tokens seen, sha256 of every file and the probe results). It takes ~50-60 minutes on a
quiet 2-core CPU; pre-training checkpoints every `--save_every_steps` into `--work_dir`, so an
interrupted build re-run with the same flags continues where it stopped. Every `EmbeddedSpec`
field is a flag (default: the shipped spec), e.g. `--corpus_docs=2000` for a quick build.
"""
from __future__ import annotations

import json
import sys

from absl import flags

from memdyn_jax import cli
from memdyn_jax.studies.embedded import EmbeddedSpec

flags.DEFINE_string("output_dir", None, "Directory the built model (HF format + manifest.json) "
                    "is written to: a new or empty folder, or an earlier built base (replaced "
                    "atomically when the build finishes). Any other folder is refused.")
flags.DEFINE_string("work_dir", None, "Tokenizer, initial weights and pre-training checkpoints "
                    "of the build in progress (default: <output_dir>.build); removed on success. "
                    "A new or empty folder, or an interrupted build's (it holds spec.json).")
flags.DEFINE_integer("save_every_steps", 250, "Pre-training checkpoint interval (steps).")
flags.DEFINE_integer("probe_examples", 256, "Items per probe (arithmetic, copying, accuracy).")
FLAG_NAMES = cli.define_dataclass_flags(EmbeddedSpec, help_format="{doc} (default {default!r})")
FLAGS = flags.FLAGS


def main() -> int:
  if not FLAGS.output_dir:
    raise cli.UsageError("--output_dir: required")
  cli.check_output_dir(FLAGS.output_dir)
  if FLAGS.work_dir:
    cli.check_output_dir(FLAGS.work_dir, "work_dir")
  spec = EmbeddedSpec(**cli.dataclass_kwargs_from_flags(EmbeddedSpec, FLAG_NAMES))
  from memdyn_jax import fileio
  from memdyn_jax.studies import embedded
  command = " ".join(["python", "experiments/build_embedded.py", *sys.argv[1:]])
  try:
    manifest = embedded.build(spec, FLAGS.output_dir, work_dir=FLAGS.work_dir,
                              save_every_steps=FLAGS.save_every_steps,
                              probe_examples=FLAGS.probe_examples, command=command)
  except fileio.NotReplaceableError as e:
    raise cli.UsageError(f"--output_dir: {e}") from None
  except embedded.EmbeddedBaseError as e:
    raise cli.UsageError(str(e)) from None
  print(json.dumps({k: manifest[k] for k in ("pretrain_steps", "tokens_seen", "final_loss",
                                             "probes")}, indent=2))
  print(f"embedded base written to {FLAGS.output_dir}")
  return 0


if __name__ == "__main__":
  cli.run_binary("build_embedded.py", main)
