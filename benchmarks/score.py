"""Scoring throughput: `memdyn_jax.scoring.score` vs HF PyTorch forward, same model, same batch.

  python benchmarks/score.py                          # SmolLM2-135M shape, B=16, T=256, fp32
  python benchmarks/score.py --batch_sizes=16,64 --iters=3
  python benchmarks/score.py --dtype=bfloat16         # kernels, not frameworks (see below)

A random-init Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
intermediate 1536, vocab 49152, tied embeddings) is built with transformers, saved, and
loaded into memdyn_jax, so both sides hold identical weights. Each row is a 128-token
prompt + 128-token target; both sides produce the target's token log-probs:
  * jax:        `scoring.score` (forward + log-probs, entropy, argmax, reductions; jitted)
  * hf score:   forward + `log_softmax` gathered at the targets (what lm-eval does)
  * hf forward: the forward alone (logits), HF's floor
Contenders are timed round-robin (one call each per round, median of `--iters`), so a
shared machine's load hits all alike. tokens/s counts B*T per call. The fraction of the
roofline is model FLOPs ÷ (the fp32 jnp matmul peak measured in this run × time).
On these CPUs torch's bf16 runs on AMX units XLA does not use: compare frameworks in fp32.
"""
from __future__ import annotations

import os
import statistics
import tempfile
import time

from absl import app, flags

from memdyn_jax import testing

flags.DEFINE_list("batch_sizes", ["16"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
flags.DEFINE_integer("target_len", 128, "Target (scored) tokens per row.")
flags.DEFINE_integer("num_layers", 30, "Decoder layers (30 = SmolLM2-135M).")
flags.DEFINE_integer("iters", 3, "Timed rounds (the median is reported).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_integer("seed", 0, "Seed for weights and token ids.")
FLAGS = flags.FLAGS

SMOLLM2_135M = testing.SMOLLM2_135M_SHAPE


def matmul_peak_flops(n: int = 2048, reps: int = 5) -> float:
  """Measured fp32 jnp matmul FLOP/s (best of `reps`)."""
  import jax
  import jax.numpy as jnp

  a = jnp.ones((n, n), jnp.float32)
  mm = jax.jit(lambda x: x @ x)
  mm(a).block_until_ready()
  best = float("inf")
  for _ in range(reps):
    t0 = time.perf_counter()
    mm(a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n**3 / best


def forward_flops(cfg, batch: int, seq: int) -> float:
  """Matmul FLOPs of one forward over (batch, seq) tokens, logits at every position."""
  h, d = cfg.hidden_size, cfg.head_dim
  per_layer = 2 * h * d * (2 * cfg.num_heads + 2 * cfg.num_kv_heads) + 6 * h * cfg.intermediate_size
  dense = cfg.num_layers * per_layer + 2 * h * cfg.vocab_size
  attention = cfg.num_layers * 2 * 2 * cfg.num_heads * d * seq * (seq + 1) / 2  # causal half
  return batch * (seq * dense + attention)


def main(argv):
  del argv
  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  import transformers

  from memdyn_jax import models, scoring, testing

  dtype = {"float32": (jnp.float32, torch.float32), "bfloat16": (jnp.bfloat16, torch.bfloat16)}
  jdtype, tdtype = dtype[FLAGS.dtype]
  hf_cfg = transformers.LlamaConfig(num_hidden_layers=FLAGS.num_layers, **SMOLLM2_135M)
  with tempfile.TemporaryDirectory() as tmp:
    testing.make_hf_model(hf_cfg, seed=FLAGS.seed, perturb=0.0).save_pretrained(tmp)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, dtype=tdtype, attn_implementation="eager").eval()
    model, cfg = models.from_pretrained(tmp, dtype=jdtype)

  p, t = FLAGS.prompt_len, FLAGS.prompt_len + FLAGS.target_len
  peak = matmul_peak_flops()
  print(f"devices: {jax.devices()}  torch threads: {torch.get_num_threads()}  "
        f"cpu count: {os.cpu_count()}  load average: {os.getloadavg()[0]:.1f}")
  print(f"model: SmolLM2-135M shape, {FLAGS.num_layers} layers, {FLAGS.dtype}; rows of {p} prompt "
        f"+ {FLAGS.target_len} target tokens; median of {FLAGS.iters} round-robin rounds")
  print(f"fp32 jnp matmul peak now: {peak / 1e9:.0f} GFLOP/s")

  for b in (int(x) for x in FLAGS.batch_sizes):
    rng = np.random.RandomState(FLAGS.seed)
    ids = rng.randint(3, cfg.vocab_size, (b, t)).astype(np.int32)
    mask = np.ones((b, t), np.int32)
    target = np.zeros((b, t), np.int32)
    target[:, p:] = 1
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    nxt = ids_t[:, 1:, None]
    tmask_t = torch.tensor(target[:, 1:], dtype=torch.bool)

    def jax_score():
      out = scoring.score(model, ids, mask, target)
      return jax.block_until_ready(out.token_logprobs)

    def hf_forward():
      with torch.no_grad():
        return hf(input_ids=ids_t, attention_mask=mask_t).logits

    def hf_score():
      with torch.no_grad():
        logits = hf(input_ids=ids_t, attention_mask=mask_t).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt)[..., 0]
        return torch.where(tmask_t, lp, 0.0)

    runs = {"jax score": jax_score, "hf score": hf_score, "hf forward": hf_forward}
    ours = np.asarray(jax_score())[:, 1:]  # also the warm-up (compile) call
    ref = hf_score().numpy()
    diff = float(np.abs(ours - ref)[target[:, 1:] == 1].max())
    hf_forward()
    times = {name: [] for name in runs}
    for _ in range(FLAGS.iters):
      for name, fn in runs.items():
        t0 = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - t0)
    flops = forward_flops(cfg, b, t)
    print(f"\nbatch {b} x {t} tokens   max |dlogprob| jax vs hf: {diff:.1e}")
    tps = {}
    for name, ts in times.items():
      sec = statistics.median(ts)
      tps[name] = b * t / sec
      print(f"  {name:<11s} {sec:8.2f} s/call  {tps[name]:8.0f} tokens/s  "
            f"{flops / sec / 1e9:6.0f} GFLOP/s  {flops / sec / peak:5.0%} of fp32 matmul peak")
    print(f"  ratio jax score / hf score:   {tps['jax score'] / tps['hf score']:.2f}x")
    print(f"  ratio jax score / hf forward: {tps['jax score'] / tps['hf forward']:.2f}x")
  print(f"\nfp32 jnp matmul peak at the end: {matmul_peak_flops() / 1e9:.0f} GFLOP/s  "
        f"load average: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
  app.run(main)
