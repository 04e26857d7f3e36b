"""Hugging Face checkpoints in and out: config.json + safetensors, no torch.

One regex key map per family (as Tunix does), declared in the family's module
(`registry.Family.key_rules`): each entry ties an HF tensor name (with `{i}` for the layer
index, `{e}` for the expert) to one of our parameter paths and a layout transform, or to rows
of a fused HF tensor (split on load, concatenated on save); a read-only entry is another
layout the loader accepts in its place (HF's fused experts); the code here is generic.
The generic loader streams tensor by tensor straight into each parameter's target
sharding: a device shard is assembled from memory-mapped safetensors slices, so host RAM
holds one HF tensor and one stacked shard at a time, never the model.
"""
from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import struct
from typing import Any, Iterable, Sequence

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from memdyn_jax import fileio, hub
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import registry
from memdyn_jax.models.config import ModelConfig
from memdyn_jax.models.registry import BATCHED_LINEAR, FLAT, LINEAR, KeyRule

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- key maps


def key_rules(cfg: ModelConfig) -> list[KeyRule]:
  """The key map of `cfg`'s family (`Family.key_rules`)."""
  return list(registry.get_family(cfg).key_rules(cfg))


# HF tensors that carry no parameters of any family (RoPE frequency buffers saved by old
# checkpoints); each family adds its own (`Family.ignored_keys`). An lm_head duplicated next
# to tied embeddings is skipped too (`from_pretrained`).
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


def _ignored(cfg: ModelConfig) -> tuple[re.Pattern, ...]:
  return _IGNORED + tuple(re.compile(p) for p in registry.get_family(cfg).ignored_keys)


# ----------------------------------------------------------------------------- safetensors

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
              "BOOL": np.bool_}
_ST_NAMES = {np.dtype(v): k for k, v in _ST_DTYPES.items()}


class SafetensorsFile:
  """Memory-mapped safetensors file: `get(name)` returns a read-only numpy view, no copy."""

  def __init__(self, path: str):
    self.path = path
    try:
      with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    except (struct.error, json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f"{path}: not a valid safetensors file ({e})") from e
    header.pop("__metadata__", None)
    self.header = header
    self._offset = 8 + n
    self._mmap = np.memmap(path, dtype=np.uint8, mode="r")

  def keys(self) -> list[str]:
    return list(self.header)

  def get(self, name: str) -> np.ndarray:
    info = self.header[name]
    if info["dtype"] not in _ST_DTYPES:
      raise ValueError(f"{self.path}: tensor {name} has unsupported dtype {info['dtype']}")
    start, end = info["data_offsets"]
    if self._offset + end > self._mmap.size:
      raise ValueError(f"{self.path}: tensor {name} extends past the end of the file (truncated?)")
    raw = self._mmap[self._offset + start:self._offset + end]
    return raw.view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])


