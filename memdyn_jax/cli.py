"""Shared plumbing of the absl binaries in `experiments/`: every user error (bad flag,
bad input) is one line `PROG: error: ...` on stderr and exit status 2."""
from __future__ import annotations

import collections.abc
import dataclasses
import importlib.util
import inspect
import json
import os
import re
import signal
import sys
import types
import typing
from typing import Any, Callable, Iterable, Mapping, NoReturn

from absl import app, flags, logging

# transformers warns "PyTorch was not found" on import when torch is absent; here torch is
# only the tests' parity reference, so binaries (which import this module first) silence
# that advice. A user's own setting of the variable wins.
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


class UsageError(Exception):
  """A one-line user error."""


def usage_error(error, flag_names: Mapping[str, str] | None = None) -> UsageError:
  """The one-line `--<flag>: <message>` of a `memdyn_jax.errors.FieldError`; `flag_names`
  maps fields to flags where their names differ."""
  return UsageError(f"--{(flag_names or {}).get(error.field, error.field)}: {error.message}")


def fail(prog: str, message: str) -> NoReturn:
  """Prints `PROG: error: <message>` and exits 2. The message's first line only: a
  library error may chain a multi-line storage or parser message after its own line."""
  lines = [line for line in str(message).splitlines() if line.strip()] or ["(no message)"]
  print(f"{prog}: error: {lines[0]}", file=sys.stderr)
  sys.exit(2)


# XLA:CPU's YNNPACK fusions (on by default in the installed jaxlib) were slower here for
# these small models: embedded-shape train step 219-234 -> 194-203 ms, sampling 128 prompts
# 3.6 -> 2.8 s on a 2-core Xeon. Binaries turn them off unless XLA_FLAGS names the flag.
CPU_XLA_DEFAULTS = ("--xla_cpu_experimental_ynn_fusion_type=",)


def set_cpu_xla_defaults() -> None:
  """Adds `CPU_XLA_DEFAULTS` to XLA_FLAGS (flags the user set win); call before JAX
  creates its backend. They only affect the CPU backend."""
  current = os.environ.get("XLA_FLAGS", "")
  extra = [f for f in CPU_XLA_DEFAULTS if f.split("=")[0] not in current]
  if extra:
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


def skip_absent_tpu() -> None:
  """Sets JAX_PLATFORMS=cpu on a machine with libtpu installed (the test extra brings it,
  for compiling TPU programs) but no TPU chip and no GPU: JAX would otherwise initialise
  libtpu and print a dozen lines of warnings about a TPU it cannot find. A user's own
  setting wins; TPU and GPU machines are left alone. Call before JAX creates its backend."""
  if "JAX_PLATFORMS" in os.environ or importlib.util.find_spec("libtpu") is None:
    return
  try:  # JAX's own probes of the PCI bus (what its TPU initialisation checks)
    from jax._src import hardware_utils
    tpu_chips = hardware_utils.num_available_tpu_chips_and_device_id()[0]
    gpus = hardware_utils.has_visible_nvidia_gpu() or hardware_utils.num_available_amd_gpus()
  except (ImportError, AttributeError, OSError):  # a JAX without these probes: leave it be
    return
  if not tpu_chips and not gpus:
    os.environ["JAX_PLATFORMS"] = "cpu"


def exit_status(stop_signal: int | None) -> int:
  """0, or 128 + the signal that stopped the work after it saved (143 SIGTERM, 130 SIGINT),
  as a shell reports a process the signal killed."""
  return 0 if stop_signal is None else 128 + int(stop_signal)


def stopped_note(stop_signal: int) -> str:
  """"stopped by SIGTERM after a checkpoint; re-run the command to continue"."""
  return (f"stopped by {signal.Signals(stop_signal).name} after a checkpoint; re-run the "
          "same command to continue")


STOPPED_AT_ONCE = ("while nothing was being saved: the work in progress is dropped (what was "
                   "written before stays); re-run the same command to continue")
_AT_START = None  # the binary's at-once block (`_stop_at_once`)


def _stop_at_once():
  """The at-once `signals.StopSignals` a binary holds from its start (entered once, on the
  main thread): until its work saves on a signal, SIGTERM / Ctrl-C stop it at once. A
  StopRequested that no `run_binary` catches (raised while the binary's modules load) is
  printed as the same one line, and the process exits 128 + the signal."""
  global _AT_START
  if _AT_START is not None:
    return _AT_START
  from memdyn_jax.signals import StopRequested, StopSignals
  previous = sys.excepthook

  def excepthook(kind, value, tb):
    if not isinstance(value, StopRequested):
      return previous(kind, value, tb)
    print(f"{os.path.basename(sys.argv[0])}: {value}", flush=True)
    sys.stderr.flush()
    os._exit(exit_status(value.signum))  # Python would exit by SIGINT even for a SIGTERM

  sys.excepthook = excepthook
  _AT_START = StopSignals(at_once=STOPPED_AT_ONCE).__enter__()
  return _AT_START


