"""The package's layout is its architecture: stages import only themselves and the stages
below them (function-local imports included), no module imports itself back through a
circle, and the binaries are thin. Read from the source (ast), so nothing is imported."""
from __future__ import annotations

import ast
import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "memdyn_jax"

# Lower rank = earlier stage. A module may import its own rank or lower.
STAGES = {
    "memdyn_jax.errors": 0, "memdyn_jax.fileio": 0, "memdyn_jax.sharding": 0,
    "memdyn_jax.signals": 0,
    "memdyn_jax.hub": 0,
    "memdyn_jax.models": 1, "memdyn_jax.tasks": 1, "memdyn_jax.metrics": 1,
    "memdyn_jax.train": 2,
    "memdyn_jax.evaluation": 3,
    "memdyn_jax.merging": 4,
    "memdyn_jax.report": 5,
    "memdyn_jax.studies": 6,
    "memdyn_jax.cli": 7, "memdyn_jax.plan": 7, "memdyn_jax.testing": 7, "memdyn_jax": 7,
}


def module_name(path: pathlib.Path) -> str:
  parts = list(path.relative_to(ROOT).with_suffix("").parts)
  if parts[-1] == "__init__":
    parts.pop()
  return ".".join(parts)


def modules() -> dict[str, pathlib.Path]:
  return {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """Every memdyn_jax module `path` imports, at any depth of its code."""
  package = name if path.name == "__init__.py" else name.rpartition(".")[0]
  found = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Import):
      targets = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
      if node.level:
        base = package.split(".")[:len(package.split(".")) - node.level + 1]
        module = ".".join(base + ([node.module] if node.module else []))
      else:
        module = node.module or ""
      # `from pkg import sub` imports the submodule pkg.sub when there is one.
      targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module
                 for a in node.names]
    else:
      continue
    found.update(t for t in targets if t == "memdyn_jax" or t.startswith("memdyn_jax."))
  return found - {name}


def stage(name: str) -> int:
  for prefix in sorted(STAGES, key=len, reverse=True):
    if name == prefix or name.startswith(prefix + "."):
      return STAGES[prefix]
  raise AssertionError(f"{name} belongs to no stage: add it to STAGES")


def import_graph() -> dict[str, set[str]]:
  found = modules()
  return {name: imports_of(name, path, set(found)) for name, path in found.items()}


def test_every_module_has_a_stage_and_the_root_holds_at_most_8_modules():
  for name in modules():
    stage(name)
  root = sorted(p.name for p in PACKAGE.glob("*.py"))
  assert len(root) <= 8, root


def test_no_stage_imports_a_later_one():
  upward = [f"{a} (stage {stage(a)}) imports {b} (stage {stage(b)})"
            for a, targets in import_graph().items() for b in targets if stage(b) > stage(a)]
  assert not upward, "\n".join(upward)


def test_no_import_cycle():
  graph = import_graph()
  # A package's __init__ importing its own submodules is its surface, not a circle.
  edges = {a: {b for b in targets if not (a in STAGES or b.startswith(a + "."))}
           for a, targets in graph.items()}
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):  # Tarjan's strongly connected components
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges.get(v, ()):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        cycles.append(sorted(component))

  for v in sorted(edges):
    if v not in index:
      visit(v)
  assert not cycles, cycles


def test_the_library_imports_no_binary_launcher_or_test():
  for name, path in modules().items():
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
      if isinstance(node, (ast.Import, ast.ImportFrom)):
        mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                else [node.module or ""])
        bad = [m for m in mods if m.split(".")[0] in ("experiments", "launch", "tests", "conftest")]
        assert not bad, f"{name} imports {bad}"


BINARIES = sorted((ROOT / "experiments").glob("*.py"))


@pytest.mark.parametrize("path", BINARIES, ids=[p.name for p in BINARIES])
def test_binaries_are_thin(path):
  text = path.read_text()
  assert len(text.splitlines()) <= 150, f"{path.name}: {len(text.splitlines())} lines"
  assert "sys.path" not in text, f"{path.name} edits sys.path"
  tree = ast.parse(text)
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and not node.level:
      top = (node.module or "").split(".")[0]
    elif isinstance(node, ast.Import):
      top = node.names[0].name.split(".")[0]
    else:
      continue
    assert top not in ("launch", "tests", "benchmarks", "experiments"), f"{path.name}: {top}"


