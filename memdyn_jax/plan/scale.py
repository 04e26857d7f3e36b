"""`plan_scale`: the study's programs for one mesh on one target, compiled, with per-chip
memory, collectives, the compiler's time estimate, tokens/s per chip and MFU.

A TPU target (`target="v5p-8"`) compiles with XLA:TPU for the slice's deviceless topology
(`chips.target_devices`; needs libtpu): memory is XLA:TPU's buffer assignment and the step
time is its cost model's estimate. A GPU target (`"h100-8"`) compiles with XLA:GPU for a
deviceless H100/H200 when the JAX CUDA plugin is installed (cuDNN attention; XLA:GPU gives
no time estimate), else for fake CPU devices. Without a target the programs compile for
fake CPU devices (`programs.force_host_devices`): parameter, optimizer and batch bytes are
exact, temporaries are XLA:CPU's (see the README for how far that is off), and there is no
time estimate.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Sequence

import jax
from jax.sharding import Mesh

from memdyn_jax import models
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.errors import FieldError
from memdyn_jax.models import ModelConfig
from memdyn_jax.models import flops as flops_lib
from memdyn_jax.models import presets as model_presets
from memdyn_jax.plan.chips import ACCELERATORS, CHIPS, Target, TargetError, parse_target
from memdyn_jax.plan.chips import gpu_compiler_available, target_devices
from memdyn_jax.plan.hlo import Collective
from memdyn_jax.plan.programs import (ProgramReport, plan_sampling, plan_scoring,
                                     plan_train_step)

GB = 10**9
GiB = 2**30

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


@dataclasses.dataclass(frozen=True)
class PlanReport:
  """Per-chip memory, cost and collectives of a training plan (and its evaluation programs),
  and whether it fits.

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
    score: the scorer's program (None when scoring was not planned).
    target: the slice compiled for ("v5p-8"), None for fake CPU devices.
    platform: what the programs compiled for: "tpu" (XLA:TPU), "gpu" (XLA:GPU) or "cpu"
      (fake devices).
    peak_flops: the chip's published bf16 peak (FLOP/s per chip).
    model_flops_per_step: the train step's model FLOPs (`models.flops.train_flops`).
    sample_batch, prompt_len, max_new_tokens, samples_per_prompt: the sampler's shapes
      (prompts per call; rows = prompts x samples).
    score_batch, score_len: the scorer's shapes.
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
  score: ProgramReport | None = None
  target: str | None = None
  platform: str = "cpu"
  peak_flops: float = 0.0
  model_flops_per_step: float = 0.0
  sample_batch: int = 0
  prompt_len: int = 0
  max_new_tokens: int = 0
  samples_per_prompt: int = 1
  score_batch: int = 0
  score_len: int = 0

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
  def programs(self) -> list[ProgramReport]:
    return [p for p in (self.train, self.score, self.prefill, self.decode) if p is not None]

  @property
  def peak_bytes(self) -> int:
    """The largest per-device peak over the planned programs."""
    return max(p.total_bytes for p in self.programs)

  @property
  def usable_bytes(self) -> int:
    return int(self.capacity_bytes * USABLE_FRACTION)

  @property
  def fits(self) -> bool:
    """The train step compiled (the compiler did not refuse it for memory) and its peak is
    within `USABLE_FRACTION` of the chip's memory."""
    return self.train.out_of_memory is None and self.total_bytes <= self.usable_bytes

  @property
  def sampling_fits(self) -> bool | None:
    if self.prefill is None:
      return None
    return (self.prefill.out_of_memory is None and self.decode.out_of_memory is None
            and max(self.prefill.total_bytes, self.decode.total_bytes) <= self.usable_bytes)

  @property
  def step_seconds(self) -> float | None:
    """The compiler's estimate of one train step (XLA:TPU's cost model), or None."""
    return self.train.estimated_seconds

  @property
  def tokens_per_second_per_chip(self) -> float | None:
    """Training tokens (padding included) per second per chip at `step_seconds`."""
    if not self.step_seconds:
      return None
    return self.global_batch * self.seq_len / (self.step_seconds * self.devices)

  @property
  def mfu(self) -> float | None:
    """Model FLOPs utilisation at `step_seconds`: the step's model FLOPs over the chips'
    bf16 peak for that time."""
    if not self.step_seconds or not self.peak_flops:
      return None
    return self.model_flops_per_step / (self.step_seconds * self.devices * self.peak_flops)

  def summary(self) -> str:
    """A human-readable multi-line report."""
    d, f, t = self.mesh_shape
    gib = lambda b: f"{format_bytes(b):>11}"
    where = {"tpu": f"{self.target} ({self.devices} chips), compiled by XLA:TPU",
             "gpu": f"{self.target} ({self.devices} GPUs), compiled by XLA:GPU (deviceless; "
                    "no time estimate)"}.get(
                 self.platform, f"{self.devices} fake CPU devices (XLA:CPU's buffer assignment)")
    lines = [
        f"{self.model} ({self.num_params / 1e9:.2f}B params) on {where}: data={d}, fsdp={f}, "
        f"tensor={t}; batch {self.global_batch} x {self.seq_len}, "
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
        f"  attention: {self.train.attention_path}; compiled in {self.train.compile_seconds:.1f}s",
    ]
    if self.step_seconds:
      lines.append(f"  estimated step {self.step_seconds * 1e3:.1f} ms (XLA:TPU cost model): "
                   f"{self.tokens_per_second_per_chip:,.0f} tokens/s/chip, MFU "
                   f"{self.mfu:.1%} of {self.peak_flops / 1e12:.0f} TFLOP/s bf16")
    lines += _collective_lines(self.train.collectives)
    for prog in (self.score, self.prefill, self.decode):
      if prog is None:
        continue
      label = "scorer" if prog.name == "score" else f"sampler {prog.name}"
      estimate = (f"; estimated {prog.estimated_seconds * 1e3:.2f} ms per call"
                  if prog.estimated_seconds else "")
      lines.append(f"{label}: total {gib(prog.total_bytes)} (args "
                   f"{format_bytes(prog.argument_bytes)}, temp {format_bytes(prog.temp_bytes)}); "
                   f"attention {prog.attention_path}; compiled in {prog.compile_seconds:.1f}s"
                   f"{estimate}")
      lines += _collective_lines(prog.collectives)
    for prog in self.programs:
      if prog.out_of_memory:
        lines.append(f"{prog.name}: the compiler refused it: {prog.out_of_memory}")
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
    for prog in self.programs:
      out[prog.name if prog.name != "train_step" else "train"] = prog.to_dict()
    out.update(devices=self.devices, total_bytes=self.total_bytes, fits=self.fits,
               activation_bytes=self.activation_bytes, usable_bytes=self.usable_bytes,
               step_seconds=self.step_seconds,
               tokens_per_second_per_chip=self.tokens_per_second_per_chip, mfu=self.mfu)
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


