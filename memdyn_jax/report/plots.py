"""PNG figures of the analysis (matplotlib, headless Agg backend).

Every function draws one figure, saves it to `path` and closes it; it returns `path`.
"""
from __future__ import annotations

import os
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig, path: str) -> str:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def premem_scatter(points: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str, *,
                   slope: float = np.nan, intercept: float = np.nan, r2: float = np.nan,
                   threshold: float = np.nan) -> str:
  """Test accuracy (y) vs train PreMemAcc (x), one color per run, with the y = x line
  and the fitted line (Kang et al. Fig. 4).

  Args:
    points: run name -> (premem (C,), test accuracy (C,)).
    path: output PNG.
    slope, intercept, r2: the pooled line fit (drawn when finite).
    threshold: PreMemAcc threshold, shown in the title.
  """
  fig, ax = plt.subplots(figsize=(5.5, 4.5))
  for name, (x, y) in points.items():
    ax.scatter(x, y, label=name, s=22)
  ax.plot([0, 1], [0, 1], ls=":", c="gray", lw=1, label="y = x")
  if np.isfinite(slope):
    xs = np.linspace(0, 1, 2)
    ax.plot(xs, slope * xs + intercept, c="k", lw=1, label=f"fit (R² = {r2:.3f})")
  ax.set(xlabel="train pre-memorization accuracy", ylabel="test accuracy",
         title=f"Test acc vs train PreMemAcc (threshold ppl {threshold:.3f})",
         xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
  ax.legend(fontsize=7, loc="best")
  return _save(fig, path)


def calibration_curve(candidates: np.ndarray, r2: np.ndarray, chosen: float, path: str) -> str:
  """R² of test acc on train PreMemAcc per candidate threshold (log-log x axis scale)."""
  fig, ax = plt.subplots(figsize=(5.5, 3.5))
  x = np.log(np.log(np.asarray(candidates, np.float64)))
  ax.plot(x, r2, marker="o", ms=3)
  ax.axvline(np.log(np.log(chosen)), c="r", ls="--", lw=1, label=f"chosen ppl {chosen:.3f}")
  ax.set(xlabel="threshold log(log(perplexity))", ylabel="R²", title="Threshold calibration")
  ax.legend(fontsize=8)
  return _save(fig, path)


def robustness_violins(premem: np.ndarray, accs: Mapping[str, np.ndarray], num_bins: int,
                       path: str) -> str:
  """Per-example accuracy by PreMemAcc bin, one panel per prompt variant (Kang et al.
  Fig. 7): violins of the distribution and a line through the bin means."""
  from memdyn_jax.report.analysis import bin_index
  idx = bin_index(premem, num_bins)
  fig, axes = plt.subplots(1, len(accs), figsize=(4 * len(accs), 3.5), squeeze=False)
  centers = (np.arange(num_bins) + 0.5) / num_bins
  for ax, (label, acc) in zip(axes[0], accs.items()):
    data, pos, means = [], [], []
    for b in range(num_bins):
      vals = acc[(idx == b) & ~np.isnan(acc)]
      means.append(vals.mean() if vals.size else np.nan)
      if vals.size and np.ptp(vals) > 0:
        data.append(vals)
        pos.append(centers[b])
      elif vals.size:  # a KDE of identical values is singular: mark the value instead
        ax.scatter([centers[b]], [vals[0]], marker="_", s=300, c="tab:blue")
    if data:
      parts = ax.violinplot(data, positions=pos, widths=0.8 / num_bins, showextrema=False)
      for body in parts["bodies"]:
        body.set_alpha(0.4)
    ax.plot(centers, means, marker="o", c="k", lw=1)
    ax.set(title=f"prompt: {label}", xlabel="PreMemAcc bin", ylim=(-0.05, 1.05), xlim=(0, 1))
  axes[0][0].set_ylabel("accuracy of samples")
  return _save(fig, path)


def overmemorization_curves(runs: Sequence[dict], path: str) -> str:
  """Test perplexity and test accuracy vs step per run, over-memorization stages shaded,
  merged models marked with stars (perplexity red, accuracy blue) at their merge step.

  Args:
    runs: dicts with name, steps, test_perplexity, test_accuracy, stage_steps
      ((first, last) step pairs) and optionally merged (dicts with label, step,
      test_perplexity, test_accuracy).
    path: output PNG.
  """
  n = max(len(runs), 1)
  fig, axes = plt.subplots(n, 1, figsize=(6, 2.6 * n), squeeze=False)
  for ax, run in zip(axes[:, 0], runs):
    ax.plot(run["steps"], run["test_perplexity"], c="tab:red", marker="o", ms=3)
    ax.set_ylabel("test perplexity", color="tab:red")
    twin = ax.twinx()
    twin.plot(run["steps"], run["test_accuracy"], c="tab:blue", marker="s", ms=3)
    twin.set_ylabel("test accuracy", color="tab:blue")
    twin.set_ylim(-0.02, 1.02)
    for first, last in run["stage_steps"]:
      ax.axvspan(first, last if last > first else first + 0.5, color="orange", alpha=0.25)
    for m in run.get("merged", ()):
      ax.scatter([m["step"]], [m["test_perplexity"]], marker="*", s=160, c="tab:red",
                 edgecolors="k", zorder=5)
      twin.scatter([m["step"]], [m["test_accuracy"]], marker="*", s=160, c="tab:blue",
                   edgecolors="k", zorder=5, label=f"merged: {m['label']}")
    if run.get("merged"):
      twin.legend(fontsize=7, loc="upper left")
    ax.set(title=f"{run['name']}: over-memorization stages shaded", xlabel="step")
  return _save(fig, path)


def data_maps(maps: Sequence[tuple[str, np.ndarray, np.ndarray, np.ndarray]], path: str) -> str:
  """Ge et al. data maps: per train example, variance (x) vs mean (y) of exact memorization
  across checkpoints, colored by region. `maps`: (run, mean, variance, labels) per run."""
  n = max(len(maps), 1)
  cols = min(n, 3)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.5 * rows), squeeze=False)
  colors = {"easy": "tab:green", "hard": "tab:red", "other": "tab:gray"}
  for ax, (name, mean, var, labels) in zip(axes.flat, maps):
    for lab, c in colors.items():
      sel = labels == lab
      ax.scatter(var[sel], mean[sel], s=10, c=c, label=f"{lab} ({int(sel.sum())})")
    ax.set(title=name, xlabel="variance of exact memorization",
           ylabel="mean exact memorization", ylim=(-0.02, 1.02))
    ax.legend(fontsize=7)
  for ax in list(axes.flat)[len(maps):]:
    ax.axis("off")
  return _save(fig, path)


