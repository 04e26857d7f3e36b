"""Data samplers compared at an equal step budget: Ge et al.'s MBC, Ruan et al.'s reweighting.

One study trains the same base model on the same examples with the same `TrainConfig`
(hence the same number of optimizer steps and examples drawn) once per sampler
(`memdyn_jax.train.samplers`), evaluates each run's last checkpoint, and lays the results
side by side. Two presets:

  * "mbc" (Ge et al. Sec. 4): `uniform` vs `mbc`. Held-out ("validation") perplexity, exact
    memorization on train and held-out targets, teacher-forced response entropy, quality
    by a pairwise judge (each sampler's held-out responses against the baseline's:
    `judge.ReferenceAnswerJudge` for tasks with short answers, the local-model
    `judge.local_model_judge` for open-ended ones), and the sampling frequency of every
    training example (Ge et al. Fig. 8) as PNG + CSV.
  * "reweight" (Ruan et al.): `uniform` vs `memorization_reweight`. Test accuracy, test
    perplexity, robustness (accuracy under answer-preamble perturbations of the test
    prompts) and OOD accuracy, against Ruan et al.'s other two mitigations applied to the
    baseline run itself (`mitigations`): checkpoint selection (the checkpoint of lowest
    perplexity on validation examples, test-split examples after the evaluated ones) and
    merging (the uniform average of its saved checkpoints), evaluated on the same units.

Both presets evaluate the same units where asked; the presets only pick defaults
(samplers, judge, OOD, perturbations). Layout under `output_dir`:

    runs/<sampler>/            a training run (resumed if present; examples.json as
                               experiments/train.py writes it) with its records in
                               runs/<sampler>/<EVAL_NAME>/ (atomic, skipped when done);
                               the baseline's validation records (checkpoint selection)
                               in runs/<baseline>/<SELECTION_EVAL_NAME>/
    merged/<baseline>/         the merge of the baseline's checkpoints, a run directory
    sampling_frequency.csv/.png  draws per training example per sampler
    judge_<judge>.csv          per-item judge scores and verdicts
    results.csv, summary.json, report.md

Everything is resumable: training and evaluation skip what is saved; the tables, plots
and judge verdicts are recomputed from the saved records.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from memdyn_jax import evaluation
from memdyn_jax.evaluation import judge as judge_lib
from memdyn_jax import fileio
from memdyn_jax.evaluation import records as records_lib
from memdyn_jax.errors import FieldError
from memdyn_jax.evaluation.sampling import SamplingParams
from memdyn_jax.tasks.base import Example, Task
from memdyn_jax.train import task_run
from memdyn_jax.train.config import TrainConfig
from memdyn_jax.train.samplers import SAMPLERS

EVAL_NAME = "study_eval"
SELECTION_EVAL_NAME = "selection_eval"
VALIDATION = "validation"
# Ruan et al.'s mitigations other than reweighting, applied to the baseline run.
MITIGATIONS = ("selection", "merge")
TRAIN, TEST, OOD, PERTURBED = "train", "test", "ood", "test_perturbed"
JUDGES = ("auto", "reference", "local", "both", "none")
# Tasks whose "answer" is the whole response: graded by exact match, so judged by a model.
OPEN_ENDED_TASKS = ("sft",)


class StudyConfigError(FieldError):
  """A bad study setting; `field` names it (and the mbc.py flag)."""


@dataclasses.dataclass(frozen=True)
class StudyPreset:
  """Defaults of one study: which samplers, which judge, which robustness units."""

  samplers: tuple[str, ...]
  judge: str
  ood: bool
  perturbations: tuple[str, ...]
  source: str
  mitigations: tuple[str, ...] = ()


PRESETS: dict[str, StudyPreset] = {
    "mbc": StudyPreset(("uniform", "mbc"), "auto", False, (), "Ge et al. Sec. 4"),
    "reweight": StudyPreset(("uniform", "memorization_reweight"), "none", True,
                            ("First", "We know that"), "Ruan et al. (mitigation)",
                            MITIGATIONS),
}


@dataclasses.dataclass(frozen=True)
class StudyConfig:
  """One sampler study.

  Attributes:
    study: preset name ("mbc" or "reweight"), for the report.
    samplers: samplers to train, the baseline among them.
    baseline: the sampler every other one is judged against.
    train: the shared TrainConfig (its `sampler` is replaced per run).
    sampling: how held-out responses are sampled (accuracy and judge responses; the
      judge compares each prompt's first sample, as Ge et al. compare one response);
      without stop strings, the task's (`evaluation.with_task_stop`).
    n_eval: held-out (test split) examples evaluated: the first N (0 = all).
    n_eval_train: training examples evaluated (seeded subset; 0 = all).
    n_ood: OOD examples evaluated when `ood`: the first N (0 = all).
    subset_seed: seed of that subset.
    perturbations: answer preambles of the robustness units (none = no robustness).
    ood: evaluate the task's OOD split.
    mitigations: of MITIGATIONS, applied to the baseline run and evaluated like a sampler:
      "selection" (its checkpoint of lowest validation perplexity), "merge" (the uniform
      average of its saved checkpoints). Both need the run to save several checkpoints.
    n_validation: validation examples of checkpoint selection: the test split's examples
      after the `n_eval` evaluated ones (disjoint from them).
    judge: "auto" (reference judge for tasks with short answers, else local), "reference",
      "local", "both" or "none".
    judge_tie_margin: local judge: |log-odds| at or below this is a tie.
    judge_max_response_tokens: local judge: responses are cut to this many tokens.
    confidence: level of the win-rate intervals.
    eval_batch_size: prompts per compiled sampling / scoring program.
  """

  study: str = "mbc"
  samplers: tuple[str, ...] = PRESETS["mbc"].samplers
  baseline: str = "uniform"
  train: TrainConfig = TrainConfig()
  sampling: SamplingParams = SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=256)
  n_eval: int = 200
  n_eval_train: int = 200
  n_ood: int = 200
  subset_seed: int = 0
  perturbations: tuple[str, ...] = ()
  ood: bool = False
  mitigations: tuple[str, ...] = ()
  n_validation: int = 128
  judge: str = "auto"
  judge_tie_margin: float = 0.1
  judge_max_response_tokens: int = 256
  confidence: float = 0.95
  eval_batch_size: int = 16

  def __post_init__(self):
    object.__setattr__(self, "samplers", tuple(self.samplers))
    object.__setattr__(self, "mitigations", tuple(self.mitigations))
    object.__setattr__(self, "perturbations", tuple(p.strip() for p in self.perturbations
                                                    if p.strip()))
    if self.study not in PRESETS:
      raise StudyConfigError("study", f"{self.study!r} is not one of {sorted(PRESETS)}")
    unknown = [s for s in self.samplers if s not in SAMPLERS]
    if unknown or len(set(self.samplers)) != len(self.samplers) or len(self.samplers) < 2:
      raise StudyConfigError("samplers", f"need two or more distinct samplers of "
                             f"{list(SAMPLERS)}, got {list(self.samplers)}")
    if self.baseline not in self.samplers:
      raise StudyConfigError("baseline", f"{self.baseline!r} is not among the samplers "
                             f"{list(self.samplers)}")
    bad = [m for m in self.mitigations if m not in MITIGATIONS]
    if bad or len(set(self.mitigations)) != len(self.mitigations):
      raise StudyConfigError("mitigations", f"distinct ones of {list(MITIGATIONS)}, got "
                             f"{list(self.mitigations)}")
    if self.mitigations and not (self.train.save_every_epochs or self.train.save_every_steps):
      raise StudyConfigError("mitigations", "checkpoint selection and merging need the "
                             "baseline run's checkpoints: set save_every_epochs or "
                             "save_every_steps")
    if "selection" in self.mitigations and (self.n_eval == 0 or self.n_validation < 1):
      raise StudyConfigError("n_validation", "checkpoint selection needs n_validation >= 1 "
                             "validation examples after the first n_eval > 0 test ones")
    if self.judge not in JUDGES:
      raise StudyConfigError("judge", f"{self.judge!r} is not one of {list(JUDGES)}")
    for name in ("n_eval", "n_eval_train", "n_ood", "judge_tie_margin"):
      if getattr(self, name) < 0:
        raise StudyConfigError(name, "must be >= 0")
    for name in ("judge_max_response_tokens", "eval_batch_size"):
      if getattr(self, name) < 1:
        raise StudyConfigError(name, "must be >= 1")
    if not 0 < self.confidence < 1:
      raise StudyConfigError("confidence", f"must be in (0, 1), got {self.confidence}")


def study_config(study: str, **overrides) -> StudyConfig:
  """The preset's StudyConfig; `overrides` that are None keep the preset's value."""
  if study not in PRESETS:
    raise StudyConfigError("study", f"{study!r} is not one of {sorted(PRESETS)}")
  p = PRESETS[study]
  base = dict(study=study, samplers=p.samplers, judge=p.judge, ood=p.ood,
              perturbations=p.perturbations, mitigations=p.mitigations)
  base.update({k: v for k, v in overrides.items() if v is not None})
  return StudyConfig(**base)


def judges_for(cfg: StudyConfig, task: Task) -> tuple[str, ...]:
  """The judges a study runs: ("reference",), ("local",), both, or none."""
  if cfg.judge == "none":
    return ()
  if cfg.judge == "both":
    return ("reference", "local")
  if cfg.judge == "auto":
    return ("local",) if task.name in OPEN_ENDED_TASKS else ("reference",)
  return (cfg.judge,)


@dataclasses.dataclass(frozen=True)
class StudyResult:
  """What a study wrote.

  Attributes:
    rows: one dict per sampler (the results table).
    judged: judge name -> sampler -> PairwiseResult against the baseline.
    report: path of report.md.
    files: every output file by role.
  """

  rows: tuple[dict[str, Any], ...]
  judged: dict[str, dict[str, judge_lib.PairwiseResult]]
  report: str
  files: dict[str, str]


def _units(cfg: StudyConfig, trained: Sequence[Example], heldout: Sequence[Example],
           ood: Sequence[Example] | None) -> list[evaluation.EvalUnit]:
  units = [evaluation.EvalUnit(TRAIN, tuple(trained), greedy=False),
           evaluation.EvalUnit(TEST, tuple(heldout), greedy=False)]
  if cfg.ood and ood:
    units.append(evaluation.EvalUnit(OOD, tuple(ood), greedy=False))
  units += [evaluation.EvalUnit(PERTURBED, tuple(heldout), perturbation=p, greedy=False,
                                score_targets=False) for p in cfg.perturbations]
  return units


def _eval_config(cfg: StudyConfig, task: Task, units) -> dict[str, Any]:
  """What the records depend on; evaluating again with another value is refused."""
  return {"task": task.name, "sampling": dataclasses.asdict(cfg.sampling),
          "units": {records_lib.unit_name(u.split, u.perturbation): [e.id for e in u.examples]
                    for u in units}}


def _load_unit(run_dir: str, step: int, split: str, perturbation: str | None = None,
               name: str = EVAL_NAME) -> list[evaluation.ExampleRecord]:
  rows = records_lib.read_jsonl(records_lib.record_path(run_dir, step, split, perturbation,
                                                        name=name))
  return [evaluation.ExampleRecord.from_dict(r) for r in rows]


def draw_count_stats(counts: np.ndarray) -> dict[str, float]:
  """Spread of per-example draw counts: min, max, std, share of examples never drawn."""
  c = np.asarray(counts, np.float64)
  return {"draws_min": float(c.min()), "draws_max": float(c.max()), "draws_std": float(c.std()),
          "frac_never_drawn": float(np.mean(c == 0))}


def _row(sampler: str, step: int, batch: int, counts: np.ndarray,
         units: Mapping[str, list[evaluation.ExampleRecord]],
         perturbations: Sequence[str]) -> dict[str, Any]:
  row: dict[str, Any] = {"sampler": sampler, "steps": step, "examples_drawn": step * batch}
  row.update(draw_count_stats(counts))
  tr = evaluation.summarize(units[TRAIN])
  te = evaluation.summarize(units[TEST])
  row.update(train_accuracy=tr["accuracy"], train_perplexity=tr["perplexity"],
             train_exact_memorization=tr["exact_memorization"],
             test_accuracy=te["accuracy"], test_perplexity=te["perplexity"],
             test_exact_memorization=te["exact_memorization"],
             test_entropy=te["mean_entropy"], test_sampled_entropy=te["sampled_entropy"],
             test_distinct_2=te["distinct_2"])
  if OOD in units:
    row["ood_accuracy"] = evaluation.summarize(units[OOD])["accuracy"]
  pert = [evaluation.summarize(units[records_lib.unit_name(PERTURBED, p)])["accuracy"]
          for p in perturbations]
  for p, acc in zip(perturbations, pert):
    row[f"accuracy@{p}"] = acc
  if pert:
    row["robustness"] = float(np.mean(pert))  # mean accuracy over the perturbed prompts
  return row


def _first(examples: list[Example], n: int) -> list[Example]:
  return examples[:n] if n > 0 else examples


def _load_split(task: Task, spec: task_run.TaskSpec, split: str, flag: str) -> list[Example]:
  try:
    return task.load(split, spec.path)
  except (ValueError, FileNotFoundError) as e:
    raise task_run.TaskRunError(flag, f"task {task.name!r} cannot load split {split!r}: "
                                f"{e}") from e


def run_study(cfg: StudyConfig, spec: task_run.TaskSpec, model: str, output_dir: str, *,
              judge_model: str | None = None, progress: bool = True,
              log: Callable[[str], None] = print) -> StudyResult:
  """Trains one run per sampler, evaluates and judges them, and writes the report.

  Args:
    cfg: the study.
    spec: the training data (`task_run.TaskSpec`); held-out examples are the first
      `cfg.n_eval` of the task's test split, OOD ones the first `cfg.n_ood` of its "ood".
    model: base model reference (`task_run.resolve_model`).
    output_dir: where runs and outputs go (resumed when it holds this study).
    judge_model: local judge's model directory (default the base model, a weak judge:
      pass a stronger local model when judging open-ended responses).
    progress: progress bars.
    log: progress messages.

  Returns:
    A StudyResult.

  Raises:
    task_run.TaskRunError: a bad task, split, model or max_length (names the setting).
    checkpoints.RunMismatchError: a run directory holds a different run.
  """
  from memdyn_jax.train import checkpoints
  from memdyn_jax import models

  task_run.check_task_name(spec.name)
  base_dir = task_run.resolve_model(model)
  tokenizer = models.load_tokenizer(base_dir, padding_side="right")
  task, _ = task_run.load_examples(spec, tokenizer)  # a chat template renders with it
  cfg = dataclasses.replace(cfg, sampling=evaluation.with_task_stop(cfg.sampling, task))
  heldout = _first(_load_split(task, spec, "test", "task_path"), cfg.n_eval)
  ood = _first(_load_split(task, spec, "ood", "ood"), cfg.n_ood) if cfg.ood else None
  os.makedirs(output_dir, exist_ok=True)

  counts, loaded, steps = {}, {}, {}
  units = ids = None
  for sampler in cfg.samplers:
    run_dir = os.path.join(output_dir, "runs", sampler)
    result = task_run.train_on_task(cfg.train.replace(sampler=sampler), spec, model, run_dir,
                                    progress=progress, async_checkpoints=False)
    if result.preempted:
      raise InterruptedError(f"{run_dir}: stopped by SIGTERM after a checkpoint; rerun to "
                             "resume")
    steps[sampler] = step = checkpoints.list_steps(run_dir)[-1]
    log(f"{sampler}: trained {step} steps ({run_dir})")
    if units is None:  # every run trains on the same rows (examples.json)
      trained = checkpoints.trained_examples(run_dir, task, path=spec.path)
      ids = [e.id for e in trained]
      drawn = checkpoints.drawn_examples(run_dir, trained)
      units = _units(cfg, evaluation.subset(drawn, cfg.n_eval_train, cfg.subset_seed),
                     heldout, ood)
    loaded[sampler] = _evaluate_at(cfg, task, tokenizer, units, run_dir, step, progress)
    counts[sampler] = np.asarray(checkpoints.read_meta(run_dir, step)["draw_counts"], np.int64)
    log(f"{sampler}: evaluated step {step}")
  how = {s: "last checkpoint" for s in cfg.samplers}
  if cfg.mitigations:
    validation = _load_split(task, spec, "test", "task_path")[cfg.n_eval:][:cfg.n_validation]
    baseline_dir = os.path.join(output_dir, "runs", cfg.baseline)
    for mitigation in cfg.mitigations:
      name = f"{cfg.baseline}+{mitigation}"
      run_dir, steps[name], how[name] = _mitigate(
          mitigation, cfg, task, tokenizer, baseline_dir, validation, output_dir, progress)
      loaded[name] = _evaluate_at(cfg, task, tokenizer, units, run_dir, steps[name], progress)
      # The baseline's draws up to the checkpoint used (the merge: up to its last source).
      counts[name] = np.asarray(checkpoints.read_meta(baseline_dir, steps[name])["draw_counts"],
                                np.int64)
      log(f"{name}: {how[name]}, evaluated")

  files: dict[str, str] = {}
  from memdyn_jax.report import markdown, plots
  freq_rows = [{"row": i, "example_id": ids[i], **{s: int(counts[s][i]) for s in cfg.samplers}}
               for i in range(len(ids))]
  files["sampling_frequency_csv"] = markdown.write_csv(
      os.path.join(output_dir, "sampling_frequency.csv"), freq_rows)
  files["sampling_frequency_png"] = plots.sampling_frequency(
      counts, os.path.join(output_dir, "sampling_frequency.png"))

  judged, judge_files = judge_runs(cfg, task, heldout, loaded, output_dir,
                                   judge_model or base_dir)
  files.update(judge_files)
  rows = []
  for sampler in loaded:
    row = _row(sampler, steps[sampler], cfg.train.global_batch_size, counts[sampler],
               loaded[sampler], cfg.perturbations)
    row["checkpoint"] = how[sampler]
    for name, by_sampler in judged.items():
      if sampler in by_sampler:
        r = by_sampler[sampler]
        row[f"{name}_judge_wins"], row[f"{name}_judge_ties"] = r.wins, r.ties
        row[f"{name}_judge_losses"], row[f"{name}_judge_win_rate"] = r.losses, r.win_rate
    rows.append(row)
  files["results_csv"] = markdown.write_csv(os.path.join(output_dir, "results.csv"), rows)
  summary = {"config": {"study": cfg.study, "samplers": list(cfg.samplers),
                        "baseline": cfg.baseline, "train": cfg.train.to_dict(),
                        "mitigations": list(cfg.mitigations),
                        "n_validation": cfg.n_validation,
                        "sampling": dataclasses.asdict(cfg.sampling)},
             "rows": rows,
             "judge": {n: {s: r.to_dict() for s, r in d.items()} for n, d in judged.items()}}
  files["summary_json"] = os.path.join(output_dir, "summary.json")
  fileio.atomic_write_text(files["summary_json"],
                                json.dumps(summary, indent=2, sort_keys=True) + "\n")
  report = write_report(cfg, task, rows, judged, files, output_dir, len(ids), len(heldout))
  files["report"] = report
  return StudyResult(rows=tuple(rows), judged=judged, report=report, files=files)


def _evaluate_at(cfg: StudyConfig, task: Task, tokenizer, units, run_dir: str, step: int,
                 progress: bool) -> dict[str, list[evaluation.ExampleRecord]]:
  """The study's units evaluated at one checkpoint of a run (skipped where saved)."""
  records_lib.check_config(run_dir, _eval_config(cfg, task, units), name=EVAL_NAME,
                           task_stop=task.stop)
  evaluation.evaluate_units(run_dir, task, tokenizer, units, cfg.sampling, steps=[step],
                            batch_size=cfg.eval_batch_size, keep_texts=True,
                            progress=progress, name=EVAL_NAME)
  return {records_lib.unit_name(u.split, u.perturbation):
          _load_unit(run_dir, step, u.split, u.perturbation, EVAL_NAME) for u in units}


