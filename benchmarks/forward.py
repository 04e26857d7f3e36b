"""Forward-pass throughput: memdyn_jax (jitted) vs HF PyTorch, same model, same batch.

  python benchmarks/forward.py                      # SmolLM2-135M shape, B=4, T=256, fp32
  python benchmarks/forward.py --batch=8 --seq_len=128 --iters=10

A random-init Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
intermediate 1536, vocab 49152, tied embeddings) is built with transformers, saved, and
loaded into memdyn_jax, so both sides hold identical fp32 weights. Each contender gets
`--warmup` untimed calls (JAX compiles in the first), then `--iters` timed rounds of one
call each, round-robin (so a shared machine's load hits all alike); the median is
reported as tokens/s (B*T per call), all in one process. A matmul GFLOP/s line shows how
busy the machine was.
JAX is timed twice: `nnx.jit` on the module, and `jax.jit` over the state of
`nnx.split` (no per-call graph traversal). PyTorch runs under `torch.no_grad()` with its
default thread count, in eager and sdpa attention.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags

from memdyn_jax import testing

flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("seq_len", 256, "Sequence length.")
flags.DEFINE_integer("num_layers", 30, "Decoder layers (30 = SmolLM2-135M).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per contender.")
flags.DEFINE_integer("iters", 5, "Timed calls per contender (the median is reported).")
flags.DEFINE_list("torch_attn", ["eager", "sdpa"], "HF attention implementations to time.")
flags.DEFINE_bool("left_pad", False, "Left-pad half the rows by T/4 (exercises the mask).")
flags.DEFINE_integer("seed", 0, "Seed for weights and token ids.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default).")
FLAGS = flags.FLAGS

SMOLLM2_135M = testing.SMOLLM2_135M_SHAPE


def _median_seconds(runs: dict, warmup: int, iters: int) -> dict[str, float]:
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


def _matmul_gflops(jnp, torch, n: int = 1536, reps: int = 5) -> tuple[float, float]:
  """fp32 n x n matmul GFLOP/s of jnp and torch: how busy the machine is right now."""
  import jax

  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(jnp.matmul)
  mm(a, a).block_until_ready()
  t0 = time.perf_counter()
  for _ in range(reps):
    mm(a, a).block_until_ready()
  jax_s = (time.perf_counter() - t0) / reps
  at = torch.ones(n, n)
  torch.mm(at, at)
  t0 = time.perf_counter()
  for _ in range(reps):
    torch.mm(at, at)
  torch_s = (time.perf_counter() - t0) / reps
  return 2 * n**3 / jax_s / 1e9, 2 * n**3 / torch_s / 1e9


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers
  from flax import nnx

  from memdyn_jax import models, testing

  b, t = FLAGS.batch, FLAGS.seq_len
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  hf_cfg = transformers.LlamaConfig(num_hidden_layers=FLAGS.num_layers, **SMOLLM2_135M)
  with tempfile.TemporaryDirectory() as tmp:
    testing.make_hf_model(hf_cfg, seed=FLAGS.seed, perturb=0.0).save_pretrained(tmp)
    hf = {impl: transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=torch.float32, attn_implementation=impl).eval() for impl in FLAGS.torch_attn}
    model, _ = models.from_pretrained(tmp, dtype=jnp.float32)

  rng = np.random.RandomState(FLAGS.seed)
  ids = rng.randint(3, hf_cfg.vocab_size, (b, t)).astype(np.int32)
  mask = np.ones((b, t), np.int32)
  if FLAGS.left_pad:
    mask[::2, :t // 4] = 0
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  ids_j, mask_j = jnp.asarray(ids), jnp.asarray(mask)
  ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
  pos_t = torch.tensor(positions, dtype=torch.long)

  nnx_forward = nnx.jit(lambda m, i, a: m(i, a))
  graphdef, state = nnx.split(model)
  split_forward = jax.jit(lambda s, i, a: nnx.merge(graphdef, s)(i, a))
  runs = {
      "jax nnx.jit": lambda: nnx_forward(model, ids_j, mask_j).block_until_ready(),
      "jax jax.jit(split)": lambda: split_forward(state, ids_j, mask_j).block_until_ready(),
  }

  def torch_run(m):
    def run():
      with torch.no_grad():
        return m(input_ids=ids_t, attention_mask=mask_t, position_ids=pos_t).logits
    return run

  for impl, m in hf.items():
    runs[f"torch {impl}"] = torch_run(m)

  # Same numbers on both sides (a benchmark of different computations would be meaningless).
  ref = torch_run(next(iter(hf.values())))().numpy()
  ours = np.asarray(split_forward(state, ids_j, mask_j))
  real = mask.astype(bool)
  max_diff = float(np.abs(ours - ref)[real].max())

  print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  "
        f"cpu count: {os.cpu_count()}")
  print(f"model: SmolLM2-135M shape, {FLAGS.num_layers} layers, fp32; batch {b} x {t} tokens"
        f"{' (left-padded)' if FLAGS.left_pad else ''}; warmup {FLAGS.warmup}, "
        f"median of {FLAGS.iters}")
  print(f"max |dlogit| jax vs torch: {max_diff:.2e}")
  print("fp32 matmul GFLOP/s now: jax %.0f, torch %.0f" % _matmul_gflops(jnp, torch))
  tps = {}
  for name, sec in _median_seconds(runs, FLAGS.warmup, FLAGS.iters).items():
    tps[name] = b * t / sec
    print(f"{name:<20s} {sec * 1e3:9.1f} ms/call  {tps[name]:9.0f} tokens/s")
  best_jax = max((k for k in tps if k.startswith("jax")), key=tps.get)
  for name in (k for k in tps if k.startswith("torch")):
    print(f"ratio {best_jax} / {name}: {tps[best_jax] / tps[name]:.2f}x")


if __name__ == "__main__":
  app.run(main)
