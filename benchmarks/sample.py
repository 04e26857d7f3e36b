"""Generation throughput: `memdyn_jax.sampling.generate` vs HF `generate`, same model and batch.

  python benchmarks/sample.py                             # B=16 and 64, 128 + 128 tokens, greedy
  python benchmarks/sample.py --batch_sizes=16 --temperature=0.8 --top_p=0.95
  python benchmarks/sample.py --dtype=bfloat16            # kernels, not frameworks (see below)

A random-init Llama of SmolLM2-135M's shape (30 layers, hidden 576, 9 heads / 3 KV heads,
intermediate 1536, vocab 49152, tied embeddings) is built with transformers, saved and
loaded into memdyn_jax. Both sides get the same 128-token prompts and generate exactly
`--new_tokens` tokens per row (no stop token), HF with `use_cache=True` and the same
sampling settings. JAX is warmed up first (compiling its prefill and decode programs with
a one-step run); HF with a two-token run. Each contender then runs once per batch size,
JAX first, and new-tokens/s = B * new_tokens / wall time (prefill included).

Roofline: per decode step, max(FLOPs / measured fp32 jnp matmul peak, bytes of weights +
KV cache read / measured memory bandwidth), plus the prefill's FLOPs / peak, summed over
the run; "of roofline" = that ideal time / the measured time. Both peaks are measured in
this run (the machine may be shared: load averages are printed).
On these CPUs torch's bf16 runs on AMX units XLA does not use: compare frameworks in fp32.
"""
from __future__ import annotations

import os
import time

from absl import app, flags

from _common import (best_seconds, define_json_out_flag, jnp_matmul_flops, machine_line,
                     random_token_ids, ratio_line, smollm2_shaped_models, write_json_out)
from memdyn_jax.models.flops import (attention_flops, decoder_flops_per_token,
                                     lm_head_flops_per_token)