def select_checkpoint(cfg: StudyConfig, task: Task, tokenizer, run_dir: str,
                      validation: Sequence[Example], progress: bool) -> tuple[int, float]:
  """Checkpoint selection (Ruan et al.): the run's checkpoint of lowest mean perplexity of
  the validation targets (ties: the earliest); returns (step, that perplexity)."""
  from memdyn_jax.train import checkpoints

  steps = checkpoints.list_steps(run_dir)
  if len(steps) < 2:
    raise StudyConfigError("mitigations", f"{run_dir} saved {len(steps)} checkpoint(s); "
                           "checkpoint selection needs several (save_every_*)")
  unit = evaluation.EvalUnit(VALIDATION, tuple(validation), greedy=False)
  records_lib.check_config(run_dir, _eval_config(cfg, task, [unit]), name=SELECTION_EVAL_NAME,
                           task_stop=task.stop)
  evaluation.evaluate_units(run_dir, task, tokenizer, [unit], cfg.sampling, steps=steps,
                            batch_size=cfg.eval_batch_size, progress=progress,
                            name=SELECTION_EVAL_NAME)
  ppl = [evaluation.summarize(_load_unit(run_dir, s, VALIDATION, None,
                                         SELECTION_EVAL_NAME))["perplexity"] for s in steps]
  best = int(np.argmin(ppl))
  return steps[best], float(ppl[best])


