"""memdyn_jax.hub: where the Hugging Face Hub does not answer, Hub ids fail at once in one
line (no retries), naming the local alternative. No network is used: the endpoint is a
closed loopback port."""
from __future__ import annotations

import pytest

from memdyn_jax import hub

from conftest import assert_one_line_error, run_binary

CLOSED_PORT = "http://127.0.0.1:9"  # loopback "discard" port: nothing listens here


@pytest.fixture
def unreachable_hub(monkeypatch):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "ENDPOINT", CLOSED_PORT)
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
  monkeypatch.setattr(hub, "_probed", {})


def test_offline_mode_only_inside_the_block_where_the_hub_does_not_answer(unreachable_hub):
  from huggingface_hub import constants
  with hub.offline_unless_reachable() as reason:
    assert "cannot be reached" in reason and CLOSED_PORT in reason
    assert constants.HF_HUB_OFFLINE is True
  assert constants.HF_HUB_OFFLINE is False
  assert hub.offline_reason() == reason  # probed once per process and endpoint


def test_hf_hub_offline_is_honoured_without_a_probe(monkeypatch):
  from huggingface_hub import constants
  monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
  monkeypatch.setattr(hub, "_probed", {})
  assert "HF_HUB_OFFLINE" in hub.offline_reason() and hub._probed == {}


def test_hub_ids_fail_at_once_in_one_line_when_the_hub_does_not_answer(tmp_path):
  """The walk's commands without network: a Hub model id, and GSM8K without --task_path
  (was 22 doubled retry warnings over 26 s before the line)."""
  import concurrent.futures
  cache = tmp_path / "hf"  # an empty cache: nothing can be loaded from it
  env = {"HF_ENDPOINT": CLOSED_PORT, "HF_HUB_OFFLINE": "0", "HF_HOME": str(cache),
         "HF_HUB_CACHE": str(cache / "hub"), "HF_DATASETS_CACHE": str(cache / "datasets")}
  model = ("train.py", "--model=HuggingFaceTB/SmolLM2-135M", "--task=synthetic_arith",
           f"--output_dir={tmp_path / 'a'}")
  data = ("train.py", "--model=embedded", "--task=gsm8k", f"--output_dir={tmp_path / 'b'}")
  with concurrent.futures.ThreadPoolExecutor(2) as pool:
    procs = list(pool.map(lambda args: run_binary(*args, env=env), (model, data)))
  line = assert_one_line_error(procs[0], "train.py", "--model: 'HuggingFaceTB/SmolLM2-135M'")
  assert "Hub id" in line and "cannot be reached" in line and "local model directory" in line
  line = assert_one_line_error(procs[1], "train.py", "--task: cannot load openai/gsm8k")
  assert "cannot be reached" in line and "--task_path" in line
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
