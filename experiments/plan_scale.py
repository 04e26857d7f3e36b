r"""Plans a fine-tuning study at pod scale on this machine: compiles the real train step,
scorer and sampler for a TPU slice with the TPU compiler (libtpu, no TPU needed), a GPU
(the JAX CUDA plugin) or fake CPU devices, and prints per-chip memory, the attention path,
collectives and, on TPU, the step-time estimate, tokens/s per chip and MFU.

  python experiments/plan_scale.py --model=llama3-8b --target=v5p-8 --micro_batch=8
  python experiments/plan_scale.py --model=gemma2-9b --search --accelerators=v5e,v5p,h100
  python experiments/plan_scale.py --model=llama3-8b --target=v5p-8 --micro_batch=16 \
      --paper_grid=kang_llama3_gsm8k --task_path=data/gsm8k --tokenizer=<tokenizer dir>

--search: the cheapest fitting configuration per chip; --paper_grid: what the grid's runs
cost to train and evaluate on --target, in chip-hours, assumptions stated (plan.study).
"""
from __future__ import annotations

import json
import math
import os

from absl import flags

from memdyn_jax import cli, plan
from memdyn_jax.errors import FieldError
from memdyn_jax.models import presets as model_presets
from memdyn_jax.plan import study

flags.DEFINE_string("model", "llama3-8b", f"{model_presets.preset_names()} or a config.json.")
flags.DEFINE_string("target", None, "Slice to compile for: v5p-8 (4 chips), v5e-16, v6e-256, "
                    "v4-8 (XLA:TPU) or h100-8, h200-8 (XLA:GPU with the CUDA plugin, else fake "
                    "CPU devices). Default: --mesh fake CPU devices, fit on --accelerator.")
flags.DEFINE_list("mesh", ["1", "8", "1"], "data,fsdp,tensor sizes (--target: 1,<chips>,1).")
flags.DEFINE_integer("global_batch", 128, "Examples per optimizer step.")
flags.DEFINE_integer("seq_len", 1024, "Tokens per training example (and scored sequence).")
flags.DEFINE_enum("remat", "full", ["none", "full", "dots"], "Rematerialisation policy.")
flags.DEFINE_enum("precision", "mixed", sorted(plan.PRECISIONS), "fp32, mixed, bf16.")
flags.DEFINE_integer("micro_batch", 0, "Examples per micro-batch (0 = no accumulation).")
flags.DEFINE_enum("optimizer", "adamw", ["adamw", "adam", "sgd"], "Optimizer.")
flags.DEFINE_enum("accelerator", "v5p", sorted(plan.ACCELERATORS),
                  "Chip to check the fit on without --target.")
flags.DEFINE_bool("pin_activations", True, "Pin embeddings to batch sharding "
                  "(plan.batch_sharded_embeddings); --nopin_activations: the trainer as is.")
flags.DEFINE_bool("sampling", True, "Also plan the sampler's prefill and decode programs.")
flags.DEFINE_bool("scoring", True, "Also plan the scorer's teacher-forced forward.")
flags.DEFINE_integer("prompt_len", 0, "Sampling prompt length (0 = seq_len / 2).")
flags.DEFINE_integer("max_new_tokens", 0, "Sampling budget (0 = seq_len / 2).")
flags.DEFINE_integer("sample_batch", 0, "Prompts per sampling call (0 = global_batch).")
flags.DEFINE_integer("samples_per_prompt", 1, "Sampled rows per prompt (prefilled once).")
flags.DEFINE_integer("score_batch", 0, "Sequences per scoring call (0 = global_batch).")
flags.DEFINE_bool("search", False, "Search the cheapest fitting configuration instead.")
flags.DEFINE_list("accelerators", sorted(plan.ACCELERATORS), "Chips for --search.")
flags.DEFINE_list("device_counts", ["1", "2", "4", "8", "16", "32", "64"],
                  "Chip counts for --search, ascending (TPU chips: their slice sizes).")
flags.DEFINE_list("tensor_options", ["1"], "Tensor-parallel sizes for --search.")
flags.DEFINE_list("remats", ["none", "dots", "full"], "Remat policies for --search.")
flags.DEFINE_list("precisions", ["mixed"], "Precisions for --search.")
flags.DEFINE_enum("compiler", "auto", ["auto", "tpu", "cpu"], "--search: TPU chips by "
                  "XLA:TPU (auto: if libtpu is installed) or on fake CPU devices.")
flags.DEFINE_bool("estimate", False, "--search: also each XLA:TPU candidate's step time, MFU.")
flags.DEFINE_string("paper_grid", None, "A paper grid (e.g. kang_llama3_gsm8k): its runs' "
                    "training and evaluation cost on --target in chip-hours.")
flags.DEFINE_string("task", "gsm8k", "--paper_grid: the task whose data gives the lengths.")
flags.DEFINE_string("task_path", None, "--paper_grid: the task's local data (default: hub).")
flags.DEFINE_string("tokenizer", None, "--paper_grid: measure the lengths with this tokenizer "
                    "on the task's train split (p99, rounded up to 128); else --seq_len, "
                    "--prompt_len.")
