"""The cheapest configuration whose train step fits a chip: a search over chip counts,
fsdp/tensor splits, remat, micro-batch and precision, each candidate compiled (`plan_scale`).

TPU chips are searched on their real slices with XLA:TPU's memory (libtpu installed; the
chip counts are the slice sizes the chip comes in); GPU chips, and TPU chips without libtpu,
on fake CPU devices, whose compiles all chips share.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import jax.numpy as jnp

from memdyn_jax import models
from memdyn_jax.models import ModelConfig
from memdyn_jax.plan.chips import ACCELERATORS, CHIPS, Target, slice_sizes, tpu_compiler_available
from memdyn_jax.plan.scale import (PRECISIONS, USABLE_FRACTION, GiB, PlanReport, plan_scale,
                                  resolve_model)


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the lever space (its fake-CPU compile is shared between accelerators)."""

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


def fits(report: PlanReport, usable: int) -> bool:
  """The train step compiled (no out-of-memory refusal) within `usable` bytes per chip."""
  return report.train.out_of_memory is None and report.total_bytes <= usable


def compiles_on_tpu(accelerator: str, compiler: str = "auto") -> bool:
  """Whether a search compiles `accelerator`'s candidates with XLA:TPU: a TPU chip, and
  `compiler` "tpu", or "auto" with libtpu installed ("cpu": always fake CPU devices)."""
  chip = CHIPS.get(accelerator)
  if chip is None or chip.platform != "tpu" or compiler == "cpu":
    return False
  return compiler == "tpu" or tpu_compiler_available()


def cheapest_fitting(model_config: ModelConfig | str, accelerators: Sequence[str] | str,
                     global_batch: int = 128, seq_len: int = 1024, *,
                     device_counts: Sequence[int] = (1, 2, 4, 8, 16, 32, 64),
                     tensor_options: Sequence[int] = (1,),
                     remats: Sequence[str] = ("none", "dots", "full"),
                     precisions: Sequence[str] = ("mixed",), optimizer: str = "adamw",
                     pin_activations: bool = True, compiler: str = "auto",
                     estimate: bool = False, cache: dict | None = None,
                     log=None) -> dict[str, FitResult]:
  """The cheapest configuration whose train step fits each accelerator.

  "Cheapest" = fewest chips, then the first ladder of `candidate_space` (precision, remat,
  tensor split) that fits with its smallest micro-batch, then the largest micro-batch of
  that ladder that still fits (a binary search: memory grows with the micro-batch).
  Candidates whose `state_lower_bound` exceeds the chip are skipped uncompiled. A TPU chip
  compiled with XLA:TPU (`compiles_on_tpu`) is searched on its slice sizes among
  `device_counts`; fake-CPU compiles are shared between accelerators (and across calls
  through `cache`).

  Args:
    model_config: a `ModelConfig` or preset name.
    accelerators: one key of `ACCELERATORS` or several.
    global_batch, seq_len: the batch to train on.
    device_counts: chip counts to consider, ascending.
    tensor_options: tensor-parallel sizes to consider (fsdp takes the rest of the chips).
    remats, precisions: lever values to consider (keys of `PRECISIONS`).
    optimizer: as `TrainConfig.optimizer`.
    pin_activations: see `plan_scale`.
    compiler: "auto" (XLA:TPU for TPU chips where libtpu is installed), "tpu" or "cpu".
    estimate: XLA:TPU plans also carry the compiler's step-time estimate (and MFU): a few
      more small compiles per candidate (`plan_scale(estimate=True)`).
    cache: a dict reused across calls: candidate key -> PlanReport.
    log: optional `log(str)` progress callback.

  Returns:
    {accelerator: FitResult}.
  """
  accelerators = [accelerators] if isinstance(accelerators, str) else list(accelerators)
  name, cfg = resolve_model(model_config)
  cache = {} if cache is None else cache

  def compile_one(c: Candidate, acc: str) -> PlanReport:
    on_tpu = compiles_on_tpu(acc, compiler)
    key = (name, global_batch, seq_len, optimizer, pin_activations, estimate and on_tpu,
           acc if on_tpu else "cpu", c)
    if key not in cache:
      compute, param = PRECISIONS[c.precision]
      where = (dict(target=Target(CHIPS[acc], c.devices)) if on_tpu
               else dict(accelerator="h200"))
      cache[key] = plan_scale(cfg, c.mesh_shape, global_batch, seq_len, remat=c.remat,
                              compute_dtype=compute, param_dtype=param,
                              micro_batch=c.micro_batch, optimizer=optimizer,
                              pin_activations=pin_activations, sampling=False,
                              estimate=estimate and on_tpu, **where)
      if log:
        r = cache[key]
        log(f"{name} {acc if on_tpu else 'fake CPU'} {c}: {r.total_bytes / GiB:.2f} "
            f"GiB/device, compiled in {r.train.compile_seconds:.1f}s")
    return dataclasses.replace(cache[key], model=name)

  out = {}
  for acc in accelerators:
    usable = int(ACCELERATORS[acc] * USABLE_FRACTION)
    counts = list(device_counts)
    if compiles_on_tpu(acc, compiler):
      sizes = set(slice_sizes(CHIPS[acc], max(counts)))
      counts = [n for n in counts if n in sizes]
    tried: list[tuple[Candidate, int | None]] = []
    found = None
    for n in counts:
      for ladder in candidate_space(n, global_batch, tensor_options=tensor_options,
                                    remats=remats, precisions=precisions):
        low = ladder[0]
        if state_lower_bound(cfg, low.mesh_shape, low.precision, optimizer) > usable:
          tried.append((low, None))
          continue
        report = compile_one(low, acc)
        tried.append((low, report.total_bytes))
        if not fits(report, usable):
          continue
        best, lo, hi = report, 1, len(ladder) - 1  # binary search for the largest fit
        while lo <= hi:
          mid = (lo + hi) // 2
          r = compile_one(ladder[mid], acc)
          tried.append((ladder[mid], r.total_bytes))
          if fits(r, usable):
            best, lo = r, mid + 1
          else:
            hi = mid - 1
        found = best
        break
      if found is not None:
        break
    if found is not None:
      found = dataclasses.replace(found, accelerator=acc, capacity_bytes=ACCELERATORS[acc],
                                  peak_flops=CHIPS[acc].peak_bf16_flops if acc in CHIPS else 0.0)
    out[acc] = FitResult(acc, found, tuple(tried))
  return out