def _mitigate(mitigation: str, cfg: StudyConfig, task: Task, tokenizer, baseline_dir: str,
              validation: Sequence[Example], output_dir: str, progress: bool
              ) -> tuple[str, int, str]:
  """(run directory, step, description) of a mitigation applied to the baseline run."""
  from memdyn_jax.train import checkpoints
  from memdyn_jax import merging
  from memdyn_jax.merging import run as merge_run

  if mitigation == "selection":
    step, ppl = select_checkpoint(cfg, task, tokenizer, baseline_dir, validation, progress)
    return baseline_dir, step, (f"step {step}: lowest validation perplexity ({ppl:.4f} on "
                                f"{len(validation)} examples)")
  steps = checkpoints.list_steps(baseline_dir)
  if len(steps) < 2:
    raise StudyConfigError("mitigations", f"{baseline_dir} saved {len(steps)} checkpoint(s); "
                           "merging needs several (save_every_*)")
  merged_dir = os.path.join(output_dir, "merged", cfg.baseline)
  merge_run.merge_to_run_dir(merged_dir, "linear",
                             [merge_run.CheckpointRef(baseline_dir, s) for s in steps],
                             config=merging.MergeConfig(method="linear"), tokenizer=tokenizer,
                             log=lambda m: None)
  return merged_dir, steps[-1], f"uniform average of its {len(steps)} checkpoints {steps}"


