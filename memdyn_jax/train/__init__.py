"""Fine-tuning: config and paper presets, optimizers, loss, the jitted step and the loop.

LoRA (`memdyn_jax.train.lora`) and the data samplers (`memdyn_jax.train.samplers`) live in
their own modules.
"""
from memdyn_jax.train.config import (PRESETS, ConfigError, Preset, TrainConfig, get_preset,
                                     preset_grid)
from memdyn_jax.train.loop import (NonFiniteError, RunExistsError, TrainData,
                                   TrainResult, train)
from memdyn_jax.train.loss import example_perplexity, masked_mean_loss
from memdyn_jax.train.optim import make_optimizer, make_schedule
from memdyn_jax.train.samplers import ExampleSampler, make_sampler

__all__ = [
    "PRESETS", "ConfigError", "ExampleSampler", "NonFiniteError", "Preset", "RunExistsError",
    "TrainConfig", "TrainData", "TrainResult", "example_perplexity", "get_preset",
    "make_optimizer", "make_sampler", "make_schedule", "masked_mean_loss", "preset_grid", "train",
]
