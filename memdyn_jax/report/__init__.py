"""Analysis of evaluation records over a sweep of runs: tables, Markdown and PNG plots.

- collect: records of each run gathered into (checkpoint, example) matrices.
- analysis: per-checkpoint tables, PreMemAcc calibration, baselines, over-memorization,
  robustness bins, data maps, entropy; distance from initialization from checkpoints.
- plots: matplotlib figures written as PNG.
- markdown: Markdown tables and CSV files.
- merges: merged models beside the trajectories they were merged from.
- sweep_report: `analyze_sweep`, every table and plot of a sweep (experiments/analyze.py).
"""
from __future__ import annotations

from memdyn_jax.report.sweep_report import (AnalysisError, AnalysisOptions, AnalysisResult,
                                            analyze_sweep)
