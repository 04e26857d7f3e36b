"""The training loop: data order, steps, checkpoints, resume, failure handling, logging.

`train(cfg, data, model_path, output_dir)` fine-tunes the model at `model_path` on
pre-tokenized `TrainData` (see `memdyn_jax.tasks.tokenize` for the prompt/target
convention) and writes a run directory (`memdyn_jax.train.checkpoints`). On a multi-host pod
every process runs the same call: each holds the whole (small) token array and the same
sampler, and materialises only its own shards of each global batch.

Resumption is exact: params, optimizer state, RNG streams and the sampler's state are
restored from the latest complete checkpoint, and every source of randomness is a
function of (seed, step), so a killed-and-resumed run ends bitwise equal to an
uninterrupted one on the same topology.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from memdyn_jax.train import checkpoints as ckpt
from memdyn_jax import fileio
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.models import hf_io
from memdyn_jax.signals import STOP_SIGNALS, StopSignals  # noqa: F401 - re-exported
from memdyn_jax.train import loss as loss_lib
from memdyn_jax.train import step as step_lib
from memdyn_jax.train.config import TrainConfig, checkpoint_steps, epoch_crossed
from memdyn_jax.train.optim import make_optimizer, make_schedule
from memdyn_jax.train.samplers import ExampleSampler, make_sampler

log = logging.getLogger(__name__)

_ARRAYS = ("input_ids", "attention_mask", "target_mask")


class NonFiniteError(FloatingPointError):
  """The loss or gradient norm became NaN/inf; names the step."""


class RunExistsError(RuntimeError):
  """The output directory already has checkpoints and resuming was disabled."""


@dataclasses.dataclass(frozen=True)
class TrainData:
  """Pre-tokenized training examples, (N, T) int32 arrays, row i = example index i."""

  input_ids: np.ndarray
  attention_mask: np.ndarray
  target_mask: np.ndarray

  def __post_init__(self):
    for name in _ARRAYS:
      arr = np.asarray(getattr(self, name), dtype=np.int32)
      if arr.ndim != 2 or arr.shape != np.shape(self.input_ids):
        raise ValueError(f"TrainData.{name} has shape {arr.shape}; every array must be "
                         f"(N, T) = {np.shape(self.input_ids)}")
      object.__setattr__(self, name, arr)
    if self.num_examples == 0:
      raise ValueError("TrainData has no examples")

  @property
  def num_examples(self) -> int:
    return self.input_ids.shape[0]

  @property
  def seq_len(self) -> int:
    return self.input_ids.shape[1]

  def rows(self, indices: np.ndarray, length_multiple: int = 0) -> dict[str, np.ndarray]:
    """The rows `indices`; with `length_multiple` > 0, columns that are padding in every
    one of them are cut from the end down to a multiple of it (at most `seq_len`)."""
    out = {k: getattr(self, k)[indices] for k in _ARRAYS}
    if length_multiple > 0:
      used = np.flatnonzero(out["attention_mask"].any(axis=0))
      length = int(used[-1]) + 1 if used.size else 1
      length = min(self.seq_len, -(-length // length_multiple) * length_multiple)
      out = {k: v[:, :length] for k, v in out.items()}
    return out

  def fingerprint(self) -> str:
    """sha256 of the arrays: a resumed run must train on the same tokens."""
    h = hashlib.sha256()
    for k in _ARRAYS:
      a = getattr(self, k)
      h.update(str(a.shape).encode())
      h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


@dataclasses.dataclass(frozen=True)
class TrainResult:
  """Outcome of `train`.

  Attributes:
    run_dir: the run directory.
    step: optimizer steps completed.
    total_steps: steps the run asks for.
    losses: losses of the steps run by this call (not of resumed-from steps).
    preempted: stopped by SIGTERM or SIGINT (Ctrl-C) after saving a checkpoint.
    model: the trained model (LoRA adapters unmerged).
    stop_signal: the signal that stopped it (signal.SIGTERM / signal.SIGINT), else None;
      binaries exit 128 + its number (143, 130), as a shell does for a killed process.
  """

  run_dir: str
  step: int
  total_steps: int
  losses: tuple[float, ...]
  preempted: bool
  model: nnx.Module
  stop_signal: int | None = None


def sampler_kwargs(cfg: TrainConfig) -> dict[str, Any]:
  """The sampler-specific TrainConfig fields, as `make_sampler` keyword arguments."""
  if cfg.sampler == "mbc":
    return {"refresh_steps": cfg.mbc_refresh_steps}
  if cfg.sampler == "memorization_reweight":
    return {"refresh_steps": cfg.mbc_refresh_steps, "alpha": cfg.reweight_alpha,
            "p": cfg.reweight_p}
  return {}


def make_default_sampler(cfg: TrainConfig, num_examples: int,
                         lengths: np.ndarray | None = None) -> ExampleSampler:
  """The sampler of `cfg`; `lengths` (tokens per example) serve length grouping."""
  kwargs = sampler_kwargs(cfg)
  if cfg.group_by_length:  # TrainConfig checks the sampler is uniform
    kwargs.update(lengths=lengths, group_batches=cfg.group_by_length,
                  batch_size=cfg.global_batch_size)
  return make_sampler(cfg.sampler, num_examples, seed=cfg.seed,
                      data_fraction=cfg.data_fraction, **kwargs)


def _metrics_lines_up_to(path: str, last_step: int) -> list[str]:
  """The lines of metrics.jsonl with step <= last_step; a torn final line is skipped."""
  with open(path, encoding="utf-8") as f:
    lines = [line for line in f if line.strip()]
  keep = []
  for k, line in enumerate(lines):
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      if k == len(lines) - 1:
        break  # cut off by a kill mid-write; its step is recomputed after the resume
      raise ValueError(f"{path}:{k + 1}: malformed metrics line") from None
    if record["step"] <= last_step:
      keep.append(line if line.endswith("\n") else line + "\n")
  return keep


class MetricsWriter:
  """metrics.jsonl (+ TensorBoard via tensorboardX when installed); process 0 only.

  On resume, records past the resumed-from step are dropped so the file has one line per
  step. The kept lines are written to a new file that replaces the old one atomically (a
  kill then loses nothing logged up to the resume point), and a torn last line (a kill
  mid-write) is dropped.
  """

  def __init__(self, run_dir: str, start_step: int, enabled: bool):
    self.enabled = enabled
    self.path = os.path.join(run_dir, "metrics.jsonl")
    self._tb = None
    if not enabled:
      return
    if os.path.exists(self.path):
      fileio.atomic_write_text(self.path, "".join(_metrics_lines_up_to(self.path, start_step)))
    self._file = open(self.path, "a")
    try:
      import tensorboardX
      self._tb = tensorboardX.SummaryWriter(os.path.join(run_dir, "tensorboard"),
                                            purge_step=start_step + 1 if start_step else None)
    except ImportError:
      log.warning("tensorboardX is not installed: metrics go to metrics.jsonl only")

  def write(self, record: dict[str, Any]) -> None:
    if not self.enabled:
      return
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for k, v in record.items():
        if k != "step" and isinstance(v, (int, float)):
          self._tb.add_scalar(f"train/{k}", v, record["step"])

  def close(self) -> None:
    if not self.enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def per_example_perplexity(ppl_fn: Callable, states: tuple, data: TrainData, chunk: int,
                           mesh: Mesh, rules=sharding_lib.DEFAULT_RULES) -> np.ndarray:
  """Target perplexity of every training example (N,), scored in chunks of `chunk` rows.

  The last chunk is padded with rows that have no target token (discarded).
  """
  n = data.num_examples
  out = np.empty((n,), np.float32)
  sharding = sharding_lib.batch_sharding(mesh, 2, rules)
  for start in range(0, n, chunk):
    idx = np.arange(start, min(start + chunk, n))
    rows = data.rows(np.concatenate([idx, np.full(chunk - len(idx), idx[-1])]))
    rows["target_mask"][len(idx):] = 0
    arrays = [sharding_lib.put_global(rows[k], sharding) for k in _ARRAYS]
    out[idx] = np.asarray(jax.device_get(ppl_fn(*states, *arrays)))[:len(idx)]
  return out


def train(cfg: TrainConfig, data: TrainData, model_path: str, output_dir: str, *,
          mesh: Mesh | None = None, resume: bool = True, sampler: ExampleSampler | None = None,
          progress: bool = True, hooks: Sequence[Callable[[int, dict], None]] = (),
          async_checkpoints: bool = True, rules=sharding_lib.DEFAULT_RULES,
          log_line: Callable[[str], None] | None = None) -> TrainResult:
  """Fine-tunes `model_path` on `data`, checkpointing into `output_dir`.

  Args:
    cfg: the run configuration.
    data: pre-tokenized training examples.
    model_path: base model (local HF directory, `.gguf` or hub id).
    output_dir: the run directory (created, or resumed when it holds the same run).
    mesh: device mesh; default all devices on the `data` axis.
    resume: continue from the latest complete checkpoint (else refuse a directory that has
      checkpoints).
    sampler: data-order sampler; default `samplers.make_sampler(cfg.sampler, ...)`. Its
      `subset` (if any) is written to `subset.json` in the run directory.
    progress: show a tqdm bar (process 0).
    hooks: `hook(step, record)` after each step (and after its checkpoint save started).
    async_checkpoints: write checkpoints in the background.
    rules: logical-axis sharding rules.
    log_line: prints a line for the user (process 0 only): the step a resumed run continues
      from, and that the train step is compiling (minutes on a large model, before the
      first step); default this module's logger at INFO.

  Returns:
    A TrainResult.

  Raises:
    NonFiniteError: the loss or gradient norm became NaN/inf (no checkpoint is written for
      that step; earlier ones stay intact).
    checkpoints.RunMismatchError: `output_dir` holds a different run.
    RunExistsError: `output_dir` has checkpoints and `resume=False`.
  """
  mesh = mesh if mesh is not None else sharding_lib.make_mesh()
  n = data.num_examples
  total = cfg.total_steps(n)
  if jax.process_index() == 0:
    for note in cfg.schedule_notes(n):
      log.warning("%s: %s", output_dir, note)
  model_dir = hf_io.resolve_checkpoint_dir(model_path)
  info = ckpt.run_info(cfg, model_path=model_path, data_fingerprint=data.fingerprint(),
                       num_examples=n)
  ckpt.init_run_dir(output_dir, info, model_dir)

  micro = cfg.micro_batch_size or cfg.global_batch_size
  dp = mesh.shape["data"] * mesh.shape["fsdp"]
  if micro % dp:
    raise ValueError(f"micro-batch of {micro} examples does not split over the {dp} "
                     f"data-parallel devices (data x fsdp) of the mesh")

  sampler = (sampler if sampler is not None else
             make_default_sampler(cfg, n, data.attention_mask.sum(axis=1)))
  subset = getattr(sampler, "subset", None)
  if subset is not None and jax.process_index() == 0:
    # The fixed data_fraction subset: evaluation scores the run's train split on it.
    ckpt.write_subset(output_dir, cfg.data_fraction, subset)
  # With checkpoints_to_save, only those of the cadence's steps (an epoch is the subset).
  kept_steps = (set(checkpoint_steps(cfg, total, n if subset is None else len(subset)))
                if cfg.checkpoints_to_save else None)
  model = ckpt.load_base_model(model_dir, cfg, mesh, rules)
  model_hook = None
  wrt: Any = nnx.Param
  if cfg.lora:
    from memdyn_jax.train import lora as lora_lib
    lora_lib.apply_lora(model, ckpt.lora_config(cfg), nnx.Rngs(cfg.seed))
    sharding_lib.shard_model(model, mesh, rules)
    wrt = lora_lib.LoraParam
    if cfg.lora_dropout > 0:
      model.train()  # adapters drop out; keys set per (step, micro-batch) by the hook
      model_hook = lora_lib.set_lora_dropout_key
  router_aux_coef = loss_lib.router_aux_coefficient(cfg.router_aux_loss, model.cfg)
  graphdef, trained, rngs, frozen = step_lib.split_model(model, wrt)
  del model  # its trained buffers are donated to the step from here on

  tx = make_optimizer(cfg, total)
  schedule = make_schedule(cfg, total)
  with jax.set_mesh(mesh):
    opt_state = jax.jit(tx.init)(trained)
  state_shardings = tuple(step_lib.shardings_of(s) for s in (trained, opt_state, rngs, frozen))

  # Peers line up after loading the model, before orbax's first collective barrier.
  sharding_lib.wait_for_all_processes(f"memdyn_jax.train:{os.path.abspath(output_dir)}")
  mngr = ckpt.make_manager(output_dir, async_save=async_checkpoints)
  start = 0
  latest = mngr.latest_step()
  if latest is not None:
    if not resume:
      mngr.close()
      raise RunExistsError(f"{output_dir} already has checkpoints (latest step {latest}); "
                           "resume it or choose another output directory")
    trained, opt_state, rngs, meta = ckpt.restore_checkpoint(
        mngr, latest, params=trained, opt_state=opt_state, rngs=rngs)
    sampler.load_state_dict(meta["sampler"])
    start = int(meta["step"])
  is_main = jax.process_index() == 0
  say = (log_line or (lambda m: log.info("%s", m))) if is_main else (lambda m: None)
  if latest is not None:
    say(f"{output_dir}: resumed from step {start} of {total}")
  last_saved = start if latest is not None else None

  batch_shardings = {k: step_lib.microbatch_sharding(mesh, 3, rules) for k in _ARRAYS}
  batch_shardings["weights"] = step_lib.microbatch_sharding(mesh, 2, rules)
  train_step = step_lib.make_train_step(graphdef, tx, state_shardings=state_shardings,
                                        batch_shardings=batch_shardings, seed=cfg.seed,
                                        model_hook=model_hook,
                                        router_aux_loss_coef=router_aux_coef)
  ppl_fn = None
  writer = MetricsWriter(output_dir, start, enabled=is_main)

  def save(done: int) -> None:
    meta = {"step": done, "examples_seen": done * cfg.global_batch_size,
            "epoch": float(sampler.epoch()), "sampler": sampler.state_dict(),
            "draw_counts": np.asarray(sampler.draw_counts).tolist(),
            "config": cfg.to_dict(), "time": time.time()}
    ckpt.save_checkpoint(mngr, done, params=trained, opt_state=opt_state, rngs=rngs, meta=meta)

  from tqdm import tqdm
  bar = tqdm(total=total, initial=start, disable=not (progress and is_main), unit="step",
             dynamic_ncols=True)
  losses: list[float] = []
  preempted = False
  if start < total:  # the first call compiles; its bar shows nothing meanwhile
    say(f"{output_dir}: compiling the train step (the first step waits for it)")
  last_time = time.perf_counter()
  with StopSignals() as stop:  # to the end: a signal while the run closes changes nothing
    try:
      for s in range(start, total):
        if sampler.wants_scores(s):
          if ppl_fn is None:
            ppl_fn = step_lib.make_perplexity_fn(graphdef, NamedSharding(mesh, P()))
          sampler.update_scores(per_example_perplexity(
              ppl_fn, (trained, rngs, frozen), data, micro, mesh, rules))
        epoch_before = float(sampler.epoch())
        indices = np.asarray(sampler.next_indices(cfg.global_batch_size))
        weights = sampler.loss_weights(indices)
        host = data.rows(indices, cfg.batch_length_multiple)
        host["weights"] = (np.ones(len(indices), np.float32) if weights is None
                           else np.asarray(weights, np.float32))
        host = step_lib.to_microbatches(host, cfg.accumulation_steps)
        batch = {k: sharding_lib.put_global(v, batch_shardings[k]) for k, v in host.items()}
        trained, opt_state, rngs, metrics = train_step(trained, opt_state, rngs, frozen, batch,
                                                       jnp.int32(s))
        metrics = jax.device_get(metrics)
        now = time.perf_counter()
        dt, last_time = now - last_time, now
        done = s + 1
        if not bool(metrics["finite"]):
          mngr.wait_until_finished()  # the last good checkpoint is complete on disk
          raise NonFiniteError(
              f"non-finite training at step {done}: loss={float(metrics['loss'])}, "
              f"grad_norm={float(metrics['grad_norm'])}; last good checkpoint: "
              f"{'none' if last_saved is None else f'step {last_saved}'} in {output_dir}")
        loss = float(metrics["loss"])
        losses.append(loss)
        record = {"step": done, "epoch": float(sampler.epoch()), "loss": loss,
                  "lr": float(schedule(s)), "grad_norm": float(metrics["grad_norm"]),
                  "target_tokens": int(metrics["target_tokens"]),
                  "tokens_per_s": float(host["attention_mask"].sum() / max(dt, 1e-9)),
                  "examples_seen": done * cfg.global_batch_size}
        if "router_aux_loss" in metrics:  # unweighted; the objective adds router_aux_coef x it
          record["router_aux_loss"] = float(metrics["router_aux_loss"])
        if done % cfg.log_every_steps == 0 or done == total:
          writer.write(record)
        bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
        bar.update(1)
        on_cadence = (done == total
                      or (cfg.save_every_steps and done % cfg.save_every_steps == 0)
                      or epoch_crossed(epoch_before, record["epoch"], cfg.save_every_epochs))
        if on_cadence and (kept_steps is None or done in kept_steps):
          save(done)
          last_saved = done
        for hook in hooks:
          hook(done, record)
        if stop.fired and done < total:  # after the last step it changes nothing
          if last_saved != done:
            save(done)
            last_saved = done
          preempted = True
          break
      mngr.wait_until_finished()
    finally:
      bar.close()
      writer.close()
      mngr.close()
  final = start + len(losses)
  return TrainResult(run_dir=output_dir, step=final, total_steps=total, losses=tuple(losses),
                     preempted=preempted, model=nnx.merge(graphdef, trained, rngs, frozen),
                     stop_signal=stop.signum if preempted else None)


def task_train_data(tokenizer, task, examples, cfg: TrainConfig) -> tuple[TrainData, list[str]]:
  """Task examples tokenized under the trainer/scorer convention -> (TrainData, example ids).

  Row i of the arrays is example `ids[i]` (over-length examples follow `cfg.overlength`).
  """
  from memdyn_jax.tasks import tokenize_task_examples

  batch = tokenize_task_examples(tokenizer, task, examples, max_length=cfg.max_length,
                                 overlength=cfg.overlength, padding_side="right",
                                 append_eos=cfg.append_eos)
  if len(batch.kept_indices) == 0:
    raise ValueError(f"every example is longer than max_length={cfg.max_length} tokens")
  ids = [examples[i].id for i in batch.kept_indices]
  return TrainData(batch.input_ids, batch.attention_mask, batch.target_mask), ids
