"""The chips a plan targets: memory and peak bf16 throughput, and for TPUs the slice names
users book (`v5p-8`, `v5e-16`, `v6e-256`) with the deviceless topologies the TPU compiler
(libtpu) compiles for on a CPU machine; for GPUs (`h100-8`) the device description XLA:GPU
compiles for without a GPU (the JAX CUDA plugin installed, `JAX_PLATFORMS=cpu`).

A TPU slice name counts TensorCores for v4 and v5p (two per chip: `v5p-8` is 4 chips in a
2x2x1 torus) and chips for v5e and v6e (`v5e-16` is a 4x4 grid), as Google Cloud names them.
`target_devices` returns the slice's compile-only devices (`jax.experimental.topologies`):
programs compile for them through XLA:TPU, Mosaic kernels included, but hold no data.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import math
import os
import re
from typing import Any

from memdyn_jax.errors import FieldError

GB = 10**9


class TargetError(FieldError):
  """An unknown target, a slice size the chip does not come in, a mesh that does not fit the
  slice, or no TPU compiler installed; `field` names the setting."""


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator chip.

  Attributes:
    name: "v4", "v5e", "v5p", "v6e", "h100", "h200".
    platform: "tpu" or "gpu".
    hbm_bytes: memory per chip as the vendor quotes it (decimal GB).
    peak_bf16_flops: published dense bf16 matmul peak per chip (FLOP/s), MFU's denominator.
    cores_per_chip: TensorCores a slice name counts per chip (v4, v5p: 2).
    topology_dims: 3 (a torus: v4, v5p) or 2 (v5e, v6e); 0 = no TPU topology.
  """
  name: str
  platform: str
  hbm_bytes: int
  peak_bf16_flops: float
  cores_per_chip: int = 1
  topology_dims: int = 0


# Published figures: Cloud TPU system architecture pages (v4 275 TFLOP/s and 32 GiB HBM;
# v5e 197 and 16 GB; v5p 459 and 95 GB; v6e 918 and 32 GB) and NVIDIA's H100/H200 SXM data
# sheets (989 TFLOP/s dense bf16; 80 and 141 GB).
CHIPS: dict[str, Chip] = {c.name: c for c in [
    Chip("v4", "tpu", 32 * 2**30, 275e12, cores_per_chip=2, topology_dims=3),
    Chip("v5e", "tpu", 16 * GB, 197e12, topology_dims=2),
    Chip("v5p", "tpu", 95 * GB, 459e12, cores_per_chip=2, topology_dims=3),
    Chip("v6e", "tpu", 32 * GB, 918e12, topology_dims=2),
    Chip("h100", "gpu", 80 * GB, 989e12),
    Chip("h200", "gpu", 141 * GB, 989e12),
]}

# Per-chip memory by chip name: what fit checks read (a plain dict, so a caller may add a
# hypothetical chip).
ACCELERATORS: dict[str, int] = {name: chip.hbm_bytes for name, chip in CHIPS.items()}

# The largest slice planned; TPU pods go further, a plan of one program per chip need not.
MAX_CHIPS = 4096
_TARGET = re.compile(r"^(v4|v5e|v5p|v6e|v5litepod|h100|h200)-(\d+)$")


@dataclasses.dataclass(frozen=True)
class Target:
  """A slice of `num_chips` chips of one kind (`parse_target("v5p-8")`)."""
  chip: Chip
  num_chips: int

  @property
  def name(self) -> str:
    return f"{self.chip.name}-{self.num_chips * self.chip.cores_per_chip}"

  @property
  def platform(self) -> str:
    return self.chip.platform

  @property
  def topology(self) -> str | None:
    """The TPU compiler's topology name ("v5p:2x2x1"), None for a GPU target."""
    if not self.chip.topology_dims:
      return None
    return f"{self.chip.name}:" + "x".join(map(str, topology_shape(self.chip, self.num_chips)))


def slice_sizes(chip: Chip, up_to: int = MAX_CHIPS) -> list[int]:
  """The chip counts `chip` comes in, ascending, up to `up_to`: powers of two from 1 (v5e,
  v6e: 1, 4, 8, 16, ...; the 2-chip shape is no slice) or from 4 (v4, v5p tori); any count
  for a GPU (a node of 8 and multiples, or fewer)."""
  if not chip.topology_dims:
    return list(range(1, up_to + 1))
  counts = [n for n in (2**k for k in range(13)) if n <= up_to]
  return [n for n in counts if n != 2] if chip.topology_dims == 2 else [n for n in counts if n >= 4]


