"""Pod-scale planning on a laptop: compile the real train and sampling programs for a big
mesh of fake CPU devices and read off per-device memory and collectives.

XLA compiles a program for N devices without allocating its arrays: the inputs here are
`jax.ShapeDtypeStruct`s carrying the shardings the trainer would give them, the model is
abstract (`nnx.eval_shape`), and `jax.jit(...).lower(...).compile()` runs the SPMD
partitioner, so the compiled module is what one device of the mesh would run. Run with
`XLA_FLAGS=--xla_force_host_platform_device_count=N` (set before JAX starts; see
`force_host_devices`) on the CPU backend.

What is compiled is the project's own code: `memdyn_jax.train.step.make_train_step` (with
the optimizer of `memdyn_jax.train.optim.make_optimizer`, shardings as `train.loop.train`
places them) and the sampler's jitted prefill and decode programs
(`memdyn_jax.evaluation.sampling.lower_prefill` / `lower_decode`, with abstract inputs).

Caveat (see README): the numbers are XLA:CPU's buffer assignment for the partitioned
program. Parameter, optimizer-state and batch bytes are exact; temporaries are an
estimate of what XLA:TPU / XLA:GPU would need, since their fusion, scheduling,
rematerialisation and attention kernels differ.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memdyn_jax import models
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import ModelConfig, abstract_model
from memdyn_jax.models import presets as model_presets
from memdyn_jax.train import step as step_lib
from memdyn_jax.train.config import TrainConfig
from memdyn_jax.train.optim import make_optimizer

GB = 10**9
GiB = 2**30

# Per-chip memory (bytes) as the vendors quote it (decimal GB).
ACCELERATORS: dict[str, int] = {
    "v5e": 16 * GB,
    "v5p": 95 * GB,
    "v6e": 32 * GB,
    "h100": 80 * GB,
    "h200": 141 * GB,
}
# Share of a chip's memory a plan may use: the rest is left to the runtime, fragmentation
# and collective buffers. (JAX on GPU preallocates 75% by default; raise it with
# XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 to use a plan near this limit.)
USABLE_FRACTION = 0.9

# Precision levers: (compute_dtype, param_dtype). "mixed" keeps fp32 master weights and
# optimizer state with bf16 activations/matmuls; "bf16" stores the weights (and Adam
# moments, which follow the weights' dtype) in bf16 as well.
PRECISIONS: dict[str, tuple[str, str]] = {
    "fp32": ("float32", "float32"),
    "mixed": ("bfloat16", "float32"),
    "bf16": ("bfloat16", "bfloat16"),
}

COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

_DTYPE_BYTES = {"pred": 1, "s4": 1, "u4": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2,
                "bf16": 2, "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8,
                "c64": 8, "c128": 16, "token": 0}


def force_host_devices(n: int) -> None:
  """Asks XLA for `n` CPU devices; must run before JAX initialises its backends.

  Raises:
    RuntimeError: JAX's backends are already up with fewer devices.
  """
  flags = os.environ.get("XLA_FLAGS", "")
  flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", flags)
  os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
  from jax._src import xla_bridge  # only to tell whether backends are already initialised
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")  # the fake devices are CPU devices
  elif len(jax.devices()) < n:
    raise RuntimeError(f"JAX already started with {len(jax.devices())} devices; call "
                       f"force_host_devices({n}) before any JAX computation")


# ----------------------------------------------------------------------------- reports


@dataclasses.dataclass(frozen=True)
class Collective:
  """One collective kind in a compiled program, per device.

  Attributes:
    kind: "all-reduce", "all-gather", "reduce-scatter", "all-to-all" or
      "collective-permute".
    ops: instructions of this kind in the HLO text.
    executions: times they run per call (while-loop bodies counted by their trip count).
    operand_bytes: bytes of the operands of one execution of each op, summed over ops.
    bytes_per_call: operand bytes summed over executions (what the program feeds into
      this kind of collective per call).
    largest_operand_bytes: the largest single op's operand bytes.
  """

  kind: str
  ops: int
  executions: int
  operand_bytes: int
  bytes_per_call: int
  largest_operand_bytes: int


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """`compiled.memory_analysis()` of one program, per device, plus its collectives.

  `total_bytes` = arguments + outputs − aliased (donated) + temporaries: the peak the
  buffer assignment needs while the program runs.
  """

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compile_seconds: float
  collectives: tuple[Collective, ...]

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes


@dataclasses.dataclass(frozen=True)
class PlanReport:
  """Per-device memory of a training (and sampling) plan, and whether it fits.

  Attributes:
    model: the model's name (preset name or `model_type`).
    num_params: parameter count.
    mesh_shape: (data, fsdp, tensor).
    global_batch, seq_len, micro_batch: the batch (micro_batch = global_batch: no
      accumulation).
    remat, compute_dtype, param_dtype: memory levers.
    pin_activations: the embeddings were pinned to batch sharding (`plan_scale`).
    accelerator, capacity_bytes: the chip checked and its memory.
    param_bytes: trained parameters held by one device (from their shardings).
    optimizer_bytes: optimizer state held by one device.
    batch_bytes: the step's batch arrays on one device.
    train: the train step's program report.
    prefill, decode: the sampler's programs (None when sampling was not planned).
  """

  model: str
  num_params: int
  mesh_shape: tuple[int, int, int]
  global_batch: int
  seq_len: int
  micro_batch: int
  remat: str
  compute_dtype: str
  param_dtype: str
  pin_activations: bool
  accelerator: str
  capacity_bytes: int
  param_bytes: int
  optimizer_bytes: int
  batch_bytes: int
  train: ProgramReport
  prefill: ProgramReport | None = None
  decode: ProgramReport | None = None

  @property
  def devices(self) -> int:
    return math.prod(self.mesh_shape)

  @property
  def activation_bytes(self) -> int:
    """Temporaries of the train step: activations, gradients, accumulators, workspace."""
    return self.train.temp_bytes

  @property
  def total_bytes(self) -> int:
    """Peak per-device bytes of the train step."""
    return self.train.total_bytes

  @property
  def peak_bytes(self) -> int:
    """The largest per-device peak over the planned programs."""
    programs = [p for p in (self.train, self.prefill, self.decode) if p is not None]
    return max(p.total_bytes for p in programs)

  @property
  def usable_bytes(self) -> int:
    return int(self.capacity_bytes * USABLE_FRACTION)

  @property
  def fits(self) -> bool:
    """The train step's peak is within `USABLE_FRACTION` of the chip's memory."""
    return self.total_bytes <= self.usable_bytes

  @property
  def sampling_fits(self) -> bool | None:
    if self.prefill is None:
      return None
    return max(self.prefill.total_bytes, self.decode.total_bytes) <= self.usable_bytes

  def summary(self) -> str:
    """A human-readable multi-line report."""
    d, f, t = self.mesh_shape
    gib = lambda b: f"{format_bytes(b):>11}"
    lines = [
        f"{self.model} ({self.num_params / 1e9:.2f}B params) on {self.devices} devices "
        f"(data={d}, fsdp={f}, tensor={t}); batch {self.global_batch} x {self.seq_len}, "
        f"micro-batch {self.micro_batch} ({self.global_batch // self.micro_batch} "
        f"accumulation steps), remat={self.remat}, compute={self.compute_dtype}, "
        f"params={self.param_dtype}",
        "per device, train step:",
        f"  parameters        {gib(self.param_bytes)}",
        f"  optimizer state   {gib(self.optimizer_bytes)}",
        f"  batch             {gib(self.batch_bytes)}",
        f"  temporaries       {gib(self.train.temp_bytes)}  (activations, grads, accumulators)",
        f"  total             {gib(self.total_bytes)}  "
        f"(args {format_bytes(self.train.argument_bytes)} + out "
        f"{format_bytes(self.train.output_bytes)} - donated {format_bytes(self.train.alias_bytes)}"
        f" + temp {format_bytes(self.train.temp_bytes)})",
        f"  compiled in {self.train.compile_seconds:.1f}s",
    ]
    lines += _collective_lines(self.train.collectives)
    for prog in (self.prefill, self.decode):
      if prog is not None:
        lines.append(f"sampler {prog.name}: total {gib(prog.total_bytes)} "
                     f"(args {format_bytes(prog.argument_bytes)}, temp {format_bytes(prog.temp_bytes)});"
                     f" compiled in {prog.compile_seconds:.1f}s")
        lines += _collective_lines(prog.collectives)
    verdict = "FITS" if self.fits else "DOES NOT FIT"
    lines.append(f"{verdict} {self.accelerator} ({self.capacity_bytes / GB:.0f} GB, usable "
                 f"{USABLE_FRACTION:.0%} = {format_bytes(self.usable_bytes)}): train step needs "
                 f"{format_bytes(self.total_bytes)} per device")
    if self.sampling_fits is not None:
      lines.append(f"sampling {'fits' if self.sampling_fits else 'does NOT fit'} "
                   f"(peak {format_bytes(max(self.prefill.total_bytes, self.decode.total_bytes))})")
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    for name in ("train", "prefill", "decode"):
      if out[name] is not None:
        out[name]["total_bytes"] = getattr(self, name).total_bytes
    out.update(devices=self.devices, total_bytes=self.total_bytes, fits=self.fits,
               activation_bytes=self.activation_bytes, usable_bytes=self.usable_bytes)
    return out


def format_bytes(n: int) -> str:
  """`n` bytes as GiB, MiB or KiB, whichever reads best."""
  for unit, size in (("GiB", GiB), ("MiB", 2**20), ("KiB", 2**10)):
    if abs(n) >= size:
      return f"{n / size:.2f} {unit}"
  return f"{n} B"


def _collective_lines(collectives: Sequence[Collective]) -> list[str]:
  if not collectives:
    return ["  collectives: none"]
  lines = ["  collectives (per device, per call):"]
  for c in collectives:
    lines.append(f"    {c.kind:<19} {c.ops:4d} ops, {c.executions:6d} executions, "
                 f"{format_bytes(c.bytes_per_call):>11} operands (largest op "
                 f"{format_bytes(c.largest_operand_bytes)})")
  return lines


# ----------------------------------------------------------------------------- HLO parsing


_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.*?) ([a-z][\w\-]*)\(")
_OPERAND_NAME = re.compile(r"%([\w.\-]+)")
_SHAPE = re.compile(r"\b(" + "|".join(_DTYPE_BYTES) + r")\[([\d,]*)\]")
_CALLEE = re.compile(r"\b(to_apply|calls|body|condition|true_computation|false_computation)="
                     r"%?([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')


def _shape_bytes(text: str) -> int:
  total = 0
  for dtype, dims in _SHAPE.findall(text):
    n = math.prod(int(x) for x in dims.split(",") if x) if dims else 1
    total += n * _DTYPE_BYTES[dtype]
  return total


def _operands(line: str, start: int) -> str:
  """The text inside the parentheses opening at `start` (balanced)."""
  depth = 0
  for i in range(start, len(line)):
    if line[i] == "(":
      depth += 1
    elif line[i] == ")":
      depth -= 1
      if depth == 0:
        return line[start + 1:i]
  return line[start + 1:]


def hlo_collectives(hlo_text: str) -> tuple[Collective, ...]:
  """Collectives of an HLO module's text, with operand sizes and per-call execution counts.

  An op inside a while-loop body (a `lax.scan` over layers or micro-batches) runs once
  per iteration: the loop's `known_trip_count` multiplies its executions, nested loops
  multiply. A loop without a known trip count counts once.
  """
  comps: dict[str, list[str]] = {}
  entry = None
  current = None
  for line in hlo_text.splitlines():
    if current is None:
      m = _COMP_HEADER.match(line)
      if m and "=" not in line.split("(")[0]:
        current = m.group(2)
        comps[current] = []
        if m.group(1):
          entry = current
      continue
    if line.strip() == "}":
      current = None
      continue
    comps[current].append(line)
  if entry is None:
    return ()

  # Executions per call of each computation, following calls from the entry.
  mult: dict[str, int] = {}

  def visit(name: str, times: int) -> None:
    if name not in comps or mult.get(name, 0) >= times:
      return
    mult[name] = times
    for line in comps[name]:
      trip = _TRIP_COUNT.search(line)
      for attr, callee in _CALLEE.findall(line):
        n = int(trip.group(1)) if (attr == "body" and trip) else 1
        visit(callee, times * n)
      for group in _BRANCHES.findall(line):
        for callee in group.split(","):
          visit(callee.strip().lstrip("%"), times)

  visit(entry, 1)
  # Optimised HLO names operands without their shapes: look them up by name.
  types: dict[str, str] = {}
  for lines in comps.values():
    for line in lines:
      m = _INSTRUCTION.match(line)
      if m:
        types[m.group(1)] = m.group(2)
  stats: dict[str, list[int]] = {k: [0, 0, 0, 0, 0] for k in COLLECTIVES}
  for name, lines in comps.items():
    times = mult.get(name, 0)
    if not times:
      continue
    for line in lines:
      m = _INSTRUCTION.match(line)
      kind = m.group(3).removesuffix("-start") if m else None
      if kind not in stats:
        continue
      operands = _OPERAND_NAME.findall(_operands(line, m.end() - 1))
      nbytes = sum(_shape_bytes(types.get(name, "")) for name in operands)
      s = stats[kind]
      s[0] += 1
      s[1] += times
      s[2] += nbytes
      s[3] += nbytes * times
      s[4] = max(s[4], nbytes)
  return tuple(Collective(k, *v) for k, v in stats.items() if v[0])


# ----------------------------------------------------------------------------- lowering


def _mesh(mesh_shape: Sequence[int], devices: Sequence[jax.Device] | None) -> Mesh:
  if len(mesh_shape) != 3 or any(int(s) < 1 for s in mesh_shape):
    raise ValueError(f"mesh_shape must be (data, fsdp, tensor) positive sizes, got {mesh_shape}")
  n = math.prod(mesh_shape)
  devices = list(devices if devices is not None else jax.devices())
  if len(devices) < n:
    raise ValueError(
        f"mesh {tuple(mesh_shape)} needs {n} devices but JAX has {len(devices)}; start the "
        f"process with XLA_FLAGS=--xla_force_host_platform_device_count={n} (or call "
        f"memdyn_jax.plan.force_host_devices({n}) before JAX starts)")
  return sharding_lib.make_mesh(*mesh_shape, devices=devices[:n])


def _is_var(x) -> bool:
  return isinstance(x, nnx.Variable)


def abstract_state(state: nnx.State, mesh: Mesh, rules=sharding_lib.DEFAULT_RULES) -> nnx.State:
  """`state` with every array a `ShapeDtypeStruct` carrying its parameter sharding."""
  def one(var):
    sharding = sharding_lib.param_sharding(var, mesh, rules)
    return var.replace(jax.ShapeDtypeStruct(var.shape, var.dtype, sharding=sharding))
  return jax.tree.map(one, state, is_leaf=_is_var)


def _with_sharding(tree, shardings):
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def per_device_bytes(tree) -> int:
  """Bytes one device holds of a tree of sharded `ShapeDtypeStruct`s / arrays (the
  largest shard, so uneven splits are not undercounted)."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return total


