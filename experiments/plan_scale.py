r"""Plans a fine-tuning run at pod scale on this machine: compiles the real train step (and
sampler) for a mesh of fake CPU devices and prints per-device memory and collectives.

  python experiments/plan_scale.py --model=llama3-8b --mesh=1,64,1 --accelerator=v5p \
      --remat=full --micro_batch=64
  python experiments/plan_scale.py --model=gemma2-9b --search --accelerators=v5e,h100

`--search` finds the cheapest fitting configuration per accelerator
(`memdyn_jax.plan.cheapest_fitting`) and prints one markdown table row per accelerator.
Nothing is allocated; the fake devices come from --xla_force_host_platform_device_count,
which this script sets before JAX starts.
"""
from __future__ import annotations

import json
import math
import os

from absl import flags

from memdyn_jax import cli, plan
from memdyn_jax.models import presets as model_presets

flags.DEFINE_string("model", "llama3-8b", f"Preset ({model_presets.preset_names()}) or a "
                    "path to an HF config.json.")
flags.DEFINE_list("mesh", ["1", "8", "1"], "data,fsdp,tensor mesh sizes.")
flags.DEFINE_integer("global_batch", 128, "Examples per optimizer step.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per example.")
flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "Rematerialisation policy.")
flags.DEFINE_enum("precision", "mixed", sorted(plan.PRECISIONS),
                  "fp32, mixed (fp32 master weights, bf16 compute) or bf16.")
flags.DEFINE_integer("micro_batch", 0, "Examples per micro-batch (0 = no accumulation).")
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "adam", "sgd"], "Optimizer.")
flags.DEFINE_enum("accelerator", "v5p", sorted(plan.ACCELERATORS), "Chip to check the fit on.")
flags.DEFINE_bool("pin_activations", True, "Pin embeddings to batch sharding (see "
                  "plan.batch_sharded_embeddings); --nopin_activations compiles the trainer as is.")
flags.DEFINE_bool("sampling", True, "Also plan the sampler's prefill and decode programs.")
flags.DEFINE_integer("prompt_len", 0, "Sampling prompt length (0 = seq_len / 2).")
flags.DEFINE_integer("max_new_tokens", 0, "Sampling budget (0 = seq_len / 2).")
flags.DEFINE_bool("search", False, "Search the cheapest fitting configuration instead.")
flags.DEFINE_list("accelerators", sorted(plan.ACCELERATORS), "Chips for --search.")
flags.DEFINE_list("device_counts", ["1", "2", "4", "8", "16", "32", "64"],
                  "Chip counts for --search, ascending.")
flags.DEFINE_list("tensor_options", ["1"], "Tensor-parallel sizes for --search.")
flags.DEFINE_list("remats", ["none", "dots", "full"], "Remat policies for --search.")
flags.DEFINE_list("precisions", ["mixed"], "Precisions for --search.")
flags.DEFINE_string("json_out", None, "Also write the report(s) as JSON here.")

FLAGS = flags.FLAGS


def _model():
  if FLAGS.model in model_presets.HF_CONFIGS:
    return FLAGS.model
  from memdyn_jax.models import from_hf_config
  with open(FLAGS.model) as f:
    return from_hf_config(json.load(f))


def _attention_line(model, accelerator: str, seq_len: int, prompt_len: int) -> str:
  """What `attention_impl="auto"` runs on the chip (the plan compiles the reference path)."""
  from memdyn_jax.models.layers import attention_choice_for_config
  cfg = model_presets.preset_config(model) if isinstance(model, str) else model
  backend = "gpu" if accelerator in ("h100", "h200") else "tpu"
  runs = []
  for phase, n in (("forward", seq_len), ("prefill", prompt_len), ("decode", seq_len)):
    choice = attention_choice_for_config(cfg, "auto", backend=backend, seq_len=n, phase=phase)
    runs.append(f"{phase} {choice.describe()}")
  return f"attention_impl=auto on {accelerator}: " + "; ".join(runs)


def main() -> int:
  if FLAGS.search:
    counts = [int(x) for x in FLAGS.device_counts]
    plan.force_host_devices(max(counts))
    results = plan.cheapest_fitting(
        _model(), FLAGS.accelerators, FLAGS.global_batch, FLAGS.seq_len, device_counts=counts,
        tensor_options=[int(x) for x in FLAGS.tensor_options], remats=FLAGS.remats,
        precisions=FLAGS.precisions, optimizer=FLAGS.optimizer,
        pin_activations=FLAGS.pin_activations, log=lambda s: print(s, flush=True))
    print("| model | batch | accelerator | cheapest fitting configuration |")
    print("|---|---|---|---|")
    for acc, res in results.items():
      print(f"| {FLAGS.model} | {FLAGS.global_batch} x {FLAGS.seq_len} | {acc} | "
            f"{plan.describe_fit(res)} |")
    payload = {acc: (res.report.to_dict() if res.report else None) for acc, res in results.items()}
  else:
    mesh = [int(x) for x in FLAGS.mesh]
    plan.force_host_devices(math.prod(mesh))
    compute, param = plan.PRECISIONS[FLAGS.precision]
    report = plan.plan_scale(
        _model(), mesh, FLAGS.global_batch, FLAGS.seq_len, remat=FLAGS.remat,
        compute_dtype=compute, param_dtype=param, micro_batch=FLAGS.micro_batch,
        accelerator=FLAGS.accelerator, optimizer=FLAGS.optimizer,
        pin_activations=FLAGS.pin_activations, sampling=FLAGS.sampling,
        prompt_len=FLAGS.prompt_len or None, max_new_tokens=FLAGS.max_new_tokens or None)
    print(report.summary())
    print(_attention_line(_model(), FLAGS.accelerator, FLAGS.seq_len,
                          FLAGS.prompt_len or FLAGS.seq_len // 2))
    payload = report.to_dict()
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(payload, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli.run_binary("plan_scale.py", main)