def topology_shape(chip: Chip, num_chips: int) -> tuple[int, ...]:
  """The chip grid of a slice: 2-D for v5e/v6e (4 -> 2x2, 8 -> 2x4, 16 -> 4x4, ...), 3-D for
  v4/v5p (4 -> 2x2x1, 8 -> 2x2x2, 16 -> 2x2x4, 32 -> 2x4x4, 64 -> 4x4x4, ...).

  Raises:
    TargetError: `num_chips` is not a slice size of the chip.
  """
  if num_chips not in slice_sizes(chip, max(num_chips, 1)) or not chip.topology_dims:
    raise TargetError("target", f"{chip.name} does not come in slices of {num_chips} chips; "
                      f"slice sizes: {_named_sizes(chip)}")
  if num_chips == 1:
    return (1, 1)
  shape = [2, 2] if chip.topology_dims == 2 else [2, 2, 1]
  axis = 1 if chip.topology_dims == 2 else 2
  while math.prod(shape) < num_chips:  # double the shortest axis, the last of ties
    shape[axis] *= 2
    axis = min(range(len(shape)), key=lambda i: (shape[i], -i))
  return tuple(sorted(shape)) if chip.topology_dims == 2 else tuple(shape)


def _named_sizes(chip: Chip, up_to: int = 256) -> str:
  return ", ".join(f"{chip.name}-{n * chip.cores_per_chip}" for n in slice_sizes(chip, up_to))


