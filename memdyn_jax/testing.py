"""Tiny random-init HF models for tests and benchmarks (needs torch: the `test` extra).

Everything here is built locally with `transformers` + `save_pretrained`; nothing is
downloaded. Parameters are perturbed away from HF's init (zeros biases, unit norms) so a
parity test exercises every tensor.
"""
from __future__ import annotations

import os
from typing import Any, Iterator, Mapping


def _tiny_configs() -> dict[str, Mapping[str, Any]]:
  from memdyn_jax.models import registry  # imports JAX: not on this module's import

  return registry.tiny_configs()


class _TinyConfigs(Mapping):
  """name -> kwargs of every registered family's tiny HF configs (`Family.tiny_configs`),
  read at each look-up, so a family registered later is in it too."""

  def __getitem__(self, name: str) -> Mapping[str, Any]:
    return _tiny_configs()[name]

  def __iter__(self) -> Iterator[str]:
    return iter(_tiny_configs())

  def __len__(self) -> int:
    return len(_tiny_configs())


# Small configs per HF model type that exercise each family's features: GQA, biases,
# rope scaling, sliding windows shorter than test sequences, soft-capping. `model_type`
# defaults to the name.
TINY_CONFIGS: Mapping[str, Mapping[str, Any]] = _TinyConfigs()


# SmolLM2-135M's published shape (Llama architecture): the benchmarks' model shape.
SMOLLM2_135M_SHAPE: dict[str, Any] = dict(
    vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9,
    num_key_value_heads=3, head_dim=64, max_position_embeddings=8192, rope_theta=100000.0,
    rms_norm_eps=1e-5, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)


def hf_config(name: str, **overrides):
  import transformers

  kwargs = dict(TINY_CONFIGS[name])
  model_type = kwargs.pop("model_type", name)
  kwargs.update(overrides)
  return transformers.AutoConfig.for_model(model_type, **kwargs)


def make_hf_model(config, seed: int = 0, perturb: float = 0.05):
  """A random HF PyTorch causal LM (eager attention, fp32, eval mode)."""
  import torch
  import transformers

  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
  model = model.float().eval()
  with torch.no_grad():
    for p in model.parameters():
      p.add_(torch.randn_like(p) * perturb)
  return model


def save_tiny_hf_model(name: str, out_dir: str, seed: int = 0, **overrides) -> str:
  """Builds `TINY_CONFIGS[name]` (with overrides) and saves it to `out_dir`; returns out_dir."""
  model = make_hf_model(hf_config(name, **overrides), seed=seed)
  os.makedirs(out_dir, exist_ok=True)
  model.save_pretrained(out_dir)
  return out_dir


def hf_and_jax_model(name: str, out_dir: str, seed: int = 1):
  """`(hf_model, our_model, config)`: a tiny HF model of `TINY_CONFIGS[name]`, saved to
  `out_dir` and loaded back with `memdyn_jax.models.from_pretrained`."""
  from memdyn_jax import models

  hf = make_hf_model(hf_config(name), seed=seed)
  hf.save_pretrained(out_dir)
  model, cfg = models.from_pretrained(str(out_dir))
  return hf, model, cfg


def tiny_jax_models(name: str, out_dirs, **overrides) -> list:
  """One tiny model of `TINY_CONFIGS[name]` per directory (seed = its index), saved as HF and
  loaded with `memdyn_jax.models.from_pretrained`: checkpoints of one architecture."""
  from memdyn_jax import models

  return [models.from_pretrained(save_tiny_hf_model(name, str(d), seed=i, **overrides))[0]
          for i, d in enumerate(out_dirs)]


def left_padded_batch(vocab_size: int, batch: int, length: int, pad_lengths, seed: int = 0):
  """Random ids with left padding: row i has `pad_lengths[i]` pads. Returns (ids, mask, positions)."""
  import numpy as np

  rng = np.random.RandomState(seed)
  ids = rng.randint(3, vocab_size, (batch, length))
  mask = np.ones((batch, length), np.int32)
  for i, n in enumerate(pad_lengths):
    mask[i, :n] = 0
    ids[i, :n] = 0
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  return ids, mask, positions


# A ChatML chat template (Qwen's and SmolLM's shape) for tokenizers built here: roles in
# `<|im_start|>` ... `<|im_end|>` turns, the generation prompt opening the assistant's.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CHATML_TOKENS = ("<|im_start|>", "<|im_end|>")


def save_tiny_task_model(out_dir: str, task, *, hidden_size: int = 32, num_layers: int = 1,
                         max_position_embeddings: int = 256, seed: int = 0,
                         chat_template: str | None = None) -> str:
  """A tiny random Llama with the `synthetic_arith` tokenizer, saved as an HF dir (no torch).

  The tokenizer is trained on a small pre-training corpus of `task`; the model is built by
  memdyn_jax itself (seconds faster than `save_tiny_hf_model`). With `chat_template` (e.g.
  `CHATML_TEMPLATE`) the tokenizer has that Jinja template and the `CHATML_TOKENS` as
  special tokens, as an instruct model's does. Returns `out_dir`.
  """
  from memdyn_jax import models
  from memdyn_jax.tasks import synthetic_corpus

  tok = synthetic_corpus.build_tokenizer(out_dir, vocab_size=256, n_docs=200,
                                         lexicon_repeats=20, task=task)
  if chat_template is not None:
    tok.add_tokens(list(CHATML_TOKENS), special_tokens=True)
    tok.chat_template = chat_template
    tok.save_pretrained(out_dir)
  cfg = models.from_hf_config(dict(
      model_type="llama", vocab_size=len(tok), hidden_size=hidden_size,
      intermediate_size=2 * hidden_size, num_hidden_layers=num_layers, num_attention_heads=4,
      num_key_value_heads=2, max_position_embeddings=max_position_embeddings,
      tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
  models.save_pretrained(models.build_model(cfg, seed=seed), cfg, out_dir)
  return out_dir
