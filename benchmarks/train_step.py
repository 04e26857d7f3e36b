"""Train-step throughput: step time, tokens/s and MFU of the jitted step, vs HF PyTorch.

MFU = 6 · N_params · tokens/s ÷ the float32 `jnp` matmul peak measured in the same run
(on this CPU the peak is what XLA reaches on a large square matmul). The PyTorch baseline
is a `transformers` Llama of the same shape with `torch.optim.AdamW`, one forward +
backward + step, float32.

  python benchmarks/train_step.py --layers=6 --hidden=256 --batch=8 --seq=128
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from _common import define_json_out_flag, jnp_matmul_flops, mean_seconds, write_json_out
from memdyn_jax import models
from memdyn_jax.train import optim
from memdyn_jax.train import step as step_lib
from memdyn_jax.train.config import TrainConfig

flags.DEFINE_integer("layers", 6, "Transformer layers.")
flags.DEFINE_integer("hidden", 256, "Hidden size.")
flags.DEFINE_integer("heads", 8, "Attention heads.")
flags.DEFINE_integer("vocab", 8192, "Vocabulary size.")
flags.DEFINE_integer("batch", 8, "Global batch (examples).")
flags.DEFINE_integer("micro", 0, "Micro-batch (0 = no accumulation).")
flags.DEFINE_integer("seq", 128, "Sequence length.")
flags.DEFINE_integer("iters", 10, "Timed steps.")
flags.DEFINE_string("dtype", "float32", "Compute dtype.")
flags.DEFINE_bool("torch", True, "Also time HF PyTorch.")
define_json_out_flag(flags)
FLAGS = flags.FLAGS


def hf_dict():
  return dict(model_type="llama", vocab_size=FLAGS.vocab, hidden_size=FLAGS.hidden,
              intermediate_size=4 * FLAGS.hidden, num_hidden_layers=FLAGS.layers,
              num_attention_heads=FLAGS.heads, num_key_value_heads=FLAGS.heads,
              max_position_embeddings=max(FLAGS.seq, 128), tie_word_embeddings=False)


def jax_step_time(batch) -> tuple[float, int]:
  cfg = models.from_hf_config(hf_dict())
  model = models.build_model(cfg, dtype=jnp.dtype(FLAGS.dtype), seed=0)
  graphdef, trained, rngs, frozen = step_lib.split_model(model)
  tcfg = TrainConfig(learning_rate=1e-4, schedule="constant", global_batch_size=FLAGS.batch,
                     micro_batch_size=FLAGS.micro, weight_decay=0.01, max_grad_norm=1.0)
  tx = optim.make_optimizer(tcfg, 1000)
  opt_state = tx.init(trained)
  fn = step_lib.make_train_step(graphdef, tx)
  mb = step_lib.to_microbatches(batch, tcfg.accumulation_steps)
  mb = jax.device_put(mb)
  for s in range(2):  # compile + warm up
    trained, opt_state, rngs, m = fn(trained, opt_state, rngs, frozen, mb, jnp.int32(s))
  jax.block_until_ready(m)
  t = time.perf_counter()
  for s in range(FLAGS.iters):
    trained, opt_state, rngs, m = fn(trained, opt_state, rngs, frozen, mb, jnp.int32(s))
  jax.block_until_ready(m)
  return (time.perf_counter() - t) / FLAGS.iters, models.num_params(cfg)


def torch_step_time(batch) -> float:
  import torch
  import transformers

  from memdyn_jax import testing
  d = hf_dict()
  d.pop("model_type")
  config = transformers.LlamaConfig(**d)
  model = testing.make_hf_model(config, perturb=0.0).train()
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.tensor(batch["input_ids"], dtype=torch.long)
  attn = torch.tensor(batch["attention_mask"], dtype=torch.long)
  labels = ids.masked_fill(torch.tensor(batch["target_mask"]) == 0, -100)

  def one():
    opt.zero_grad(set_to_none=True)
    loss = model(input_ids=ids, attention_mask=attn, labels=labels).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()

  return mean_seconds(one, FLAGS.iters, warmup=2)


def main(_):
  rng = np.random.RandomState(0)
  b, t = FLAGS.batch, FLAGS.seq
  tgt = np.zeros((b, t), np.int32)
  tgt[:, t // 4:] = 1
  batch = {"input_ids": rng.randint(0, FLAGS.vocab, (b, t)).astype(np.int32),
           "attention_mask": np.ones((b, t), np.int32), "target_mask": tgt,
           "weights": np.ones((b,), np.float32)}
  peak = jnp_matmul_flops(timer=mean_seconds)  # mean of 5, 2048 x 2048
  dt, n_params = jax_step_time(batch)
  tok_s = b * t / dt
  mfu = 6 * n_params * tok_s / peak
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}  "
        f"model: {FLAGS.layers}x{FLAGS.hidden} vocab {FLAGS.vocab}, {n_params / 1e6:.2f}M params  "
        f"batch {b}x{t} {FLAGS.dtype}")
  print(f"jnp f32 matmul peak: {peak / 1e9:.1f} GFLOP/s")
  print(f"jax step: {dt * 1e3:.1f} ms  {tok_s:,.0f} tokens/s  MFU {100 * mfu:.1f}%")
  figures = {"benchmark": "train_step", "layers": FLAGS.layers, "hidden": FLAGS.hidden,
             "vocab": FLAGS.vocab, "batch": b, "seq": t, "num_params": n_params,
             "jax_tokens_per_s": tok_s, "mfu": mfu, "matmul_peak_flops": peak}
  if FLAGS.torch:
    tdt = torch_step_time(batch)
    print(f"torch step: {tdt * 1e3:.1f} ms  {b * t / tdt:,.0f} tokens/s  "
          f"jax speed-up x{tdt / dt:.2f}")
    figures.update(torch_tokens_per_s=b * t / tdt, ratio_jax_over_torch=tdt / dt)
  write_json_out(FLAGS.json_out, figures)


if __name__ == "__main__":
  app.run(main)