def describe_fit(result: FitResult) -> str:
  """One table cell: "16 chips, fsdp=16, remat=full, micro-batch 64 (2 acc. steps), 11.2
  GiB/chip", with the estimated tokens/s per chip and MFU of an XLA:TPU plan."""
  r = result.report
  if r is None:
    return "does not fit in the searched space"
  d, f, t = r.mesh_shape
  split = f"fsdp={f}" + (f" tensor={t}" if t > 1 else "") + (f" data={d}" if d > 1 else "")
  acc = r.global_batch // r.micro_batch
  cell = (f"{r.devices} chips, {split}, remat={r.remat}, micro-batch {r.micro_batch}"
          f" ({acc} acc. step{'s' if acc > 1 else ''}), {r.total_bytes / GiB:.1f} GiB/chip")
  if r.mfu:
    cell += f"; est. {r.tokens_per_second_per_chip:,.0f} tok/s/chip, MFU {r.mfu:.0%}"
  return cell


def fit_table(results: dict[str, FitResult], model: str, global_batch: int, seq_len: int,
              compiler: str = "auto") -> str:
  """`cheapest_fitting`'s results as a Markdown table, a row per chip, naming the compiler
  each row's memory comes from."""
  rows = ["| model | batch | accelerator | compiled by | cheapest fitting configuration |",
          "|---|---|---|---|---|"]
  for acc, res in results.items():
    by = "XLA:TPU" if compiles_on_tpu(acc, compiler) else "XLA:CPU (fake devices)"
    rows.append(f"| {model} | {global_batch} x {seq_len} | {acc} | {by} | "
                f"{describe_fit(res)} |")
  return "\n".join(rows)
