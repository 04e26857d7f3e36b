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

from absl import app, flags

from _common import (define_json_out_flag, jnp_matmul_flops, machine_line, random_token_ids,
                     ratio_line, round_robin_median_seconds, smollm2_shaped_models,
                     write_json_out)
from memdyn_jax.models.flops import (attention_flops, decoder_flops_per_token,
                                     lm_head_flops_per_token)

flags.DEFINE_list("batch_sizes", ["16"], "Batch sizes to time.")
flags.DEFINE_integer("prompt_len", 128, "Prompt tokens per row.")
flags.DEFINE_integer("target_len", 128, "Target (scored) tokens per row.")
flags.DEFINE_integer("num_layers", 30, "Decoder layers (30 = SmolLM2-135M).")
flags.DEFINE_integer("iters", 3, "Timed rounds (the median is reported).")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Weights and compute dtype.")
flags.DEFINE_integer("seed", 0, "Seed for weights and token ids.")
define_json_out_flag(flags)
FLAGS = flags.FLAGS


def forward_flops(cfg, batch: int, seq: int) -> float:
  """Matmul FLOPs of one forward over (batch, seq) tokens, logits at every position."""
  dense = decoder_flops_per_token(cfg) + lm_head_flops_per_token(cfg)
  return batch * (seq * dense + attention_flops(cfg, seq * (seq + 1) / 2))  # causal half


def main(argv):
  del argv
  import jax
  import numpy as np
  import torch

  from memdyn_jax.evaluation import scoring

  hf_models, model, cfg = smollm2_shaped_models(FLAGS.num_layers, FLAGS.seed, FLAGS.dtype,
                                                ["eager"])
  hf = hf_models["eager"]

  p, t = FLAGS.prompt_len, FLAGS.prompt_len + FLAGS.target_len
  peak = jnp_matmul_flops()
  print(machine_line(load_average=True))
  print(f"model: SmolLM2-135M shape, {FLAGS.num_layers} layers, {FLAGS.dtype}; rows of {p} prompt "
        f"+ {FLAGS.target_len} target tokens; median of {FLAGS.iters} round-robin rounds")
  print(f"fp32 jnp matmul peak now: {peak / 1e9:.0f} GFLOP/s")

  figures = {"benchmark": "score", "prompt_len": p, "target_len": FLAGS.target_len,
             "batches": {}}
  for b in (int(x) for x in FLAGS.batch_sizes):
    ids = random_token_ids(FLAGS.seed, cfg.vocab_size, b, t)
    mask = np.ones((b, t), np.int32)
    target = np.zeros((b, t), np.int32)
    target[:, p:] = 1
    ids_t, mask_t = torch.tensor(ids, dtype=torch.long), torch.tensor(mask)
    nxt = ids_t[:, 1:, None]
    tmask_t = torch.tensor(target[:, 1:], dtype=torch.bool)

    # Each shape's closures take its arrays as defaults: bound now, not at the loop's end.
    def jax_score(ids=ids, mask=mask, target=target):
      out = scoring.score(model, ids, mask, target)
      return jax.block_until_ready(out.token_logprobs)

    def hf_forward(ids_t=ids_t, mask_t=mask_t):
      with torch.no_grad():
        return hf(input_ids=ids_t, attention_mask=mask_t).logits

    def hf_score(ids_t=ids_t, mask_t=mask_t, nxt=nxt, tmask_t=tmask_t):
      with torch.no_grad():
        logits = hf(input_ids=ids_t, attention_mask=mask_t).logits[:, :-1]
        lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, nxt)[..., 0]
        return torch.where(tmask_t, lp, 0.0)

    runs = {"jax score": jax_score, "hf score": hf_score, "hf forward": hf_forward}
    ours = np.asarray(jax_score())[:, 1:]  # also the warm-up (compile) call
    ref = hf_score().numpy()
    diff = float(np.abs(ours - ref)[target[:, 1:] == 1].max())
    hf_forward()
    seconds = round_robin_median_seconds(runs, warmup=0, iters=FLAGS.iters)  # warmed up above
    flops = forward_flops(cfg, b, t)
    print(f"\nbatch {b} x {t} tokens   max |dlogprob| jax vs hf: {diff:.1e}")
    tps = {}
    for name, sec in seconds.items():
      tps[name] = b * t / sec
      print(f"  {name:<11s} {sec:8.2f} s/call  {tps[name]:8.0f} tokens/s  "
            f"{flops / sec / 1e9:6.0f} GFLOP/s  {flops / sec / peak:5.0%} of fp32 matmul peak")
    for hf_name in ("hf score", "hf forward"):
      print("  " + ratio_line("jax score", hf_name, tps["jax score"] / tps[hf_name],
                              label_width=len("hf forward:")))
    figures["batches"][str(b)] = {
        "tokens_per_s": tps, "max_abs_logprob_diff": diff,
        "jax_peak_fraction": flops / seconds["jax score"] / peak,
        "ratio_jax_over": {k: tps["jax score"] / tps[k] for k in ("hf score", "hf forward")}}
  print(f"\nfp32 jnp matmul peak at the end: {jnp_matmul_flops() / 1e9:.0f} GFLOP/s  "
        f"load average: {os.getloadavg()[0]:.1f}")
  write_json_out(FLAGS.json_out, {**figures, "matmul_peak_flops": peak})


if __name__ == "__main__":
  app.run(main)
