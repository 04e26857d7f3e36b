"""Runs every benchmark at the shapes of the README's table, one after the other on this
machine, and prints that table as Markdown (memdyn_jax vs HF PyTorch in the same run,
with the targets of the speed issue), writes it as JSON, and with `--readme` puts it into
README.md between its `<!-- benchmarks:begin -->` / `<!-- benchmarks:end -->` markers, so
the table is regenerated, never retyped:

  python benchmarks/run_all.py --json_out=/tmp/benchmarks.json --readme

Each benchmark is its own process (`python benchmarks/<name>.py ... --json_out=...`): no
compilation cache or thread pool of one leaks into the next. Run it on a quiet machine: the
load average at the end of each is recorded beside its figures.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time

from absl import app, flags

flags.DEFINE_string("json_out", None, "Write every benchmark's figures and the table here.")
flags.DEFINE_bool("readme", False, "Replace the table in README.md between its markers.")
flags.DEFINE_list("only", [], "Run only these benchmark names (default: all).")
FLAGS = flags.FLAGS

HERE = os.path.dirname(os.path.abspath(__file__))
README = os.path.join(os.path.dirname(HERE), "README.md")
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"

# name -> (script, its flags): the shapes the speed issue sets its targets at.
BENCHMARKS = {
    "forward": ("forward.py", []),
    "score": ("score.py", ["--batch_sizes=16"]),
    "sample": ("sample.py", ["--batch_sizes=16,64"]),
    "train_llama": ("train_step.py", []),
    "train_embedded": ("train_step.py", ["--layers=4", "--hidden=128", "--heads=4",
                                         "--vocab=512", "--batch=16"]),
}


def run_benchmark(script: str, args: list[str]) -> dict:
  """Runs one benchmark script; returns the figures it wrote (its stdout is passed on)."""
  with tempfile.TemporaryDirectory() as tmp:
    out = os.path.join(tmp, "figures.json")
    t0 = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, script), *args, f"--json_out={out}"],
                   check=True)
    with open(out) as f:
      figures = json.load(f)
  figures["wall_s"] = time.perf_counter() - t0
  return figures


def _ratio(value: float, target: float) -> str:
  return f"{value:.2f}× ({'met' if value >= target else f'target ≥ {target:g}×'})"


def table_rows(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
  """(benchmark, memdyn_jax, HF PyTorch, ratio and target) per measured shape."""
  rows = []
  if "forward" in results:
    r = results["forward"]
    tps, best = r["tokens_per_s"], r["best_jax"]
    rows.append((f"forward, {r['batch']}×{r['seq_len']}", f"{tps[best]:,.0f} tok/s ({best})",
                 " / ".join(f"{tps[k]:,.0f} ({k.split()[-1]})" for k in tps
                            if k.startswith("torch")),
                 " / ".join(_ratio(v, 0.95) if k == "torch sdpa" else f"{v:.2f}×"
                            for k, v in r["ratio_best_jax_over"].items())))
  if "score" in results:
    r = results["score"]
    for b, fig in r["batches"].items():
      tps, ratio = fig["tokens_per_s"], fig["ratio_jax_over"]
      rows.append((f"score, {b}×({r['prompt_len']}+{r['target_len']})",
                   f"{tps['jax score']:,.0f} tok/s, {fig['jax_peak_fraction']:.0%} of peak",
                   f"{tps['hf score']:,.0f} (score) / {tps['hf forward']:,.0f} (bare forward)",
                   f"{_ratio(ratio['hf score'], 1.0)} / {_ratio(ratio['hf forward'], 0.9)}"))
  if "sample" in results:
    r = results["sample"]
    for b, fig in r["batches"].items():
      tps, roof = fig["new_tokens_per_s"], fig["roofline_fraction"]
      target = 1.5 if int(b) <= 16 else 2.5
      rows.append((f"{'greedy ' if r['greedy'] else ''}sampling, {b}×({r['prompt_len']}+"
                   f"{r['new_tokens']} new)",
                   f"{tps['jax generate']:,.1f} new tok/s, {roof['jax generate']:.0%} of roofline",
                   f"{tps.get('hf generate', float('nan')):,.1f}",
                   _ratio(fig["ratio_jax_over_hf"], target) if "ratio_jax_over_hf" in fig
                   else "–"))
  for name in ("train_llama", "train_embedded"):
    if name in results:
      r = results[name]
      rows.append((f"train step, {r['layers']}×{r['hidden']} vocab {r['vocab']}, "
                   f"{r['batch']}×{r['seq']}",
                   f"{r['jax_tokens_per_s']:,.0f} tok/s, MFU {r['mfu']:.0%}",
                   f"{r.get('torch_tokens_per_s', float('nan')):,.0f}",
                   _ratio(r["ratio_jax_over_torch"], 0.9) if "ratio_jax_over_torch" in r
                   else "–"))
  return rows


def markdown(results: dict[str, dict]) -> str:
  loads = ", ".join(f"{k} {v['load_average']:.1f}" for k, v in results.items())
  peaks = sorted(v["matmul_peak_flops"] / 1e9 for v in results.values()
                 if "matmul_peak_flops" in v)
  lines = ["| benchmark | memdyn_jax | HF PyTorch | ratio (target) |", "|---|---|---|---|"]
  lines += [f"| {' | '.join(row)} |" for row in table_rows(results)]
  lines.append("")
  lines.append(f"fp32, `python benchmarks/run_all.py`, {time.strftime('%Y-%m-%d')}; jnp matmul "
               f"peak in the same run {peaks[0]:.0f}–{peaks[-1]:.0f} GFLOP/s; load average at "
               f"the end of each: {loads}." if peaks else f"Load average: {loads}.")
  return "\n".join(lines)


def replace_readme_table(text: str, table: str) -> str:
  begin, end = text.index(BEGIN), text.index(END)
  return text[:begin + len(BEGIN)] + "\n" + table + "\n" + text[end:]


def main(argv):
  del argv
  names = FLAGS.only or list(BENCHMARKS)
  unknown = sorted(set(names) - set(BENCHMARKS))
  if unknown:
    raise app.UsageError(f"--only: unknown benchmark(s) {unknown}; choose from "
                         f"{list(BENCHMARKS)}")
  results = {name: run_benchmark(*BENCHMARKS[name]) for name in names}
  table = markdown(results)
  print("\n" + table)
  if FLAGS.json_out:
    with open(FLAGS.json_out, "w") as f:
      json.dump({"results": results, "table": table}, f, indent=2, sort_keys=True)
  if FLAGS.readme:
    with open(README) as f:
      text = f.read()
    with open(README, "w") as f:
      f.write(replace_readme_table(text, table))


if __name__ == "__main__":
  app.run(main)
