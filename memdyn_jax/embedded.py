"""The embedded base model: a tiny Llama-architecture LM that this project pre-trains itself.

It is what runs with no hub access: the `synthetic_arith` tokenizer (trained on the task's
pre-training corpus), a sub-million-parameter Llama config, pre-training by the project's
own trainer on that corpus, and an HF-format export (config.json + safetensors +
tokenizer), so every binary loads it like any HF model. Builds are cached under a key of
the full spec and `BUILD_VERSION`, and written atomically (a temp dir renamed into place).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time

from absl import logging

EMBEDDED_NAME = "embedded"
# Part of every cache key: bump it with any code change that alters what a build of the same
# spec produces (corpus, tokenizer, packing, trainer), so stale caches are not reused.
BUILD_VERSION = 2


@dataclasses.dataclass(frozen=True)
class EmbeddedSpec:
  """Architecture, corpus and pre-training budget of the embedded model.

  The defaults pre-train 924 steps of 16x128 tokens (1.9M tokens incl. ~6% row padding;
  186-228 s on a quiet 2-core CPU, 197-244 s with corpus and tokenizer), sized so that the
  quickstart fits its 10-minute budget. Measured on a 32k-document build (2.5M tokens): 97%
  teacher-forced single-equation accuracy on held-out "a op b=" facts (a whole-number
  vocabulary and fact chains got there; digit tokens stayed at chance after 1M tokens) and
  25% greedy accuracy on test problems in the corpus's own `Problem/Work/Result` format (8%
  when documents were cut across rows, see `packing`); the 24k default fine-tunes to lower
  test accuracy (quickstart best runs 0.25 vs 0.31). At the default's budget (~210 s of
  pre-training) nothing else tried moved the base: greedy accuracy on 192 test problems in
  the corpus format / task format / task format at T=0.8 was 0.14 / 0.10 / 0.07 for the
  default, 0.13-0.18 / 0.10 / 0.05-0.10 with batch 8 (LR 5e-3 or 3e-3), 0.17 / 0.13 / 0.08
  with no loss on problem statements, 0.17 / 0.09 / 0.08 for 3 layers on 32k documents,
  and worse with `task_format_fraction` 0 (0.06 / 0 / 0) or 1 (0 / 0.06 / 0.06): the
  capability scales with pre-training tokens, which CPU time bounds. What it lacks is
  in-context copying of numbers: repeating a question's story after "Again:", the default
  copies 0.30-0.37 of number tokens and ~0.6 of words, and wrong numbers are off by 1-3
  (a blurred value, not a wrong position). Quoting each event sentence in the trace, 15%
  story-repeat documents and a 315-step copy warm-up raised that to 0.59 / 0.95 but left
  greedy task accuracy at 0.11-0.13; 2 heads of 64, digit tokens, or number tokens that
  carry their leading space did not raise number copying. `scaled(k)` gives a
  bigger model and corpus for a real machine. The task fields pin the `synthetic_arith`
  configuration the model is built for (`task()`): its splits are kept out of the corpus,
  and its number bound sets what arithmetic the corpus teaches.

  Attributes:
    task_max_steps: events per train/test problem (1..task_max_steps).
    task_max_value: bound on OOD values; train/test use 2/3 of it.
    corpus_mix: relative weights of `synthetic_corpus.DOC_KINDS`.
    whole_numbers: numbers 0..whole_numbers are single tokens (see
      `synthetic_corpus.build_tokenizer`); 0 = one token per digit.
    chain_fraction: share of fact documents written as chains (each fact starts from the
      previous result), which teach carrying a value from line to line.
    packing: "whole_documents" (first-fit rows, a document is split only when longer than
      a row) or "stream" (documents concatenated and cut every seq_len tokens).
    task_format_fraction: share of corpus problems in the task's own prompt and trace
      format (with a random valid trace, never the target); the rest use a format of
      their own (`Problem: ... Work: a op b=c; ... Result: n`), so the base model half
      knows the task's surface and fine-tuning has something to learn.
  """

  hidden_size: int = 128
  num_layers: int = 4
  num_heads: int = 4
  num_kv_heads: int = 4
  intermediate_size: int = 384
  max_position_embeddings: int = 512
  rope_theta: float = 10000.0
  tokenizer_vocab_size: int = 512
  whole_numbers: int = 99
  task_max_steps: int = 3
  task_max_value: int = 30
  corpus_docs: int = 24000
  corpus_mix: tuple[tuple[str, float], ...] = (("facts", 0.45), ("numbers", 0.05),
                                               ("sentences", 0.0), ("problems", 0.5))
  chain_fraction: float = 0.8
  task_format_fraction: float = 0.35
  seq_len: int = 128
  packing: str = "whole_documents"
  pretrain_epochs: float = 1.0
  batch_size: int = 16
  learning_rate: float = 5e-3
  beta2: float = 0.99
  warmup_ratio: float = 0.05
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

  def task(self, **kwargs):
    """The `SyntheticArithTask` this model is built for (split sizes may be overridden).

    Keep n_test/n_ood at their defaults: train problems are drawn after test and OOD, so
    any n_train up to the default reuses problems the corpus already excludes.
    """
    from memdyn_jax.tasks import synthetic_arith
    return synthetic_arith.SyntheticArithTask(seed=self.seed, max_steps=self.task_max_steps,
                                              max_value=self.task_max_value, **kwargs)

  def key(self) -> str:
    blob = json.dumps({**dataclasses.asdict(self), "build_version": BUILD_VERSION},
                      sort_keys=True)
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


_CALC_RE = re.compile(r"(\d+[-+*/]\d+)=<<[^>]*>>(\d+)")


def work_format(question: str, trace: str) -> str:
  """A worked problem in the corpus-only format: `Problem: q\nWork: a op b=c; ...\nResult: n`.

  Same question and arithmetic as the task's trace, but none of its surface (no `Answer:`,
  calculator annotations, connectors, names or `####`), so the task's format is learned in
  fine-tuning, as a real model learns GSM8K's style from its SFT data.
  """
  calcs = [f"{expr}={c}" for expr, c in _CALC_RE.findall(trace)]
  answer = trace.rsplit("####", 1)[-1].split()[0]  # drops the template's stop text
  return f"Problem: {question}\nWork: {'; '.join(calcs)}\nResult: {answer}"


def corpus_texts(spec: EmbeddedSpec, task=None) -> list[str]:
  """The pre-training documents of `spec` (see `task_format_fraction`)."""
  import random

  from memdyn_jax.tasks import synthetic_corpus

  if not 0.0 <= spec.task_format_fraction <= 1.0:
    raise ValueError(f"task_format_fraction must be in [0, 1], got {spec.task_format_fraction}")
  task = task or spec.task()
  docs = synthetic_corpus.corpus_documents(spec.corpus_docs, seed=spec.seed, task=task,
                                           mix=dict(spec.corpus_mix),
                                           chain_fraction=spec.chain_fraction)
  rng = random.Random(f"embedded/{spec.seed}/format")  # own stream: docs stay as generated
  # Problem documents are format_prompt(question) + target(trace): split them back.
  before, after = task.format_prompt("\x00").split("\x00")
  out = []
  for d in docs:
    if d.kind == "problems" and rng.random() >= spec.task_format_fraction:
      question, _, trace = d.text[len(before):].partition(after)
      out.append(work_format(question, trace))
    else:
      out.append(d.text)
  return out


def pretraining_data(spec: EmbeddedSpec, tokenizer, task=None):
  """The pre-training corpus packed into rows of `seq_len` tokens, documents kept whole.

  Each document (BOS + text + EOS) goes into the first row with room for it (first-fit in
  corpus order); only a document longer than a row is split. A worked problem cut across two
  rows would show its trace without its question, teaching the model to write plausible
  chains that ignore the question. Every real token after the first of a row is a target, so
  the model also learns to end documents; row tails are padding.
  """
  import numpy as np

  from memdyn_jax.train.loop import TrainData

  if spec.packing not in ("whole_documents", "stream"):
    raise ValueError(f"packing must be 'whole_documents' or 'stream', got {spec.packing!r}")
  t = spec.seq_len
  docs = [[tokenizer.bos_token_id, *tokenizer.encode(doc, add_special_tokens=False),
           tokenizer.eos_token_id] for doc in corpus_texts(spec, task)]
  if spec.packing == "stream":  # concatenated, cut every t tokens
    flat = [i for ids in docs for i in ids]
    rows = [flat[start:start + t] for start in range(0, len(flat), t)]
  else:
    rows: list[list[int]] = []
    for ids in docs:
      for start in range(0, len(ids), t):
        piece = ids[start:start + t]
        # First fit among the most recent rows only: linear time.
        fit = next((r for r in rows[-64:] if t - len(r) >= len(piece)), None)
        if fit is None:
          fit = []
          rows.append(fit)
        fit.extend(piece)
  if not rows:
    raise ValueError("empty pre-training corpus")
  pad = tokenizer.pad_token_id
  tokens = np.full((len(rows), t), pad, np.int32)
  mask = np.zeros((len(rows), t), np.int32)
  for i, r in enumerate(rows):
    tokens[i, :len(r)] = r
    mask[i, :len(r)] = 1
  target = mask.copy()
  target[:, 0] = 0  # the first token of a row has no context to be predicted from
  return TrainData(tokens, mask, target)


def build(spec: EmbeddedSpec, work_dir: str, progress: bool = True) -> str:
  """Trains the tokenizer, pre-trains the model, exports it; returns the export dir."""
  from memdyn_jax import checkpoints, models
  from memdyn_jax.tasks import synthetic_corpus
  from memdyn_jax.train.config import TrainConfig
  from memdyn_jax.train.loop import train

  start = time.time()
  task = spec.task()
  tok_dir = os.path.join(work_dir, "tokenizer")
  tokenizer = synthetic_corpus.build_tokenizer(tok_dir, seed=spec.seed,
                                               vocab_size=spec.tokenizer_vocab_size, task=task,
                                               whole_numbers=spec.whole_numbers)
  cfg = models.from_hf_config(spec.hf_config(tokenizer))
  init_dir = os.path.join(work_dir, "init")
  models.save_pretrained(models.build_model(cfg, seed=spec.seed), cfg, init_dir)
  tokenizer.save_pretrained(init_dir)

  data = pretraining_data(spec, tokenizer, task)
  train_cfg = TrainConfig(
      learning_rate=spec.learning_rate, num_epochs=spec.pretrain_epochs,
      global_batch_size=spec.batch_size, optimizer="adamw", weight_decay=0.01, beta2=spec.beta2,
      schedule="cosine", warmup_ratio=spec.warmup_ratio, max_grad_norm=1.0, seed=spec.seed,
      max_length=spec.seq_len, save_every_steps=0, save_every_epochs=0.0, log_every_steps=10)
  run_dir = os.path.join(work_dir, "pretrain")
  train_start = time.time()
  result = train(train_cfg, data, init_dir, run_dir, progress=progress, async_checkpoints=False)
  if result.preempted or result.step < result.total_steps:
    # Never cache a half-trained model as the embedded default.
    raise RuntimeError(f"embedded pre-training stopped at step {result.step} of "
                       f"{result.total_steps}; nothing was cached, re-run to build again")
  train_seconds = time.time() - train_start
  model, _ = checkpoints.restore(run_dir, step=result.step)
  out = os.path.join(work_dir, "export")
  models.save_pretrained(model, cfg, out)
  tokenizer.save_pretrained(out)
  with open(os.path.join(out, "embedded.json"), "w") as f:
    json.dump({"spec": dataclasses.asdict(spec), "build_version": BUILD_VERSION,
               "pretrain_steps": result.step,
               "final_loss": result.losses[-1] if result.losses else None,
               "num_params": cfg.num_params, "tokens": int(data.input_ids.size),
               "pretrain_seconds": round(train_seconds, 1),
               "tokens_per_s": round(result.step * spec.batch_size * spec.seq_len
                                     / max(train_seconds, 1e-9)),
               "seconds": round(time.time() - start, 1)}, f,
              indent=2)
  logging.info("embedded model: %d params, %d pre-training steps, final loss %.3f, %.0f s",
               cfg.num_params, result.step, result.losses[-1], time.time() - start)
  return out
