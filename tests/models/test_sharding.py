"""Parameters land where the logical-axis rules say, and sharded logits equal one device's."""
import json
import os
import subprocess
import sys

import pytest
from jax.sharding import PartitionSpec as P

from memdyn_jax import sharding, testing


def _run_worker(checkpoint_dir):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  worker = os.path.join(os.path.dirname(__file__), "sharding_worker.py")
  proc = subprocess.run([sys.executable, worker, checkpoint_dir], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", ["llama", "gemma2", "olmo2", "phi3"])  # phi3: fused HF tensors
def test_2x2x2_mesh_places_params_by_rules_and_matches_one_device(name, tmp_path):
  src = testing.save_tiny_hf_model(name, str(tmp_path / name), num_key_value_heads=2,
                                   vocab_size=212)  # even: the vocab axis splits over tensor=2
  result = _run_worker(src)
  assert result["max_diff"] <= 1e-5
  assert result["shard_model_same"]
  placed = result["placements"]
  # spot checks of the rules table: vocab->tensor, embed->fsdp, heads->tensor, layers unsharded
  assert placed["embedding"] == ["tensor", "fsdp"]
  assert placed["blocks.self_attn.q_proj.kernel"] == [None, "fsdp", "tensor", None]
  assert placed["blocks.mlp.down_proj.kernel"] == [None, "tensor", "fsdp"]
  if name == "olmo2":  # q/k norms over the whole projection: split over heads like it
    assert placed["blocks.self_attn.q_norm.scale"] == [None, "tensor", None]
    assert placed["blocks.self_attn.k_norm.scale"] == [None, "tensor", None]


def test_logical_to_spec_rules():
  assert sharding.logical_to_spec(("batch", "length")) == P(("data", "fsdp"), None)
  assert sharding.logical_to_spec(("layers", "embed", "mlp")) == P(None, "fsdp", "tensor")
  # experts over fsdp take it from embed (one mesh axis per spec)
  assert (sharding.logical_to_spec(("layers", "expert", "embed", "mlp"))
          == P(None, "fsdp", None, "tensor"))
  with pytest.raises(ValueError, match="no sharding rule"):
    sharding.logical_to_spec(("nonsense",))


def test_make_mesh_validates_sizes():
  import jax
  n = jax.device_count()
  mesh = sharding.make_mesh()
  assert mesh.shape == {"data": n, "fsdp": 1, "tensor": 1}
  with pytest.raises(ValueError, match="at most one"):
    sharding.make_mesh(data=-1, fsdp=-1)
  with pytest.raises(ValueError, match="needs"):
    sharding.make_mesh(data=n + 1)


def test_initialize_distributed_is_noop_for_one_process(monkeypatch):
  for k in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "TPU_WORKER_HOSTNAMES",
            "MEGASCALE_COORDINATOR_ADDRESS"):
    monkeypatch.delenv(k, raising=False)
  assert sharding.initialize_distributed() is False


def test_moe_shards_by_expert_and_dispatches_per_device(tmp_path):
  """qwen3_moe on the 2x2x2 mesh: expert weights split by expert over fsdp and by width over
  tensor, the router's expert axis whole; the sorted (ragged_dot) dispatch runs per device in
  a shard_map and gives the dense experts' logits and gradients of one device."""
  src = testing.save_tiny_hf_model("qwen3_moe", str(tmp_path / "moe"), vocab_size=212)
  result = _run_worker(src)
  assert result["max_diff"] <= 1e-5 and result["shard_model_same"]
  placed = result["placements"]
  assert placed["blocks.mlp.gate_proj"] == [None, "fsdp", None, "tensor"]
  assert placed["blocks.mlp.up_proj"] == [None, "fsdp", None, "tensor"]
  assert placed["blocks.mlp.down_proj"] == [None, "fsdp", "tensor", None]
  assert placed["blocks.mlp.router.kernel"] == [None, "fsdp", None]
  assert result["experts_in_shard_map"]
  assert result["ragged_max_diff"] <= 1e-5
  assert result["ragged_grad_max_diff"] <= 1e-5
