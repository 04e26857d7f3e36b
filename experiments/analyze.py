"""Analyzes the evaluation records of a sweep: CSV + Markdown tables and PNG plots.

  python experiments/analyze.py --sweep_dir=runs/ --output_dir=runs/analysis

--sweep_dir is a folder of run directories (or one run directory) evaluated by
experiments/evaluate.py. Written to --output_dir (memdyn_jax/report/sweep_report.py lists
every file): report.md with every table and figure; checkpoints.csv (per run and
checkpoint: accuracies, perplexities, train PreMemAcc, memorization, entropies, diversity,
OOD / perturbed accuracy, the baselines); PreMemAcc threshold calibration and scatter
(Kang et al.); baselines.csv; over-memorization stages and checkpoint selection (Ruan et
al.); merges.csv (merged models vs their source trajectory); robustness by PreMemAcc bin;
data maps, entropy, diversity and OOD (Ge et al.; Ruan et al.). Every flag but
--sweep_dir and --output_dir is a field of memdyn_jax.report.AnalysisOptions.
Exit status: 0 done, 2 bad flags or inputs (one-line error naming the flag or path).
"""
from __future__ import annotations

from absl import flags

from memdyn_jax import cli
from memdyn_jax.cli import UsageError
from memdyn_jax.report.sweep_report import AnalysisError, AnalysisOptions

PROG = "analyze.py"

flags.DEFINE_string("sweep_dir", None, "Folder of evaluated run directories (or one run).")
flags.DEFINE_string("output_dir", None, "Where to write (default: <sweep_dir>/analysis).")
_OPTION_FLAGS = cli.define_dataclass_flags(AnalysisOptions, help_format="{doc}")
FLAGS = flags.FLAGS


def run() -> int:
  if not FLAGS.sweep_dir:
    raise UsageError("--sweep_dir is required")
  cli.check_output_dir(FLAGS.output_dir)
  from memdyn_jax.report import sweep_report
  try:
    options = AnalysisOptions(**cli.dataclass_kwargs_from_flags(AnalysisOptions, _OPTION_FLAGS))
    result = sweep_report.analyze_sweep(FLAGS.sweep_dir, FLAGS.output_dir, options)
  except AnalysisError as e:
    raise cli.usage_error(e, _OPTION_FLAGS) from None
  print(f"{PROG}: {result.runs} run(s), {result.checkpoints} checkpoint(s) -> "
        f"{result.output_dir} ({len(result.files)} files)")
  return 0


if __name__ == "__main__":
  cli.run_binary(PROG, run)
