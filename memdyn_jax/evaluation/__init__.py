"""Evaluation: score and sample a model on examples, evaluate a run's checkpoints, keep the
records.

    scoring.py            teacher-forced log-probs, perplexity, exact memorization (jitted)
    sampling.py           KV-cache sampler (temperature / top-p / greedy)
    examples.py           one checkpoint on a list of examples: `ExampleRecord`s
    run.py                a run's checkpoints: `EvalSettings`, `evaluate` (the entry point)
                          and `evaluate_units` (its engine, for studies with custom units)
    records.py            run_dir/eval/: per-example and per-checkpoint records
    gradient_variance.py  per-checkpoint gradient variance and distance from init
    judge.py              a judge model's verdict on samples (sampler study)

The names below load their module on first use: importing the package imports no JAX.
"""
import importlib

_LAZY = {
    **dict.fromkeys(("ExampleRecord", "CATEGORY_KEYS", "solution_lines", "example_meta",
                     "example_category", "evaluate_examples", "summarize", "default_sampling",
                     "with_task_stop", "subset"), "examples"),
    **dict.fromkeys(("SPLITS", "SAMPLING_FIELDS", "EvalSettingsError", "EvalSettings",
                     "EvalUnit", "StepTiming", "sampling_params", "for_run", "load_task",
                     "load_tokenizer", "build_units", "evaluate", "evaluate_units",
                     "pending_steps", "spread_steps", "checkpoint_scalars",
                     "write_tensorboard"), "run"),
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"memdyn_jax.evaluation.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'memdyn_jax.evaluation' has no attribute {name!r}")


__all__ = sorted(_LAZY)