# A binary imports this module first: holding the at-once block from here covers its other
# module-level imports too (merge.py's import JAX: 1.5-3 s). Only for the binaries of
# experiments/ beside this package: a test or notebook importing this module keeps its own.
_MAIN = getattr(sys.modules.get("__main__"), "__file__", None) or ""
if os.path.dirname(os.path.abspath(_MAIN)) == os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments"):
  _stop_at_once()


def run_binary(prog: str, run: Callable[[], int], *, stopped_at_once: str = STOPPED_AT_ONCE
               ) -> None:
  """`app.run` with one-line errors for flag parsing and `UsageError`; `run()` is the
  binary's body and returns its exit status. `--help` and `--helpfull` exit 0.

  From its start until `run()` returns, SIGTERM / Ctrl-C stop the binary at once with one
  line, "PROG: stopped by SIGINT <stopped_at_once>", exit 128 + the signal, except inside
  the blocks of its work that save first (graceful `signals.StopSignals`: training steps,
  evaluation records), which stop after saving and return the status themselves. A signal
  after `run()` returned changes nothing.
  """
  from memdyn_jax.signals import STOP_SIGNALS, StopRequested
  _stop_at_once().at_once = stopped_at_once

  def parse_flags(argv):
    try:
      return flags.FLAGS(argv)
    except flags.Error as e:
      fail(prog, str(e))
    except SystemExit as e:
      # absl's --help/--helpshort/--helpfull/--helpxml print the help, then exit 1 (bad flags
      # are flags.Error, above). Asking for help is not an error: exit 0.
      sys.exit(0 if e.code == 1 else e.code)

  def main(argv):
    set_cpu_xla_defaults()
    skip_absent_tpu()
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)  # orbax logs every save/restore at INFO
    if len(argv) > 1:
      fail(prog, f"unexpected arguments {argv[1:]}")
    try:
      status = run()
    except UsageError as e:
      fail(prog, str(e))
    except StopRequested as e:
      print(f"{prog}: {e}", flush=True)
      status = exit_status(e.signum)
    for s in STOP_SIGNALS:  # the work is done: a signal now changes nothing
      signal.signal(s, lambda *_: None)
    sys.exit(status)

  app.run(main, flags_parser=parse_flags)


# ------------------------------------------------------------------ flags from dataclasses


def _flag_type(hint) -> type:
  """The flag kind of a field type: int, float, str, bool, tuple (a list flag) or dict
  (a JSON string); `X | None` is X."""
  args = [a for a in typing.get_args(hint) if a is not type(None)]
  origin = typing.get_origin(hint)
  if origin in (typing.Union, types.UnionType) and len(args) == 1:
    return _flag_type(args[0])
  if origin in (tuple, list) or hint in (tuple, list):
    return tuple
  if origin in (dict, collections.abc.Mapping) or hint in (dict, collections.abc.Mapping):
    return dict
  if hint in (int, float, str, bool):
    return hint
  raise TypeError(f"no flag type for {hint!r}")


def field_docs(cls) -> dict[str, str]:
  """{field: its description} from the "Attributes:" section of a Google-style class
  docstring; an entry may describe several fields ("top_p, n_samples: ...")."""
  docs, names, inside = {}, (), False
  for line in inspect.cleandoc(cls.__doc__ or "").splitlines():
    stripped = line.strip()
    if not inside:
      inside = stripped == "Attributes:"
      continue
    if stripped and not line.startswith(" "):  # the next section
      break
    entry = re.match(r"^ {2}(\w+(?:, \w+)*)(?: \([^)]*\))?: (.*)$", line)
    if entry:
      names = entry.group(1).split(", ")
      for name in names:
        docs[name] = entry.group(2).strip()
    elif stripped:
      for name in names:
        docs[name] += " " + stripped
  return docs


def _binary_module() -> str | None:
  """The name absl files a binary's own flags under (its main module, named by sys.argv[0]):
  flags defined here for a binary then show in its --help, not only --helpfull."""
  main = sys.modules.get("__main__")
  return sys.argv[0] if sys.argv and getattr(main, "__file__", None) else None


