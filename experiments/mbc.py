"""Sampler studies at an equal step budget: MBC (Ge et al.) or memorization reweighting (Ruan et al.).

  python experiments/mbc.py --study=mbc --model=embedded --task=synthetic_arith \\
      --output_dir=/tmp/mbc_study --preset=ge_gptneo_sft --num_epochs=3 --mbc_refresh_steps=20
  python experiments/mbc.py --study=reweight --model=embedded --task=synthetic_arith \\
      --output_dir=/tmp/reweight_study --reweight_p=1.2 --save_every_epochs=8

Trains the base model once per sampler (--samplers; default uniform + mbc, or uniform +
memorization_reweight) with the same TrainConfig, hence the same steps and examples drawn;
evaluates each run's last checkpoint on training examples, the held-out test split, and
(per --study) OOD and perturbed test prompts, plus --mitigations of the baseline run
(checkpoint selection, merging); judges each sampler's held-out responses
against --baseline's (--judge); writes results.csv, sampling_frequency.csv/.png,
judge_*.csv, summary.json and report.md to --output_dir (`memdyn_jax.studies.sampler_study`).
Every TrainConfig field is a flag (default: --preset's). Re-running resumes: finished
runs and records are kept. Exit status: 0 done, 2 bad flags or inputs.
"""
from __future__ import annotations

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError

PROG = "mbc.py"

flags.DEFINE_enum("study", "mbc", ["mbc", "reweight"], "Study preset: its samplers, judge, "
                  "OOD and perturbation defaults.")
flags.DEFINE_list("samplers", None, "Samplers to compare (default: the study's).")
flags.DEFINE_string("baseline", "uniform", "Sampler the others are judged against.")
flags.DEFINE_string("model", None, "Base model: local HF directory, .gguf, hub id or 'embedded'.")
_TASK_FLAGS = cli.define_task_flags(skip=("split",), rename={"max_examples": "max_train"})
flags.DEFINE_string("output_dir", None, "Study directory.")
flags.DEFINE_string("preset", "none", "TrainConfig preset (memdyn_jax.train.config.PRESETS).")
flags.DEFINE_integer("n_eval", 200, "Held-out test examples evaluated (first N; 0 = all).")
flags.DEFINE_integer("n_eval_train", 200, "Training examples evaluated (seeded subset; 0 = all).")
flags.DEFINE_integer("n_ood", 200, "OOD examples evaluated (first N; 0 = all).")
flags.DEFINE_bool("ood", None, "Evaluate the task's OOD split (default: the study's).")
flags.DEFINE_list("mitigations", None, "Of selection, merge: applied to the baseline run "
                  "(default: the study's; 'none' = none). Need --save_every_epochs/steps.")
flags.DEFINE_integer("n_validation", 128, "Checkpoint selection: test examples after the "
                     "first --n_eval ones it picks by.")
flags.DEFINE_list("perturbations", None, "Answer preambles of the robustness units "
                  "(default: the study's; 'none' = no robustness units).")
flags.DEFINE_float("temperature", 0.7, "Sampling temperature of held-out responses.")
flags.DEFINE_float("top_p", 0.9, "Nucleus mass.")
flags.DEFINE_integer("n_samples", 1, "Samples per prompt (accuracy; the judge sees the first).")
flags.DEFINE_integer("max_new_tokens", 256, "Generation budget.")
flags.DEFINE_integer("sampling_seed", 0, "Sampling seed.")
flags.DEFINE_enum("judge", None, ["auto", "reference", "local", "both", "none"],
                  "Pairwise judge (default: the study's; auto = reference for tasks with "
                  "short answers, the local model otherwise).")
flags.DEFINE_string("judge_model", None, "Local judge's model (default: the base model).")
flags.DEFINE_float("judge_tie_margin", 0.1, "Local judge: |log-odds| <= this is a tie.")
flags.DEFINE_integer("judge_max_response_tokens", 256, "Local judge: tokens kept per response.")
flags.DEFINE_float("confidence", 0.95, "Level of the win-rate intervals.")
flags.DEFINE_integer("eval_batch_size", 16, "Prompts per compiled sampling/scoring program.")
flags.DEFINE_bool("progress", True, "Show progress bars.")
cli.define_train_config_flags()
FLAGS = flags.FLAGS


