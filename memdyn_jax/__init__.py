"""memdyn_jax: memorization dynamics of LLM fine-tuning on reasoning data (JAX / Flax NNX).

The package is laid out by stage; data flows one way (tasks -> train -> evaluation ->
metrics/report -> studies):

    models/      NNX model families, HF safetensors / GGUF I/O, published presets
    tasks/       GSM8K, MATH, SFT data, the synthetic arithmetic task, tokenization
    train/       configs and presets, the jitted step, the loop, LoRA, samplers, and the
                 run directory (`train.checkpoints`)
    evaluation/  scoring, sampling, a run's evaluation and its records
    metrics/     PreMemAcc, baselines, over-memorization, data maps, diversity (pure numerics)
    merging/     checkpoint merging and merged runs
    report/      a sweep's analysis, tables and plots
    studies/     sweep, quickstart, curation, sampler study, the embedded base
    plan/        the study's programs compiled for TPU slices (libtpu) or GPUs: memory,
                 cost, cheapest fit, a paper grid's chip-hours
    sharding.py · cli.py · errors.py · fileio.py · testing.py

Modules that used to sit at the top level (`memdyn_jax.scoring`, `memdyn_jax.checkpoints`,
...) are still importable under those names: `_MOVED` maps them to their homes.
"""
import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

# Former top-level module -> its home. `import memdyn_jax.scoring`,
# `from memdyn_jax import scoring` and `from memdyn_jax.scoring import score` give the
# module itself (one object under two names, so a patch through either name is seen).
_MOVED = {
    "checkpoints": "memdyn_jax.train.checkpoints",
    "model_presets": "memdyn_jax.models.presets",
    "scoring": "memdyn_jax.evaluation.scoring",
    "sampling": "memdyn_jax.evaluation.sampling",
    "run_evaluation": "memdyn_jax.evaluation.run",
    "records": "memdyn_jax.evaluation.records",
    "gradient_variance": "memdyn_jax.evaluation.gradient_variance",
    "judge": "memdyn_jax.evaluation.judge",
    "merged_run": "memdyn_jax.merging.run",
    "sweep": "memdyn_jax.studies.sweep",
    "quickstart": "memdyn_jax.studies.quickstart",
    "curation": "memdyn_jax.studies.curation",
    "sampler_study": "memdyn_jax.studies.sampler_study",
    "embedded": "memdyn_jax.studies.embedded",
}


class _MovedModuleLoader(importlib.abc.Loader):
  """Loads a former name as the module at its new home (imported there, once)."""

  def __init__(self, target: str):
    self.target = target

  def create_module(self, spec):
    module = importlib.import_module(self.target)
    self._own_spec = module.__spec__
    return module

  def exec_module(self, module):
    # The import system stamped the former name's spec on the module; give back its own.
    module.__spec__ = self._own_spec


class _MovedModuleFinder(importlib.abc.MetaPathFinder):

  def find_spec(self, fullname, path=None, target=None):
    prefix, _, name = fullname.partition(".")
    if prefix != __name__ or name not in _MOVED:
      return None
    return importlib.util.spec_from_loader(fullname, _MovedModuleLoader(_MOVED[name]))


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
  sys.meta_path.append(_MovedModuleFinder())


def __getattr__(name):
  if name in _MOVED:
    return importlib.import_module(f"{__name__}.{name}")
  raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
