"""The study's programs compiled ahead of time with abstract inputs: the trainer's jitted
step, the scorer's teacher-forced forward and the sampler's prefill and decode, each on a
mesh, with the memory (`compiled.memory_analysis()`), cost (`compiled.cost_analysis()`:
FLOPs, bytes accessed, and on TPU the compiler's own time estimate) and collectives of one
device's partitioned program.

XLA compiles a program for N devices without allocating its arrays: the inputs here are
`jax.ShapeDtypeStruct`s carrying the shardings the trainer would give them and the model is
abstract (`nnx.eval_shape`). The devices are a TPU slice's compile-only devices
(`chips.target_devices`: XLA:TPU itself) or fake CPU devices
(`XLA_FLAGS=--xla_force_host_platform_device_count=N`, `force_host_devices`). The model
picks its attention path for the mesh's platform (`sharding.target_platform`), so a TPU
program compiles the splash kernel where the model would run it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import ModelConfig, abstract_model
from memdyn_jax.plan.hlo import (Collective, cudnn_attention_calls, hlo_collectives,
                                 mosaic_calls)
from memdyn_jax.train import loss as loss_lib
from memdyn_jax.train import step as step_lib
from memdyn_jax.train.config import TrainConfig
from memdyn_jax.train.optim import make_optimizer


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


@dataclasses.dataclass(frozen=True)
class ProgramReport:
  """One compiled program, per device: its memory (`compiled.memory_analysis()`), its cost
  (`compiled.cost_analysis()`) and its collectives.

  `total_bytes` = arguments + outputs − aliased (donated) + temporaries: the peak the
  buffer assignment needs while the program runs.

  Attributes:
    name: "train_step", "score", "prefill" or "decode".
    argument_bytes, output_bytes, alias_bytes, temp_bytes, code_bytes: buffer assignment.
    compile_seconds: lowering + compiling.
    collectives: per collective kind.
    platform: what it was compiled for ("tpu", "cpu", ...).
    flops: the compiler's FLOP count of one call on one device: depth-extrapolated when
      planned with `estimate` (`depth_extrapolated`), else the program's own cost analysis,
      which counts a loop's body once.
    bytes_accessed: the compiler's count of memory traffic, likewise.
    estimated_seconds: the compiler's time estimate of one call ("optimal_seconds",
      XLA:TPU's cost model), likewise; None where the compiler gives none (XLA:CPU, XLA:GPU
      without a device).
    mosaic_calls: Mosaic (Pallas TPU) kernel calls: splash attention compiled in.
    cudnn_attention_calls: cuDNN fused-attention calls (XLA:GPU).
    out_of_memory: the compiler's refusal when the program cannot fit the chip's memory
      (XLA:TPU will not compile it: "Ran out of memory on HBM ..."), else None; then
      `temp_bytes` is the requirement it states and nothing else is known.
  """

  name: str
  argument_bytes: int
  output_bytes: int
  alias_bytes: int
  temp_bytes: int
  code_bytes: int
  compile_seconds: float
  collectives: tuple[Collective, ...]
  platform: str = "cpu"
  flops: float = 0.0
  bytes_accessed: float = 0.0
  estimated_seconds: float | None = None
  mosaic_calls: int = 0
  cudnn_attention_calls: int = 0
  out_of_memory: str | None = None

  @property
  def total_bytes(self) -> int:
    return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes

  @property
  def attention_path(self) -> str:
    """"splash (N Mosaic calls)" or "cuDNN (N fused-attention calls)" when such kernels
    were compiled in, else "XLA"."""
    if self.mosaic_calls:
      return f"splash ({self.mosaic_calls} Mosaic calls)"
    if self.cudnn_attention_calls:
      return f"cuDNN ({self.cudnn_attention_calls} fused-attention calls)"
    return "XLA"

  def to_dict(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    out.update(total_bytes=self.total_bytes, attention_path=self.attention_path)
    return out


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


@dataclasses.dataclass(frozen=True)
class Cost:
  """The compiler's cost analysis of one call of a program on one device: FLOPs, bytes
  accessed and (XLA:TPU) its time estimate, "optimal_seconds"."""
  flops: float
  bytes_accessed: float
  seconds: float | None

  @classmethod
  def of(cls, compiled) -> "Cost":
    analysis = compiled.cost_analysis()
    if isinstance(analysis, (list, tuple)):  # one dict per partition in older JAX versions
      analysis = analysis[0] if analysis else {}
    analysis = dict(analysis or {})
    seconds = analysis.get("optimal_seconds")
    return cls(float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0)),
               float(seconds) if seconds and seconds > 0 else None)


def depth_extrapolated(one: Cost, two: Cost, num_layers: int) -> Cost:
  """The cost of an L-layer program from the same program at 1 and 2 layers, unrolled:
  C1 + (L - 1) (C2 - C1), every layer costing what the second one adds.

  Why: XLA's cost analysis counts a while loop's body once, whatever its trip count (a
  2- and a 4-layer train step under remat, whose layers are a loop, report the same FLOPs),
  so the real program's own figures undercount every layer but one.
  """
  extra = num_layers - 1
  seconds = (None if one.seconds is None or two.seconds is None
             else one.seconds + extra * (two.seconds - one.seconds))
  return Cost(one.flops + extra * (two.flops - one.flops),
              one.bytes_accessed + extra * (two.bytes_accessed - one.bytes_accessed), seconds)


def layer_variant(cfg: ModelConfig, num_layers: int) -> ModelConfig:
  """`cfg` with its first `num_layers` layers (their per-layer data kept: every `layer_…`
  tuple of the config, the windows and RoPE bases)."""
  per_layer = {f.name: tuple(getattr(cfg, f.name)[:num_layers])
               for f in dataclasses.fields(cfg)
               if f.name.startswith("layer_") and isinstance(getattr(cfg, f.name), tuple)
               and len(getattr(cfg, f.name)) == cfg.num_layers}
  return dataclasses.replace(cfg, num_layers=num_layers, **per_layer)


def _compile(mesh: Mesh, lower):
  """`lower()` (a `jax.stages.Lowered`) compiled with `mesh` in scope, as the trainer and
  evaluation run their programs (the model pins activations to it and picks its attention
  path by its platform)."""
  with jax.set_mesh(mesh):
    return lower().compile()


def _program_report(name: str, mesh: Mesh, lower, estimate=None) -> ProgramReport:
  """Compiles `lower()` on `mesh` and reports its memory and cost; the time covers lowering
  and compiling. `estimate()`, when given, replaces the program's own cost figures (see
  `depth_extrapolated`)."""
  t0 = time.perf_counter()
  try:
    compiled = _compile(mesh, lower)
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    return _out_of_memory_report(name, mesh, str(e), time.perf_counter() - t0)
  seconds = time.perf_counter() - t0
  mem = compiled.memory_analysis()
  text = compiled.as_text()
  cost = estimate() if estimate is not None else Cost.of(compiled)
  report = ProgramReport(
      name=name, argument_bytes=int(mem.argument_size_in_bytes),
      output_bytes=int(mem.output_size_in_bytes), alias_bytes=int(mem.alias_size_in_bytes),
      temp_bytes=int(mem.temp_size_in_bytes),
      code_bytes=int(mem.generated_code_size_in_bytes), compile_seconds=seconds,
      collectives=hlo_collectives(text), platform=mesh.devices.flat[0].platform,
      flops=cost.flops, bytes_accessed=cost.bytes_accessed, estimated_seconds=cost.seconds,
      mosaic_calls=mosaic_calls(text), cudnn_attention_calls=cudnn_attention_calls(text))
  return report


_SIZE = re.compile(r"\(([\d.]+)([KMGT]?)\)")
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory_report(name: str, mesh: Mesh, message: str, seconds: float) -> ProgramReport:
  """A program the compiler refused for want of memory: the requirement its message states
  ("... required for HLO temporaries (19.34G) exceeds available HBM (15.75G)") as the
  temporaries, the line that says so as `out_of_memory` (the whole message if none does)."""
  line = next((text.strip() for text in message.splitlines() if "memory" in text.lower()),
              message.strip() or "out of memory")
  size = _SIZE.search(line)
  required = int(float(size.group(1)) * _UNITS[size.group(2)]) if size else 0
  return ProgramReport(name=name, argument_bytes=0, output_bytes=0, alias_bytes=0,
                       temp_bytes=required, code_bytes=0, compile_seconds=seconds,
                       collectives=(), platform=mesh.devices.flat[0].platform,
                       out_of_memory=line)


def _estimator(cfg: ModelConfig, mesh: Mesh, lower_at: Callable[[ModelConfig, bool], Any],
               estimate: bool = True):
  """`estimate()` for `_program_report`: compiles the thunk `lower_at(variant, True)`
  (unrolled layers) for the 1- and 2-layer variants of `cfg` and extrapolates to its depth;
  None without `estimate`."""
  if not estimate:
    return None

  def cost() -> Cost:
    one, two = (Cost.of(_compile(mesh, lower_at(layer_variant(cfg, k), True))) for k in (1, 2))
    return depth_extrapolated(one, two, cfg.num_layers)

  return cost


def _abstract_split(cfg: ModelConfig, mesh: Mesh, rules, *, compute_dtype: str, param_dtype: str,
                    attention_impl: str = "auto", unroll: bool = False):
  """(graphdef, state) of the abstract model, its state sharded on `mesh` by `rules`."""
  model = abstract_model(cfg, dtype=jnp.dtype(compute_dtype), param_dtype=jnp.dtype(param_dtype),
                         attention_impl=attention_impl, unroll_layers=unroll)
  graphdef, state = nnx.split(model)
  return graphdef, abstract_state(state, mesh, rules)


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


def _optimizer_state(tx, trained, mesh: Mesh):
  # Optimizer moments take their parameter's sharding (as `jax.jit(tx.init)(trained)` in
  # train.loop propagates them); counters and other non-parameter leaves are replicated.
  replicated = NamedSharding(mesh, P())
  return optax.tree_map_params(
      tx, lambda s, p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=p.sharding),
      jax.eval_shape(tx.init, trained), trained,
      transform_non_params=lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated))


def _lower_train_step(cfg: ModelConfig, mesh: Mesh, tcfg: TrainConfig, global_batch: int,
                      seq_len: int, *, pin_activations: bool, rules, attention_impl: str,
                      unroll: bool = False):
  """(lower thunk, trained, opt_state, batch, tx) of the trainer's step, all abstract."""
  micro = tcfg.micro_batch_size or global_batch
  model = abstract_model(cfg, dtype=jnp.dtype(tcfg.compute_dtype),
                         param_dtype=jnp.dtype(tcfg.param_dtype), remat=tcfg.remat,
                         attention_impl=attention_impl, unroll_layers=unroll)
  graphdef, trained, rngs, frozen = step_lib.split_model(model)
  trained, rngs, frozen = (abstract_state(s, mesh, rules) for s in (trained, rngs, frozen))
  tx = make_optimizer(tcfg, total_steps=1000)
  opt_state = _optimizer_state(tx, trained, mesh)
  shardings = tuple(step_lib.shardings_of(s) for s in (trained, opt_state, rngs, frozen))
  accum = global_batch // micro
  batch_shardings = {k: step_lib.microbatch_sharding(mesh, 3, rules) for k in step_lib.BATCH_KEYS}
  batch_shardings["weights"] = step_lib.microbatch_sharding(mesh, 2, rules)
  batch = {k: jax.ShapeDtypeStruct((accum, micro, seq_len), jnp.int32, sharding=batch_shardings[k])
           for k in step_lib.BATCH_KEYS}
  batch["weights"] = jax.ShapeDtypeStruct((accum, micro), jnp.float32,
                                          sharding=batch_shardings["weights"])
  step = step_lib.make_train_step(graphdef, tx, state_shardings=shardings,
                                  batch_shardings=batch_shardings, seed=tcfg.seed,
                                  model_hook=(batch_sharded_embeddings(mesh, rules)
                                              if pin_activations else None),
                                  router_aux_loss_coef=loss_lib.router_aux_coefficient(
                                      tcfg.router_aux_loss, cfg))
  step_index = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, P()))
  lower = lambda: step.lower(trained, opt_state, rngs, frozen, batch, step_index)
  return lower, trained, opt_state, batch, tx