ASSUMPTION_FLAGS = cli.define_dataclass_flags(
    study.StudyAssumptions, only=("train_examples", "test_examples", "eval_train_examples",
                                  "eval_test_examples", "include_base", "save_every_epochs"),
    help_format="--paper_grid: {doc} (default {default!r}).")
flags.DEFINE_string("json_out", None, "Also write the report(s) as JSON here.")

FLAGS = flags.FLAGS


def _mesh_flag():
  return [int(x) for x in FLAGS.mesh] if FLAGS["mesh"].present or not FLAGS.target else None


def _search():
  counts = [int(x) for x in FLAGS.device_counts]
  plan.force_host_devices(max(counts))
  results = plan.cheapest_fitting(
      FLAGS.model, FLAGS.accelerators, FLAGS.global_batch, FLAGS.seq_len, device_counts=counts,
      tensor_options=[int(x) for x in FLAGS.tensor_options], remats=FLAGS.remats,
      precisions=FLAGS.precisions, optimizer=FLAGS.optimizer,
      pin_activations=FLAGS.pin_activations, compiler=FLAGS.compiler, estimate=FLAGS.estimate,
      log=lambda s: print(s, flush=True))
  print(plan.fit_table(results, FLAGS.model, FLAGS.global_batch, FLAGS.seq_len, FLAGS.compiler))
  return {acc: (res.report.to_dict() if res.report else None) for acc, res in results.items()}


def _study():
  if not FLAGS.target:
    raise cli.UsageError("--paper_grid needs --target (a TPU slice, e.g. v5p-8)")
  defaults = study.StudyAssumptions
  fields = dict(micro_batch=FLAGS.micro_batch, remat=FLAGS.remat, precision=FLAGS.precision,
                samples_per_prompt=(FLAGS.samples_per_prompt if FLAGS["samples_per_prompt"].present
                                    else defaults.samples_per_prompt),
                sample_batch=FLAGS.sample_batch or defaults.sample_batch,
                score_batch=FLAGS.score_batch or defaults.score_batch,
                max_new_tokens=FLAGS.max_new_tokens or defaults.max_new_tokens,
                **cli.dataclass_kwargs_from_flags(defaults, ASSUMPTION_FLAGS))
  prompt = FLAGS.prompt_len or FLAGS.seq_len // 2
  assumptions = (study.measured_assumptions(FLAGS.task, FLAGS.tokenizer, FLAGS.task_path,
                                            **fields) if FLAGS.tokenizer
                 else defaults(train_len=FLAGS.seq_len, prompt_len=prompt, **fields,
                               source=f"given: --seq_len={FLAGS.seq_len}, --prompt_len={prompt}"))
  cost = study.study_cost(FLAGS.model, FLAGS.paper_grid, FLAGS.target, assumptions,
                          mesh_shape=_mesh_flag(), log=lambda s: print(s, flush=True))
  print(cost.plan.summary(), cost.markdown(), sep="\n\n")
  return cost.to_dict()


def _plan():
  mesh = _mesh_flag()
  target = plan.parse_target(FLAGS.target) if FLAGS.target else None
  if target is None or target.platform != "tpu":  # fake CPU devices, unless a GPU compiles
    plan.force_host_devices(math.prod(mesh) if mesh else target.num_chips)
  compute, param = plan.PRECISIONS[FLAGS.precision]
  report = plan.plan_scale(
      FLAGS.model, mesh, FLAGS.global_batch, FLAGS.seq_len, remat=FLAGS.remat,
      compute_dtype=compute, param_dtype=param, micro_batch=FLAGS.micro_batch,
      accelerator=FLAGS.accelerator, target=FLAGS.target, optimizer=FLAGS.optimizer,
      pin_activations=FLAGS.pin_activations, sampling=FLAGS.sampling, scoring=FLAGS.scoring,
      sample_batch=FLAGS.sample_batch or None, prompt_len=FLAGS.prompt_len or None,
      max_new_tokens=FLAGS.max_new_tokens or None, score_batch=FLAGS.score_batch or None,
      samples_per_prompt=FLAGS.samples_per_prompt)
  print(report.summary())
  if report.platform == "cpu":
    print(plan.auto_attention_line(plan.resolve_model(FLAGS.model)[1], report.accelerator,
                                   FLAGS.seq_len, FLAGS.prompt_len or FLAGS.seq_len // 2))
  return report.to_dict()


def main() -> int:
  try:
    payload = _search() if FLAGS.search else _study() if FLAGS.paper_grid else _plan()
  except FieldError as e:  # TargetError, an unknown model or paper grid: names its flag
    raise cli.usage_error(e) from None
  except ValueError as e:  # a mesh or batch that does not split
    raise cli.UsageError(f"--mesh/--global_batch/--micro_batch: {e}") from None
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump(payload, f, indent=1, default=str)
  return 0


if __name__ == "__main__":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  cli.run_binary("plan_scale.py", main)