def resolve_model(model_config: ModelConfig | str) -> tuple[str, ModelConfig]:
  """(name, config) of a `ModelConfig`, a `memdyn_jax.models.presets` name, or the path of
  an HF config.json.

  Raises:
    FieldError: ("model") a string that is neither a preset nor a readable config.json.
  """
  if not isinstance(model_config, str):
    return model_config.model_type, model_config
  if model_config in model_presets.HF_CONFIGS:
    return model_config, model_presets.preset_config(model_config)
  try:
    with open(model_config) as f:
      cfg = models.from_hf_config(json.load(f))
  except (OSError, ValueError) as e:
    raise FieldError("model", f"{model_config} is neither a preset "
                     f"({model_presets.preset_names()}) nor a readable config.json ({e})") from e
  return cfg.model_type, cfg


def auto_attention_line(cfg: ModelConfig, accelerator: str, seq_len: int, prompt_len: int) -> str:
  """What `attention_impl="auto"` runs on `accelerator`'s platform in training, prefill and
  decode: what a fake-CPU plan (which compiles the einsums) does not show."""
  from memdyn_jax.models.layers import attention_choice_for_config
  backend = CHIPS[accelerator].platform if accelerator in CHIPS else "tpu"
  runs = [f"{phase} " + attention_choice_for_config(cfg, "auto", backend=backend, seq_len=n,
                                                     phase=phase).describe()
          for phase, n in (("forward", seq_len), ("prefill", prompt_len), ("decode", seq_len))]
  return (f"attention_impl=auto on {accelerator} (the fake-CPU plan compiled the einsums): "
          + "; ".join(runs))


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


