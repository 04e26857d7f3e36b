"""Checkpoint merging (Ruan et al.'s fix for over-memorization).

    methods.py  the merge methods, tensor by tensor (soups, SLERP, task arithmetic, TIES,
                DARE; stacked layers one layer at a time) over lazy tensor sources; greedy
                soup
    run.py      a merge written as a run directory that evaluation reads like a training
                run's (`merge_to_run_dir`)

The names of `methods` are the package's (`memdyn_jax.merging.merge`, ...); they load on
first use, so importing the package imports no JAX.
"""
import importlib

_METHODS = ("METHODS", "PER_LAYER_METHODS", "LAYERS_AXIS", "DEFAULT_T", "DEFAULT_LAMBDA",
            "SLERP_DOT_THRESHOLD", "MergeConfigError", "path_str", "TValue", "MergeConfig",
            "TensorSource", "TensorSink", "PytreeSource", "PytreeSink", "OrbaxCheckpointSource",
            "to_pytree", "layer_axes_of", "keep_count", "dare_key", "merge_tensor", "merge",
            "merge_pytrees", "GreedySoupResult", "greedy_soup", "Path")


def __getattr__(name):
  if name in _METHODS:
    return getattr(importlib.import_module("memdyn_jax.merging.methods"), name)
  raise AttributeError(f"module 'memdyn_jax.merging' has no attribute {name!r}")


__all__ = sorted(_METHODS)
