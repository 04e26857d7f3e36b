"""memdyn_jax.cli: flags generated from dataclasses (help from the docstring, `only`,
`rename`), read back and written out as command-line arguments."""
from __future__ import annotations

import dataclasses
import os
import re

from absl import flags

from memdyn_jax import cli


@dataclasses.dataclass(frozen=True)
class _Settings:
  """Settings of a test binary.

  Attributes:
    cli_test_alpha: the first field, described over
      two lines.
    cli_test_beta, cli_test_gamma (optional): two fields, one description.
    cli_test_kwargs: a JSON object.

  Raises:
    Nothing: this section is not read.
  """
  cli_test_alpha: int = 3
  cli_test_beta: tuple[str, ...] = ("a", "b")
  cli_test_gamma: float | None = None
  cli_test_kwargs: dict = dataclasses.field(default_factory=dict)
  cli_test_undocumented: bool = False


def test_field_docs_reads_the_attributes_section():
  assert cli.field_docs(_Settings) == {
      "cli_test_alpha": "the first field, described over two lines.",
      "cli_test_beta": "two fields, one description.",
      "cli_test_gamma": "two fields, one description.",
      "cli_test_kwargs": "a JSON object."}
  assert cli.field_docs(int) == {}


def test_dataclass_flags_round_trip():
  names = cli.define_dataclass_flags(
      _Settings, only=("cli_test_alpha", "cli_test_beta", "cli_test_kwargs",
                       "cli_test_undocumented"),
      rename={"cli_test_beta": "cli_test_betas"}, help_format="{doc} [{default!r}]")
  assert names == {"cli_test_alpha": "cli_test_alpha", "cli_test_beta": "cli_test_betas",
                   "cli_test_kwargs": "cli_test_kwargs",
                   "cli_test_undocumented": "cli_test_undocumented"}
  fv = flags.FLAGS
  assert "cli_test_gamma" not in fv
  assert fv["cli_test_betas"].help == "two fields, one description. [('a', 'b')]"
  assert fv["cli_test_undocumented"].help == "_Settings.cli_test_undocumented [False]"
  fv(["prog", "--cli_test_alpha=5", "--cli_test_betas=x,y", '--cli_test_kwargs={"k": 1}'])
  try:
    kwargs = cli.dataclass_kwargs_from_flags(_Settings, names)
    assert kwargs == {"cli_test_alpha": 5, "cli_test_beta": ("x", "y"),
                      "cli_test_kwargs": {"k": 1}, "cli_test_undocumented": False}
    obj = _Settings(**kwargs)
    assert cli.dataclass_flag_args(obj, names) == [
        "--cli_test_alpha=5", "--cli_test_betas=x,y", '--cli_test_kwargs={"k": 1}',
        "--nocli_test_undocumented"]
  finally:
    fv.unparse_flags()


def test_cpu_xla_defaults_add_flags_the_user_did_not_set(monkeypatch):
  # setenv (not delenv, which records nothing when the variable is unset) so teardown
  # restores XLA_FLAGS: a leaked value would reach later tests' subprocesses only.
  monkeypatch.setenv("XLA_FLAGS", "")
  cli.set_cpu_xla_defaults()
  assert os.environ["XLA_FLAGS"] == " ".join(cli.CPU_XLA_DEFAULTS)
  mine = "--xla_force_host_platform_device_count=8 --xla_cpu_experimental_ynn_fusion_type=dot"
  monkeypatch.setenv("XLA_FLAGS", mine)
  cli.set_cpu_xla_defaults()
  assert os.environ["XLA_FLAGS"] == mine  # the user's value of the flag wins


def test_binaries_do_not_print_the_no_pytorch_banner():
  """A user without torch must not see transformers' "PyTorch was not found" advice from
  any binary: each one imports memdyn_jax.cli (which silences it) before anything that
  imports transformers. Checked in a subprocess where torch cannot be imported."""
  import ast
  import subprocess
  import sys
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  for name in sorted(os.listdir(os.path.join(repo, "experiments"))):
    if not name.endswith(".py"):
      continue
    tree = ast.parse(open(os.path.join(repo, "experiments", name)).read())
    first = next((n for n in tree.body if isinstance(n, ast.ImportFrom)
                  and (n.module or "").startswith(("memdyn_jax", "transformers"))), None)
    if first is None:
      continue
    names = [a.name for a in first.names]
    assert first.module in ("memdyn_jax", "memdyn_jax.cli") and (
        first.module == "memdyn_jax.cli" or names[0] == "cli"), (
            f"experiments/{name}: import memdyn_jax.cli first (line {first.lineno})")
  code = ("import sys; sys.modules['torch'] = None\n"
          "import memdyn_jax.cli, transformers\n")
  env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       check=True)
  assert "PyTorch was not found" not in out.stderr + out.stdout
  shown = subprocess.run([sys.executable, "-c", code.replace("memdyn_jax.cli, ", "")],
                         capture_output=True, text=True, env=env, check=True)
  assert "PyTorch was not found" in shown.stderr  # The check above can fail.


# ------------------------------------------------------------------ every binary's front door