def parse_target(text: str) -> Target:
  """`"v5p-8"` (4 chips), `"v5e-16"`, `"v6e-256"`, `"v4-8"`, `"v5litepod-16"` (= v5e-16),
  `"h100-8"`: the slice as Cloud TPU (or a GPU cluster) names it.

  Raises:
    TargetError: not such a name, or a size the chip does not come in.
  """
  m = _TARGET.match(text.strip().lower())
  if not m:
    raise TargetError("target", f"{text!r} is not a target; expected CHIP-N with CHIP one of "
                      f"{sorted(CHIPS)} (e.g. v5p-8, v5e-16, v6e-256, h100-8)")
  chip = CHIPS["v5e" if m.group(1) == "v5litepod" else m.group(1)]
  count = int(m.group(2))
  if count % chip.cores_per_chip or count < 1:
    raise TargetError("target", f"{text}: {chip.name} slices count {chip.cores_per_chip} "
                      f"TensorCores per chip; sizes: {_named_sizes(chip)}")
  target = Target(chip, count // chip.cores_per_chip)
  if chip.topology_dims:
    topology_shape(chip, target.num_chips)  # a size the chip comes in
  return target


# XLA:GPU's description of each GPU: what a deviceless compile takes in place of querying
# the device (NVIDIA's data sheets: 132 SMs at 1.98 GHz boost, 50 MB L2; HBM bandwidth and
# the memory CUDA reports).
_GPU_SPECS: dict[str, dict[str, Any]] = {
    "h100": dict(memory_bandwidth=3352320000000, device_memory_size=84929347584,
                 description="NVIDIA H100 80GB HBM3"),
    "h200": dict(memory_bandwidth=4800000000000, device_memory_size=150754066432,
                 description="NVIDIA H200"),
}
_GPU_TARGET_CONFIG = """gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: 132
  fpus_per_core: 128 block_dim_limit_x: 2147483647 block_dim_limit_y: 65535
  block_dim_limit_z: 65535 memory_bandwidth: {memory_bandwidth} l2_cache_size: 52428800
  clock_rate_ghz: 1.98 device_memory_size: {device_memory_size}
  shared_memory_per_block_optin: 232448 cuda_compute_capability {{ major: 9 }}
  registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 9 minor: 7 }}
runtime_version {{ major: 12 minor: 8 }}
device_description_str: "{description}"
"""
GPUS_PER_HOST = 8


def gpu_target_config(chip: Chip) -> str:
  """XLA:GPU's TargetConfig (text proto) of a GPU chip, for a deviceless compile."""
  return _GPU_TARGET_CONFIG.format(**_GPU_SPECS[chip.name])


def gpu_compiler_available() -> bool:
  """Whether the JAX CUDA plugin (XLA:GPU; `pip install "jax[cuda12]==<jax version>"`) is
  installed: with it, GPU targets compile deviceless, no GPU needed."""
  try:  # a dotted name raises where the parent namespace package is absent
    return importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
  except ModuleNotFoundError:
    return False


def tpu_compiler_available() -> bool:
  """Whether libtpu (the TPU compiler; `pip install "jax[tpu]==<jax version>"`) is
  installed."""
  return importlib.util.find_spec("libtpu") is not None


def libtpu_install_hint() -> str:
  import jax
  return f'pip install "jax[tpu]=={jax.__version__}"'


def _gpu_devices(target: Target) -> list:
  import jax
  from jax.experimental import topologies

  if not gpu_compiler_available():
    raise TargetError("target", f"{target.name} compiles deviceless with XLA:GPU once the JAX "
                      f'CUDA plugin is installed: pip install "jax[cuda12]=={jax.__version__}"')
  n = target.num_chips
  if n > GPUS_PER_HOST and n % GPUS_PER_HOST:
    raise TargetError("target", f"{target.name}: more than {GPUS_PER_HOST} GPUs come in whole "
                      f"hosts of {GPUS_PER_HOST}")
  hosts, per_host = (n // GPUS_PER_HOST, GPUS_PER_HOST) if n > GPUS_PER_HOST else (1, n)
  topo = topologies.get_topology_desc(platform="cuda", target_config=gpu_target_config(
      target.chip), topology=f"1x{hosts}x{per_host}")
  return list(topo.devices)


@contextlib.contextmanager
def _libtpu_load_env(target: Target):
  """The environment libtpu reads when it loads, set for the load and restored after it (the
  process's environment is the user's: a subprocess must not inherit a fake TPU host).

  libtpu takes a machine-wide lock on first load, meant for processes sharing TPU chips; a
  deviceless compile opens no chip, and several processes (a search and a test, parallel
  plans) may compile at once: ALLOW_MULTIPLE_LIBTPU_LOAD. On a machine without TPU chips it
  is also told what host it would be on, as a TPU VM's metadata does: without that it prints
  a dozen lines of warnings. A TPU VM's own environment is left alone."""
  env = {"ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
  try:
    from jax._src import hardware_utils
    on_tpu_vm = bool(hardware_utils.num_available_tpu_chips_and_device_id()[0])
  except (ImportError, AttributeError, OSError):
    on_tpu_vm = True  # cannot tell: describe nothing
  if not on_tpu_vm:
    env.update(TPU_ACCELERATOR_TYPE=target.name.replace("v5e-", "v5litepod-"),  # Cloud names
               TPU_WORKER_HOSTNAMES="localhost", TPU_WORKER_ID="0")
  added = [k for k in env if k not in os.environ]
  os.environ.update({k: env[k] for k in added})
  try:
    yield
  finally:
    for k in added:
      os.environ.pop(k, None)


def target_devices(target: Target) -> list:
  """The compile-only devices of a slice (one per chip): libtpu's deviceless topology for a
  TPU slice, XLA:GPU's for GPUs described by `gpu_target_config`.

  Raises:
    TargetError: the target's compiler (libtpu, the JAX CUDA plugin) is not installed.
  """
  if target.platform == "gpu":
    return _gpu_devices(target)
  if not tpu_compiler_available():
    raise TargetError("target", f"{target.name} needs the TPU compiler (libtpu), which is not "
                      f"installed: {libtpu_install_hint()}")
  from jax.experimental import topologies

  kwargs = {}
  if target.num_chips == 1:
    kwargs["chips_per_host_bounds"] = [1, 1, 1]
  if target.chip.cores_per_chip > 1:
    kwargs["chip_config_name"] = "megacore"  # one JAX device per chip, as on the pod
  with _libtpu_load_env(target):
    topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu",
                                        **kwargs)
  devices = list(topo.devices)
  if len(devices) != target.num_chips:
    raise TargetError("target", f"{target.name}: libtpu's topology {target.topology} has "
                      f"{len(devices)} devices, expected {target.num_chips}")
  return devices
