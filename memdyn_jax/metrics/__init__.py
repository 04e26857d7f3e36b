"""Memorization metrics: pure numpy / jax functions over per-checkpoint, per-example arrays.

- premem: pre-memorization train accuracy and threshold calibration (Kang et al. Sec. 4).
- held_out: held-out R² of predictors (leave-one-run-out, K-run calibration; App. A.1).
- regression: line fit with R² and Pearson r.
- baselines: gradient variance, distance from initialization, ATC (Kang et al. App. B).
- overmemorization: over-memorization stages and checkpoint selection (Ruan et al.).
- data_maps: exact memorization and data maps (Ge et al. Sec. 2).
- diversity: distinct-n, unique answers and traces among samples (Ruan et al.).
"""
import importlib

# The submodules that import JAX load on first use, so `memdyn_jax.metrics.premem` (the
# memorization rule, which the JAX-free task definitions read) imports no JAX.
_LAZY = {
    **dict.fromkeys(("NUM_GRADIENT_MINIBATCHES", "atc_predicted_accuracy", "atc_threshold",
                     "distance_from_init", "gradient_variance", "minibatch_gradients",
                     "squared_distance_leaves", "variance_from_moments", "welford_update"),
                    "baselines"),
    **dict.fromkeys(("EASY", "HARD", "OTHER", "CategorySummary", "DataMap",
                     "DataMapThresholds", "data_map", "exact_memorization", "partition",
                     "quantile_thresholds", "summarize_by_category"), "data_maps"),
}


def __getattr__(name: str):
  if name not in _LAZY:
    raise AttributeError(f"module 'memdyn_jax.metrics' has no attribute {name!r}")
  value = getattr(importlib.import_module(f"memdyn_jax.metrics.{_LAZY[name]}"), name)
  globals()[name] = value
  return value


def __dir__():
  return sorted([*globals(), *_LAZY])


from memdyn_jax.metrics.diversity import (
    Diversity,
    distinct_n,
    sample_diversity,
    unique_final_answers,
    unique_traces,
)
from memdyn_jax.metrics.held_out import (
    HeldOutScore,
    choose_calibration_runs,
    k_run_fold,
    leave_one_run_out,
    line_held_out,
    out_of_sample_r2,
    premem_held_out,
)
from memdyn_jax.metrics.overmemorization import (
    OverMemorization,
    OverMemorizationConfig,
    detect_overmemorization,
    select_checkpoint,
)
from memdyn_jax.metrics.premem import (
    GSM8K_LOGLOG_THRESHOLD,
    MATH_LOGLOG_THRESHOLD,
    CalibrationResult,
    CalibrationRun,
    calibrate_threshold,
    dataset_premem_accuracy,
    is_memorized,
    loglog_to_perplexity,
    masked_accuracy,
    memorized_fraction,
    perplexity_to_loglog,
    premem_accuracy,
    unscored_as_never_memorized,
)
from memdyn_jax.metrics.regression import LinearFit, fit_r2, r2_identity