def _update_cost(tx, trained, opt_state) -> Cost:
  """The optimizer update alone (gradients in the parameters' layout): what a step does once
  however many micro-batches it accumulates."""
  def update(trained, opt_state, grads):
    updates, opt_state = tx.update(grads, opt_state, trained)
    return optax.apply_updates(trained, updates), opt_state
  return Cost.of(jax.jit(update).lower(trained, opt_state, trained).compile())


def plan_train_step(cfg: ModelConfig, mesh: Mesh, global_batch: int, seq_len: int, *,
                    remat: str, compute_dtype: str, param_dtype: str, micro_batch: int,
                    optimizer: str = "adamw", pin_activations: bool = False,
                    estimate: bool = False, attention_impl: str = "auto",
                    rules=sharding_lib.DEFAULT_RULES) -> tuple[ProgramReport, int, int, int]:
  """Compiles the trainer's jitted step on `mesh` with abstract inputs.

  `pin_activations` passes `batch_sharded_embeddings` as the step's `model_hook`. With
  `estimate`, the cost figures are extrapolated from 1- and 2-layer unrolled steps of one
  micro-batch (`depth_extrapolated`): a step of A micro-batches costs A of those less A - 1
  optimizer updates (`_update_cost`, compiled at full depth).

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
  kwargs = dict(pin_activations=pin_activations, rules=rules, attention_impl=attention_impl)
  lower, trained, opt_state, batch, tx = _lower_train_step(cfg, mesh, tcfg, global_batch,
                                                           seq_len, **kwargs)
  accum = global_batch // micro

  def step_cost() -> Cost:
    one_micro = tcfg.replace(global_batch_size=micro, micro_batch_size=0)
    variant = lambda c, unroll: _lower_train_step(c, mesh, one_micro, micro, seq_len,
                                                  unroll=unroll, **kwargs)[0]
    per_micro = _estimator(cfg, mesh, variant)()
    if accum == 1:
      return per_micro
    update = _update_cost(tx, trained, opt_state)
    scaled = lambda a, b: None if a is None or b is None else accum * a - (accum - 1) * b
    return Cost(scaled(per_micro.flops, update.flops),
                scaled(per_micro.bytes_accessed, update.bytes_accessed),
                scaled(per_micro.seconds, update.seconds))

  report = _program_report("train_step", mesh, lower, step_cost if estimate else None)
  return report, per_device_bytes(trained), per_device_bytes(opt_state), per_device_bytes(batch)


def plan_sampling(cfg: ModelConfig, mesh: Mesh, batch: int, prompt_len: int, max_new_tokens: int,
                  *, compute_dtype: str, param_dtype: str, samples_per_prompt: int = 1,
                  estimate: bool = False, attention_impl: str = "auto",
                  rules=sharding_lib.DEFAULT_RULES) -> tuple[ProgramReport, ProgramReport]:
  """Compiles the sampler's prefill and decode programs (`memdyn_jax.evaluation.sampling`) on `mesh`.

  The programs are the ones `sampling.generate` runs (temperature sampling), lowered with
  abstract parameters, prompts and decode state: `batch` prompts of `prompt_len` tokens,
  each prefilled once and copied to its `samples_per_prompt` rows, and a KV cache of
  `prompt_len + max_new_tokens` slots. The decode program is a loop whose trip count is
  data (rows stop at their stop tokens): its cost figures (`estimate`) are one iteration's,
  one new token for every row.
  """
  from memdyn_jax.evaluation import sampling

  rows = sharding_lib.batch_sharding(mesh, 1, rules)
  ints = lambda shape, s: jax.ShapeDtypeStruct(shape, jnp.int32, sharding=s)
  replicated = NamedSharding(mesh, P())
  key = jax.eval_shape(lambda: jax.random.key(0))
  key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=replicated)
  prompt_sharding = sharding_lib.batch_sharding(mesh, 2, rules)
  params = sampling.SamplingParams(temperature=1.0, max_new_tokens=max_new_tokens)
  precision = dict(compute_dtype=compute_dtype, param_dtype=param_dtype,
                   attention_impl=attention_impl)

  def prefill_at(c: ModelConfig, unroll: bool):
    def lower():
      graphdef, state = _abstract_split(c, mesh, rules, unroll=unroll, **precision)
      return sampling.lower_prefill(
          graphdef, state, ints((batch, prompt_len), prompt_sharding),
          ints((batch, prompt_len), prompt_sharding), key, ints((batch,), rows),
          ints((), replicated), params=params, n=samples_per_prompt, mesh=mesh)
    return lower

  def decode_at(c: ModelConfig, unroll: bool):
    def lower():
      graphdef, state = _abstract_split(c, mesh, rules, unroll=unroll, **precision)
      prefill = prefill_at(c, unroll)()
      loop = _with_sharding(prefill.out_info, prefill.compile().output_shardings)
      return sampling.lower_decode(
          graphdef, state, loop, jax.ShapeDtypeStruct((4,), jnp.float32, sharding=replicated),
          ints((), replicated), ints((1,), replicated), ints((), replicated), params=params)
    return lower

  prefill = _program_report("prefill", mesh, prefill_at(cfg, False),
                            _estimator(cfg, mesh, prefill_at, estimate))
  decode = _program_report("decode", mesh, decode_at(cfg, False),
                           _estimator(cfg, mesh, decode_at, estimate))
  return prefill, decode


def plan_scoring(cfg: ModelConfig, mesh: Mesh, batch: int, seq_len: int, *, compute_dtype: str,
                 param_dtype: str, estimate: bool = False, attention_impl: str = "auto",
                 rules=sharding_lib.DEFAULT_RULES) -> ProgramReport:
  """Compiles the scorer's program (`memdyn_jax.evaluation.scoring.score`: teacher-forced
  log-likelihood, entropy and argmax hits of every target token) for `batch` sequences of
  `seq_len` tokens, batch-sharded as the evaluation places them. Its cost variants
  (`estimate`) take the LM head over the whole sequence at once: the scorer's slice loop
  would be counted once."""
  from memdyn_jax.evaluation import scoring

  seqs = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32,
                              sharding=sharding_lib.batch_sharding(mesh, 2, rules))
  precision = dict(compute_dtype=compute_dtype, param_dtype=param_dtype,
                   attention_impl=attention_impl)

  def score_at(c: ModelConfig, unroll: bool):
    def lower():
      graphdef, state = _abstract_split(c, mesh, rules, unroll=unroll, **precision)
      chunk = 1 << 62 if unroll else scoring.LOGITS_CHUNK_BYTES
      return scoring.lower_score(graphdef, state, seqs, seqs, seqs, chunk_bytes=chunk)
    return lower

  return _program_report("score", mesh, score_at(cfg, False),
                         _estimator(cfg, mesh, score_at, estimate))