def write_safetensors(path: str, tensors: Iterable[tuple[str, np.ndarray]] | None = None, *,
                      specs: Sequence[tuple[str, tuple[int, ...], np.dtype]] | None = None,
                      produce=None, metadata: dict[str, str] | None = None) -> None:
  """Writes a safetensors file. Either `tensors` (materialised) or `specs` + `produce(name)`
  (streamed: the header is known up front, each tensor is produced only when written).
  Written atomically (`fileio.atomic_open`): a crash never leaves a half file at `path`."""
  if tensors is not None:
    tensors = list(tensors)
    specs = [(n, tuple(a.shape), a.dtype) for n, a in tensors]
    by_name = dict(tensors)
    produce = by_name.__getitem__
  header: dict[str, Any] = {"__metadata__": metadata or {"format": "pt"}}
  offset = 0
  for name, shape, dtype in specs:
    size = int(math.prod(shape)) * np.dtype(dtype).itemsize
    header[name] = {"dtype": _ST_NAMES[np.dtype(dtype)], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  with fileio.atomic_open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for name, shape, dtype in specs:
      arr = np.ascontiguousarray(produce(name), dtype=dtype)
      if tuple(arr.shape) != tuple(shape):
        raise ValueError(f"tensor {name}: produced shape {arr.shape}, declared {shape}")
      f.write(arr.tobytes())


class CheckpointReader:
  """All tensors of an HF checkpoint directory (single file or sharded with an index)."""

  def __init__(self, directory: str):
    index_path = os.path.join(directory, "model.safetensors.index.json")
    single = os.path.join(directory, "model.safetensors")
    if os.path.exists(index_path):
      with open(index_path) as f:
        weight_map = json.load(f)["weight_map"]
      files = sorted(set(weight_map.values()))
      for fname in files:
        if not os.path.exists(os.path.join(directory, fname)):
          raise FileNotFoundError(f"{index_path} lists shard {fname!r}, which is missing from "
                                  f"{directory}")
    elif os.path.exists(single):
      files = ["model.safetensors"]
      weight_map = None
    else:
      raise FileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {directory}")
    self.files = {f: SafetensorsFile(os.path.join(directory, f)) for f in files}
    self.location: dict[str, str] = {}
    for fname, st in self.files.items():
      for k in st.keys():
        self.location[k] = fname
    if weight_map is not None:
      missing = [k for k in weight_map if k not in self.location]
      if missing:
        raise ValueError(f"{index_path} lists tensors absent from their shards: {missing[:5]}")

  def keys(self) -> list[str]:
    return list(self.location)

  def get(self, name: str) -> np.ndarray:
    return self.files[self.location[name]].get(name)


# ----------------------------------------------------------------------------- layouts


def _to_ours(hf: np.ndarray, rule: KeyRule, layer_shape: tuple[int, ...],
             name: str | None = None) -> np.ndarray:
  if rule.fused:  # our part of a fused tensor: a view of its rows
    axis = rule.fused_axis % hf.ndim
    if hf.shape[axis] != sum(rule.fused):
      raise ValueError(f"tensor {name or rule.hf}: {hf.shape[axis]} rows, but the config fuses "
                       f"{' + '.join(map(str, rule.fused))} there (config mismatch?)")
    hf = hf[(slice(None),) * axis + (rule.rows,)]
  if rule.transform == LINEAR:
    hf = hf.T
  elif rule.transform == BATCHED_LINEAR:
    hf = np.swapaxes(hf, -1, -2)
  if tuple(hf.shape) != layer_shape and math.prod(hf.shape) != math.prod(layer_shape):
    raise ValueError(f"tensor {rule.hf}: shape {hf.shape} does not fit parameter {rule.ours} "
                     f"{layer_shape} (config mismatch?)")
  return hf.reshape(layer_shape)


def _to_hf(ours: np.ndarray, rule: KeyRule) -> np.ndarray:
  if rule.read_only:
    raise ValueError(f"key rule for {rule.hf} is a layout read, never written")
  if rule.transform == LINEAR:
    n_in = rule.n_in
    return ours.reshape(math.prod(ours.shape[:n_in]), -1).T
  if rule.transform == FLAT:
    return ours.reshape(-1)
  return ours


def _hf_shape(layer_shape: tuple[int, ...], rule: KeyRule) -> tuple[int, ...]:
  if rule.transform == LINEAR:
    return (math.prod(layer_shape[rule.n_in:]), math.prod(layer_shape[:rule.n_in]))
  if rule.transform == FLAT:
    return (math.prod(layer_shape),)
  return layer_shape


# ----------------------------------------------------------------------------- load


def resolve_checkpoint_dir(path_or_hub_id: str) -> str:
  """A local directory as is; a `.gguf` file converted once (cached); else a hub snapshot
  (honours the HF cache and `HF_HUB_OFFLINE`).

  Raises:
    FileNotFoundError: a missing path or GGUF file; `hub.HubUnreachableError` for a Hub id
      the cache does not hold where the Hub cannot be reached (no retries).
  """
  if os.path.isdir(path_or_hub_id):
    return path_or_hub_id
  if path_or_hub_id.endswith(".gguf"):
    if not os.path.exists(path_or_hub_id):
      raise FileNotFoundError(f"GGUF file {path_or_hub_id} does not exist")
    from memdyn_jax.models import gguf  # needs torch; only for this path

    return gguf.convert_gguf_to_hf(path_or_hub_id)
  if os.path.exists(path_or_hub_id) or path_or_hub_id.startswith((".", "/")):
    raise FileNotFoundError(f"{path_or_hub_id} is not a checkpoint directory")
  import huggingface_hub

  with hub.offline_unless_reachable() as offline:
    try:
      return huggingface_hub.snapshot_download(
          path_or_hub_id,
          allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"])
    except (OSError, ValueError) as e:
      if offline is None:
        raise
      raise _unreachable(path_or_hub_id, offline, "model directory (config.json, "
                         "safetensors, tokenizer files)") from e


def _unreachable(hub_id: str, reason: str, local: str) -> hub.HubUnreachableError:
  return hub.HubUnreachableError(
      f"{hub_id!r} is read as a Hugging Face Hub id, and {reason}; the local cache (HF_HOME) "
      f"does not hold it either: pass a local {local} instead")


def load_config(directory: str) -> ModelConfig:
  path = os.path.join(directory, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"no config.json in {directory}")
  with open(path) as f:
    try:
      raw = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f"{path}: malformed JSON ({e})") from e
  return registry.from_hf_config(raw)


def _index_tuple(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[tuple[int, int], ...]:
  return tuple(s.indices(n)[:2] for s, n in zip(index, shape))


def from_pretrained(path_or_hub_id: str, *, dtype=jnp.float32, param_dtype=None, mesh=None,
                    rules=sharding_lib.DEFAULT_RULES, remat: str = "none",
                    attention_impl: str = "auto"):
  """Loads an HF causal-LM checkpoint into our NNX model. Returns `(model, config)`.

  Args:
    path_or_hub_id: a local HF directory, a `.gguf` file, or a hub id.
    dtype: activation/compute dtype. param_dtype: parameter dtype (default = dtype).
    mesh: place parameters by the logical-axis `rules` on this mesh (default: first device).
    remat: rematerialisation policy of the blocks (`transformer.REMAT_POLICIES`).
    attention_impl: "auto" (what the chip the program is compiled for runs best: splash on
      TPU, cuDNN on GPU, the exact einsums on CPU; `layers.choose_attention`), "reference"
      (the exact einsum path everywhere), "splash", or a `jax.nn.dot_product_attention`
      implementation ("xla", "cudnn").
  """
  directory = resolve_checkpoint_dir(path_or_hub_id)
  cfg = load_config(directory)
  param_dtype = param_dtype or dtype
  abstract = registry.abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                                     attention_impl=attention_impl)
  graphdef, abs_state = nnx.split(abstract)
  reader = CheckpointReader(directory)

  # Per rule, its HF tensors by index (layer, expert: `KeyRule.indices`); every HF tensor
  # must be claimed by a rule or ignored.
  key_map = key_rules(cfg)
  rules_of_path: dict[str, list[KeyRule]] = {}
  for rule in key_map:
    rules_of_path.setdefault(rule.ours, []).append(rule)
  claimed: dict[KeyRule, dict[tuple[int, ...], str]] = {rule: {} for rule in key_map}
  patterns = [(r, r.pattern) for r in key_map]
  ignored = _ignored(cfg)
  unexpected = []
  for name in reader.keys():
    matched = False
    for rule, pat in patterns:  # a fused tensor is claimed by the rule of each of its parts
      m = pat.match(name)
      if m:
        claimed[rule][tuple(int(m.group(n)) for n in rule.indices)] = name
        matched = True
    if not matched:
      if name == "lm_head.weight" and cfg.tie_word_embeddings:
        continue
      if not any(p.match(name) for p in ignored):
        unexpected.append(name)
  if unexpected:
    raise ValueError(f"{directory}: tensors with no place in a {cfg.model_type} model: {unexpected[:8]}")

  device = jax.devices()[0]
  flat = nnx.to_flat_state(abs_state)
  loaded = []
  for path, var in flat:
    key = ".".join(map(str, path))
    if key not in rules_of_path:
      raise ValueError(f"parameter {key} has no HF key rule (model/key-map mismatch)")
    # The written layout, unless the checkpoint holds none of it but another one it reads.
    rule = next(r for r in rules_of_path[key] if not r.read_only)
    if not claimed[rule]:
      rule = next((r for r in rules_of_path[key] if r.read_only and claimed[r]), rule)
    shape = tuple(var.shape)
    n_index = len(rule.indices)  # our leading axes the HF names index
    layer_shape = shape[n_index:]  # the shape of one HF tensor's part, in our layout
    names = claimed[rule]
    expected = itertools.product(*(range(n) for n in shape[:n_index]))
    missing = [rule.name(i) for i in expected if i not in names]
    if missing:
      raise ValueError(f"{directory}: checkpoint lacks tensor(s) {missing[:4]} for {key}")
    np_dtype = np.dtype(param_dtype)
    if mesh is not None:
      target = sharding_lib.param_sharding(var, mesh, rules)
    else:
      target = jax.sharding.SingleDeviceSharding(device)
    shard_cache: dict[Any, np.ndarray] = {}

    def read_shard(index, rule=rule, names=names, layer_shape=layer_shape, shape=shape,
                   n_index=n_index, np_dtype=np_dtype, shard_cache=shard_cache):
      idx = _index_tuple(index, shape)
      if idx in shard_cache:
        return shard_cache[idx]
      lead, rest = idx[:n_index], tuple(slice(a, b) for a, b in idx[n_index:])
      grid = list(itertools.product(*(range(a, b) for a, b in lead)))  # [()] without indices
      parts = [_to_ours(reader.get(names[i]), rule, layer_shape, names[i])[rest].astype(np_dtype)
               for i in grid]
      out = (np.stack(parts).reshape(tuple(b - a for a, b in lead) + parts[0].shape) if lead
             else parts[0])  # no copy of an unindexed tensor (an embedding) beyond astype's
      shard_cache[idx] = out
      return out

    arr = jax.make_array_from_callback(shape, target, read_shard)
    shard_cache.clear()
    loaded.append((path, var.replace(arr)))
  state = nnx.from_flat_state(loaded)
  model = nnx.merge(graphdef, state)
  return model, cfg


# ----------------------------------------------------------------------------- save


def _gather(x: jax.Array) -> np.ndarray:
  if jax.process_count() > 1 and not x.is_fully_addressable:
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def save_pretrained(model, config: ModelConfig, out_dir: str, *, max_shard_bytes: int = 5 * 2**30,
                    dtype=None) -> None:
  """Writes `config.json` + safetensors (sharded with an index past `max_shard_bytes`)
  that `transformers.AutoModelForCausalLM.from_pretrained` loads. Parameters are gathered
  and written one at a time (the parts of a fused HF tensor together); only process 0
  writes."""
  state = nnx.state(model, nnx.Param)
  flat = {".".join(map(str, k)): v for k, v in nnx.to_flat_state(state)}
  rules = [r for r in key_rules(config) if not r.read_only]
  out_dtype = np.dtype(dtype) if dtype is not None else None
  for rule in rules:
    if rule.ours not in flat:
      raise ValueError(f"model has no parameter {rule.ours} for HF tensor {rule.hf}")
  # HF tensor -> the rules of its parts: one each, or every part of a fused tensor in order.
  parts_of: dict[str, list[KeyRule]] = {}
  for rule in rules:
    parts_of.setdefault(rule.hf, []).append(rule)
  specs = []  # (hf name, hf shape, dtype, [(param key, rule, index) per part])
  for hf_name, parts in parts_of.items():
    parts.sort(key=lambda r: r.part)
    fused = parts[0].fused
    if [r.part for r in parts] != list(range(len(fused) or 1)):
      raise ValueError(f"HF tensor {hf_name}: key rules for parts {[r.part for r in parts]} "
                       f"of a tensor fusing {len(fused) or 1}")
    hf_shapes = []
    for r in parts:
      shape = tuple(flat[r.ours][...].shape)
      hf_shapes.append(_hf_shape(shape[len(r.indices):], r))
      if fused and hf_shapes[-1][0] != fused[r.part]:
        raise ValueError(f"parameter {r.ours} {shape} is not the {fused[r.part]} rows of "
                         f"{hf_name} its key rule says (model/key-map mismatch)")
    arr_dtype = out_dtype or np.dtype(flat[parts[0].ours][...].dtype)
    hf_shape = (sum(fused),) + hf_shapes[0][1:] if fused else hf_shapes[0]
    lead = flat[parts[0].ours][...].shape[:len(parts[0].indices)]
    for index in itertools.product(*(range(n) for n in lead)):  # [()] without indices
      specs.append((parts[0].name(index), hf_shape, arr_dtype,
                    [(r.ours, r, index) for r in parts]))

  # Group tensors of one parameter together so each is gathered once.
  files: list[list[tuple]] = [[]]
  size = 0
  for spec in specs:
    nbytes = math.prod(spec[1]) * spec[2].itemsize
    if files[-1] and size + nbytes > max_shard_bytes:
      files.append([])
      size = 0
    files[-1].append(spec)
    size += nbytes
  is_writer = jax.process_index() == 0
  if is_writer:
    os.makedirs(out_dir, exist_ok=True)
  names = (["model.safetensors"] if len(files) == 1 else
           [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
  cache: dict[str, np.ndarray] = {}
  for fname, group in zip(names, files):
    by_name = {s[0]: s for s in group}

    def produce(name, by_name=by_name):
      _, _, arr_dtype, sources = by_name[name]
      keys = [key for key, _, _ in sources]
      if set(keys) != set(cache):  # on the host: the parameters of one HF tensor at a time
        held = {key: cache[key] if key in cache else _gather(flat[key][...]) for key in keys}
        cache.clear()
        cache.update(held)
      tensors = [_to_hf(cache[key][index], rule) for key, rule, index in sources]
      hf = tensors[0] if len(tensors) == 1 else np.concatenate(tensors, axis=0)
      return hf.astype(arr_dtype)

    if is_writer:
      write_safetensors(os.path.join(out_dir, fname), specs=[(s[0], s[1], s[2]) for s in group],
                        produce=produce)
    else:  # other processes take part in the gathers in the same order
      for s in group:
        produce(s[0])
  if not is_writer:
    return
  if len(files) > 1:
    index = {"metadata": {"total_size": int(sum(math.prod(s[1]) * s[2].itemsize for s in specs))},
             "weight_map": {s[0]: fname for fname, g in zip(names, files) for s in g}}
    with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as f:
      json.dump(index, f, indent=2)
  hf_config = registry.to_hf_config(config, np.dtype(out_dtype or specs[0][2]))
  with open(os.path.join(out_dir, "config.json"), "w") as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)


# ----------------------------------------------------------------------------- tokenizer


def load_tokenizer(path_or_hub_id: str, *, padding_side: str = "left"):
  """`AutoTokenizer` with a pad token (EOS if it has none) and left padding for generation."""
  import transformers

  directory = path_or_hub_id
  if not os.path.isdir(path_or_hub_id) and path_or_hub_id.endswith(".gguf"):
    directory = resolve_checkpoint_dir(path_or_hub_id)
  if os.path.isdir(directory):
    tok = transformers.AutoTokenizer.from_pretrained(directory)
  else:  # a Hub id: transformers would retry for a minute without network
    with hub.offline_unless_reachable() as offline:
      try:
        tok = transformers.AutoTokenizer.from_pretrained(directory)
      except OSError as e:
        if offline is None:
          raise
        raise _unreachable(directory, offline, "tokenizer directory") from e
  if tok.pad_token is None:
    if tok.eos_token is None:
      raise ValueError(f"tokenizer at {path_or_hub_id} has neither a pad nor an EOS token")
    tok.pad_token = tok.eos_token
  tok.padding_side = padding_side
  return tok
