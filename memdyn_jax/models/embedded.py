"""The shipped embedded base model: where it is, and whether its files are intact.

The model itself (a tiny Llama-architecture LM pre-trained by this project on the
synthetic arithmetic corpus) is package data in `ASSET_DIR`, loaded like any HF checkpoint;
its recipe and builder are `memdyn_jax.studies.embedded`, which also builds other specs into
a cache. This module is what loading needs: the reference name "embedded" resolves here.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

EMBEDDED_NAME = "embedded"
# The shipped base (package data) and its manifest: spec, build command, sha256 of each file,
# pre-training statistics and probe results.
ASSET_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                         "embedded")
MANIFEST_FILE = "manifest.json"
BUILD_COMMAND = "python experiments/build_embedded.py --output_dir=memdyn_jax/assets/embedded"


class EmbeddedBaseError(RuntimeError):
  """The embedded base model is missing, corrupt, or its build cannot continue."""


def shipped_manifest(path: str = ASSET_DIR) -> dict[str, Any]:
  """The manifest of a built base model directory (the shipped one by default)."""
  file = os.path.join(path, MANIFEST_FILE)
  try:
    with open(file) as f:
      return json.load(f)
  except FileNotFoundError:
    raise EmbeddedBaseError(f"{file} is missing: the embedded base is not installed; "
                            f"rebuild it with `{BUILD_COMMAND}`") from None


def task_kwargs(path: str = ASSET_DIR) -> dict[str, Any]:
  """The `synthetic_arith` keyword arguments of the task a built base was pre-trained
  around (its manifest's spec): fine-tuning data of other sizes or values would be out of
  its distribution, and its test split would no longer be the held-out one."""
  spec = shipped_manifest(path)["spec"]
  return {"seed": spec["seed"], "max_steps": spec["task_max_steps"],
          "max_value": spec["task_max_value"]}


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()


def verify(path: str = ASSET_DIR) -> dict[str, Any]:
  """Checks every file listed in a base's manifest against its sha256; returns the manifest."""
  manifest = shipped_manifest(path)
  for name, expected in manifest["sha256"].items():
    file = os.path.join(path, name)
    if not os.path.exists(file):
      raise EmbeddedBaseError(f"{file} is missing (listed in {MANIFEST_FILE})")
    got = file_sha256(file)
    if got != expected:
      raise EmbeddedBaseError(f"{file}: sha256 {got[:12]}... does not match the manifest's "
                              f"{expected[:12]}...; the file is corrupt or was changed")
  return manifest


def shipped_dir() -> str:
  """The shipped base's directory, its files checked against the manifest.

  Raises:
    EmbeddedBaseError: a file is missing or changed (rebuild with `BUILD_COMMAND`).
  """
  verify(ASSET_DIR)
  return ASSET_DIR
