"""Shared pytest fixtures. Each section belongs to one area; add new sections below."""
from __future__ import annotations

import os
import pathlib

import pytest

REPO_ROOT = pathlib.Path(__file__).resolve().parent.parent

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