def target_mesh(target: Target | str, mesh_shape: Sequence[int] | None = None):
  """(target, mesh shape, devices) for a slice: the mesh defaults to pure fsdp over every
  chip; TPU targets get their compile-only devices, GPU targets too where the JAX CUDA
  plugin is installed, else None (fake CPU devices).

  Raises:
    TargetError: an unknown target, no libtpu, or a mesh whose size is not the slice's.
  """
  target = parse_target(target) if isinstance(target, str) else target
  shape = tuple(int(s) for s in (mesh_shape or (1, target.num_chips, 1)))
  if math.prod(shape) != target.num_chips:
    raise TargetError("mesh", f"mesh {','.join(map(str, shape))} has {math.prod(shape)} "
                      f"devices; {target.name} has {target.num_chips} chips (the mesh must use "
                      "all of them)")
  compiles = target.platform == "tpu" or gpu_compiler_available()
  return target, shape, target_devices(target) if compiles else None


def plan_scale(model_config: ModelConfig | str, mesh_shape: Sequence[int] | None = None,
               global_batch: int = 128, seq_len: int = 1024, *, remat: str = "full",
               compute_dtype: str = "bfloat16", param_dtype: str = "float32",
               micro_batch: int = 0, accelerator: str = "v5p", target: Target | str | None = None,
               optimizer: str = "adamw", pin_activations: bool = False, sampling: bool = True,
               scoring: bool = False, sample_batch: int | None = None,
               prompt_len: int | None = None, max_new_tokens: int | None = None,
               score_batch: int | None = None, samples_per_prompt: int = 1,
               estimate: bool | None = None, devices: Sequence[jax.Device] | None = None,
               rules=sharding_lib.DEFAULT_RULES) -> PlanReport:
  """Compiles the real train step (and scorer and sampler) for a mesh and reports per-chip
  memory, collectives and, on a TPU target, the compiler's time estimate.

  Nothing is allocated: parameters, optimizer state and batch are `ShapeDtypeStruct`s with
  the trainer's shardings.

  Args:
    model_config: a `ModelConfig` or a `memdyn_jax.models.presets` name ("llama3-8b", ...).
    mesh_shape: (data, fsdp, tensor) mesh sizes; default (1, chips, 1) on a target, else
      (1, 8, 1).
    global_batch: examples per optimizer step.
    seq_len: tokens per example.
    remat: "none", "full" (per-layer) or "dots" (save matmul outputs).
    compute_dtype: activation / matmul dtype.
    param_dtype: master-weight (and Adam-moment) dtype.
    micro_batch: examples per forward/backward pass; 0 = the whole global batch.
    accelerator: a key of `ACCELERATORS` to check the fit against (a target sets it).
    target: a slice ("v5p-8", "v5e-16", "h100-8", or a `Target`): TPU slices compile with
      XLA:TPU for their deviceless topology (libtpu), GPU ones with XLA:GPU where the JAX
      CUDA plugin is installed, else for fake CPU devices.
    optimizer: "adamw", "adam" or "sgd" (as `TrainConfig.optimizer`).
    pin_activations: pin the embeddings to batch sharding through the step's `model_hook`
      (`batch_sharded_embeddings`); False compiles the trainer exactly as it runs.
    sampling: also compile the sampler's prefill and decode programs.
    scoring: also compile the scorer's program.
    sample_batch: prompts per sampling call (default `global_batch`).
    prompt_len, max_new_tokens: sampling lengths (default `seq_len // 2` each).
    score_batch: sequences per scoring call (default `global_batch`), of `seq_len` tokens.
    samples_per_prompt: sampled rows per prompt (the prefill copies each prompt's cache).
    estimate: extrapolate each program's cost from 1- and 2-layer compiles
      (`programs.depth_extrapolated`; a few more small compiles); default: on a TPU target,
      whose compiler gives a time estimate.
    devices: devices for the mesh without a target (default `jax.devices()`; the first
      prod(mesh) are used).
    rules: logical-axis sharding rules.

  Returns:
    A `PlanReport`.

  Raises:
    TargetError: an unknown target, no libtpu for a TPU target, a mesh that is not the
      slice's size.
    ValueError: unknown accelerator, too few devices, or a batch that does not split.
  """
  target_name, platform, attention = None, "cpu", "auto"
  if target is not None:
    tgt, mesh_shape, target_devs = target_mesh(target, mesh_shape)
    accelerator, target_name = tgt.chip.name, tgt.name
    if target_devs is not None:
      devices, platform = target_devs, tgt.platform
    if platform == "gpu" and compute_dtype in ("bfloat16", "float16"):
      # What "auto" runs on the GPU (cuDNN flash attention); deviceless, JAX cannot query the
      # device to pick it, so it is named.
      attention = "cudnn"
  if accelerator not in ACCELERATORS:
    raise ValueError(f"unknown accelerator {accelerator!r}; known: {sorted(ACCELERATORS)}")
  name, cfg = resolve_model(model_config)
  mesh_shape = tuple(int(s) for s in (mesh_shape or (1, 8, 1)))
  mesh = _mesh(mesh_shape, devices)
  micro = micro_batch or global_batch
  if global_batch % micro:
    raise ValueError(f"micro_batch {micro} must divide global_batch {global_batch}")
  estimate = platform == "tpu" if estimate is None else estimate
  precision = dict(compute_dtype=compute_dtype, param_dtype=param_dtype, estimate=estimate,
                   attention_impl=attention, rules=rules)
  train, param_bytes, opt_bytes, batch_bytes = plan_train_step(
      cfg, mesh, global_batch, seq_len, remat=remat, micro_batch=micro, optimizer=optimizer,
      pin_activations=pin_activations, **precision)
  prompt = prompt_len or max(seq_len // 2, 1)
  new = max_new_tokens or max(seq_len // 2, 1)
  rows = sample_batch or global_batch
  prefill = decode = score = None
  if sampling:
    prefill, decode = plan_sampling(cfg, mesh, rows, prompt, new,
                                    samples_per_prompt=samples_per_prompt, **precision)
  if scoring:
    score = plan_scoring(cfg, mesh, score_batch or global_batch, seq_len, **precision)
  chip = CHIPS.get(accelerator)
  return PlanReport(
      model=name, num_params=models.num_params(cfg), mesh_shape=mesh_shape,
      global_batch=global_batch, seq_len=seq_len, micro_batch=micro, remat=remat,
      compute_dtype=compute_dtype, param_dtype=param_dtype, pin_activations=pin_activations,
      accelerator=accelerator, capacity_bytes=ACCELERATORS[accelerator],
      param_bytes=param_bytes, optimizer_bytes=opt_bytes, batch_bytes=batch_bytes, train=train,
      prefill=prefill, decode=decode, score=score, target=target_name, platform=platform,
      peak_flops=chip.peak_bf16_flops if chip else 0.0,
      model_flops_per_step=flops_lib.train_flops(cfg, global_batch, seq_len),
      sample_batch=rows if sampling else 0, prompt_len=prompt if sampling else 0,
      max_new_tokens=new if sampling else 0, samples_per_prompt=samples_per_prompt,
      score_batch=(score_batch or global_batch) if scoring else 0,
      score_len=seq_len if scoring else 0)
