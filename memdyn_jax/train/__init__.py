"""Fine-tuning: config and paper presets, optimizers, loss, the jitted step and the loop.

LoRA (`memdyn_jax.train.lora`) and the data samplers (`memdyn_jax.train.samplers`) live in
their own modules. Only the config is imported eagerly: the JAX-side names load on first
use, so binaries check their flags before importing JAX.
"""
import importlib

from memdyn_jax.train.config import (PRESETS, ConfigError, Preset, TrainConfig, get_preset,
                                     preset_grid)

_LAZY = {"NonFiniteError": "loop", "RunExistsError": "loop", "TrainData": "loop",
         "TrainResult": "loop", "train": "loop", "example_perplexity": "loss",
         "masked_mean_loss": "loss", "make_optimizer": "optim", "make_schedule": "optim",
         "ExampleSampler": "samplers", "make_sampler": "samplers"}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(f"memdyn_jax.train.{_LAZY[name]}"), name)
  raise AttributeError(f"module 'memdyn_jax.train' has no attribute {name!r}")


__all__ = [
    "PRESETS", "ConfigError", "ExampleSampler", "NonFiniteError", "Preset", "RunExistsError",
    "TrainConfig", "TrainData", "TrainResult", "example_perplexity", "get_preset",
    "make_optimizer", "make_sampler", "make_schedule", "masked_mean_loss", "preset_grid", "train",
]