def _program_report(name: str, lower) -> tuple[ProgramReport, Any]:
  """Compiles `lower()` (a `jax.stages.Lowered`) and reports its memory; the time covers
  lowering and compiling."""
  t0 = time.perf_counter()
  lowered = lower()
  compiled = lowered.compile()
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  report = ProgramReport(
      name=name, argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes), compile_seconds=seconds,
      collectives=hlo_collectives(compiled.as_text()))
  return report, (lowered, compiled)


def _resolve_model(model_config: ModelConfig | str) -> tuple[str, ModelConfig]:
  if isinstance(model_config, str):
    return model_config, model_presets.preset_config(model_config)
  return model_config.model_type, model_config


def batch_sharded_embeddings(mesh: Mesh, rules=sharding_lib.DEFAULT_RULES):
  """A `make_train_step` `model_hook` pinning the token embeddings (B, T, E) to batch
  sharding.

  Without it GSPMD lets the `embed`-on-fsdp weight sharding win: every device computes
  the whole micro-batch and all-reduces activations (weight-stationary, not FSDP). The
  pinned layout is the scan carry, so every layer stays batch-sharded and XLA all-gathers
  weights instead. This is the constraint the model itself should apply.
  """
  target = NamedSharding(mesh, sharding_lib.batch_sharding(mesh, 3, rules).spec)

  def hook(model: nnx.Module, key: jax.Array) -> None:
    del key
    embed = model.embed_tokens
    # An instance attribute shadows the method on this per-trace copy of the model only;
    # object.__setattr__ skips nnx's attribute bookkeeping (it is not model state).
    object.__setattr__(model, "embed_tokens", lambda ids, pos: jax.lax.with_sharding_constraint(
        embed(ids, pos), target))

  return hook


