"""`TrainConfig`, the frozen description of one fine-tuning run, and the papers' presets.

A run is identified by its `TrainConfig` (saved as JSON in the run directory and compared
on resume); the mesh is *not* part of it, so a run may resume on a different topology.

Presets reproduce the papers' set-ups (Kang et al., Appendix A; Ge et al., Section 3):
`get_preset(name)` gives the base configuration and `preset_grid(name)` the exact list of
runs the paper reports (learning rate x epochs x dataset size).
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from typing import Any, Mapping, Sequence

from memdyn_jax.errors import FieldError

OPTIMIZERS = ("adamw", "adam", "sgd")
SCHEDULES = ("linear", "cosine", "constant")
DTYPES = ("float32", "bfloat16")
SAMPLERS = ("uniform", "mbc", "memorization_reweight")
REMAT = ("none", "full", "dots")
OVERLENGTH = ("drop", "truncate", "error")
ROUTER_AUX_LOSSES = ("hf", "on", "off")


class ConfigError(FieldError):
  """A bad `TrainConfig` value; `field` names the offending field (and CLI flag)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Every knob of a fine-tuning run. Field names double as `experiments/train.py` flags.

  Attributes:
    learning_rate: peak learning rate.
    num_epochs: passes over the (possibly subsetted) training set; may be fractional.
    max_steps: if > 0, the number of optimizer steps, overriding the epoch count.
    train_steps_as_full_epochs: if > 0, train for the steps of this many epochs over the
      *full* dataset regardless of `data_fraction` (Kang et al.'s half/quarter runs).
    global_batch_size: examples per optimizer step (summed over hosts and micro-batches).
    micro_batch_size: examples per forward/backward pass; gradients of
      `global_batch_size / micro_batch_size` micro-batches are accumulated. 0 = no accumulation.
    optimizer: "adamw" (decoupled weight decay), "adam" (no decay) or "sgd" (momentum `beta1`).
    beta1: decay of the first-moment (mean) estimate of Adam/AdamW; SGD's momentum.
    beta2: decay of the second-moment (variance) estimate of Adam/AdamW.
    eps: Adam/AdamW's epsilon, added to the root of the second moment.
    weight_decay: AdamW decoupled decay; not applied to biases and norm scales (as HF Trainer).
    schedule: "linear" (warmup then linear decay to 0), "cosine" (warmup then cosine to 0)
      or "constant" (warmup then flat).
    warmup_steps: linear warmup length in steps; if 0, `warmup_ratio * total_steps` (rounded up).
    warmup_ratio: warmup as a fraction of the total steps.
    max_grad_norm: global-norm clipping threshold; 0 disables clipping.
    compute_dtype: activation / matmul dtype ("bfloat16" = mixed precision).
    param_dtype: master-weight dtype (keep "float32" for bf16 mixed precision).
    remat: rematerialisation policy of the transformer blocks.
    seed: seeds data order, LoRA init and dropout.
    sampler: "uniform", "mbc" or "memorization_reweight" (memdyn_jax.train.samplers).
    data_fraction: fraction of the training set used (a fixed random subset).
    mbc_refresh_steps: MBC / reweighting: steps between perplexity refreshes.
    reweight_alpha: memorization_reweight: exponent α > 0 of the loss weights
      min(1, (ppl - 1)/(p - 1))^α (larger shrinks memorized examples' weights faster).
    reweight_p: memorization_reweight: perplexity p > 1 at and above which an example
      counts as unmemorized and keeps full weight.
    lora_rank: LoRA rank; 0 = full fine-tuning.
    lora_alpha: LoRA scale numerator: the adapters' update is scaled by lora_alpha /
      lora_rank.
    lora_dropout: dropout rate on the adapters' input while training (0 = off).
    lora_target_modules: names of the projections that get adapters (the last path
      component: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj; GPT-Neo's
      MLP is c_fc, c_proj).
    max_length: maximum tokens per training example (prompt + target).
    overlength: what to do with longer examples: "drop", "truncate" or "error".
    batch_length_multiple: 0 = every batch keeps all `max_length` columns (one compiled
      step); k > 0 = columns that are padding in every row of the batch are cut from the
      end down to a multiple of k (fewer FLOPs on short batches, one compilation per
      length; the loss is unchanged).
    group_by_length: 0 = off; k > 0 = batches of similar length (HF's `group_by_length`):
      each chunk of k batches of the epoch's permutation is sorted by length, then the
      batches are shuffled (uniform sampler only; pairs with `batch_length_multiple`).
    append_eos: end every target with EOS (the model learns to stop).
    save_every_steps: checkpoint every this many steps (0 = off).
    save_every_epochs: checkpoint every time this fraction of an epoch passes (0 = off).
    checkpoints_to_save: save only this many of the checkpoints the save_every_* cadence
      (and the last step) would make, spread over the run as `spread_steps` picks them: the
      ones an evaluation with `checkpoints_per_run` of the same number reads. 0 = all.
    log_every_steps: metrics cadence.
    router_aux_loss: a mixture-of-experts model's load-balancing loss, weighted by its
      config's `router_aux_loss_coef`, added to the training objective: "hf" where HF's model
      adds it to its loss (its config's `output_router_logits`; Qwen3-30B-A3B's: false, so
      off), "on", or "off". Ignored for models without routers
      (`memdyn_jax.train.loss.router_aux_coefficient`).
  """

  learning_rate: float = 2e-5
  num_epochs: float = 3.0
  max_steps: int = 0
  train_steps_as_full_epochs: float = 0.0
  global_batch_size: int = 128
  micro_batch_size: int = 0
  optimizer: str = "adamw"
  beta1: float = 0.9
  beta2: float = 0.999
  eps: float = 1e-8
  weight_decay: float = 0.0
  schedule: str = "linear"
  warmup_steps: int = 0
  warmup_ratio: float = 0.0
  max_grad_norm: float = 1.0
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  seed: int = 0
  sampler: str = "uniform"
  data_fraction: float = 1.0
  mbc_refresh_steps: int = 100
  reweight_alpha: float = 1.0
  reweight_p: float = 2.0
  lora_rank: int = 0
  lora_alpha: float = 16.0
  lora_dropout: float = 0.0
  lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
  max_length: int = 512
  overlength: str = "drop"
  batch_length_multiple: int = 0
  group_by_length: int = 0
  append_eos: bool = True
  save_every_steps: int = 0
  save_every_epochs: float = 0.0
  checkpoints_to_save: int = 0
  log_every_steps: int = 1
  router_aux_loss: str = "hf"

  def __post_init__(self):
    # Lists from JSON / flags become tuples so the config stays hashable and comparable.
    object.__setattr__(self, "lora_target_modules", tuple(self.lora_target_modules))
    _choice("optimizer", self.optimizer, OPTIMIZERS)
    _choice("schedule", self.schedule, SCHEDULES)
    _choice("compute_dtype", self.compute_dtype, DTYPES)
    _choice("param_dtype", self.param_dtype, DTYPES)
    _choice("sampler", self.sampler, SAMPLERS)
    _choice("remat", self.remat, REMAT)
    _choice("overlength", self.overlength, OVERLENGTH)
    _choice("router_aux_loss", self.router_aux_loss, ROUTER_AUX_LOSSES)
    _check("learning_rate", self.learning_rate >= 0, "must be >= 0")
    _check("num_epochs", self.num_epochs > 0, "must be > 0")
    for name in ("max_steps", "warmup_steps", "save_every_steps", "micro_batch_size",
                 "lora_rank", "checkpoints_to_save"):
      _check(name, getattr(self, name) >= 0, "must be >= 0")
    _check("global_batch_size", self.global_batch_size > 0, "must be > 0")
    if self.micro_batch_size:
      _check("micro_batch_size", self.global_batch_size % self.micro_batch_size == 0,
             f"must divide global_batch_size = {self.global_batch_size}")
    _check("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)")
    _check("data_fraction", 0 < self.data_fraction <= 1, "must be in (0, 1]")
    _check("train_steps_as_full_epochs", self.train_steps_as_full_epochs >= 0, "must be >= 0")
    _check("max_grad_norm", self.max_grad_norm >= 0, "must be >= 0 (0 = no clipping)")
    _check("weight_decay", self.weight_decay >= 0, "must be >= 0")
    _check("weight_decay", not (self.weight_decay and self.optimizer != "adamw"),
           f"only adamw applies weight decay, got optimizer={self.optimizer!r}")
    _check("beta1", 0 <= self.beta1 < 1, "must be in [0, 1)")
    _check("beta2", 0 <= self.beta2 < 1, "must be in [0, 1)")
    _check("eps", self.eps > 0, "must be > 0")
    _check("save_every_epochs", self.save_every_epochs >= 0, "must be >= 0")
    _check("log_every_steps", self.log_every_steps > 0, "must be > 0")
    _check("mbc_refresh_steps", self.mbc_refresh_steps > 0, "must be > 0")
    _check("lora_dropout", 0 <= self.lora_dropout < 1, "must be in [0, 1)")
    _check("lora_alpha", self.lora_alpha > 0, "must be > 0")
    _check("max_length", self.max_length > 1, "must be > 1")
    _check("batch_length_multiple", self.batch_length_multiple >= 0, "must be >= 0")
    _check("group_by_length", self.group_by_length >= 0, "must be >= 0")
    _check("group_by_length", not self.group_by_length or self.sampler == "uniform",
           "needs sampler 'uniform'")
    _check("reweight_p", self.reweight_p > 1, "must be > 1 (a perplexity)")
    _check("reweight_alpha", self.reweight_alpha > 0, "must be > 0")

  @property
  def accumulation_steps(self) -> int:
    """Micro-batches per optimizer step."""
    return self.global_batch_size // self.micro_batch_size if self.micro_batch_size else 1

  @property
  def lora(self) -> bool:
    return self.lora_rank > 0

  def total_steps(self, num_examples: int) -> int:
    """Optimizer steps of the run for a training set of `num_examples` (before subsetting).

    `max_steps` wins; else `train_steps_as_full_epochs` epochs of the full set; else
    `num_epochs` epochs of the `data_fraction` subset. Partial last batches round up.
    """
    if self.max_steps:
      return self.max_steps
    if self.train_steps_as_full_epochs:
      return max(1, math.ceil(self.train_steps_as_full_epochs * num_examples
                              / self.global_batch_size))
    subset = subset_size(num_examples, self.data_fraction)
    return max(1, math.ceil(self.num_epochs * subset / self.global_batch_size))

  def schedule_notes(self, num_examples: int) -> list[str]:
    """What a user may not expect of the step count for `num_examples` examples: a batch
    larger than the (subset of the) data, so examples repeat inside a batch; epochs that a
    whole number of steps can only approximate (2 epochs running as 2.24); or a warmup as
    long as the run (a preset's 20 steps in a 4-step run), so the learning rate never
    reaches its peak. Empty when the run is what it says. The training loop logs them."""
    notes = []
    subset = subset_size(num_examples, self.data_fraction)
    steps = self.total_steps(num_examples)
    if self.global_batch_size > subset:
      notes.append(f"global_batch_size {self.global_batch_size} exceeds the {subset} training "
                   f"examples: examples repeat within a batch")
    if not self.max_steps and not self.train_steps_as_full_epochs:
      actual = steps * self.global_batch_size / subset
      if abs(actual - self.num_epochs) > 1e-6 * max(1.0, self.num_epochs):
        notes.append(f"num_epochs {self.num_epochs:g} of {subset} examples in batches of "
                     f"{self.global_batch_size} rounds up to {steps} steps = {actual:.3g} epochs")
    warmup = self.warmup(steps)  # at most the run; the peak comes at step `warmup` (0-based)
    if warmup >= steps and self.learning_rate > 0:
      asked = (f"warmup_steps {self.warmup_steps}" if self.warmup_steps
               else f"warmup_ratio {self.warmup_ratio:g}")
      highest = self.learning_rate * (steps - 1) / warmup
      notes.append(f"{asked} spans the whole {steps}-step run: the learning rate rises to "
                   f"{highest:.3g} at most, never its peak learning_rate "
                   f"{self.learning_rate:g} (lower the warmup)")
    return notes

  def warmup(self, total_steps: int) -> int:
    if self.warmup_steps:
      return min(self.warmup_steps, total_steps)
    return min(math.ceil(self.warmup_ratio * total_steps), total_steps)

  def replace(self, **changes) -> "TrainConfig":
    unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
    if unknown:
      raise ConfigError(unknown[0], "no such TrainConfig field")
    return dataclasses.replace(self, **changes)

  def to_dict(self) -> dict[str, Any]:
    d = dataclasses.asdict(self)
    d["lora_target_modules"] = list(self.lora_target_modules)
    return d

  def to_json(self) -> str:
    return json.dumps(self.to_dict(), sort_keys=True, indent=2)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
    return cls().replace(**dict(d))

  def diff(self, other: "TrainConfig") -> dict[str, tuple[Any, Any]]:
    """{field: (self value, other value)} for every field that differs."""
    a, b = self.to_dict(), other.to_dict()
    return {k: (a[k], b[k]) for k in a if a[k] != b[k]}


# How much denser late than early `spread_steps` picks (1 = even in checkpoint index).
SPREAD_POWER = 0.75


def spread_steps(steps: Sequence[int], k: int) -> list[int]:
  """k of `steps` (sorted checkpoint steps) spread over the run, the last included; all of
  them when k <= 0 or there are at most k. Training saves (`checkpoints_to_save`) and
  evaluation reads (`checkpoints_per_run`) the same picks."""
  steps = sorted(steps)
  if k <= 0 or len(steps) <= k:
    return list(steps)
  picks = {steps[-1]}
  for i in range(1, k):
    at = round(len(steps) * (i / k) ** SPREAD_POWER) - 1
    picks.add(steps[min(len(steps) - 1, max(at, 0))])
  for s in reversed(steps):  # spacing collisions: fill from the end
    if len(picks) >= k:
      break
    picks.add(s)
  return sorted(picks)


def epoch_crossed(before: float, after: float, every: float) -> bool:
  """Whether going from epoch `before` to `after` passes a multiple of `every` (> 0)."""
  if every <= 0:
    return False
  eps = 1e-9  # 0.25 * 4 must count as reaching epoch 1
  return math.floor(after / every + eps) > math.floor(before / every + eps)


def checkpoint_steps(cfg: TrainConfig, total_steps: int, rows: int) -> list[int]:
  """The steps a run of `total_steps` over `rows` training rows checkpoints at: every
  `save_every_steps`, every `save_every_epochs` of `rows` drawn examples (a step draws
  `global_batch_size`), and the last step; `checkpoints_to_save` of them when set."""
  per_epoch = cfg.global_batch_size / max(rows, 1)
  steps = [s for s in range(1, total_steps + 1)
           if s == total_steps
           or (cfg.save_every_steps and s % cfg.save_every_steps == 0)
           or epoch_crossed((s - 1) * per_epoch, s * per_epoch, cfg.save_every_epochs)]
  return spread_steps(steps, cfg.checkpoints_to_save)


def subset_size(num_examples: int, data_fraction: float) -> int:
  """Examples kept by `data_fraction` (rounded, at least 1)."""
  return max(1, int(round(num_examples * data_fraction)))


def field_types() -> dict[str, type]:
  """Field name -> its Python type (`tuple` for sequences), for building CLI flags."""
  hints = typing.get_type_hints(TrainConfig)
  out = {}
  for f in dataclasses.fields(TrainConfig):
    t = hints[f.name]
    out[f.name] = tuple if typing.get_origin(t) is tuple else t
  return out


def _choice(field: str, value: Any, choices: tuple[str, ...]) -> None:
  if value not in choices:
    raise ConfigError(field, f"{value!r} is not one of {list(choices)}")


def _check(field: str, ok: bool, message: str) -> None:
  if not ok:
    raise ConfigError(field, message)


# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
  """A paper's training set-up: shared settings plus the runs of its grid.

  Attributes:
    name: preset name.
    source: where the values come from.
    base: TrainConfig overrides shared by every run.
    grid: per-run overrides, one dict per run the paper reports.
  """

  name: str
  source: str
  base: tuple[tuple[str, Any], ...]
  grid: tuple[tuple[tuple[str, Any], ...], ...] = ()

  def config(self, **overrides) -> TrainConfig:
    return TrainConfig().replace(**{**dict(self.base), **overrides})

  def runs(self) -> list[TrainConfig]:
    return [self.config(**dict(run)) for run in self.grid] or [self.config()]


def _runs(rows: list[tuple[float, float, str]]) -> tuple:
  """(lr, epochs, size) rows -> per-run overrides; half/quarter runs train the steps of
  3 full epochs (Kang et al., Appendix A)."""
  fraction = {"full": 1.0, "half": 0.5, "quarter": 0.25}
  out = []
  for lr, epochs, size in rows:
    run = {"learning_rate": lr, "num_epochs": float(epochs), "data_fraction": fraction[size]}
    if size != "full":
      run["train_steps_as_full_epochs"] = 3.0
    out.append(tuple(sorted(run.items())))
  return tuple(out)


_KANG_LLAMA_GSM8K = [(5e-5, 6, "full"), (2e-5, 6, "full"), (5e-7, 6, "full"), (2e-4, 6, "full"),
                     (5e-5, 3, "full"), (2e-5, 3, "full"), (5e-7, 3, "full"), (2e-4, 3, "full"),
                     (5e-5, 1, "full"), (5e-7, 1, "full"), (2e-4, 1, "full"),
                     (2e-5, 6, "half"), (2e-5, 12, "quarter")]
_KANG_LLAMA_MATH = [(5e-5, 6, "full"), (5e-7, 6, "full"), (2e-4, 6, "full"),
                    (5e-5, 3, "full"), (5e-7, 3, "full"), (2e-4, 3, "full"),
                    (5e-5, 1, "full"), (5e-7, 1, "full"), (2e-4, 1, "full"),
                    (2e-5, 6, "half"), (2e-5, 12, "quarter")]
_KANG_GEMMA = ([(lr, ep, "full") for ep in (6, 3, 1) for lr in (5e-4, 5e-5, 5e-6, 5e-7)]
               + [(5e-5, 6, "half"), (5e-5, 12, "quarter")])

_KANG_LLAMA = dict(optimizer="adamw", schedule="linear", warmup_steps=20, max_grad_norm=2.0,
                   beta1=0.9, beta2=0.999, eps=1e-8, learning_rate=2e-5, num_epochs=3.0)
_KANG_GEMMA_BASE = dict(optimizer="adam", schedule="cosine", warmup_ratio=0.1, max_grad_norm=1.0,
                        global_batch_size=32, weight_decay=0.0, learning_rate=5e-5, num_epochs=3.0)

PRESETS: dict[str, Preset] = {p.name: p for p in [
    Preset("kang_llama3_gsm8k", "Kang et al., App. A.2",
           tuple(sorted({**_KANG_LLAMA, "global_batch_size": 128, "weight_decay": 0.01}.items())),
           _runs(_KANG_LLAMA_GSM8K)),
    Preset("kang_llama3_math", "Kang et al., App. A.3",
           tuple(sorted({**_KANG_LLAMA, "global_batch_size": 24, "weight_decay": 0.0}.items())),
           _runs(_KANG_LLAMA_MATH)),
    Preset("kang_gemma2_gsm8k", "Kang et al., App. A.4", tuple(sorted(_KANG_GEMMA_BASE.items())),
           _runs(_KANG_GEMMA)),
    Preset("kang_gemma2_math", "Kang et al., App. A.5", tuple(sorted(_KANG_GEMMA_BASE.items())),
           _runs(_KANG_GEMMA)),
    Preset("ge_gptneo_sft", "Ge et al., Sec. 3 (MBC)",
           tuple(sorted(dict(optimizer="adamw", beta1=0.9, beta2=0.999, weight_decay=0.0,
                             schedule="linear", warmup_steps=0, learning_rate=1e-5,
                             num_epochs=15.0).items())),
           tuple(tuple(sorted({"learning_rate": lr}.items())) for lr in (1e-5, 5e-5))),
    Preset("curation_default", "Kang et al., App. C (data curation)",
           tuple(sorted({**_KANG_LLAMA, "global_batch_size": 128, "weight_decay": 0.01,
                         "learning_rate": 2e-5, "num_epochs": 3.0}.items()))),
]}


def get_preset(name: str, **overrides) -> TrainConfig:
  """The preset's base TrainConfig with `overrides` applied ("none" = library defaults)."""
  if name in ("", "none"):
    return TrainConfig().replace(**overrides)
  if name not in PRESETS:
    raise ConfigError("preset", f"{name!r} is not one of {sorted(PRESETS)}")
  return PRESETS[name].config(**overrides)


def preset_grid(name: str) -> list[TrainConfig]:
  """Every run the paper reports for preset `name`, in the paper's order."""
  if name not in PRESETS:
    raise ConfigError("preset", f"{name!r} is not one of {sorted(PRESETS)}")
  return PRESETS[name].runs()
