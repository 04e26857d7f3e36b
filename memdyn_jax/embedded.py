"""The embedded base model: a tiny Llama-architecture LM that this project pre-trains itself.

It is what runs with no hub access: the `synthetic_arith` tokenizer (trained on the task's
pre-training corpus), a sub-million-parameter Llama config, pre-training by the project's
own trainer on that corpus, and an HF-format export (config.json + safetensors +
tokenizer), so every binary loads it like any HF model. Builds are cached under a key of
the full spec and written atomically (a temp dir renamed into place).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
import time

from absl import logging

EMBEDDED_NAME = "embedded"


@dataclasses.dataclass(frozen=True)
class EmbeddedSpec:
  """Architecture, corpus and pre-training budget of the embedded model.

  The defaults pre-train in about a minute on a 2-core CPU; `scaled(k)` gives a bigger
  model and corpus for a real machine.
  """

  hidden_size: int = 96
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 2
  intermediate_size: int = 256
  max_position_embeddings: int = 512
  rope_theta: float = 10000.0
  tokenizer_vocab_size: int = 512
  corpus_docs: int = 6000
  seq_len: int = 256
  pretrain_epochs: float = 2.0
  batch_size: int = 32
  learning_rate: float = 3e-3
  seed: int = 0

  def scaled(self, k: int) -> "EmbeddedSpec":
    if k < 1:
      raise ValueError(f"scale must be >= 1, got {k}")
    if k == 1:
      return self
    return dataclasses.replace(self, hidden_size=self.hidden_size * k,
                               intermediate_size=self.intermediate_size * k,
                               num_layers=self.num_layers + 2 * (k - 1),
                               corpus_docs=self.corpus_docs * k)

  def key(self) -> str:
    blob = json.dumps(dataclasses.asdict(self), sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]

  def hf_config(self, tokenizer) -> dict:
    return dict(
        model_type="llama", vocab_size=len(tokenizer), hidden_size=self.hidden_size,
        intermediate_size=self.intermediate_size, num_hidden_layers=self.num_layers,
        num_attention_heads=self.num_heads, num_key_value_heads=self.num_kv_heads,
        max_position_embeddings=self.max_position_embeddings, rope_theta=self.rope_theta,
        rms_norm_eps=1e-5, tie_word_embeddings=True, hidden_act="silu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)


def default_cache_dir() -> str:
  return os.environ.get("MEMDYN_CACHE", os.path.join(os.path.expanduser("~"), ".cache",
                                                     "memdyn_jax"))


def model_dir(spec: EmbeddedSpec = EmbeddedSpec(), cache_dir: str | None = None,
              progress: bool = True) -> str:
  """The HF directory of the embedded model for `spec`, built on first use."""
  root = os.path.join(cache_dir or default_cache_dir(), "embedded", spec.key())
  final = os.path.join(root, "model")
  if os.path.exists(os.path.join(final, "embedded.json")):
    return final
  os.makedirs(root, exist_ok=True)
  work = tempfile.mkdtemp(prefix="build-", dir=root)
  try:
    built = build(spec, work, progress=progress)
    if os.path.exists(final):  # a concurrent build won; keep its result
      return final
    os.replace(built, final)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  return final


def pretraining_data(spec: EmbeddedSpec, tokenizer, task):
  """The pre-training corpus packed into rows of `seq_len` tokens (no padding waste).

  Documents are tokenized (BOS + text + EOS) and concatenated; every token after the first
  of a row is a target, so the model also learns to end documents.
  """
  import numpy as np

  from memdyn_jax.tasks import synthetic_corpus
  from memdyn_jax.train.loop import TrainData

  docs = synthetic_corpus.pretraining_corpus(spec.corpus_docs, seed=spec.seed, task=task)
  ids = []
  for doc in docs:
    ids.append(tokenizer.bos_token_id)
    ids.extend(tokenizer.encode(doc, add_special_tokens=False))
    ids.append(tokenizer.eos_token_id)
  rows = len(ids) // spec.seq_len
  if rows == 0:
    raise ValueError(f"corpus of {len(ids)} tokens is shorter than seq_len={spec.seq_len}")
  tokens = np.asarray(ids[:rows * spec.seq_len], np.int32).reshape(rows, spec.seq_len)
  target = np.ones_like(tokens)
  target[:, 0] = 0  # the first token of a row has no context to be predicted from
  return TrainData(tokens, np.ones_like(tokens), target)


def build(spec: EmbeddedSpec, work_dir: str, progress: bool = True) -> str:
  """Trains the tokenizer, pre-trains the model, exports it; returns the export dir."""
  from memdyn_jax import checkpoints, models
  from memdyn_jax.tasks import synthetic_arith, synthetic_corpus
  from memdyn_jax.train.config import TrainConfig
  from memdyn_jax.train.loop import train

  start = time.time()
  task = synthetic_arith.SyntheticArithTask()
  tok_dir = os.path.join(work_dir, "tokenizer")
  tokenizer = synthetic_corpus.build_tokenizer(tok_dir, seed=spec.seed,
                                               vocab_size=spec.tokenizer_vocab_size, task=task)
  cfg = models.from_hf_config(spec.hf_config(tokenizer))
  init_dir = os.path.join(work_dir, "init")
  models.save_pretrained(models.build_model(cfg, seed=spec.seed), cfg, init_dir)
  tokenizer.save_pretrained(init_dir)

  data = pretraining_data(spec, tokenizer, task)
  train_cfg = TrainConfig(
      learning_rate=spec.learning_rate, num_epochs=spec.pretrain_epochs,
      global_batch_size=spec.batch_size, optimizer="adamw", weight_decay=0.01,
      schedule="cosine", warmup_ratio=0.05, max_grad_norm=1.0, seed=spec.seed,
      max_length=spec.seq_len, save_every_steps=0, save_every_epochs=0.0, log_every_steps=10)
  run_dir = os.path.join(work_dir, "pretrain")
  result = train(train_cfg, data, init_dir, run_dir, progress=progress, async_checkpoints=False)
  model, _ = checkpoints.restore(run_dir, step=result.step)
  out = os.path.join(work_dir, "export")
  models.save_pretrained(model, cfg, out)
  tokenizer.save_pretrained(out)
  with open(os.path.join(out, "embedded.json"), "w") as f:
    json.dump({"spec": dataclasses.asdict(spec), "pretrain_steps": result.step,
               "final_loss": result.losses[-1] if result.losses else None,
               "num_params": cfg.num_params, "seconds": round(time.time() - start, 1)}, f,
              indent=2)
  logging.info("embedded model: %d params, %d pre-training steps, final loss %.3f, %.0f s",
               cfg.num_params, result.step, result.losses[-1], time.time() - start)
  return out
