"""What a study costs before a pod is booked: a paper grid's runs (Kang et al.'s 13 GSM8K
runs of Llama-3-8B, say) trained and evaluated at every checkpoint, in chip-hours on one
target, from the compiled programs' time estimates (XLA:TPU's cost model).

  training    steps per run (`TrainConfig.total_steps` of the preset's runs) x the train step
  evaluation  per checkpoint (`checkpoint_steps` of each run, the base model once): the train
              examples evaluated and the test set, sampled `samples_per_prompt` times each
              (prefill + `max_new_tokens` decode steps per call), and scored teacher-forced

Stated assumptions (`StudyAssumptions`, printed with every table): the sequence and prompt
lengths (measured on the task's data with `lengths_from_data`, else given), the sampling
budget decoded in full (a batch runs until its longest row stops: an upper bound), and the
batch sizes of each program. Not counted: the greedy (ATC) pass, gradient variance,
checkpoint writes, start-up and compilation.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Sequence

from memdyn_jax.errors import FieldError
from memdyn_jax.models import ModelConfig
from memdyn_jax.plan.chips import Target, TargetError, parse_target
from memdyn_jax.plan.scale import PRECISIONS, PlanReport, plan_scale
from memdyn_jax.train import config as train_config

# Splash attention tiles and XLA:TPU's layouts work in multiples of 128 tokens.
LENGTH_QUANTUM = 128


@dataclasses.dataclass(frozen=True)
class StudyAssumptions:
  """What a study's cost is computed from.

  Attributes:
    train_examples: D_train size (GSM8K: 7,473).
    test_examples: test set size (GSM8K: 1,319).
    train_len: tokens per training and scoring sequence (prompt + target, padded).
    prompt_len: tokens per sampling prompt (padded).
    max_new_tokens: sampling budget, decoded in full.
    samples_per_prompt: samples per evaluated example (Kang et al.: accuracy of samples at
      T = 0.8; the task's default n).
    eval_train_examples: train examples evaluated per checkpoint (0 = the run's whole
      training subset), as `EvalSettings.num_train`.
    eval_test_examples: test examples evaluated per checkpoint (0 = all).
    sample_batch: prompts per sampling call (rows = prompts x samples).
    score_batch: sequences per scoring call.
    micro_batch: training micro-batch (0 = the preset's global batch).
    remat: training remat policy; precision: a key of `plan.PRECISIONS`.
    include_base: the base model is evaluated once too.
    save_every_epochs: checkpoint cadence of every run (Kang et al.'s figures show one
      checkpoint per epoch), the last step always included.
    source: where the lengths come from (printed).
  """
  train_examples: int = 7473
  test_examples: int = 1319
  train_len: int = 512
  prompt_len: int = 256
  max_new_tokens: int = 512
  samples_per_prompt: int = 5
  eval_train_examples: int = 256
  eval_test_examples: int = 0
  sample_batch: int = 64
  score_batch: int = 64
  micro_batch: int = 0
  remat: str = "full"
  precision: str = "mixed"
  include_base: bool = True
  save_every_epochs: float = 1.0
  source: str = "defaults (GSM8K, SmolLM2 tokenizer: prompt p99 133, target p99 295 tokens)"

  def __post_init__(self):
    for name in ("train_examples", "test_examples", "train_len", "prompt_len",
                 "max_new_tokens", "samples_per_prompt", "sample_batch", "score_batch"):
      if getattr(self, name) < 1:
        raise TargetError(name, f"must be >= 1, got {getattr(self, name)}")
    if self.precision not in PRECISIONS:
      raise TargetError("precision", f"{self.precision!r} is not one of {sorted(PRECISIONS)}")

  def evaluated_prompts(self, training_rows: int) -> int:
    """Examples evaluated at one checkpoint of a run training on `training_rows` rows."""
    train = (min(self.eval_train_examples, training_rows) if self.eval_train_examples
             else training_rows)
    return train + (min(self.eval_test_examples, self.test_examples)
                    if self.eval_test_examples else self.test_examples)


def round_up(n: float, quantum: int = LENGTH_QUANTUM) -> int:
  return max(quantum, int(math.ceil(n / quantum)) * quantum)


def lengths_from_data(task, tokenizer, path: str | None = None, split: str = "train",
                      quantile: float = 0.99) -> dict[str, Any]:
  """Token lengths of `task`'s prompts, targets and whole sequences on `split`: their
  `quantile` and mean, and the padded lengths a plan uses (the quantile rounded up to
  `LENGTH_QUANTUM`)."""
  import numpy as np

  examples = task.load(split, path)
  prompts = [task.format_prompt(ex.question) for ex in examples]
  targets = [task.format_target(ex) for ex in examples]
  count = lambda texts: np.array([len(ids) for ids in tokenizer(texts)["input_ids"]])
  p, t = count(prompts), count(targets)
  q = lambda x: float(np.quantile(x, quantile))
  return {"examples": len(examples), "quantile": quantile,
          "prompt": {"mean": float(p.mean()), "quantile": q(p), "max": int(p.max())},
          "target": {"mean": float(t.mean()), "quantile": q(t), "max": int(t.max())},
          "prompt_len": round_up(q(p)), "train_len": round_up(q(p + t))}


def measured_assumptions(task_name: str, tokenizer_path: str, task_path: str | None = None,
                         **fields) -> StudyAssumptions:
  """`StudyAssumptions` with the prompt and sequence lengths measured on the task's train
  split (`lengths_from_data`), the measurement stated as its `source`.

  Raises:
    FieldError: ("tokenizer") the tokenizer, task or data cannot be loaded.
  """
  from memdyn_jax import models
  from memdyn_jax.tasks import base as tasks
  try:
    lengths = lengths_from_data(tasks.get_task(task_name), models.load_tokenizer(tokenizer_path),
                                task_path)
  except (OSError, ValueError) as e:
    raise FieldError("tokenizer", f"cannot measure {task_name}'s lengths: {e}") from e
  p, t = lengths["prompt"], lengths["target"]
  source = (f"{task_name} train split ({lengths['examples']} examples), {tokenizer_path} "
            f"tokenizer: prompt p99 {p['quantile']:.0f} (mean {p['mean']:.0f}), target p99 "
            f"{t['quantile']:.0f} (mean {t['mean']:.0f})")
  return StudyAssumptions(train_len=lengths["train_len"], prompt_len=lengths["prompt_len"],
                          source=source, **fields)


@dataclasses.dataclass(frozen=True)
class RunCost:
  """One run of the grid: its steps, checkpoints, and seconds on the slice."""
  label: str
  steps: int
  checkpoints: int
  train_seconds: float
  eval_seconds: float


@dataclasses.dataclass(frozen=True)
class StudyCost:
  """A grid's cost on one target (`study_cost`)."""
  preset: str
  target: str
  chips: int
  plan: PlanReport
  assumptions: StudyAssumptions
  runs: tuple[RunCost, ...]
  base_eval_seconds: float
  sample_call_seconds: float
  score_call_seconds: float

  def chip_hours(self, seconds: float) -> float:
    return seconds * self.chips / 3600

  @property
  def train_chip_hours(self) -> float:
    return self.chip_hours(sum(r.train_seconds for r in self.runs))

  @property
  def eval_chip_hours(self) -> float:
    return self.chip_hours(sum(r.eval_seconds for r in self.runs) + self.base_eval_seconds)

  @property
  def total_chip_hours(self) -> float:
    return self.train_chip_hours + self.eval_chip_hours

  def markdown(self) -> str:
    """The per-run table with its totals and the assumptions under it."""
    a, p = self.assumptions, self.plan
    lines = [f"Study cost: {self.preset} on {self.target} ({self.chips} chips), "
             f"{p.model}, XLA:TPU time estimates",
             "",
             "| run | steps | checkpoints | training (chip-h) | evaluation (chip-h) |",
             "|---|---|---|---|---|"]
    for r in self.runs:
      lines.append(f"| {r.label} | {r.steps} | {r.checkpoints} | "
                   f"{self.chip_hours(r.train_seconds):.1f} | "
                   f"{self.chip_hours(r.eval_seconds):.1f} |")
    if a.include_base:
      lines.append(f"| base model | 0 | 1 | 0.0 | {self.chip_hours(self.base_eval_seconds):.1f} |")
    lines.append(f"| **total** | {sum(r.steps for r in self.runs)} | "
                 f"{sum(r.checkpoints for r in self.runs) + int(a.include_base)} | "
                 f"**{self.train_chip_hours:.1f}** | **{self.eval_chip_hours:.1f}** |")
    lines += [
        "",
        f"Train step: {p.global_batch} x {p.seq_len} tokens, micro-batch {p.micro_batch}, "
        f"remat={p.remat}, {p.compute_dtype} compute / {p.param_dtype} parameters, "
        f"{p.step_seconds:.2f} s estimated ({p.tokens_per_second_per_chip:,.0f} tokens/s/chip, "
        f"MFU {p.mfu:.0%}); attention {p.train.attention_path}.",
        f"Checkpoints every {a.save_every_epochs:g} epoch(s) and at the end. "
        f"Evaluation per checkpoint: {a.eval_train_examples or 'all'} train + "
        f"{a.eval_test_examples or a.test_examples} test examples, {a.samples_per_prompt} "
        f"samples each ({a.sample_batch} prompts per call: prefill {a.prompt_len} tokens + "
        f"{a.max_new_tokens} decode steps = {self.sample_call_seconds:.2f} s), scored "
        f"teacher-forced at {a.score_batch} x {a.train_len} ({self.score_call_seconds:.3f} s "
        "per call).",
        f"Lengths: {a.source}. The sampling budget is decoded in full (an upper bound); the "
        "greedy (ATC) pass, gradient variance, checkpoint writes and compilation are not "
        "counted."]
    return "\n".join(lines)

  def to_dict(self) -> dict[str, Any]:
    return {"preset": self.preset, "target": self.target, "chips": self.chips,
            "assumptions": dataclasses.asdict(self.assumptions),
            "runs": [dataclasses.asdict(r) for r in self.runs],
            "base_eval_seconds": self.base_eval_seconds,
            "sample_call_seconds": self.sample_call_seconds,
            "score_call_seconds": self.score_call_seconds,
            "train_chip_hours": self.train_chip_hours, "eval_chip_hours": self.eval_chip_hours,
            "total_chip_hours": self.total_chip_hours, "plan": self.plan.to_dict()}


def _run_label(cfg: train_config.TrainConfig) -> str:
  size = {1.0: "full", 0.5: "half", 0.25: "quarter"}.get(cfg.data_fraction,
                                                        f"{cfg.data_fraction:g}")
  return f"lr {cfg.learning_rate:g}, {cfg.num_epochs:g} ep, {size}"


def study_cost(model_config: ModelConfig | str, paper_grid: str, target: Target | str,
               assumptions: StudyAssumptions | None = None, *,
               mesh_shape: Sequence[int] | None = None, plan: PlanReport | None = None,
               log=None) -> StudyCost:
  """Chip-hours of training and evaluating every run of `paper_grid` on `target`.

  Args:
    model_config: a `ModelConfig` or preset name ("llama3-8b").
    paper_grid: a `memdyn_jax.train.config.PRESETS` name whose grid gives the runs.
    target: a TPU slice ("v5p-8"): the programs' time estimates come from XLA:TPU.
    assumptions: lengths, evaluation sizes and batches (`StudyAssumptions`).
    mesh_shape: (data, fsdp, tensor); default pure fsdp over the slice.
    plan: an already compiled `plan_scale` report of these programs (skips compiling).
    log: optional `log(str)` progress callback.

  Raises:
    TargetError: a target without a time estimate (GPU, or no libtpu), or bad assumptions.
    FieldError: an unknown paper grid ("paper_grid").
  """
  a = assumptions or StudyAssumptions()
  target = parse_target(target) if isinstance(target, str) else target
  if paper_grid not in train_config.PRESETS:
    raise FieldError("paper_grid", f"{paper_grid!r} is not one of {sorted(train_config.PRESETS)}")
  runs = train_config.preset_grid(paper_grid)
  if target.platform != "tpu":
    raise TargetError("target", f"{target.name}: a study's cost needs XLA:TPU's time "
                      "estimates; plan a TPU target")
  if plan is None:
    compute, param = PRECISIONS[a.precision]
    if log:
      log(f"compiling the train step, scorer and sampler for {target.name} ...")
    plan = plan_scale(model_config, mesh_shape, runs[0].global_batch_size, a.train_len,
                      remat=a.remat, compute_dtype=compute, param_dtype=param,
                      micro_batch=a.micro_batch, target=target, sampling=True, scoring=True,
                      sample_batch=a.sample_batch, prompt_len=a.prompt_len,
                      max_new_tokens=a.max_new_tokens, score_batch=a.score_batch,
                      samples_per_prompt=a.samples_per_prompt, estimate=True)
  missing = [p.name for p in (plan.train, plan.prefill, plan.decode, plan.score)
             if p.estimated_seconds is None]
  if missing:
    raise TargetError("target", f"XLA:TPU gave no time estimate for {', '.join(missing)} on "
                      f"{target.name}; no cost can be stated")
  sample_call = plan.prefill.estimated_seconds + a.max_new_tokens * plan.decode.estimated_seconds
  score_call = plan.score.estimated_seconds

  def eval_seconds(training_rows: int) -> float:
    prompts = a.evaluated_prompts(training_rows)
    return (math.ceil(prompts / a.sample_batch) * sample_call
            + math.ceil(prompts / a.score_batch) * score_call)

  costs = []
  for cfg in runs:
    cfg = cfg.replace(save_every_epochs=a.save_every_epochs)
    if cfg.global_batch_size != plan.global_batch:
      raise TargetError("paper_grid", f"{paper_grid}'s runs differ in global batch; plan "
                        "them one batch size at a time")
    steps = cfg.total_steps(a.train_examples)
    rows = train_config.subset_size(a.train_examples, cfg.data_fraction)
    checkpoints = len(train_config.checkpoint_steps(cfg, steps, rows))
    costs.append(RunCost(_run_label(cfg), steps, checkpoints, steps * plan.step_seconds,
                         checkpoints * eval_seconds(rows)))
  base = eval_seconds(a.train_examples) if a.include_base else 0.0
  return StudyCost(paper_grid, target.name, target.num_chips, plan, a, tuple(costs), base,
                   sample_call, score_call)