def plan_train_step(cfg: ModelConfig, mesh: Mesh, global_batch: int, seq_len: int, *,
                    remat: str, compute_dtype: str, param_dtype: str, micro_batch: int,
                    optimizer: str = "adamw", pin_activations: bool = False,
                    rules=sharding_lib.DEFAULT_RULES) -> tuple[ProgramReport, int, int, int]:
  """Compiles the trainer's jitted step on `mesh` with abstract inputs.

  `pin_activations` passes `batch_sharded_embeddings` as the step's `model_hook`.

  Returns:
    (program report, parameter bytes, optimizer-state bytes, batch bytes) per device.
  """
  tcfg = TrainConfig(global_batch_size=global_batch, micro_batch_size=micro_batch,
                     compute_dtype=compute_dtype, param_dtype=param_dtype, remat=remat,
                     optimizer=optimizer, max_length=seq_len)
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  micro = tcfg.micro_batch_size or global_batch
  if micro % dp:  # the trainer refuses this too (train.loop.train)
    raise ValueError(f"micro-batch of {micro} examples does not split over the {dp} "
                     "data-parallel devices (data x fsdp)")
  model = abstract_model(cfg, dtype=jnp.dtype(compute_dtype), param_dtype=jnp.dtype(param_dtype),
                         remat=remat)
  graphdef, trained, rngs, frozen = step_lib.split_model(model)
  trained, rngs, frozen = (abstract_state(s, mesh, rules) for s in (trained, rngs, frozen))
  tx = make_optimizer(tcfg, total_steps=1000)
  # Optimizer moments take their parameter's sharding (as `jax.jit(tx.init)(trained)` in
  # train.loop propagates them); counters and other non-parameter leaves are replicated.
  replicated = NamedSharding(mesh, P())
  opt_shapes = jax.eval_shape(tx.init, trained)
  opt_state = optax.tree_map_params(
      tx, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
      opt_shapes, trained,
      transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated))
  shardings = tuple(step_lib.shardings_of(s) for s in (trained, opt_state, rngs, frozen))
  accum = tcfg.accumulation_steps
  batch_shardings = {k: step_lib.microbatch_sharding(mesh, 3, rules) for k in step_lib.BATCH_KEYS}
  batch_shardings["weights"] = step_lib.microbatch_sharding(mesh, 2, rules)
  batch = {k: jax.ShapeDtypeStruct((accum, micro, seq_len), jnp.int32, sharding=batch_shardings[k])
           for k in step_lib.BATCH_KEYS}
  batch["weights"] = jax.ShapeDtypeStruct((accum, micro), jnp.float32,
                                          sharding=batch_shardings["weights"])
  step = step_lib.make_train_step(graphdef, tx, state_shardings=shardings,
                                  batch_shardings=batch_shardings, seed=tcfg.seed,
                                  model_hook=(batch_sharded_embeddings(mesh, rules)
                                              if pin_activations else None))
  step_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
  with jax.set_mesh(mesh):  # as train.loop runs the step (the model pins activations to it)
    report, _ = _program_report("train_step", lambda: step.lower(
        trained, opt_state, rngs, frozen, batch, step_index))
  return report, per_device_bytes(trained), per_device_bytes(opt_state), per_device_bytes(batch)


