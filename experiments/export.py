r"""Exports one checkpoint of a training run as an HF model directory.

  python experiments/export.py --run_dir=runs/demo --output_dir=runs/demo_hf            # latest
  python experiments/export.py --run_dir=runs/demo --step=120 --output_dir=/tmp/s120 \
      --dtype=bfloat16

The output (config.json, safetensors, the base model's tokenizer files and
generation_config.json) loads with `transformers.AutoModelForCausalLM.from_pretrained` and
`memdyn_jax.models.from_pretrained`; LoRA adapters are merged in. It appears only once
complete. --output_dir must be a new or empty folder, or an earlier export of the same run
(which is replaced); any other existing folder is refused and nothing is deleted. Exit
status: 0 done, 2 bad flags or inputs (one line naming the flag or path).
"""
from __future__ import annotations

import os

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError

PROG = "export.py"
flags.DEFINE_string("run_dir", None, "Training run directory (holds run.json, checkpoints/).")
flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
flags.DEFINE_string("output_dir", None,
                    "HF directory to write: a new or empty folder, or an earlier export of the "
                    "same --run_dir (replaced whole). Any other existing folder is refused; "
                    "nothing is ever deleted.")
flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                  "Stored dtype (default: the parameters' own).")
FLAGS = flags.FLAGS


def run() -> int:
  for name in ("run_dir", "output_dir"):
    if not getattr(FLAGS, name):
      raise UsageError(f"--{name} is required")
  cli.check_output_dir(FLAGS.output_dir)
  from memdyn_jax import fileio
  from memdyn_jax.train import checkpoints
  out = os.path.abspath(FLAGS.output_dir)
  try:
    step = checkpoints.export_hf(FLAGS.run_dir, out, FLAGS.step, dtype=FLAGS.dtype)
  except fileio.NotReplaceableError as e:
    raise UsageError(f"--output_dir: {e}") from None
  except FileNotFoundError as e:
    raise UsageError(f"--run_dir: {e}") from None
  except checkpoints.CheckpointReadError as e:  # names the run, the step and the fix
    raise UsageError(str(e)) from None
  except ValueError as e:  # no such step
    raise UsageError(f"--step: {e}") from None
  print(f"{PROG}: {FLAGS.run_dir} step {step} -> {out}")
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
