"""Flax NNX causal LMs that load and save Hugging Face checkpoints and match HF PyTorch."""
from memdyn_jax.models.config import ModelConfig
from memdyn_jax.models.hf_io import (from_pretrained, load_config, load_tokenizer,
                                     resolve_checkpoint_dir, save_pretrained)
from memdyn_jax.models.registry import (abstract_model, build_model, from_hf_config,
                                        model_class, num_params, param_shapes)
from memdyn_jax.models.transformer import REMAT_POLICIES, CausalLM, KVCache

__all__ = [
    "CausalLM", "KVCache", "ModelConfig", "REMAT_POLICIES", "abstract_model", "build_model",
    "from_hf_config", "from_pretrained", "load_config", "load_tokenizer", "model_class",
    "resolve_checkpoint_dir", "save_pretrained",
]