BINARIES = sorted(n for n in os.listdir(os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "experiments")) if n.endswith(".py"))


def _run_each(commands):
  """{key: CompletedProcess} of `run_binary(*args)` per key, three at a time (each start
  is mostly imports)."""
  import concurrent.futures

  from conftest import run_binary
  with concurrent.futures.ThreadPoolExecutor(3) as pool:
    futures = {key: pool.submit(run_binary, *args, timeout=300)
               for key, args in commands.items()}
    return {key: f.result() for key, f in futures.items()}


def _flag_helps(text: str) -> dict[str, str]:
  """{flag: its description} of a --help text: an entry's lines up to absl's "(default:
  ...)" / "(an integer)" lines, and its own "(default ...)" suffix cut off."""
  import re
  helps, flag = {}, None
  for line in text.splitlines():
    entry = re.match(r"^  --(?:\[no\])?(\w+): ?(.*)$", line)
    if entry:
      flag = entry.group(1)
      helps[flag] = entry.group(2)
    elif flag and line.startswith("    ") and not line.strip().startswith("("):
      helps[flag] += " " + line.strip()
    else:
      flag = None
  return {f: h.split(" (default")[0].strip() for f, h in helps.items()}


def _example_lines(path: str) -> list[str]:
  """The source lines of a binary's module docstring that continue on the next (ending in
  a backslash, as usage examples do; an escaped one is one in the help)."""
  import ast
  text = open(path).read()
  node = ast.parse(text).body[0]
  lines = text.splitlines()[node.lineno - 1:node.end_lineno]
  return [line.strip().replace("\\\\", "\\") for line in lines if line.endswith("\\")]


def test_every_binarys_help_exits_0_and_describes_each_flag_on_its_own():
  """--help (every binary, the launcher too) and --helpfull/--helpshort (the same absl
  exit; one binary) print on stdout and exit 0, not absl's 1. Every flag of a binary has
  its own description (beta1/beta2/eps, the LoRA and reweighting flags shared one; merge.py's
  and sweep.py's evaluation flags were a boilerplate naming the dataclass field), and the
  usage examples keep their line breaks (a backslash at a line's end in a non-raw docstring
  joins the lines)."""
  import subprocess
  import sys
  commands = {name: (name, "--help") for name in BINARIES}
  commands.update({("export.py", f): ("export.py", f) for f in ("--helpfull", "--helpshort")})
  procs = _run_each(commands)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  launcher = os.path.join(repo, "launch", "launch.py")
  procs["launch.py"] = subprocess.run([sys.executable, launcher, "--help"], cwd=repo,
                                      capture_output=True, text=True, timeout=120)
  for key, proc in procs.items():
    assert proc.returncode == 0, (key, proc.stderr[-2000:])
    assert "flags:" in proc.stdout, (key, proc.stdout[-2000:])
    if not isinstance(key, str):
      continue
    helps = _flag_helps(proc.stdout)
    by_text = {}
    for flag, text in helps.items():
      assert text, (key, flag, "no description")
      assert not re.search(r"\b[A-Z][A-Za-z]+\.\w+\b", text), (key, flag, text)
      by_text.setdefault(text, []).append(flag)
    shared = {t: f for t, f in by_text.items() if len(f) > 1}
    assert not shared, (key, shared)
    path = launcher if key == "launch.py" else os.path.join(repo, "experiments", key)
    printed = {line.strip() for line in proc.stdout.splitlines()}
    for line in _example_lines(path):
      assert line in printed, (key, line)


def test_an_output_folder_that_is_a_file_names_its_flag(tmp_path):
  """Every binary that writes a folder refuses a file there in one line naming the flag,
  before any work (no traceback from os.makedirs)."""
  from conftest import assert_one_line_error
  afile = tmp_path / "afile"
  afile.write_text("not a folder\n")
  task = ("--model=embedded", "--task=synthetic_arith")
  commands = {
      "train.py": ("train.py", *task, f"--output_dir={afile}"),
      "sweep.py": ("sweep.py", *task, f"--sweep_dir={afile}"),
      "mbc.py": ("mbc.py", *task, f"--output_dir={afile}"),
      "curate.py": ("curate.py", *task, f"--output_dir={afile}"),
      "quickstart.py": ("quickstart.py", f"--output_dir={afile}/study"),
      "analyze.py": ("analyze.py", f"--sweep_dir={tmp_path}", f"--output_dir={afile}"),
      "export.py": ("export.py", f"--run_dir={tmp_path}", f"--output_dir={afile}"),
      "merge.py": ("merge.py", f"--checkpoints={tmp_path}:1", f"--output_dir={afile}"),
      "build_embedded.py": ("build_embedded.py", f"--output_dir={afile}"),
      "convert_gguf.py": ("convert_gguf.py", f"--gguf={afile}", f"--out_dir={afile}"),
  }
  for name, proc in _run_each(commands).items():
    flag = {"sweep.py": "--sweep_dir", "convert_gguf.py": "--out_dir"}.get(name, "--output_dir")
    assert_one_line_error(proc, name, f"{flag}: ")
    assert "a file, not a folder" in proc.stderr, (name, proc.stderr)