def judge_runs(cfg: StudyConfig, task: Task, heldout: Sequence[Example],
               loaded: Mapping[str, Mapping[str, list[evaluation.ExampleRecord]]],
               output_dir: str, judge_model: str
               ) -> tuple[dict[str, dict[str, judge_lib.PairwiseResult]], dict[str, str]]:
  """Judges every sampler's first held-out sample against the baseline's, per judge.

  Returns:
    (judge name -> sampler -> PairwiseResult with the sampler as system A, files written).
  """
  from memdyn_jax.report import markdown

  names = judges_for(cfg, task)
  if not names:
    return {}, {}
  by_id = {e.id: e for e in heldout}
  texts = {s: {r.example_id: (r.texts[0] if r.texts else "") for r in units[TEST]}
           for s, units in loaded.items()}
  ids = [i for i in by_id if all(i in t for t in texts.values())]
  prompts = [by_id[i].question for i in ids]
  references = [by_id[i].answer for i in ids]
  judged: dict[str, dict[str, judge_lib.PairwiseResult]] = {}
  files = {}
  for name in names:
    margin = cfg.judge_tie_margin if name == "local" else 0.0
    judge = _make_judge(name, task, judge_model, cfg)
    judged[name] = {}
    rows = []
    for sampler in cfg.samplers:
      if sampler == cfg.baseline:
        continue
      a = [texts[sampler][i] for i in ids]
      b = [texts[cfg.baseline][i] for i in ids]
      extra = {}
      if isinstance(judge, judge_lib.BothOrders):
        forward, swapped = judge.scores_by_order(prompts, a, b, references)
        scores = 0.5 * (forward - swapped)
        extra = {"score_forward": forward, "score_swapped": swapped}
      else:
        scores = judge(prompts, a, b, references)
      judged[name][sampler] = judge_lib.summarize(scores, tie_margin=margin,
                                                  confidence=cfg.confidence)
      verdict = judge_lib.verdicts(scores, margin)
      for k, i in enumerate(ids):
        rows.append({"example_id": i, "system_a": sampler, "system_b": cfg.baseline,
                     "score": float(scores[k]), "verdict": int(verdict[k]),
                     **{key: float(v[k]) for key, v in extra.items()}})
    files[f"judge_{name}_csv"] = markdown.write_csv(
        os.path.join(output_dir, f"judge_{name}.csv"), rows)
  return judged, files


