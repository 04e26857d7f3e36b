"""memdyn_jax: memorization dynamics of LLM fine-tuning on reasoning data (JAX / Flax NNX)."""

__version__ = "0.1.0"