def define_dataclass_flags(cls, *, skip: Iterable[str] = (), only: Iterable[str] | None = None,
                           rename: Mapping[str, str] | None = None,
                           help_format: str = "{cls}.{field} (default {default!r}).",
                           use_defaults: bool = True) -> dict[str, str]:
  """Defines one flag per field of the dataclass `cls` (the flag is named like the field,
  or `rename[field]`); lists are comma-separated, dicts are JSON.

  Args:
    cls: the dataclass.
    skip: fields without a flag.
    only: if given, the only fields with a flag.
    rename: field -> flag name.
    help_format: help text, formatted with cls, field, default and doc (the field's
      description in the class docstring's "Attributes:" section, else "{cls}.{field}").
    use_defaults: the flags default to the fields' defaults; else to None (unset).

  Returns:
    {field: flag name} for `dataclass_kwargs_from_flags`.
  """
  hints = typing.get_type_hints(cls)
  docs = field_docs(cls)
  rename = rename or {}
  definers = {int: flags.DEFINE_integer, float: flags.DEFINE_float, str: flags.DEFINE_string,
              bool: flags.DEFINE_boolean, tuple: flags.DEFINE_list, dict: flags.DEFINE_string}
  names = {}
  for field in dataclasses.fields(cls):
    if field.name in skip or (only is not None and field.name not in only):
      continue
    kind = _flag_type(hints[field.name])
    default = (field.default if field.default is not dataclasses.MISSING
               else None if field.default_factory is dataclasses.MISSING
               else field.default_factory())
    flag_default = None
    if use_defaults:
      flag_default = (json.dumps(default) if kind is dict and default is not None
                      else list(default) if kind is tuple and default is not None else default)
    name = rename.get(field.name, field.name)
    doc = docs.get(field.name, f"{cls.__name__}.{field.name}")
    definers[kind](name, flag_default, help_format.format(
        cls=cls.__name__, field=field.name, default=default, doc=doc),
        module_name=_binary_module())
    names[field.name] = name
  return names


def dataclass_kwargs_from_flags(cls, names: Mapping[str, str], *, only_present: bool = False
                                ) -> dict[str, Any]:
  """Field values from the flags `define_dataclass_flags` defined (JSON parsed, lists as
  tuples); unset (None) flags are left out, and with `only_present` so are flags not
  given on the command line.

  Raises:
    UsageError: a JSON flag that does not parse to an object.
  """
  hints = typing.get_type_hints(cls)
  out = {}
  for field, name in names.items():
    value = flags.FLAGS[name].value
    if value is None or (only_present and not flags.FLAGS[name].present):
      continue
    kind = _flag_type(hints[field])
    if kind is dict:
      try:
        value = json.loads(value)
      except json.JSONDecodeError as e:
        raise UsageError(f"--{name}: not JSON ({e})") from None
      if not isinstance(value, dict):
        raise UsageError(f"--{name}: must be a JSON object, got {value!r}")
    elif kind is tuple:
      value = tuple(value)
    out[field] = value
  return out


def dataclass_flag_args(obj, names: Mapping[str, str]) -> list[str]:
  """The command-line flags that give `obj`'s field values (inverse of
  `dataclass_kwargs_from_flags`); None values are left out."""
  hints = typing.get_type_hints(type(obj))
  args = []
  for field, name in names.items():
    value = getattr(obj, field)
    if value is None:
      continue
    kind = _flag_type(hints[field])
    if kind is bool:
      args.append(f"--{name}" if value else f"--no{name}")
    elif kind is tuple:
      args.append(f"--{name}=" + ",".join(str(v) for v in value))
    elif kind is dict:
      args.append(f"--{name}=" + json.dumps(dict(value), sort_keys=True))
    else:
      args.append(f"--{name}={value}")
  return args


# ------------------------------------------------------------------- training runs


def define_train_config_flags() -> dict[str, str]:
  """One flag per `TrainConfig` field, unset by default (= the chosen preset's value)."""
  from memdyn_jax.train.config import TrainConfig
  return define_dataclass_flags(
      TrainConfig, use_defaults=False,
      help_format="{doc} (default: the --preset's value; {default!r} with --preset=none)")


def train_config_from_flags(preset: str):
  """The preset's TrainConfig with every TrainConfig flag that was given applied.

  Raises:
    UsageError: a bad value, naming its flag.
  """
  from memdyn_jax.train import config as config_lib
  names = {field: field for field in config_lib.field_types()}
  overrides = dataclass_kwargs_from_flags(config_lib.TrainConfig, names)
  try:
    return config_lib.get_preset(preset, **overrides)
  except config_lib.ConfigError as e:
    raise usage_error(e) from None


# TaskSpec field -> flag name, where they differ.
TASK_FLAG_NAMES = {"name": "task", "kwargs": "task_kwargs", "path": "task_path"}


def define_task_flags(*, skip: Iterable[str] = (), rename: Mapping[str, str] | None = None,
                      help_format: str = "{doc}") -> dict[str, str]:
  """--task, --task_kwargs (JSON), --task_path, --split, --max_examples: the fields of
  `train.task_run.TaskSpec`, the training data of a run; and --chat_template,
  --system_prompt, --num_fewshot, --fewshot_seed: the task's `tasks.PromptOptions`, unset
  by default, which join the task arguments (`skip`, `rename` and `help_format` as in
  `define_dataclass_flags`). Returns {field: flag} of both."""
  from memdyn_jax.tasks import PromptOptions
  from memdyn_jax.train.task_run import TaskSpec
  names = define_dataclass_flags(TaskSpec, skip=skip,
                                 rename={**TASK_FLAG_NAMES, **(rename or {})},
                                 help_format=help_format)
  return {**names, **define_dataclass_flags(
      PromptOptions, skip=skip, rename=rename, use_defaults=False,
      help_format=help_format.replace("{doc}", "{doc} (a task argument; default {default!r})"))}


