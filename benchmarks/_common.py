"""What the benchmarks share, so that each measures and reports the same way: the model both
frameworks run, the timers, the matmul probe and the ratio line. (The FLOP model is the
library's, `memdyn_jax.models.flops`, which `memdyn_jax.plan` uses too.)

The scripts run as `python benchmarks/<name>.py` from any folder: Python puts the script's
own folder first on `sys.path`, so they import this file as the sibling module `_common`
(the underscore: it is not a benchmark; `python -m benchmarks.<name>` would not find it). jax, torch and transformers are imported inside
the functions, as the scripts do, so that importing this module (and `--help`) stays fast.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from typing import Any, Callable


def mean_seconds(fn: Callable[[], Any], reps: int, warmup: int = 0) -> float:
  """Seconds per call of `fn`, averaged over `reps` back-to-back calls after `warmup`
  untimed ones. The mean keeps every slowdown in: it says how fast things run now, load
  from other processes included (`best_seconds` says how fast they can run)."""
  for _ in range(warmup):
    fn()
  t0 = time.perf_counter()
  for _ in range(reps):
    fn()
  return (time.perf_counter() - t0) / reps


def best_seconds(fn: Callable[[], Any], reps: int, warmup: int = 0) -> float:
  """Seconds of the fastest of `reps` timed calls of `fn`, after `warmup` untimed ones: the
  least disturbed call, the nearest a shared machine gets to its peak."""
  for _ in range(warmup):
    fn()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    fn()
    best = min(best, time.perf_counter() - t0)
  return best


def round_robin_median_seconds(runs: dict[str, Callable[[], Any]], warmup: int,
                               iters: int) -> dict[str, float]:
  """Median seconds per call of each contender. Timed round-robin (one call of each per
  round), so load from other processes on a shared machine hits all of them alike."""
  for fn in runs.values():
    for _ in range(warmup):
      fn()
  times = {name: [] for name in runs}
  for _ in range(iters):
    for name, fn in runs.items():
      t0 = time.perf_counter()
      fn()
      times[name].append(time.perf_counter() - t0)
  return {name: statistics.median(ts) for name, ts in times.items()}


def jnp_matmul_flops(n: int = 2048, reps: int = 5, timer=best_seconds) -> float:
  """FLOP/s of a jitted fp32 n x n `jnp` matmul, after one compiling call. With
  `best_seconds` it is the peak XLA reaches here, the yardstick of MFU and roofline
  figures; with `mean_seconds` it gauges how busy the machine is right now."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  square = jax.jit(lambda x: x @ x)
  return 2 * n**3 / timer(lambda: square(a).block_until_ready(), reps, warmup=1)


def torch_matmul_flops(n: int = 2048, reps: int = 5, timer=best_seconds) -> float:
  """FLOP/s of an fp32 n x n `torch.mm` after one untimed call: `jnp_matmul_flops`'s
  counterpart, since load slows torch's OpenMP threads more than XLA's."""
  import torch

  a = torch.ones(n, n)
  return 2 * n**3 / timer(lambda: torch.mm(a, a), reps, warmup=1)


def machine_line(load_average: bool = False) -> str:
  """Where the numbers were measured: JAX's devices, torch's thread count, the CPU count
  and, with `load_average`, the 1-minute load average (other processes on the cores slow
  every contender, and not all of them alike)."""
  import jax
  import torch

  line = (f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  "
          f"cpu count: {os.cpu_count()}")
  if load_average:
    line += f"  load average: {os.getloadavg()[0]:.1f}"
  return line


def smollm2_shaped_models(num_layers: int, seed: int, dtype: str,
                          attn_implementations) -> tuple[dict[str, Any], Any, Any]:
  """`(hf_models, model, cfg)`: a random-init Llama of SmolLM2-135M's shape with
  `num_layers` decoder layers, loaded by HF once per attention implementation
  (`{implementation: model}`, eval mode; none if `attn_implementations` is empty) and by
  memdyn_jax (`model` and its `cfg`), both in `dtype` ("float32", "bfloat16"). Both load
  the one checkpoint saved here, so both sides compute the same function and a speed
  difference is the frameworks', not the weights'. HF's own init is kept (`perturb=0`):
  the tests' perturbation only matters for parity."""
  import jax.numpy as jnp
  import torch
  import transformers

  from memdyn_jax import models, testing

  hf_cfg = transformers.LlamaConfig(num_hidden_layers=num_layers,
                                    **testing.SMOLLM2_135M_SHAPE)
  with tempfile.TemporaryDirectory() as tmp:
    testing.make_hf_model(hf_cfg, seed=seed, perturb=0.0).save_pretrained(tmp)
    hf_models = {
        impl: transformers.AutoModelForCausalLM.from_pretrained(
            tmp, dtype=getattr(torch, dtype), attn_implementation=impl).eval()
        for impl in attn_implementations}
    model, cfg = models.from_pretrained(tmp, dtype=getattr(jnp, dtype))
  return hf_models, model, cfg


def random_token_ids(seed: int, vocab_size: int, batch: int, length: int):
  """int32 (batch, length) token ids drawn uniformly above ids 0 to 2 (pad, bos, eos), so
  that the random text holds no special token."""
  import numpy as np

  return np.random.RandomState(seed).randint(3, vocab_size, (batch, length)).astype(np.int32)


def ratio_line(numerator: str, denominator: str, ratio: float, label_width: int = 0) -> str:
  """`ratio A / B: R.RRx`, A's throughput over B's (above 1: A is faster), so every
  comparison with HF PyTorch reads the same way. `label_width` pads "B:" so that a column
  of ratios lines up."""
  return f"ratio {numerator} / {(denominator + ':').ljust(label_width)} {ratio:.2f}x"


def define_json_out_flag(flags) -> None:
  """`--json_out`: where a script also writes its figures as JSON (`run_all.py` reads them)."""
  flags.DEFINE_string("json_out", None, "Also write the measured figures to this JSON file.")


def write_json_out(path: str | None, figures: dict[str, Any]) -> None:
  """Writes `figures` (with the machine's load average) to `path`; nothing without one."""
  if not path:
    return
  figures = {**figures, "load_average": os.getloadavg()[0]}
  with open(path, "w") as f:
    json.dump(figures, f, indent=2, sort_keys=True)
