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

from absl import app, flags

from _common import (define_json_out_flag, jnp_matmul_flops, machine_line, mean_seconds,
                     random_token_ids, ratio_line, round_robin_median_seconds,
                     smollm2_shaped_models, torch_matmul_flops, write_json_out)

flags.DEFINE_integer("batch", 4, "Batch size.")
flags.DEFINE_integer("seq_len", 256, "Sequence length.")
flags.DEFINE_integer("num_layers", 30, "Decoder layers (30 = SmolLM2-135M).")
flags.DEFINE_integer("warmup", 2, "Untimed calls per contender.")
flags.DEFINE_integer("iters", 5, "Timed calls per contender (the median is reported).")
flags.DEFINE_list("torch_attn", ["eager", "sdpa"], "HF attention implementations to time.")
flags.DEFINE_bool("left_pad", False, "Left-pad half the rows by T/4 (exercises the mask).")
flags.DEFINE_integer("seed", 0, "Seed for weights and token ids.")
flags.DEFINE_integer("torch_threads", 0, "torch.set_num_threads (0 = torch's default).")
define_json_out_flag(flags)
FLAGS = flags.FLAGS


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx

  b, t = FLAGS.batch, FLAGS.seq_len
  if FLAGS.torch_threads:
    torch.set_num_threads(FLAGS.torch_threads)
  hf, model, cfg = smollm2_shaped_models(FLAGS.num_layers, FLAGS.seed, "float32",
                                         FLAGS.torch_attn)

  ids = random_token_ids(FLAGS.seed, cfg.vocab_size, b, t)
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

  print(machine_line())
  print(f"model: SmolLM2-135M shape, {FLAGS.num_layers} layers, fp32; batch {b} x {t} tokens"
        f"{' (left-padded)' if FLAGS.left_pad else ''}; warmup {FLAGS.warmup}, "
        f"median of {FLAGS.iters}")
  print(f"max |dlogit| jax vs torch: {max_diff:.2e}")
  # A load gauge, not a peak: the mean of a smaller matmul, right before the timed rounds.
  print("fp32 matmul GFLOP/s now: jax %.0f, torch %.0f"
        % (jnp_matmul_flops(n=1536, timer=mean_seconds) / 1e9,
           torch_matmul_flops(n=1536, timer=mean_seconds) / 1e9))
  tps = {}
  for name, sec in round_robin_median_seconds(runs, FLAGS.warmup, FLAGS.iters).items():
    tps[name] = b * t / sec
    print(f"{name:<20s} {sec * 1e3:9.1f} ms/call  {tps[name]:9.0f} tokens/s")
  best_jax = max((k for k in tps if k.startswith("jax")), key=tps.get)
  ratios = {}
  for name in (k for k in tps if k.startswith("torch")):
    ratios[name] = tps[best_jax] / tps[name]
    print(ratio_line(best_jax, name, ratios[name]))
  write_json_out(FLAGS.json_out, {
      "benchmark": "forward", "batch": b, "seq_len": t, "tokens_per_s": tps,
      "best_jax": best_jax, "ratio_best_jax_over": ratios, "max_abs_logit_diff": max_diff})


if __name__ == "__main__":
  app.run(main)
