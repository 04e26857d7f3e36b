"""README's "Python API" snippet runs as printed (on the shipped embedded base)."""
from __future__ import annotations

import re

from conftest import REPO_ROOT


def test_readme_python_api_snippet_runs():
  text = (REPO_ROOT / "README.md").read_text()
  section = text.split("## Python API", 1)[1].split("\n## ", 1)[0]
  code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
  scope: dict = {}
  exec(compile(code, "README.md#python-api", "exec"), scope)
  assert len(scope["scores"]) == 8 and all(s.perplexity > 1 for s in scope["scores"])
  assert len(scope["completions"]) == 8 and all(len(c) == 2 for c in scope["completions"])
  assert 0.0 <= scope["accuracy"] <= 1.0