flags.DEFINE_list("batch_sizes", ["16", "64"], "Batch sizes (prompts) to time.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
flags.DEFINE_integer("new_tokens", 128, "New tokens per row.")
flags.DEFINE_integer("num_layers", 30, "Decoder layers (30 = SmolLM2-135M).")
flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
flags.DEFINE_float("top_p", 1.0, "Nucleus mass (1 = off).")
flags.DEFINE_integer("top_k", 0, "Top-k (0 = off).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_bool("hf", True, "Also time HF generate.")
flags.DEFINE_integer("seed", 0, "Seed for weights, prompts and sampling.")
define_json_out_flag(flags)
FLAGS = flags.FLAGS


def machine_peaks() -> tuple[float, float]:
  """(fp32 jnp matmul FLOP/s, memory read bandwidth bytes/s), measured now."""
  import jax
  import jax.numpy as jnp

  flops = jnp_matmul_flops()  # best of 5, 2048 x 2048
  big = jnp.ones((128 * 2**20,), jnp.float32)  # 512 MiB, about the model's fp32 weights
  total = jax.jit(jnp.sum)
  bandwidth = big.nbytes / best_seconds(lambda: total(big).block_until_ready(), 5, warmup=1)
  return flops, bandwidth


def roofline_seconds(cfg, batch: int, prompt: int, new: int, peak: float, bandwidth: float,
                     bytes_per_value: int) -> float:
  """Ideal time of prefill + `new` decode steps (see the module docstring)."""
  dense, head = decoder_flops_per_token(cfg), lm_head_flops_per_token(cfg)
  # The prefill's logits are taken at the last position only.
  prefill = batch * (prompt * dense + head + attention_flops(cfg, prompt * (prompt + 1) / 2))
  seconds = prefill / peak
  from memdyn_jax import models
  weights = models.num_params(cfg) * bytes_per_value
  for step in range(1, new):  # the first new token comes from the prefill's logits
    ctx = prompt + step
    flops = batch * (dense + head + attention_flops(cfg, ctx))
    kv = 2 * cfg.num_layers * batch * ctx * cfg.num_kv_heads * cfg.head_dim * bytes_per_value
    seconds += max(flops / peak, (weights + kv) / bandwidth)
  return seconds


def main(argv):
  del argv
  import jax.numpy as jnp
  import numpy as np
  import torch

  from memdyn_jax.evaluation import sampling

  nbytes = jnp.dtype(FLAGS.dtype).itemsize
  hf_models, model, cfg = smollm2_shaped_models(FLAGS.num_layers, FLAGS.seed, FLAGS.dtype,
                                                ["eager"] if FLAGS.hf else [])
  hf = hf_models.get("eager")

  p, m = FLAGS.prompt_len, FLAGS.new_tokens
  params = sampling.SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                                   top_k=FLAGS.top_k, max_new_tokens=m, stop_token_ids=(),
                                   seed=FLAGS.seed)
  hf_kw = dict(do_sample=not params.greedy, max_new_tokens=m, min_new_tokens=m, use_cache=True,
               pad_token_id=0, eos_token_id=None)
  if not params.greedy:
    hf_kw.update(temperature=FLAGS.temperature, top_p=FLAGS.top_p, top_k=FLAGS.top_k)
  peak, bandwidth = machine_peaks()
  print(machine_line(load_average=True))
  print(f"model: SmolLM2-135M shape, {FLAGS.num_layers} layers, {FLAGS.dtype}; {p} prompt + "
        f"{m} new tokens; sampling: {'greedy' if params.greedy else hf_kw}")
  print(f"measured now: fp32 jnp matmul {peak / 1e9:.0f} GFLOP/s, memory read "
        f"{bandwidth / 1e9:.1f} GB/s")

  figures = {"benchmark": "sample", "prompt_len": p, "new_tokens": m,
             "greedy": params.greedy, "batches": {}}
  for b in (int(x) for x in FLAGS.batch_sizes):
    ids = random_token_ids(FLAGS.seed, cfg.vocab_size, b, p)
    mask = np.ones_like(ids)
    # Warm-up: a run stopped after one step compiles both programs (shapes are the same).
    sampling.generate(model, ids, mask, params, stop_fn=lambda t, n: np.ones(len(n), bool),
                      check_every=1)
    t0 = time.perf_counter()
    out = sampling.generate(model, ids, mask, params)
    results = {"jax generate": time.perf_counter() - t0}
    assert (out.lengths == m).all()
    ideal = roofline_seconds(cfg, b, p, m, peak, bandwidth, nbytes)
    agree = ""
    if hf is not None:
      ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
      with torch.no_grad():
        hf.generate(input_ids=ids_t, attention_mask=mask_t, **dict(hf_kw, max_new_tokens=2,
                                                                    min_new_tokens=2))
        t0 = time.perf_counter()
        ref = hf.generate(input_ids=ids_t, attention_mask=mask_t, **hf_kw)
        results["hf generate"] = time.perf_counter() - t0
      ref = ref[:, p:].numpy()
      assert ref.shape == out.tokens.shape
      if params.greedy:  # random-init logits are nearly flat: rounding may flip near-ties
        agree = (f"   greedy rows identical to HF: {int((ref == out.tokens).all(1).sum())}/{b}, "
                 f"tokens equal: {(ref == out.tokens).mean():.1%}")
    print(f"\nbatch {b}: {b * m} new tokens, roofline {ideal:.2f} s{agree}")
    for name, sec in results.items():
      print(f"  {name:<13s} {sec:8.2f} s  {b * m / sec:8.1f} new tokens/s  "
            f"{ideal / sec:5.0%} of roofline")
    if "hf generate" in results:
      print("  " + ratio_line("jax", "hf", results["hf generate"] / results["jax generate"]))
    figures["batches"][str(b)] = {
        "new_tokens_per_s": {k: b * m / sec for k, sec in results.items()},
        "roofline_fraction": {k: ideal / sec for k, sec in results.items()},
        **({"ratio_jax_over_hf": results["hf generate"] / results["jax generate"]}
           if "hf generate" in results else {})}
  print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
  write_json_out(FLAGS.json_out, {**figures, "matmul_peak_flops": peak,
                                  "memory_bandwidth": bandwidth})


if __name__ == "__main__":
  app.run(main)