def task_spec_from_flags(names: Mapping[str, str], model: str | None = None, **fixed):
  """The `TaskSpec` of the flags `define_task_flags` defined, with `fixed` fields. The
  prompt option flags that are given set those task arguments (over --task_kwargs); the
  arguments state the options only where they are not the default.

  With `model` "embedded", task "synthetic_arith" and no --task_kwargs, the task is the
  one the shipped base was pre-trained around (`models.embedded.task_kwargs`).

  Raises:
    UsageError: no --task, --task_kwargs that is not a JSON object, a bad prompt option.
  """
  from memdyn_jax.models import embedded
  from memdyn_jax.tasks import PROMPT_OPTION_NAMES, PromptOptions, canonical_task_kwargs
  from memdyn_jax.train.task_run import TaskSpec
  spec_names = {k: v for k, v in names.items() if k not in PROMPT_OPTION_NAMES}
  option_names = {k: v for k, v in names.items() if k in PROMPT_OPTION_NAMES}
  kwargs = dataclass_kwargs_from_flags(TaskSpec, spec_names)
  if not kwargs.get("name") and "name" not in fixed:
    raise UsageError(f"--{names['name']} is required")
  if (model == embedded.EMBEDDED_NAME and kwargs.get("name") == "synthetic_arith"
      and not kwargs.get("kwargs")):
    kwargs["kwargs"] = embedded.task_kwargs()
  options = dataclass_kwargs_from_flags(PromptOptions, option_names)
  try:
    task_kwargs = canonical_task_kwargs({**(kwargs.get("kwargs") or {}), **options})
  except ValueError as e:  # the message starts with the option's name
    field = str(e).split()[0]
    flag = option_names.get(field, names.get("kwargs", "task_kwargs"))
    raise UsageError(f"--{flag}: {e}") from None
  if task_kwargs or "kwargs" in kwargs:
    kwargs["kwargs"] = task_kwargs
  return TaskSpec(**kwargs, **fixed)


def check_output_dir(path: str | None, flag: str = "output_dir", *,
                     required: bool = False) -> None:
  """Refuses an output folder flag that names an existing file, or a path under one, naming
  the flag (before any work: a library would fail late, in `os.makedirs`).

  Raises:
    UsageError: `path` or the nearest existing folder above it is a file; no `path` where
      `required`.
  """
  if not path:
    if required:
      raise UsageError(f"--{flag} is required")
    return
  if os.path.exists(path) and not os.path.isdir(path):
    raise UsageError(f"--{flag}: {path} is a file, not a folder; pass a new or empty folder")
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.exists(parent) and os.path.dirname(parent) != parent:
    parent = os.path.dirname(parent)
  if not os.path.isdir(parent):
    raise UsageError(f"--{flag}: {path} lies under {parent}, which is a file, not a folder")


def resolve_model(model: str, flag: str = "--model") -> str:
  """A local HF directory for a model flag (`task_run.resolve_model`: a directory, `.gguf`,
  hub id or 'embedded')."""
  from memdyn_jax.train import task_run
  try:
    return task_run.resolve_model(model)
  except task_run.TaskRunError as e:
    raise UsageError(f"{flag}: {e.message}") from None


# ---------------------------------------------------------------------------- mesh flags


def define_mesh_flags() -> None:
  """--mesh_data/--mesh_fsdp/--mesh_tensor: the device mesh of a binary."""
  module = _binary_module()
  flags.DEFINE_integer("mesh_data", -1, "Mesh 'data' axis size (-1 = remaining devices).",
                       module_name=module)
  flags.DEFINE_integer("mesh_fsdp", 1, "Mesh 'fsdp' axis size.", module_name=module)
  flags.DEFINE_integer("mesh_tensor", 1, "Mesh 'tensor' axis size.", module_name=module)


def mesh_from_flags():
  """The mesh of the --mesh_* flags (imports JAX).

  Raises:
    UsageError: the sizes do not fit the devices.
  """
  from memdyn_jax import sharding
  try:
    return sharding.make_mesh(flags.FLAGS.mesh_data, flags.FLAGS.mesh_fsdp,
                              flags.FLAGS.mesh_tensor)
  except ValueError as e:
    raise UsageError(f"--mesh_data/--mesh_fsdp/--mesh_tensor: {e}") from None
