"""Device mesh, logical-axis rules, placement of host data and multi-host initialisation.

Parameters name their axes logically (`vocab`, `embed`, `heads`, `kv_heads`, `head_dim`,
`mlp`, `expert`, `layers`, `norm`, `positions`); activations use `batch` and `length`. One rules table
maps logical names to mesh axes (`data`, `fsdp`, `tensor`), as MaxText's
`logical_axis_rules` does, so placement is decided in one place; the helpers that put host
arrays on a mesh and fetch them back (`put_global`, `put_batch`, `to_host`, `data_shards`)
live here too, for the trainer, the scorer, the sampler and gradient variance alike.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
from typing import Any, Iterable, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated).
DEFAULT_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    # A mixture of experts' weights (experts, embed, mlp) split by expert over fsdp (a
    # parameter's embed axis then stays whole: a mesh axis shards one dimension), the width
    # over tensor. The experts are gathered whole where they are used, as FSDP gathers any
    # weight (`models.moe`: at its shard_map's boundary).
    ("expert", "fsdp"),
    ("layers", None),
    ("norm", None),
    ("positions", None),
)

log = logging.getLogger(__name__)


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A (data, fsdp, tensor) mesh; one size may be -1 = the remaining devices.

  Axes are `Auto` (GSPMD-style propagation): with jax>=0.10's default Explicit axes,
  NNX layers on sharded inputs fail with "contracting dimensions are sharded".
  """
  devices = list(devices) if devices is not None else jax.devices()
  sizes = [data, fsdp, tensor]
  if sizes.count(-1) > 1:
    raise ValueError(f"at most one mesh axis may be -1, got data={data} fsdp={fsdp} tensor={tensor}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"mesh sizes must be positive or -1, got data={data} fsdp={fsdp} tensor={tensor}")
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f"{len(devices)} devices do not divide into fsdp*tensor*data = {known} × k")
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices, "
                     f"have {len(devices)}")
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3,
                       devices=devices)


def logical_to_spec(axes: Iterable[str | None], rules=DEFAULT_RULES, shape: Sequence[int] | None = None,
                    mesh: Mesh | None = None) -> P:
  """PartitionSpec for logical `axes`. With `shape` and `mesh`, a dimension whose size the
  mesh axes do not divide is replicated (e.g. 3 KV heads on tensor=2), and a mesh axis is
  used at most once per spec."""
  table = dict(rules)
  used: set[str] = set()
  spec = []
  for i, name in enumerate(axes):
    target = table.get(name) if name is not None else None
    if name is not None and name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule; rules cover {sorted(table)}")
    mesh_axes = (target,) if isinstance(target, str) else tuple(target or ())
    if mesh is not None:
      mesh_axes = tuple(a for a in mesh_axes if mesh.shape[a] > 1)
    mesh_axes = tuple(a for a in mesh_axes if a not in used)
    if shape is not None and mesh is not None and mesh_axes:
      size = math.prod(mesh.shape[a] for a in mesh_axes)
      if shape[i] % size:
        log.info("replicating logical axis %s (size %d) not divisible by mesh %s", name, shape[i],
                 mesh_axes)
        mesh_axes = ()
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1 else mesh_axes)
  return P(*spec)


def param_sharding(var: nnx.Variable, mesh: Mesh, rules=DEFAULT_RULES) -> NamedSharding:
  axes = var.get_metadata().get("logical_axes")
  shape = var.shape  # also works on abstract (ShapeDtypeStruct) variables
  if axes is None:
    return NamedSharding(mesh, P())
  return NamedSharding(mesh, logical_to_spec(axes, rules, shape, mesh))


