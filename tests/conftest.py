"""Shared pytest fixtures. Each section belongs to one area; add new sections below."""
from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

# The test extra installs libtpu (TPU programs are compiled here, deviceless); JAX must not
# try to open a TPU on this CPU machine, which prints warnings into every captured stderr.
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _memory_map_count() -> int:
  with open(f"/proc/{os.getpid()}/maps", "rb") as f:
    return sum(1 for _ in f)


def _map_budget() -> int:
  try:
    return int(pathlib.Path("/proc/sys/vm/max_map_count").read_text()) // 2
  except (OSError, ValueError):
    return 0


_MAP_BUDGET = _map_budget()


@pytest.fixture(autouse=True)
def _bounded_compiled_code():
  """Every compiled XLA:CPU program keeps ~5 memory mappings while JAX caches it; the suite
  compiles thousands, and past the kernel's vm.max_map_count (65,530) LLVM's next mmap fails
  and the interpreter dies with SIGSEGV in backend_compile_and_load (seen at ~85% of the
  suite). Past half the limit the caches are dropped (programs compile again when needed)."""
  yield
  if _MAP_BUDGET and _memory_map_count() > _MAP_BUDGET:
    import gc

    import jax
    jax.clear_caches()
    gc.collect()


# =========================================================================================
# Tasks and data fixtures: local shared data, tiny locally-trained tokenizers (no hub).
# =========================================================================================


def shared_data_dir() -> pathlib.Path:
  """The read-only shared data folder: $MEMDYN_SHARED_DATA, else <repo>/../shared/data."""
  env = os.environ.get("MEMDYN_SHARED_DATA")
  return pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"


def _dataset_dir(name: str) -> pathlib.Path:
  path = shared_data_dir() / name
  if not (path / "train.jsonl").is_file() or not (path / "test.jsonl").is_file():
    pytest.skip(f"shared {name} data not found at {path} (set MEMDYN_SHARED_DATA)")
  return path


@pytest.fixture(scope="session")
def gsm8k_dir() -> pathlib.Path:
  return _dataset_dir("gsm8k")


@pytest.fixture(scope="session")
def math_dir() -> pathlib.Path:
  return _dataset_dir("math")


# Training text for the test tokenizers: GSM8K-like lines written here, so tokenizer tests
# need neither the shared data nor the network.
_TOKENIZER_CORPUS = """\
Natalia sold clips to 48 of her friends in April, and then she sold half as many in May.
Natalia sold 48/2 = 24 clips in May. Natalia sold 48+24 = 72 clips altogether.
Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting.
Weng earns 12/60 = $0.2 per minute. Working 50 minutes, she earned 0.2 x 50 = $10.
Betty is saving money for a new wallet which costs $100. How much more money does she need?
The answer is 5. We know that the total is 1,250 dollars. First, compute the sum.
Question: How many apples are left?
Answer: There are 7 apples left.
Done.
""".splitlines()

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")


def _train_bpe(add_bos: bool):
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
  from transformers import PreTrainedTokenizerFast

  tok = Tokenizer(models.BPE())
  # Byte-level: every string round-trips exactly through encode/decode.
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=list(SPECIAL_TOKENS),
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                show_progress=False)
  tok.train_from_iterator(_TOKENIZER_CORPUS * 5, trainer)
  if add_bos:
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos_id)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>",
                                 pad_token="<pad>")


@pytest.fixture(scope="session")
def tokenizer_no_bos():
  """Byte-level BPE tokenizer whose encoding adds no special tokens (GPT-2 style)."""
  return _train_bpe(add_bos=False)


@pytest.fixture(scope="session")
def tokenizer_bos():
  """Byte-level BPE tokenizer whose encoding prepends BOS `<s>` (Llama style)."""
  return _train_bpe(add_bos=True)

# =========================================================================================
# End of tasks and data fixtures.
# =========================================================================================

# =========================================================================================
# Evaluation fixtures: one tiny trained run (synthetic_arith tokenizer, tiny Llama, two
# checkpoints) shared by the evaluation and analysis tests.
# =========================================================================================

EVAL_TASK_KWARGS = {"n_train": 12, "n_test": 4, "n_ood": 4, "max_steps": 1}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
  """(run_dir, base_dir): a run trained 4 steps with checkpoints at steps 2 and 4."""
  from memdyn_jax.train import checkpoints
  from memdyn_jax import models, testing
  from memdyn_jax.tasks import synthetic_arith as sa
  from memdyn_jax.train import loop
  from memdyn_jax.train.config import TrainConfig

  root = tmp_path_factory.mktemp("eval_run")
  task = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS)
  base = testing.save_tiny_task_model(str(root / "base"), task)
  tok = models.load_tokenizer(base, padding_side="right")
  cfg = TrainConfig(learning_rate=1e-2, num_epochs=2, global_batch_size=6, warmup_steps=1,
                    save_every_steps=2, max_length=256, overlength="truncate")
  data, ids = loop.task_train_data(tok, task, task.load("train"), cfg)
  run_dir = str(root / "sweep" / "run_a")
  loop.train(cfg, data, base, run_dir, progress=False, async_checkpoints=False)
  from memdyn_jax.train import task_run
  task_run.write_examples_listing(
      run_dir, task_run.TaskSpec("synthetic_arith", {"seed": 0, **EVAL_TASK_KWARGS}), ids)
  assert checkpoints.list_steps(run_dir) == [2, 4]
  return run_dir, base


EVAL_CLI_FLAGS = ("--splits=train,test,perturbed", "--num_train=4", "--max_eval=4",
                  "--perturbations=First", "--max_new_tokens=8", "--n_samples=2",
                  "--batch_size=4", "--grad_variance_minibatches=2",
                  "--grad_variance_batch_size=2", "--noprogress")


@pytest.fixture(scope="session")
def evaluated_run(tiny_run):
  """(run_dir, completed process) after experiments/evaluate.py ran on `tiny_run`."""
  import json

  run_dir, _ = tiny_run
  proc = run_binary("evaluate.py", f"--run_dir={run_dir}",
                    f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}", *EVAL_CLI_FLAGS,
                    timeout=400)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return run_dir, proc

# =========================================================================================
# End of evaluation fixtures.
# =========================================================================================

# =========================================================================================
# Binaries: experiments/<name>.py run on CPU in a subprocess.
# =========================================================================================


def run_binary(name: str, *args, timeout: int = 300, env: dict[str, str] | None = None):
  """Runs experiments/<name> with `args` on CPU (and `env` set); returns the CompletedProcess
  (text output)."""
  import subprocess
  import sys

  return subprocess.run([sys.executable, str(REPO_ROOT / "experiments" / name), *args],
                        cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})))


def assert_one_line_error(proc, prog: str, needle: str) -> str:
  """Asserts a binary's user error: exit status 2 and one stderr line `<prog>: error: ...`
  containing `needle`; returns that line.

  A failed checkpoint read is held to it too: the reads that race the reported one print
  nothing (checkpoints.reading_checkpoint).
  """
  assert proc.returncode == 2, proc.stderr[-3000:]
  stderr = proc.stderr
  lines = [x for x in stderr.splitlines() if x.strip()]
  assert len(lines) == 1, stderr[-3000:]
  assert lines[0].startswith(f"{prog}: error:") and needle in lines[0], lines[0]
  return lines[0]

# =========================================================================================
# End of binaries.
# =========================================================================================
