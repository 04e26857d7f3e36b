"""Quickstart: a small memorization-dynamics study on the embedded default, offline on a CPU.

  python experiments/quickstart.py --output_dir=/tmp/memdyn_quickstart

1. builds (and caches) the embedded base model: the synthetic_arith tokenizer and a tiny
   Llama pre-trained by this project's trainer on the task's corpus;
2. fine-tunes it on `synthetic_arith` with a grid of learning rates, checkpointing every
   `--checkpoint_every_epochs`;
3. evaluates every checkpoint on a train subset and the test split: accuracy of samples at
   T = 0.8 and the perplexity / exact memorization of the target trace;
4. computes train pre-memorization accuracy (Kang et al.) per checkpoint and its R² against
   test accuracy across the sweep;
5. writes `summary.csv`, `records.jsonl` and `report.md` to `--output_dir`.
Re-running reuses the cached base model and finished runs/evaluations.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import os
import time

from absl import app, flags, logging

flags.DEFINE_string("output_dir", "/tmp/memdyn_quickstart", "Where runs, records and the report go.")
flags.DEFINE_integer("scale", 1, "Model/corpus/data scale factor (1 = 2-core CPU in minutes).")
flags.DEFINE_integer("seed", 0, "Seed of data, model and sampling.")
flags.DEFINE_integer("n_train", 192, "Training examples (per scale unit).")
flags.DEFINE_integer("n_eval", 64, "Train and test examples evaluated per checkpoint.")
flags.DEFINE_list("learning_rates", ["3e-4", "1e-3", "3e-3"], "Fine-tuning learning rates.")
flags.DEFINE_float("epochs", 4.0, "Fine-tuning epochs.")
flags.DEFINE_float("checkpoint_every_epochs", 1.0, "Checkpoint cadence in epochs.")
flags.DEFINE_integer("batch_size", 16, "Global batch size.")
flags.DEFINE_integer("n_samples", 2, "Samples per example for accuracy (T = 0.8).")
flags.DEFINE_float("premem_threshold", 1.105,
                   "PreMemAcc perplexity threshold (Kang et al.'s GSM8K value, loglog -2.3).")
FLAGS = flags.FLAGS


def _stage(name: str, start: float) -> None:
  print(f"[{time.time() - start:6.1f}s] {name}", flush=True)


def run_study() -> str:
  import numpy as np

  from memdyn_jax import checkpoints, embedded, evaluation, models, sampling
  from memdyn_jax.metrics import premem, regression
  from memdyn_jax.tasks import synthetic_arith
  from memdyn_jax.train import loop
  from memdyn_jax.train.config import TrainConfig

  start = time.time()
  out = FLAGS.output_dir
  os.makedirs(out, exist_ok=True)
  scale = FLAGS.scale
  base_dir = embedded.model_dir(embedded.EmbeddedSpec(seed=FLAGS.seed).scaled(scale))
  _stage(f"embedded base model ready: {base_dir}", start)

  task = synthetic_arith.SyntheticArithTask(seed=FLAGS.seed, n_train=FLAGS.n_train * scale,
                                            n_test=max(FLAGS.n_eval, 100))
  train_examples = task.load("train")
  test_examples = task.load("test")[:FLAGS.n_eval]
  eval_train = train_examples[:FLAGS.n_eval]
  tokenizer = models.load_tokenizer(base_dir, padding_side="right")
  params = sampling.SamplingParams(temperature=0.8, top_p=0.95, n=FLAGS.n_samples,
                                   max_new_tokens=160, seed=FLAGS.seed)

  summary_rows = []
  records_path = os.path.join(out, "records.jsonl")
  done = set()
  if os.path.exists(records_path):
    with open(records_path) as f:
      for line in f:
        r = json.loads(line)
        done.add((r["run"], r["step"]))
  for lr_text in FLAGS.learning_rates:
    lr = float(lr_text)
    run_name = f"lr{lr_text}"
    cfg = TrainConfig(learning_rate=lr, num_epochs=FLAGS.epochs,
                      global_batch_size=FLAGS.batch_size, optimizer="adamw", weight_decay=0.0,
                      schedule="linear", warmup_steps=2, max_grad_norm=1.0, seed=FLAGS.seed,
                      max_length=320, save_every_epochs=FLAGS.checkpoint_every_epochs,
                      log_every_steps=5)
    data, _ = loop.task_train_data(tokenizer, task, train_examples, cfg)
    run_dir = os.path.join(out, "runs", run_name)
    loop.train(cfg, data, base_dir, run_dir, progress=False, async_checkpoints=False)
    _stage(f"trained {run_name}", start)
    for step in checkpoints.list_steps(run_dir):
      if (run_name, step) in done:
        continue
      model, _ = checkpoints.restore(run_dir, step=step)
      recs = (evaluation.evaluate_examples(model, tokenizer, task, eval_train, "train",
                                           params=params)
              + evaluation.evaluate_examples(model, tokenizer, task, test_examples, "test",
                                             params=params))
      with open(records_path, "a") as f:
        for r in recs:
          f.write(json.dumps(dict(r.to_dict(), run=run_name, step=step, learning_rate=lr)) + "\n")
      _stage(f"evaluated {run_name} step {step}", start)

  # Gather records -> per-checkpoint arrays.
  with open(records_path) as f:
    records = [json.loads(line) for line in f]
  runs: dict[str, dict[int, dict[str, list]]] = {}
  for r in records:
    runs.setdefault(r["run"], {}).setdefault(r["step"], {}).setdefault(r["split"], []).append(r)
  calibration = []
  for run_name, by_step in sorted(runs.items()):
    steps = sorted(by_step)
    train_acc = np.array([[r["accuracy"] for r in by_step[s]["train"]] for s in steps])
    train_ppl = np.array([[r["perplexity"] for r in by_step[s]["train"]] for s in steps])
    test_acc = np.array([np.mean([r["accuracy"] for r in by_step[s]["test"]]) for s in steps])
    pm = premem.dataset_premem_accuracy(train_acc, train_ppl, FLAGS.premem_threshold)
    calibration.append(premem.CalibrationRun(train_acc, train_ppl, test_acc))
    for i, s in enumerate(steps):
      test = evaluation.summarize([evaluation.ExampleRecord(**{k: v for k, v in r.items()
                                                               if k in _RECORD_FIELDS})
                                   for r in by_step[s]["test"]])
      summary_rows.append(dict(run=run_name, step=s, train_accuracy=float(train_acc[i].mean()),
                               train_perplexity=float(np.mean(train_ppl[i])),
                               train_premem_accuracy=float(pm[i]), test_accuracy=test["accuracy"],
                               test_perplexity=test["perplexity"],
                               test_exact_memorization=test["exact_memorization"]))
  xs = [row["train_premem_accuracy"] for row in summary_rows]
  ys = [row["test_accuracy"] for row in summary_rows]
  fit = regression.fit_r2(np.array(xs), np.array(ys))
  try:
    cal = premem.calibrate_threshold(calibration, np.exp(np.exp(np.linspace(-4.0, -0.5, 15))))
  except ValueError as e:  # no spread across the sweep: say so in the report
    cal = str(e)
  with open(os.path.join(out, "summary.csv"), "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(summary_rows[0]))
    writer.writeheader()
    writer.writerows(summary_rows)
  _write_report(out, summary_rows, fit, cal)
  _stage(f"report: {os.path.join(out, 'report.md')}", start)
  return os.path.join(out, "report.md")


_RECORD_FIELDS = {f.name for f in dataclasses.fields(
    __import__("memdyn_jax.evaluation", fromlist=["ExampleRecord"]).ExampleRecord)}


def _write_report(out, rows, fit, cal) -> None:
  lines = ["# memdyn_jax quickstart", "",
           "Fine-tuning the embedded tiny Llama on `synthetic_arith`; per checkpoint: accuracy of "
           f"{FLAGS.n_samples} samples at T = 0.8, target-trace perplexity, and train "
           f"pre-memorization accuracy (threshold ppl {FLAGS.premem_threshold}).", "",
           "| run | step | train acc | train ppl | train PreMemAcc | test acc | test ppl | test exact mem |",
           "|---|---|---|---|---|---|---|---|"]
  for r in rows:
    lines.append(f"| {r['run']} | {r['step']} | {r['train_accuracy']:.3f} | "
                 f"{r['train_perplexity']:.3f} | {r['train_premem_accuracy']:.3f} | "
                 f"{r['test_accuracy']:.3f} | {r['test_perplexity']:.3f} | "
                 f"{r['test_exact_memorization']:.3f} |")
  lines += ["", f"Test accuracy vs train PreMemAcc over all {len(rows)} checkpoints: "
            f"R² = {fit.r2:.3f}, Pearson r = {fit.pearson_r:.3f} (slope {fit.slope:.3f}).",
            (f"Calibrated threshold (max R² over candidates): ppl {cal.threshold:.3f}, "
             f"R² = {float(cal.r2[cal.best_index]):.3f}." if not isinstance(cal, str)
             else f"Threshold calibration: {cal}."), ""]
  with open(os.path.join(out, "report.md"), "w") as f:
    f.write("\n".join(lines))


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  if FLAGS.scale < 1:
    raise app.UsageError("--scale must be >= 1")
  report = run_study()
  print(f"report written to {report}")


if __name__ == "__main__":
  app.run(main)