def per_checkpoint_lines(series: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]],
                         path: str, title: str = "") -> str:
  """One panel per metric, one line per run: `series[metric][run] = (steps, values)`."""
  n = max(len(series), 1)
  fig, axes = plt.subplots(1, n, figsize=(3.8 * n, 3.2), squeeze=False)
  for ax, (metric, by_run) in zip(axes[0], series.items()):
    for run, (x, y) in by_run.items():
      ax.plot(x, y, marker="o", ms=3, label=run)
    ax.set(title=metric, xlabel="step")
  axes[0][0].legend(fontsize=7)
  if title:
    fig.suptitle(title)
  return _save(fig, path)


def sampling_frequency(counts: Mapping[str, np.ndarray], path: str) -> str:
  """How often each training example was drawn, one series per sampler (Ge et al. Fig. 8).

  Left: draws per example in training-row order; right: the distribution of those counts
  (examples per draw count).

  Args:
    counts: sampler name -> (N,) draw counts indexed by training row.
    path: output PNG.
  """
  fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
  top = max((int(np.max(c)) for c in counts.values() if np.size(c)), default=0)
  bins = np.arange(top + 2) - 0.5
  for name, c in counts.items():
    c = np.asarray(c)
    axes[0].plot(np.arange(c.size), c, lw=0.8, marker=".", ms=3, label=name)
    axes[1].hist(c, bins=bins, alpha=0.5, label=name)
  axes[0].set(xlabel="training example", ylabel="times sampled",
              title="Sampling frequency per example")
  axes[1].set(xlabel="times sampled", ylabel="examples", title="Distribution of counts")
  axes[0].legend(fontsize=8)
  return _save(fig, path)


def sample_efficiency(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str,
                      title: str = "",
                      bands: Mapping[str, tuple[np.ndarray, np.ndarray]] | None = None) -> str:
  """Test accuracy (y) vs training examples (x), one line per curation method
  (Kang et al. Fig. 8): `curves[method] = (sizes, accuracies)`; `bands[method] = (low,
  high)` shades an interval around a line."""
  fig, ax = plt.subplots(figsize=(5.5, 4.2))
  for method, (x, y) in curves.items():
    line, = ax.plot(x, y, marker="o", ms=4, label=method)
    if bands and method in bands:
      low, high = bands[method]
      ax.fill_between(x, low, high, color=line.get_color(), alpha=0.15, lw=0)
  ax.set(xlabel="training examples", ylabel="test accuracy", title=title or "Sample efficiency")
  ax.legend(fontsize=8)
  return _save(fig, path)


def perplexity_distributions(samples: Mapping[str, np.ndarray], path: str, *,
                             threshold: float = np.nan) -> str:
  """Histograms of train-target perplexity (log x axis), one panel per model (e.g. the base
  and each run's last checkpoint), with the memorization threshold: memorized targets form
  a mode of their own near perplexity 1."""
  n = max(len(samples), 1)
  cols = min(n, 4)
  rows = (n + cols - 1) // cols
  fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.4 * rows), squeeze=False)
  finite = [np.asarray(v)[np.isfinite(v)] for v in samples.values()]
  hi = max([float(v.max()) for v in finite if v.size] + [1.5])
  bins = np.geomspace(1.0, hi * 1.05, 40)
  for ax, (name, values) in zip(axes.ravel(), samples.items()):
    v = np.clip(np.asarray(values, np.float64), 1.0, hi)
    ax.hist(v, bins=bins, color="tab:blue")
    if np.isfinite(threshold):
      ax.axvline(threshold, c="r", ls="--", lw=1)
    ax.set_xscale("log")
    ax.set_title(name, fontsize=8)
    ax.tick_params(labelsize=7)
  for ax in axes.ravel()[len(samples):]:
    ax.axis("off")
  fig.suptitle("train-target perplexity (red: memorization threshold)", fontsize=9)
  return _save(fig, path)