def plan_sampling(cfg: ModelConfig, mesh: Mesh, batch: int, prompt_len: int, max_new_tokens: int,
                  *, compute_dtype: str, param_dtype: str, rules=sharding_lib.DEFAULT_RULES
                  ) -> tuple[ProgramReport, ProgramReport]:
  """Compiles the sampler's prefill and decode programs (`memdyn_jax.evaluation.sampling`) on `mesh`.

  The programs are the ones `sampling.generate` runs (temperature sampling, one sample per
  prompt), lowered with abstract parameters, prompts and decode state; `batch` prompts of
  `prompt_len` tokens and a KV cache of `prompt_len + max_new_tokens` slots.
  """
  from memdyn_jax.evaluation import sampling

  model = abstract_model(cfg, dtype=jnp.dtype(compute_dtype), param_dtype=jnp.dtype(param_dtype))
  graphdef, state = nnx.split(model)
  state = abstract_state(state, mesh, rules)
  rows = sharding_lib.batch_sharding(mesh, 1, rules)
  ints = lambda shape, s: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
  replicated = NamedSharding(mesh, P())
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  prompt_sharding = sharding_lib.batch_sharding(mesh, 2, rules)
  params = sampling.SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)
  with jax.set_mesh(mesh):
    prefill, (lowered, compiled) = _program_report("prefill", lambda: sampling.lower_prefill(
        graphdef, state, ints((batch, prompt_len), prompt_sharding),
        ints((batch, prompt_len), prompt_sharding), key, ints((batch,), rows),
        ints((), replicated), params=params, mesh=mesh))
    loop = _with_sharding(lowered.out_info, compiled.output_shardings)
    decode, _ = _program_report("decode", lambda: sampling.lower_decode(
        graphdef, state, loop, jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated),
        ints((), replicated), ints((1,), replicated), ints((), replicated), params=params))
  return prefill, decode


