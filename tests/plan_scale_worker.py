"""Compiles small plans on 8 forced host devices (run in a subprocess: the device count must
be set before JAX starts) and prints their numbers as one JSON line."""
import json
import sys

from memdyn_jax import plan

plan.force_host_devices(8)

import jax  # noqa: E402  (after the device count is set)

from memdyn_jax.models import from_hf_config  # noqa: E402

# Every parameter dimension divides 8, so fsdp=8 splits all but the norm scales evenly.
SMALL = dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=256,
             num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512, tie_word_embeddings=False)


def main():
  assert jax.device_count() == 8, jax.devices()
  cfg = from_hf_config(SMALL)
  out = {}
  # The trainer and sampler exactly as they run (activations not pinned).
  r = plan.plan_scale(cfg, (1, 8, 1), 16, 256, remat="full", compute_dtype="float32",
                      param_dtype="float32", accelerator="v5e", sampling=True,
                      prompt_len=32, max_new_tokens=32)
  out["params"] = r.to_dict()
  out["params_summary"] = r.summary()
  # Remat with activations pinned: long enough sequences that saved activations dominate.
  for remat in ("none", "full"):
    r = plan.plan_scale(cfg, (1, 8, 1), 16, 256, remat=remat, compute_dtype="float32",
                        param_dtype="float32", accelerator="v5e", sampling=False,
                        pin_activations=True)
    out[f"remat_{remat}"] = r.to_dict()
  # An impossible plan: Llama-3-8B full fine-tune on one 16 GB chip.
  r = plan.plan_scale("llama3-8b", (1, 1, 1), 8, 128, remat="full", compute_dtype="bfloat16",
                      param_dtype="float32", accelerator="v5e", sampling=False)
  out["impossible"] = r.to_dict()
  out["impossible_summary"] = r.summary()
  # A GPU target without the JAX CUDA plugin: fake CPU devices, the fit checked on the GPU.
  r = plan.plan_scale(cfg, None, 16, 64, remat="full", compute_dtype="float32",
                      param_dtype="float32", target="h100-8", sampling=False)
  out["gpu_target"] = r.to_dict()
  out["gpu_target_summary"] = r.summary()
  # Search: a huge chip fits on one device without remat; a 1-byte chip rules every
  # candidate out by the state lower bound, without compiling.
  plan.ACCELERATORS["huge"] = 10**15
  plan.ACCELERATORS["speck"] = 1
  found = plan.cheapest_fitting(cfg, ["huge", "speck"], 1, 32, device_counts=(1, 2),
                                remats=("none", "full"))
  out["search"] = {acc: {"report": res.report.to_dict() if res.report else None,
                         "tried": [[list(c.mesh_shape), c.remat, c.micro_batch, b]
                                   for c, b in res.tried],
                         "cell": plan.describe_fit(res)} for acc, res in found.items()}
  print(json.dumps(out, default=str))


def presets(*names):
  """The train step of each named preset, compiled as `plan_scale --model=<name>` compiles
  it (fsdp=8, remat=full, mixed precision): its parameter count and per-device total."""
  assert jax.device_count() == 8, jax.devices()
  out = {}
  for name in names:
    r = plan.plan_scale(name, (1, 8, 1), 8, 128, remat="full", sampling=False)
    out[name] = dict(num_params=r.num_params, param_bytes=r.param_bytes,
                     total_bytes=r.total_bytes, fits=r.fits)
  print(json.dumps(out))


if __name__ == "__main__":
  if sys.argv[1:2] == ["presets"]:
    presets(*sys.argv[2:])
  else:
    main(*sys.argv[1:])