def test_library_errors_are_typed_and_whole():
  """No catch-all in library code unless marked (noqa: BLE001, with its reason), and no
  message trimming: the binaries' front door (cli.fail) alone makes one line."""
  offenders = []
  for name, path in modules().items():
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
      code = line.split("#")[0]
      catch_all = re.search(r"except\s*(Exception|BaseException)?\s*(as \w+)?:", code)
      if catch_all and "noqa: BLE001" not in line:
        offenders.append(f"{name}:{lineno}: {line.strip()}")
      if name != "memdyn_jax.cli" and "splitlines()[0]" in code:
        offenders.append(f"{name}:{lineno}: {line.strip()}")
  assert not offenders, "\n".join(offenders)


def test_the_memorization_rule_has_one_home():
  """"Memorized" (perplexity under the threshold, NaN never), the task thresholds and the
  log(log(perplexity)) conversion are written in metrics/premem.py alone; every other stage
  calls it."""
  rule = re.compile(r"(ppl|perplexit\w*)\S*\s*<=?\s*(threshold|memorization_perplexity|p\b)"
                    r"|exp\(\w*\.?exp\(|nan_to_num\([^)]*perplexit")
  offenders = [f"{name}:{lineno}: {line.strip()}"
               for name, path in modules().items() if name != "memdyn_jax.metrics.premem"
               for lineno, line in enumerate(path.read_text().splitlines(), 1)
               if rule.search(line.split("#")[0])]
  assert not offenders, "\n".join(offenders)


def test_former_top_level_modules_still_import_as_their_new_homes():
  import importlib

  import memdyn_jax
  for old, new in memdyn_jax._MOVED.items():
    module = importlib.import_module(f"memdyn_jax.{old}")
    assert module is importlib.import_module(new), old
    assert module.__spec__.name == new  # the alias did not rename the module
    assert getattr(memdyn_jax, old) is module
  from memdyn_jax.checkpoints import restore  # noqa: F401 - the README's older form
  from memdyn_jax import evaluation, merging
  assert evaluation.evaluate_units is evaluation.run.evaluate_units
  assert merging.merge is merging.methods.merge


def _family_names() -> set[str]:
  """The names and HF model types the family modules declare: their `Family(...)` calls'
  `name=` and `model_types=` keys."""
  names = set()
  for path in (PACKAGE / "models" / "families").glob("*.py"):
    for node in ast.walk(ast.parse(path.read_text())):
      func = getattr(node, "func", None)
      called = getattr(func, "id", getattr(func, "attr", ""))
      if not (isinstance(node, ast.Call) and called == "Family"):
        continue
      for kw in node.keywords:
        if kw.arg == "name" and isinstance(kw.value, ast.Constant):
          names.add(kw.value.value)
        elif kw.arg == "model_types" and isinstance(kw.value, ast.Dict):
          names.update(k.value for k in kw.value.keys if isinstance(k, ast.Constant))
  return names


def test_a_model_family_lives_in_its_own_module():
  """The machinery every family shares names none of them: no `if cfg.family == ...`, no
  per-model-type table; `testing` holds no table keyed by them either."""
  names = _family_names()
  assert {"llama", "mistral", "qwen2", "gemma2", "gpt_neo"} <= names
  offenders = []
  for module in ("config", "hf_io", "registry", "transformer", "layers", "flops"):
    tree = ast.parse((PACKAGE / "models" / f"{module}.py").read_text())
    named = {n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in names}
    offenders += [f"models/{module}.py names {sorted(named)}"] if named else []
  for node in ast.walk(ast.parse((PACKAGE / "testing.py").read_text())):
    keys = {k.value for k in getattr(node, "keys", None) or () if isinstance(k, ast.Constant)}
    offenders += [f"testing.py:{node.lineno} keys {sorted(keys & names)}"] if keys & names else []
  assert not offenders, "\n".join(offenders)