def plan_scale(model_config: ModelConfig | str, mesh_shape: Sequence[int] = (1, 8, 1),
               global_batch: int = 128, seq_len: int = 1024, *, remat: str = "full",
               compute_dtype: str = "bfloat16", param_dtype: str = "float32",
               micro_batch: int = 0, accelerator: str = "v5p", optimizer: str = "adamw",
               pin_activations: bool = False, sampling: bool = True, sample_batch: int | None = None,
               prompt_len: int | None = None, max_new_tokens: int | None = None,
               devices: Sequence[jax.Device] | None = None,
               rules=sharding_lib.DEFAULT_RULES) -> PlanReport:
  """Compiles the real train step (and sampler) for a mesh and reports per-device memory.

  Nothing is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s with
  the trainer's shardings. Needs `prod(mesh_shape)` JAX devices (fake CPU devices:
  `XLA_FLAGS=--xla_force_host_platform_device_count=N`).

  Args:
    model_config: a `ModelConfig` or a `memdyn_jax.models.presets` name ("llama3-8b", ...).
    mesh_shape: (data, fsdp, tensor) mesh sizes.
    global_batch: examples per optimizer step.
    seq_len: tokens per example.
    remat: "none", "full" (per-layer) or "dots" (save matmul outputs).
    compute_dtype: activation / matmul dtype.
    param_dtype: master-weight (and Adam-moment) dtype.
    micro_batch: examples per forward/backward pass; 0 = the whole global batch.
    accelerator: a key of `ACCELERATORS` to check the fit against.
    optimizer: "adamw", "adam" or "sgd" (as `TrainConfig.optimizer`).
    pin_activations: pin the embeddings to batch sharding through the step's `model_hook`
      (`batch_sharded_embeddings`); False compiles the trainer exactly as it runs.
    sampling: also compile the sampler's prefill and decode programs.
    sample_batch: prompts per sampling call (default `global_batch`).
    prompt_len, max_new_tokens: sampling lengths (default `seq_len // 2` each).
    devices: devices for the mesh (default `jax.devices()`; the first prod(mesh) are used).
    rules: logical-axis sharding rules.

  Returns:
    A `PlanReport`.

  Raises:
    ValueError: unknown accelerator, too few devices, or a batch that does not split.
  """
  if accelerator not in ACCELERATORS:
    raise ValueError(f"unknown accelerator {accelerator!r}; known: {sorted(ACCELERATORS)}")
  name, cfg = _resolve_model(model_config)
  mesh_shape = tuple(int(s) for s in mesh_shape)
  mesh = _mesh(mesh_shape, devices)
  micro = micro_batch or global_batch
  if global_batch % micro:
    raise ValueError(f"micro_batch {micro} must divide global_batch {global_batch}")
  train, param_bytes, opt_bytes, batch_bytes = plan_train_step(
      cfg, mesh, global_batch, seq_len, remat=remat, compute_dtype=compute_dtype,
      param_dtype=param_dtype, micro_batch=micro, optimizer=optimizer,
      pin_activations=pin_activations, rules=rules)
  prefill = decode = None
  if sampling:
    prompt = prompt_len or max(seq_len // 2, 1)
    new = max_new_tokens or max(seq_len // 2, 1)
    prefill, decode = plan_sampling(cfg, mesh, sample_batch or global_batch, prompt, new,
                                    compute_dtype=compute_dtype, param_dtype=param_dtype,
                                    rules=rules)
  return PlanReport(
      model=name, num_params=models.num_params(cfg), mesh_shape=mesh_shape,
      global_batch=global_batch,
      seq_len=seq_len, micro_batch=micro, remat=remat, compute_dtype=compute_dtype,
      param_dtype=param_dtype, pin_activations=pin_activations, accelerator=accelerator,
      capacity_bytes=ACCELERATORS[accelerator], param_bytes=param_bytes,
      optimizer_bytes=opt_bytes, batch_bytes=batch_bytes, train=train, prefill=prefill,
      decode=decode)


# ----------------------------------------------------------------------------- search


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the lever space (accelerator-independent: its compile is shared)."""

  mesh_shape: tuple[int, int, int]
  remat: str
  precision: str
  micro_batch: int

  @property
  def devices(self) -> int:
    return math.prod(self.mesh_shape)


@dataclasses.dataclass(frozen=True)
class FitResult:
  """The cheapest fitting configuration found for one accelerator (or None fields).

  Attributes:
    accelerator: the chip.
    report: the fitting plan (None when nothing in the search space fits).
    tried: candidates compiled or ruled out for this accelerator, with their per-device
      total bytes (None = ruled out without compiling by the state-size lower bound).
  """

  accelerator: str
  report: PlanReport | None
  tried: tuple[tuple[Candidate, int | None], ...]


def state_lower_bound(cfg: ModelConfig, mesh_shape: Sequence[int], precision: str,
                      optimizer: str = "adamw") -> int:
  """Per-device bytes the train step needs whatever the batch and remat: parameters, Adam
  moments (in the parameters' dtype) and the fp32 gradient accumulator, evenly sharded.

  Computed from the parameter count alone, so candidates can be ruled out without a
  compile. Embedding/vocab axes that do not divide the mesh make the real figure larger.
  """
  _, param_dtype = PRECISIONS[precision]
  shards = mesh_shape[1] * mesh_shape[2]  # parameters are split over fsdp and tensor only
  p = jnp.dtype(param_dtype).itemsize
  moments = {"adamw": 2, "adam": 2, "sgd": 1}[optimizer]
  return int(models.num_params(cfg) * (p * (1 + moments) + 4) / shards)


def candidate_space(devices: int, global_batch: int, *, tensor_options: Sequence[int] = (1,),
                    remats: Sequence[str] = ("none", "dots", "full"),
                    precisions: Sequence[str] = ("mixed",)) -> list[list[Candidate]]:
  """Candidates on `devices` chips grouped into ladders, cheapest ladder first.

  Each ladder fixes (mesh, precision, remat) and lists micro-batches from the smallest
  (most accumulation, least memory) to the whole batch. Ladders are ordered by precision
  (as given), then remat (none < dots < full: recomputation costs compute), then tensor
  split (pure fsdp first). Accumulation is the cheapest lever: micro-batches of ≥ 1k
  tokens per device keep the matmul units busy.
  """
  ladders = []
  for precision in precisions:
    for remat in remats:
      for t in tensor_options:
        if devices % t:
          continue
        fsdp = devices // t
        if global_batch % fsdp:
          continue
        micros = [m for m in (fsdp * 2**k for k in range(32)) if m <= global_batch
                  and global_batch % m == 0]
        ladders.append([Candidate((1, fsdp, t), remat, precision, m) for m in micros])
  return ladders


def cheapest_fitting(model_config: ModelConfig | str, accelerators: Sequence[str] | str,
                     global_batch: int = 128, seq_len: int = 1024, *,
                     device_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                     tensor_options: Sequence[int] = (1,),
                     remats: Sequence[str] = ("none", "dots", "full"),
                     precisions: Sequence[str] = ("mixed",), optimizer: str = "adamw",
                     pin_activations: bool = True, cache: dict | None = None,
                     log=None) -> dict[str, FitResult]:
  """The cheapest configuration whose train step fits each accelerator.

  "Cheapest" = fewest chips, then the first ladder of `candidate_space` (precision, remat,
  tensor split) that fits with its smallest micro-batch, then the largest micro-batch of
  that ladder that still fits (a binary search: memory grows with the micro-batch).
  Candidates whose `state_lower_bound` exceeds the chip are skipped uncompiled, and
  compiles are shared between accelerators (and across calls through `cache`).

  Args:
    model_config: a `ModelConfig` or preset name.
    accelerators: one key of `ACCELERATORS` or several.
    global_batch, seq_len: the batch to train on.
    device_counts: chip counts to consider, ascending.
    tensor_options: tensor-parallel sizes to consider (fsdp takes the rest of the chips).
    remats, precisions: lever values to consider (keys of `PRECISIONS`).
    optimizer: as `TrainConfig.optimizer`.
    pin_activations: see `plan_scale`.
    cache: a dict reused across calls: Candidate -> PlanReport.
    log: optional `log(str)` progress callback.

  Returns:
    {accelerator: FitResult}.
  """
  accelerators = [accelerators] if isinstance(accelerators, str) else list(accelerators)
  name, cfg = _resolve_model(model_config)
  cache = {} if cache is None else cache

  def compile_one(c: Candidate) -> PlanReport:
    key = (name, global_batch, seq_len, optimizer, pin_activations, c)
    if key not in cache:
      compute, param = PRECISIONS[c.precision]
      cache[key] = plan_scale(cfg, c.mesh_shape, global_batch, seq_len, remat=c.remat,
                              compute_dtype=compute, param_dtype=param,
                              micro_batch=c.micro_batch, accelerator="h200",
                              optimizer=optimizer, pin_activations=pin_activations,
                              sampling=False)
      if log:
        r = cache[key]
        log(f"{name} {c}: {r.total_bytes / GiB:.2f} GiB/device, compiled in "
            f"{r.train.compile_seconds:.1f}s")
    return dataclasses.replace(cache[key], model=name)

  out = {}
  for acc in accelerators:
    usable = int(ACCELERATORS[acc] * USABLE_FRACTION)
    tried: list[tuple[Candidate, int | None]] = []
    found = None
    for n in device_counts:
      for ladder in candidate_space(n, global_batch, tensor_options=tensor_options,
                                    remats=remats, precisions=precisions):
        low = ladder[0]
        if state_lower_bound(cfg, low.mesh_shape, low.precision, optimizer) > usable:
          tried.append((low, None))
          continue
        report = compile_one(low)
        tried.append((low, report.total_bytes))
        if report.total_bytes > usable:
          continue
        best, lo, hi = report, 1, len(ladder) - 1  # binary search for the largest fit
        while lo <= hi:
          mid = (lo + hi) // 2
          r = compile_one(ladder[mid])
          tried.append((ladder[mid], r.total_bytes))
          if r.total_bytes <= usable:
            best, lo = r, mid + 1
          else:
            hi = mid - 1
        found = best
        break
      if found is not None:
        break
    if found is not None:
      found = dataclasses.replace(found, accelerator=acc, capacity_bytes=ACCELERATORS[acc])
    out[acc] = FitResult(acc, found, tuple(tried))
  return out


def describe_fit(result: FitResult) -> str:
  """One table cell: "16 chips, fsdp=16, remat=full, micro 64 (2 acc.), 11.2 GiB"."""
  r = result.report
  if r is None:
    return "does not fit in the searched space"
  d, f, t = r.mesh_shape
  split = f"fsdp={f}" + (f" tensor={t}" if t > 1 else "") + (f" data={d}" if d > 1 else "")
  acc = r.global_batch // r.micro_batch
  return (f"{r.devices} chips, {split}, remat={r.remat}, micro-batch {r.micro_batch}"
          f" ({acc} acc. step{'s' if acc > 1 else ''}), {r.total_bytes / GiB:.1f} GiB/chip")