# Known input errors of a study (message fragment -> the flag to change).
def study_config():
  train_cfg = cli.train_config_from_flags(FLAGS.preset)  # checked before importing jax
  from memdyn_jax.studies import sampler_study
  from memdyn_jax.evaluation.sampling import SamplingParams

  try:
    sampling = SamplingParams(temperature=FLAGS.temperature, top_p=FLAGS.top_p,
                              n=FLAGS.n_samples, max_new_tokens=FLAGS.max_new_tokens,
                              seed=FLAGS.sampling_seed)
  except ValueError as e:
    flag = {"n": "n_samples"}.get(str(e).split()[0], str(e).split()[0])
    raise UsageError(f"--{flag}: {e}") from None
  perturbations, mitigations = FLAGS.perturbations, FLAGS.mitigations
  if perturbations is not None and [p.strip().lower() for p in perturbations] == ["none"]:
    perturbations = []
  if mitigations is not None and [m.strip().lower() for m in mitigations] == ["none"]:
    mitigations = []
  try:
    return sampler_study.study_config(
        FLAGS.study, samplers=FLAGS.samplers, baseline=FLAGS.baseline, train=train_cfg,
        sampling=sampling, n_eval=FLAGS.n_eval, n_eval_train=FLAGS.n_eval_train,
        n_ood=FLAGS.n_ood, ood=FLAGS.ood, mitigations=mitigations,
        n_validation=FLAGS.n_validation,
        perturbations=perturbations, judge=FLAGS.judge, judge_tie_margin=FLAGS.judge_tie_margin,
        judge_max_response_tokens=FLAGS.judge_max_response_tokens, confidence=FLAGS.confidence,
        eval_batch_size=FLAGS.eval_batch_size)
  except sampler_study.StudyConfigError as e:
    raise cli.usage_error(e) from None


def run() -> int:
  for name in ("model", "task", "output_dir"):
    if not getattr(FLAGS, name):
      raise UsageError(f"--{name} is required")
  cli.check_output_dir(FLAGS.output_dir)
  if FLAGS.max_train < 0:
    raise UsageError("--max_train: must be >= 0")
  cfg = study_config()
  spec = cli.task_spec_from_flags(_TASK_FLAGS, FLAGS.model, split="train")
  from memdyn_jax.train import checkpoints
  from memdyn_jax.studies import sampler_study
  from memdyn_jax.errors import ContextLengthError
  from memdyn_jax.evaluation import judge
  from memdyn_jax.train import task_run

  judge_model = cli.resolve_model(FLAGS.judge_model, "--judge_model") if FLAGS.judge_model else None
  try:
    result = sampler_study.run_study(cfg, spec, FLAGS.model, FLAGS.output_dir,
                                     judge_model=judge_model, progress=FLAGS.progress,
                                     log=lambda m: print(f"{PROG}: {m}", flush=True))
  except task_run.TaskRunError as e:
    raise UsageError(f"--{e}") from None
  except sampler_study.StudyConfigError as e:  # e.g. a baseline run with one checkpoint
    raise cli.usage_error(e) from e
  except checkpoints.RunMismatchError as e:
    raise UsageError(f"--output_dir: {e}") from e
  except judge.JudgePromptTooLongError as e:
    raise UsageError(f"--judge_max_response_tokens: {e}") from e
  except ContextLengthError as e:  # a prompt + --max_new_tokens over the model's window
    raise UsageError(f"--max_new_tokens: {e}") from e
  for row in result.rows:
    print(f"{PROG}: {row['sampler']}: test accuracy {row['test_accuracy']:.3f}, test "
          f"perplexity {row['test_perplexity']:.3f}")
  for name, by_sampler in result.judged.items():
    for sampler, r in by_sampler.items():
      print(f"{PROG}: {name} judge, {sampler} vs {cfg.baseline}: {r.wins}/{r.ties}/{r.losses} "
            f"(W/T/L), win rate {r.win_rate:.3f} [{r.win_rate_low:.3f}, {r.win_rate_high:.3f}]")
  print(f"{PROG}: report written to {result.report}")
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
