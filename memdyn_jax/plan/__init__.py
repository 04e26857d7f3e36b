"""Planning pod-scale runs on a laptop: the study's real programs (train step, scorer,
sampler prefill and decode) compiled for a TPU slice with the TPU compiler (libtpu, no TPU
needed) or for fake CPU devices, with per-chip memory, collectives, the compiler's time
estimate, MFU, the cheapest fitting configuration per chip, and what a paper's grid of runs
and evaluations costs in chip-hours.

  chips     the chips (memory, bf16 peak) and TPU slice names -> deviceless topologies
  programs  each program lowered with abstract inputs and compiled; memory and cost
  hlo       collectives and Mosaic kernels in the compiled HLO
  scale     `plan_scale`: one mesh on one target -> `PlanReport`
  search    `cheapest_fitting`: the cheapest configuration that fits each chip
  study     `study_cost`: chip-hours of a paper grid's training and evaluation
"""
from memdyn_jax.plan.chips import (ACCELERATORS, CHIPS, Chip, Target, TargetError,
                                   gpu_compiler_available, parse_target, slice_sizes,
                                   target_devices, topology_shape, tpu_compiler_available)
from memdyn_jax.plan.hlo import COLLECTIVES, Collective, hlo_collectives, mosaic_calls
from memdyn_jax.plan.programs import (ProgramReport, abstract_state, batch_sharded_embeddings,
                                      force_host_devices, per_device_bytes, plan_sampling,
                                      plan_scoring, plan_train_step)
from memdyn_jax.plan.scale import (GB, PRECISIONS, USABLE_FRACTION, GiB, PlanReport,
                                   auto_attention_line, format_bytes, plan_scale, resolve_model,
                                   target_mesh)
from memdyn_jax.plan.search import (Candidate, FitResult, candidate_space, cheapest_fitting,
                                    compiles_on_tpu, describe_fit, fit_table, state_lower_bound)

__all__ = [
    "ACCELERATORS", "CHIPS", "COLLECTIVES", "Candidate", "Chip", "Collective", "FitResult", "GB",
    "GiB", "PRECISIONS", "PlanReport", "ProgramReport", "Target", "TargetError",
    "USABLE_FRACTION", "abstract_state", "auto_attention_line", "batch_sharded_embeddings", "candidate_space",
    "cheapest_fitting", "compiles_on_tpu", "describe_fit", "fit_table", "force_host_devices",
    "format_bytes", "gpu_compiler_available", "hlo_collectives", "mosaic_calls", "parse_target", "per_device_bytes",
    "plan_sampling", "plan_scale", "plan_scoring", "plan_train_step", "resolve_model",
    "slice_sizes", "state_lower_bound", "target_devices", "target_mesh", "topology_shape",
    "tpu_compiler_available",
]
