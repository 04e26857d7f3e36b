"""Family name -> model class; model construction (concrete or abstract)."""
from __future__ import annotations

import math

import jax.numpy as jnp
from flax import nnx

from memdyn_jax.models.config import ModelConfig
from memdyn_jax.models.gemma2 import Gemma2ForCausalLM
from memdyn_jax.models.gpt_neo import GPTNeoForCausalLM
from memdyn_jax.models.llama import LlamaForCausalLM
from memdyn_jax.models.transformer import CausalLM

MODEL_CLASSES: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "gemma2": Gemma2ForCausalLM,
    "gpt_neo": GPTNeoForCausalLM,
}


def model_class(cfg: ModelConfig) -> type[CausalLM]:
  if cfg.family not in MODEL_CLASSES:
    raise ValueError(f"unknown model family {cfg.family!r}; known: {sorted(MODEL_CLASSES)}")
  return MODEL_CLASSES[cfg.family]


def build_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, seed: int = 0,
                remat: str = "none", attention_impl: str = "auto",
                unroll_layers: bool = False) -> CausalLM:
  """A randomly initialised model (for pre-training from scratch and tests)."""
  return model_class(cfg)(cfg, dtype=dtype, param_dtype=param_dtype, remat=remat,
                          attention_impl=attention_impl, unroll_layers=unroll_layers,
                          rngs=nnx.Rngs(seed))


def abstract_model(cfg: ModelConfig, *, dtype=jnp.float32, param_dtype=jnp.float32,
                   remat: str = "none", attention_impl: str = "auto",
                   unroll_layers: bool = False) -> CausalLM:
  """The model with `ShapeDtypeStruct` leaves: shapes and logical axes, nothing allocated."""
  return nnx.eval_shape(lambda: build_model(cfg, dtype=dtype, param_dtype=param_dtype,
                                            remat=remat, attention_impl=attention_impl,
                                            unroll_layers=unroll_layers))


def param_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
  """{dotted parameter path: shape}, from the abstract model (nothing is allocated)."""
  state = nnx.state(abstract_model(cfg), nnx.Param)
  return {".".join(map(str, k)): v.shape for k, v in nnx.to_flat_state(state)}


def num_params(cfg: ModelConfig) -> int:
  """The parameter count of the architecture `cfg` describes."""
  return int(sum(math.prod(shape) for shape in param_shapes(cfg).values()))
