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
import math
import os
import re
import shutil
import time
from typing import Any, Mapping

from absl import logging

from memdyn_jax import fileio
from memdyn_jax.models.embedded import (ASSET_DIR, BUILD_COMMAND, EMBEDDED_NAME,  # noqa: F401
                                        MANIFEST_FILE, EmbeddedBaseError, file_sha256,
                                        shipped_dir, shipped_manifest, verify)

# Part of every cache key: bump it with any code change that alters what a build of the same
# spec produces (corpus, tokenizer, packing, trainer), so stale caches are not reused.
BUILD_VERSION = 3
EMBEDDED_OUTPUT = "embedded_base"  # the output-marker kind of a built base's folder


def _is_built_base(folder: str) -> bool:
  """A base built before output markers existed: its manifest names a spec key."""
  try:
    with open(os.path.join(folder, MANIFEST_FILE), encoding="utf-8") as f:
      return "spec_key" in json.load(f)
  except (OSError, ValueError, TypeError):
    return False


@dataclasses.dataclass(frozen=True)
class EmbeddedSpec:
  """Architecture, corpus and pre-training budget of the embedded model.

  The defaults are the shipped base (`ASSET_DIR`, built once with `BUILD_COMMAND`): 220k
  documents (3/4 worked problems in the corpus's own `Problem/Work/Result` format, 1/4
  arithmetic fact chains), 8,728 steps of 8x256 tokens (17.9M tokens, one epoch), about 35
  minutes on a quiet 2-core CPU, final loss 0.369. Its probes (manifest.json, 256 test
  problems each): arithmetic facts 0.99, copying the question's numbers into the first work
  line 0.83, greedy accuracy in the corpus format 0.97, in the task's answer format 0.00 —
  it can solve the problems but has never seen the answer format, so fine-tuning teaches the
  format and, with it, the traces (`task_format_fraction` 0: no task-format problems in the
  corpus). Earlier budgets of 2-3M tokens (the quickstart once pre-trained in ~200 s) gave
  0.14-0.25 corpus-format accuracy and bases that fine-tuning could not improve: the
  capability scales with pre-training tokens, which is why the base is built once and
  shipped. `scaled(k)` gives a bigger model and corpus for a real machine. The task fields
  pin the `synthetic_arith` configuration the model is built for (`task()`): its splits are
  kept out of the corpus, and its number bound sets what arithmetic the corpus teaches.

  Attributes:
    hidden_size: the Llama model's hidden width.
    num_layers: its decoder layers.
    num_heads: its attention heads.
    num_kv_heads: its key/value heads (fewer than num_heads: grouped-query attention).
    intermediate_size: its MLP width.
    max_position_embeddings: its context window in tokens.
    rope_theta: its RoPE base frequency.
    tokenizer_vocab_size: the byte-level BPE tokenizer's vocabulary, trained on the corpus.
    task_max_steps: events per train/test problem (1..task_max_steps).
    task_max_value: bound on OOD values; train/test use 2/3 of it.
    corpus_mix: relative weights of `synthetic_corpus.DOC_KINDS`.
    whole_numbers: numbers 0..whole_numbers are single tokens (see
      `synthetic_corpus.build_tokenizer`); 0 = one token per digit.
    corpus_docs: pre-training documents generated.
    chain_fraction: share of fact documents written as chains (each fact starts from the
      previous result), which teach carrying a value from line to line.
    packing: "whole_documents" (first-fit rows, a document is split only when longer than
      a row) or "stream" (documents concatenated and cut every seq_len tokens).
    task_format_fraction: share of corpus problems in the task's own prompt and trace
      format (with a random valid trace, never the target); the rest use a format of
      their own (`Problem: ... Work: a op b=c; ... Result: n`), so the base model half
      knows the task's surface and fine-tuning has something to learn.
    seq_len: tokens per pre-training row.
    pretrain_epochs: passes over the packed corpus.
    batch_size: rows per pre-training step.
    learning_rate: peak pre-training learning rate (AdamW, cosine decay to 0).
    beta2: AdamW's second-moment decay in pre-training.
    warmup_ratio: pre-training warmup as a fraction of its steps.
    seed: seeds the corpus, the tokenizer, the initial weights, the data order and the
      task the model is built for.
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
  corpus_docs: int = 220000
  corpus_mix: tuple[tuple[str, float], ...] = (("facts", 0.25), ("numbers", 0.0),
                                               ("sentences", 0.0), ("problems", 0.75))
  chain_fraction: float = 0.8
  task_format_fraction: float = 0.0
  seq_len: int = 256
  packing: str = "whole_documents"
  pretrain_epochs: float = 1.0
  batch_size: int = 8
  learning_rate: float = 4e-3
  beta2: float = 0.99
  warmup_ratio: float = 0.02
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


def spec_of(manifest: Mapping[str, Any]) -> EmbeddedSpec:
  """The EmbeddedSpec a manifest records (tuples restored from JSON lists)."""
  fields = dict(manifest["spec"])
  fields["corpus_mix"] = tuple(tuple(kv) for kv in fields["corpus_mix"])
  return EmbeddedSpec(**fields)


def model_dir(spec: EmbeddedSpec | None = None, cache_dir: str | None = None,
              progress: bool = True, rebuild: bool = False) -> str:
  """The HF directory of the embedded base model for `spec`.

  The default spec is shipped with the package (`ASSET_DIR`, hash-checked on load); any other
  spec, or `rebuild=True`, is built into the cache on first use (key: spec and
  `BUILD_VERSION`), resuming an interrupted build from its checkpoints.
  """
  spec = spec or EmbeddedSpec()
  if not rebuild and os.path.exists(os.path.join(ASSET_DIR, MANIFEST_FILE)):
    manifest = shipped_manifest()
    if spec_of(manifest) == spec and manifest["build_version"] == BUILD_VERSION:
      return shipped_dir()
  root = os.path.join(cache_dir or default_cache_dir(), "embedded", spec.key())
  final = os.path.join(root, "model")
  if not os.path.exists(os.path.join(final, MANIFEST_FILE)):
    build(spec, final, work_dir=os.path.join(root, "work"), progress=progress)
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


def _final_loss(run_dir: str, last: int = 100) -> float | None:
  """Mean training loss over the last `last` logged steps (metrics.jsonl spans resumes)."""
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.exists(path):
    return None
  with open(path) as f:
    losses = [json.loads(line)["loss"] for line in f if line.strip()]
  return round(sum(losses[-last:]) / len(losses[-last:]), 4) if losses else None


def build(spec: EmbeddedSpec, output_dir: str, work_dir: str | None = None,
          progress: bool = True, save_every_steps: int = 250, probe_examples: int = 256,
          command: str | None = None) -> dict[str, Any]:
  """Builds the base model of `spec` into `output_dir`; returns its manifest.

  Stages: tokenizer, initial weights, pre-training, export, probes, manifest. Everything
  before the export lives in `work_dir` (default `<output_dir>.build`), and pre-training
  checkpoints every `save_every_steps`, so an interrupted build re-run with the same
  arguments continues where it stopped. `output_dir` is replaced atomically at the end (only
  if it is new, empty or an earlier built base) and the work directory removed (only if it
  is new, empty or this build's: it holds spec.json).

  Raises:
    EmbeddedBaseError: `work_dir` holds a build of another spec or is a folder of something
      else, or pre-training stopped (SIGTERM) before its last step.
    fileio.NotReplaceableError: `output_dir` exists and is not a built base.
  """
  from memdyn_jax.train import checkpoints
  from memdyn_jax import models
  from memdyn_jax.tasks import synthetic_corpus
  from memdyn_jax.train.config import TrainConfig
  from memdyn_jax.train.loop import train

  start = time.time()
  work_dir = work_dir or os.path.abspath(output_dir).rstrip(os.sep) + ".build"
  stamp = os.path.join(work_dir, "spec.json")
  # The work directory is removed on success: only a folder this build made may be it.
  if os.path.isdir(work_dir) and os.listdir(work_dir) and not os.path.exists(stamp):
    raise EmbeddedBaseError(f"work_dir {work_dir} exists and is not the work directory of an "
                            "embedded build (no spec.json); nothing was deleted: choose a new "
                            "work directory")
  fileio.check_replaceable(output_dir, EMBEDDED_OUTPUT, also_replaces=_is_built_base)
  os.makedirs(work_dir, exist_ok=True)
  if os.path.exists(stamp):
    with open(stamp) as f:
      held = json.load(f)
    if held.get("key") != spec.key():
      raise EmbeddedBaseError(f"{work_dir} holds a build of another spec ({held.get('key')} vs "
                              f"{spec.key()}); remove it or choose another work directory")
  else:
    with open(stamp, "w") as f:
      json.dump({"key": spec.key(), "spec": dataclasses.asdict(spec)}, f, indent=2)

  task = spec.task()
  tok_dir = os.path.join(work_dir, "tokenizer")
  if not os.path.exists(tok_dir):
    fileio.replace_dir(lambda d: synthetic_corpus.build_tokenizer(
        d, seed=spec.seed, vocab_size=spec.tokenizer_vocab_size, task=task,
        whole_numbers=spec.whole_numbers), tok_dir, kind="embedded_tokenizer")
  tokenizer = models.load_tokenizer(tok_dir)
  cfg = models.from_hf_config(spec.hf_config(tokenizer))
  init_dir = os.path.join(work_dir, "init")
  if not os.path.exists(init_dir):
    def save_init(d):
      models.save_pretrained(models.build_model(cfg, seed=spec.seed), cfg, d)
      tokenizer.save_pretrained(d)
    fileio.replace_dir(save_init, init_dir, kind="embedded_init")

  data = pretraining_data(spec, tokenizer, task)
  train_cfg = TrainConfig(
      learning_rate=spec.learning_rate, num_epochs=spec.pretrain_epochs,
      global_batch_size=spec.batch_size, optimizer="adamw", weight_decay=0.01, beta2=spec.beta2,
      schedule="cosine", warmup_ratio=spec.warmup_ratio, max_grad_norm=1.0, seed=spec.seed,
      max_length=spec.seq_len, save_every_steps=save_every_steps, save_every_epochs=0.0,
      log_every_steps=50)
  run_dir = os.path.join(work_dir, "pretrain")
  train_start = time.time()
  result = train(train_cfg, data, init_dir, run_dir, progress=progress, async_checkpoints=False)
  if result.preempted or result.step < result.total_steps:
    raise EmbeddedBaseError(f"embedded pre-training stopped at step {result.step} of "
                            f"{result.total_steps}; re-run the same command to continue")
  train_seconds = time.time() - train_start
  model, _ = checkpoints.restore(run_dir, step=result.step)

  manifest: dict[str, Any] = {
      "spec": dataclasses.asdict(spec), "spec_key": spec.key(), "build_version": BUILD_VERSION,
      "build_command": command or BUILD_COMMAND, "seed": spec.seed,
      "num_params": models.num_params(cfg), "pretrain_steps": result.step,
      "resumed_from_step": result.step - len(result.losses),
      "tokens_seen": result.step * spec.batch_size * spec.seq_len,
      "real_tokens_seen": int(data.attention_mask.sum() * spec.pretrain_epochs),
      "final_loss": _final_loss(run_dir),
      "pretrain_seconds_this_run": round(train_seconds, 1),
      "tokens_per_s": round(len(result.losses) * spec.batch_size * spec.seq_len
                            / max(train_seconds, 1e-9)),
      "cpu_count": os.cpu_count(),
  }
  probe_start = time.time()
  manifest["probes"] = probe(model, tokenizer, spec, n=probe_examples)
  manifest["probe_seconds"] = round(time.time() - probe_start, 1)
  manifest["seconds_this_run"] = round(time.time() - start, 1)

  def export(d):
    models.save_pretrained(model, cfg, d)
    tokenizer.save_pretrained(d)
    manifest["sha256"] = {name: file_sha256(os.path.join(d, name))
                          for name in sorted(os.listdir(d))}
    with open(os.path.join(d, MANIFEST_FILE), "w") as f:
      json.dump(manifest, f, indent=2)
      f.write("\n")
  fileio.replace_dir(export, output_dir, kind=EMBEDDED_OUTPUT, also_replaces=_is_built_base)
  shutil.rmtree(work_dir, ignore_errors=True)
  logging.info("embedded model: %d params, %d pre-training steps, final loss %s, %.0f s",
               models.num_params(cfg), result.step, manifest["final_loss"], time.time() - start)
  return manifest


# --------------------------------------------------------------------------- probes

_WORK_PROMPT = "Problem: {question}\nWork:"
_RESULT_RE = re.compile(r"Result:\s*(-?\d+)")


def _greedy_accuracy(model, tokenizer, prompts, answers, extract, max_new_tokens, stop):
  from memdyn_jax.evaluation import sampling
  params = sampling.SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop=stop)
  outs = sampling.sample(model, tokenizer, prompts, params, batch_size=64)
  right = [extract(o[0].text) == str(a) for o, a in zip(outs, answers)]
  return sum(right) / len(right)


def probe(model, tokenizer, spec: EmbeddedSpec, n: int = 256) -> dict[str, Any]:
  """What the base model can do before fine-tuning, on test problems it never saw.

  - `arithmetic`: teacher-forced argmax accuracy of the result of "a op b=" facts whose
    operands and result lie in the task's train range (the corpus's fact format);
  - `copy_numbers`: teacher-forced argmax accuracy of the first `Work:` line's two operands,
    which the model must copy from the problem statement (in-context copying);
  - `work_accuracy`: greedy accuracy in the corpus's own `Problem/Work/Result` format (what
    the model can solve);
  - `task_accuracy`: greedy accuracy in the task's prompt and trace format (what fine-tuning
    starts from), with `task_accuracy_band`: the range a re-measurement must fall in.
  Every figure is over `n` items drawn with a fixed seed, so a re-run gives the same numbers.
  """
  import random

  from memdyn_jax.evaluation import scoring

  task = spec.task()
  bound = task.split_config("test")["bound"]
  rng = random.Random(f"embedded/{spec.seed}/probe")
  facts = []
  while len(facts) < n:
    a, b, op = rng.randint(1, bound), rng.randint(1, bound), rng.choice("+-*/")
    c = {"+": a + b, "-": a - b, "*": a * b, "/": a // b if a % b == 0 else -1}[op]
    if 0 <= c <= bound:
      facts.append((f"{a}{op}{b}=", str(c)))
  scored = scoring.score_texts(model, tokenizer, [f[0] for f in facts], [f[1] for f in facts],
                               batch_size=64, add_bos=True)
  arithmetic = sum(r.exact_memorization for r in scored) / len(scored)

  tests = task.load("test")[:n]
  first_ops = [" " + _CALC_RE.findall(e.target)[0][0] for e in tests]
  # The operands only ("a op b"): the first line's numbers come from the question.
  operands = [re.match(r" \d+[-+*/]\d+", t).group(0) for t in first_ops]
  scored = scoring.score_texts(model, tokenizer,
                               [_WORK_PROMPT.format(question=e.question) for e in tests],
                               operands, batch_size=64, add_bos=True, return_tokens=True)
  number_hits = []
  for r, text in zip(scored, operands):
    ids = tokenizer.encode(text, add_special_tokens=False)
    for tok_id, ok in zip(ids, r.token_argmax_correct):
      if tokenizer.decode([tok_id]).strip().isdigit():
        number_hits.append(bool(ok))
  copy_numbers = sum(number_hits) / max(len(number_hits), 1)

  answers = [e.answer for e in tests]
  work = _greedy_accuracy(
      model, tokenizer, [_WORK_PROMPT.format(question=e.question) for e in tests], answers,
      lambda t: (m.group(1) if (m := _RESULT_RE.search(t)) else None), 96, ("\n\n", "</s>"))
  task_acc = _greedy_accuracy(
      model, tokenizer, [task.format_prompt(e.question) for e in tests], answers,
      task.extract_answer, 160, task.stop)
  se = math.sqrt(max(task_acc * (1 - task_acc), 1.0 / len(tests)) / len(tests))
  return {"n": n, "arithmetic": round(arithmetic, 4), "copy_numbers": round(copy_numbers, 4),
          "work_accuracy": round(work, 4), "task_accuracy": round(task_acc, 4),
          "task_accuracy_band": [round(max(0.0, task_acc - 3 * se - 0.02), 4),
                                 round(min(1.0, task_acc + 3 * se + 0.02), 4)]}