def model_shardings(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.State:
  """A State of `NamedSharding`s mirroring the model's parameters."""
  state = nnx.state(model)
  return jax.tree.map(lambda v: param_sharding(v, mesh, rules), state,
                      is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: Mesh, rules=DEFAULT_RULES) -> nnx.Module:
  """Moves every parameter to the sharding its logical axes ask for (in place; returns model)."""
  state = nnx.state(model)
  shardings = model_shardings(model, mesh, rules)
  nnx.update(model, jax.device_put(state, shardings))
  return model


def batch_sharding(mesh: Mesh, ndim: int = 2, rules=DEFAULT_RULES) -> NamedSharding:
  """Batch-major arrays: leading axis over the data axes, the rest replicated."""
  return NamedSharding(mesh, logical_to_spec(("batch",) + ("length",) * (ndim - 1), rules,
                                             mesh=mesh))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """`jax.distributed.initialize` for multi-host runs; a no-op for one process.

  Arguments default to the environment (`JAX_COORDINATOR_ADDRESS`, `JAX_NUM_PROCESSES`,
  `JAX_PROCESS_ID`) and, on TPU pods / SLURM, to JAX's own cluster auto-detection.
  Returns True when the distributed runtime was initialised.
  """
  coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
  if num_processes is None and os.environ.get("JAX_NUM_PROCESSES"):
    num_processes = int(os.environ["JAX_NUM_PROCESSES"])
  if process_id is None and os.environ.get("JAX_PROCESS_ID"):
    process_id = int(os.environ["JAX_PROCESS_ID"])
  auto_cluster = any(k in os.environ for k in ("SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
                                               "MEGASCALE_COORDINATOR_ADDRESS"))
  if coordinator_address is None and not auto_cluster:
    return False
  if num_processes == 1:
    return False
  if jax.distributed.is_initialized():
    return True
  jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                             process_id=process_id)
  return True


def wait_for_all_processes(barrier_id: str, timeout_s: float = 900.0) -> None:
  """Blocks until every process reaches `barrier_id` (a no-op for one process).

  A barrier of the coordination service, which waits up to `timeout_s`: CPU (gloo)
  collectives give a late peer only 30 s to set up a communicator, and a loaded host can
  lag by more than that after loading a model, so call this before a run's first collective.
  Every process passes the same `barrier_id` (an id may be reused once all have passed).
  """
  if jax.process_count() == 1:
    return
  # The coordination-service client has no public accessor; orbax reaches it the same way.
  client = jax._src.distributed.global_state.client  # pylint: disable=protected-access
  client.wait_at_barrier(barrier_id, int(timeout_s * 1000))


def host_local_to_global(batch: dict[str, np.ndarray], mesh: Mesh, rules=DEFAULT_RULES):
  """Each process passes its slice of the global batch; returns global jax Arrays."""
  out = {}
  for k, v in batch.items():
    sharding = batch_sharding(mesh, v.ndim, rules)
    out[k] = jax.make_array_from_process_local_data(sharding, v)
  return out


# ------------------------------------------------------------------ placement of host data


def put_global(array: np.ndarray, sharding: NamedSharding) -> jax.Array:
  """A global jax Array from a host array that every process holds in full (multi-host safe:
  each process materialises only its addressable shards)."""
  return jax.make_array_from_callback(array.shape, sharding, lambda idx: array[idx])


def data_shards(mesh: Mesh | None) -> int:
  """How many ways the batch axis is split on `mesh` (1 without a mesh)."""
  if mesh is None:
    return 1
  spec = batch_sharding(mesh, 1).spec[0]
  axes = (spec,) if isinstance(spec, str) else tuple(spec or ())
  return math.prod(mesh.shape[a] for a in axes)


def put_batch(x: np.ndarray, mesh: Mesh | None) -> jax.Array | np.ndarray:
  """Places a host array (same on every process) batch-sharded on `mesh`, or leaves it."""
  if mesh is None:
    return x
  return put_global(x, batch_sharding(mesh, x.ndim))


def target_platform() -> str:
  """The platform the program being traced is compiled for: the platform of the mesh in
  scope (`jax.set_mesh`; its devices may be a deviceless TPU topology compiled on a CPU
  machine, see `memdyn_jax.plan`), else `jax.default_backend()`. Code that picks a kernel
  by platform asks this, not the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  device = None if mesh.empty else getattr(mesh, "abstract_device", None)
  return device.platform if device is not None else jax.default_backend()


def mesh_context(mesh: Mesh | None):
  """`jax.set_mesh(mesh)`, or a no-op without a mesh."""
  return jax.set_mesh(mesh) if mesh is not None else contextlib.nullcontext()


def to_host(tree: Any) -> Any:
  """Fetches a pytree of (possibly multi-host sharded) arrays to numpy on every process."""
  def fetch(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      from jax.experimental import multihost_utils  # only multi-host runs need it

      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(fetch, tree)