def _make_judge(name: str, task: Task, judge_model: str, cfg: StudyConfig):
  if name == "reference":
    return judge_lib.ReferenceAnswerJudge(task)
  from memdyn_jax import models

  model, _ = models.from_pretrained(judge_model)
  tokenizer = models.load_tokenizer(judge_model, padding_side="right")
  return judge_lib.local_model_judge(model, tokenizer,
                                     max_response_tokens=cfg.judge_max_response_tokens,
                                     batch_size=cfg.eval_batch_size)


_COLUMNS = {
    "mbc": ("sampler", "steps", "draws_min", "draws_max", "draws_std", "frac_never_drawn",
            "train_exact_memorization", "test_perplexity", "test_exact_memorization",
            "test_entropy", "test_sampled_entropy", "test_accuracy"),
    "reweight": ("sampler", "checkpoint", "train_exact_memorization", "train_perplexity",
                 "test_accuracy", "test_perplexity", "robustness", "ood_accuracy"),
}


def write_report(cfg: StudyConfig, task: Task, rows: Sequence[Mapping[str, Any]],
                 judged: Mapping[str, Mapping[str, judge_lib.PairwiseResult]],
                 files: Mapping[str, str], output_dir: str, n_train: int, n_heldout: int) -> str:
  """report.md: the results table, judge verdicts and the sampling-frequency figure."""
  from memdyn_jax.report import markdown

  preset = PRESETS[cfg.study]
  doc = markdown.Report(f"Sampler study '{cfg.study}' ({preset.source})")
  doc.paragraph(
      f"Task `{task.name}`: {n_train} training examples, {n_heldout} held-out examples. "
      f"Every sampler trains {rows[0]['steps']} steps of {cfg.train.global_batch_size} "
      f"examples (learning rate {cfg.train.learning_rate:g}, seed {cfg.train.seed}); the last "
      f"checkpoint is evaluated. Accuracy: {cfg.sampling.n} sample(s) per prompt at "
      f"T = {cfg.sampling.temperature:g}, top-p {cfg.sampling.top_p:g}. Perplexity, exact "
      "memorization and entropy are teacher-forced on the reference targets (entropy: mean "
      "predictive entropy over response tokens; sampled entropy: at the sampled tokens).")
  if cfg.mitigations:
    doc.paragraph(
        f"Ruan et al.'s other mitigations, applied to the {cfg.baseline} run and evaluated "
        f"on the same examples: {cfg.baseline}+selection is its checkpoint of lowest "
        f"perplexity on {cfg.n_validation} validation examples (test-split examples after "
        f"the evaluated ones), {cfg.baseline}+merge the uniform average of its saved "
        "checkpoints (column `checkpoint`).")
  columns = [c for c in _COLUMNS[cfg.study] if any(c in r for r in rows)]
  columns += [c for c in markdown.columns_of(rows) if c not in columns
              and not c.endswith(("_wins", "_ties", "_losses"))]
  doc.heading("Results")
  doc.table(rows, columns)
  for name, by_sampler in judged.items():
    doc.heading(f"Pairwise judge: {name}")
    how = ("the task's grader: a correct response beats an incorrect one, equal grades tie"
           if name == "reference" else
           "log-odds of ' A' vs ' B' under the judge model, averaged over both presentation "
           f"orders; |score| <= {cfg.judge_tie_margin:g} is a tie; judge_local.csv keeps each "
           "order's score, whose mean is the judge's position bias")
    doc.paragraph(f"Each sampler's first held-out sample against the {cfg.baseline} run's "
                  f"({how}). Win rate counts ties as half; intervals are Wilson "
                  f"{100 * cfg.confidence:g}%; the sign test ignores ties.")
    doc.table([{"system": f"{s} vs {cfg.baseline}", "wins": r.wins, "ties": r.ties,
                "losses": r.losses, "win rate": r.win_rate,
                "interval": f"[{r.win_rate_low:.3f}, {r.win_rate_high:.3f}]",
                "decisive win rate": r.decisive_win_rate, "sign test p": r.sign_test_p}
               for s, r in by_sampler.items()])
  doc.heading("Sampling frequency")
  doc.paragraph("How often each training example was drawn over the run (Ge et al. Fig. 8): "
                "uniform draws every example once per epoch; MBC draws with replacement in "
                "proportion to each example's current perplexity.")
  doc.image(files["sampling_frequency_png"], "sampling frequency", output_dir)
  doc.paragraph("Files: " + ", ".join(sorted(os.path.basename(p) for p in files.values()))
                + ", report.md.")
  return doc.write(os.path.join(output_dir, "report.md"))

