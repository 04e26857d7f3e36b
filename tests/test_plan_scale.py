"""Pod-scale planning: compiled plans on 8 fake devices report exact parameter bytes,
remat lowers temporaries, impossible plans do not fit; HLO collective parsing; presets."""
import json
import os
import subprocess
import sys

import pytest

from memdyn_jax import models, plan
from memdyn_jax.models import presets as model_presets

_ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
_HERE = os.path.dirname(__file__)
_ROOT = os.path.dirname(_HERE)
# Optimizer-state scalars: Adam's step count + the schedule's (count, peak, warmup, decay).
SCALAR_STATE_BYTES = 4 + 4 * 4
# The worker's model (tests/plan_scale_worker.py SMALL): llama, V=512, E=128, I=256, L=3,
# 4 heads x 32, 2 KV heads.
V, E, I, L, H, K, D = 512, 128, 256, 3, 4, 2, 32


@pytest.fixture(scope="module")
def plans():
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "plan_scale_worker.py")], env=_ENV,
                        capture_output=True, text=True, timeout=900, cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parameter_bytes_are_analytic_count_over_shards(plans):
  r = plans["params"]
  sharded = V * E * 2 + L * (E * H * D + 2 * E * K * D + H * D * E + 3 * E * I)
  replicated = L * 2 * E + E  # norm scales: the rules replicate the `norm` axis
  assert r["num_params"] == sharded + replicated
  assert r["param_bytes"] == 4 * (sharded // 8 + replicated)
  # Adam mu and nu, plus replicated scalars: Adam's int32 step count and the schedule
  # state (int32 step count, float32 peak LR, warmup and decay steps)
  assert r["optimizer_bytes"] == 2 * r["param_bytes"] + SCALAR_STATE_BYTES
  # The compiled step's arguments hold exactly the state and batch we counted.
  assert r["train"]["argument_bytes"] == r["param_bytes"] + r["optimizer_bytes"] + r["batch_bytes"]
  assert r["train"]["alias_bytes"] > 0.9 * (r["param_bytes"] + r["optimizer_bytes"])  # donated
  assert r["total_bytes"] == (r["train"]["argument_bytes"] + r["train"]["output_bytes"]
                              - r["train"]["alias_bytes"] + r["train"]["temp_bytes"])
  assert r["fits"] and r["devices"] == 8
  kinds = {c["kind"] for c in r["train"]["collectives"]}
  assert "all-gather" in kinds and "all-reduce" in kinds  # fsdp gathers weights, sums grads
  assert all(c["executions"] >= c["ops"] for c in r["train"]["collectives"])
  assert r["prefill"]["total_bytes"] > 0 and r["decode"]["total_bytes"] > 0
  assert "FITS v5e" in plans["params_summary"]


def test_remat_reduces_temporaries(plans):
  none, full = plans["remat_none"], plans["remat_full"]
  assert full["train"]["temp_bytes"] < 0.7 * none["train"]["temp_bytes"]
  assert full["param_bytes"] == none["param_bytes"]


def test_model_keeps_activations_batch_sharded_on_fsdp(plans):
  # Unpinned, GSPMD would let the embed-on-fsdp weight sharding win and keep the whole
  # micro-batch on every device (weight-stationary). The model's own `constrain_batch`
  # makes the step FSDP proper, so the external pin changes nothing.
  assert plans["remat_full"]["pin_activations"] and not plans["params"]["pin_activations"]
  assert plans["params"]["train"]["temp_bytes"] == plans["remat_full"]["train"]["temp_bytes"]


def test_8b_full_finetune_on_one_16gb_chip_does_not_fit(plans):
  r = plans["impossible"]
  published = model_presets.PUBLISHED_NUM_PARAMS["llama3-8b"]
  assert r["num_params"] == published
  assert r["param_bytes"] == 4 * published  # fp32 master weights, unsharded
  assert r["optimizer_bytes"] == 8 * published + SCALAR_STATE_BYTES
  assert not r["fits"] and r["total_bytes"] > 12 * published
  assert "DOES NOT FIT v5e" in plans["impossible_summary"]
  assert "GiB per device" in plans["impossible_summary"]


def test_gpu_target_without_the_cuda_plugin_plans_on_fake_cpu_devices(plans):
  r = plans["gpu_target"]
  assert (r["target"], r["accelerator"], r["platform"]) == ("h100-8", "h100", "cpu")
  assert r["mesh_shape"] == [1, 8, 1] and r["step_seconds"] is None and r["mfu"] is None
  assert "8 fake CPU devices" in plans["gpu_target_summary"]
  assert "FITS h100 (80 GB" in plans["gpu_target_summary"]


def test_cheapest_fitting_search(plans):
  huge = plans["search"]["huge"]
  assert huge["report"]["devices"] == 1 and huge["report"]["remat"] == "none"
  assert huge["report"]["fits"] and huge["report"]["accelerator"] == "huge"
  assert huge["cell"].startswith("1 chips, fsdp=1, remat=none, micro-batch 1")
  speck = plans["search"]["speck"]
  assert speck["report"] is None and speck["cell"] == "does not fit in the searched space"
  assert speck["tried"] and all(b is None for *_, b in speck["tried"])  # nothing compiled


_HLO = """\
HloModule m

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%inner_body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%p), index=1
  %ar = f32[8]{0} all-reduce(%x), channel_id=1, replica_groups={{0,1}}, to_apply=%add
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[8]{0}) tuple(%i, %ar)
}

%outer_body (q: (s32[], f32[8])) -> (s32[], f32[8]) {
  %q = (s32[], f32[8]{0}) parameter(0)
  %w = (s32[], f32[8]{0}) while(%q), condition=%cond, body=%inner_body, backend_config={"known_trip_count":{"n":"3"}}
  %y = f32[8]{0} get-tuple-element(%w), index=1
  %ag = bf16[2,16]{1,0} all-gather(%z), channel_id=2, dimensions={0}
  %z = bf16[1,16]{1,0} constant({...})
  ROOT %u = (s32[], f32[8]{0}) tuple(%j, %y)
}

ENTRY %main (arg: f32[8]) -> f32[8] {
  %arg = f32[8]{0} parameter(0)
  %w2 = (s32[], f32[8]{0}) while(%init), condition=%cond2, body=%outer_body, backend_config={"known_trip_count":{"n":"4"}}
  %cp = f32[8]{0} collective-permute(%arg), channel_id=3, source_target_pairs={{0,1}}
  %pair = (f32[8]{0}, f32[8]{0}) all-reduce(%arg, %cp), channel_id=4, to_apply=%add
  ROOT %r = f32[8]{0} get-tuple-element(%pair), index=0
}
"""


def test_hlo_collectives_counts_loop_executions_and_operand_bytes():
  got = {c.kind: c for c in plan.hlo_collectives(_HLO)}
  assert set(got) == {"all-reduce", "all-gather", "collective-permute"}
  ar = got["all-reduce"]
  assert ar.ops == 2 and ar.executions == 4 * 3 + 1  # nested loops multiply
  assert ar.operand_bytes == 32 + 64 and ar.largest_operand_bytes == 64
  assert ar.bytes_per_call == 12 * 32 + 64
  ag = got["all-gather"]
  assert (ag.ops, ag.executions, ag.operand_bytes) == (1, 4, 32)  # operand bf16[1,16]
  assert got["collective-permute"].bytes_per_call == 32
  assert plan.hlo_collectives("no module here") == ()


def test_presets_match_published_parameter_counts():
  for name in model_presets.preset_names():
    assert (models.num_params(model_presets.preset_config(name))
            == model_presets.PUBLISHED_NUM_PARAMS[name])
  gemma = model_presets.preset_config("gemma2-9b")
  assert gemma.attn_logit_softcap == 50.0 and gemma.final_logit_softcap == 30.0
  assert set(gemma.layer_windows) == {0, 4096}
  assert set(model_presets.preset_config("qwen2.5-7b").layer_windows) == {0}  # no sliding
  qwen3 = model_presets.preset_config("qwen3-8b")
  assert (qwen3.qk_norm, set(qwen3.layer_windows), qwen3.tie_word_embeddings) == (
      "head", {0}, False)
  gemma3 = model_presets.preset_config("gemma3-12b")
  assert gemma3.layer_windows == ((1024,) * 5 + (0,)) * 8  # 5 local : 1 global
  assert {(r.theta, r.scaled) for r in gemma3.rope_layers()} == {(10000.0, False), (1e6, True)}
  assert (gemma3.rope_type, gemma3.rope, gemma3.attn_logit_softcap) == (
      "linear", {"factor": 8.0}, 0.0)
  assert model_presets.preset_config("olmo2-7b").qk_norm == "projection"
  hf = model_presets.preset_hf_config("llama3-8b")
  hf["vocab_size"] = 1  # a copy: the preset is unchanged
  assert model_presets.preset_hf_config("llama3-8b")["vocab_size"] == 128256
  with pytest.raises(ValueError, match="unknown model preset"):
    model_presets.preset_config("llama-9000")


NEW_PRESETS = ("qwen3-8b", "gemma3-12b", "olmo2-7b")


def test_plan_scale_compiles_the_qk_norm_presets():
  """`plan_scale --model=<preset>` for the families with q/k norms and per-layer RoPE: the
  train step compiles at full size on 8 fake devices, parameters sharded over fsdp."""
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "plan_scale_worker.py"),
                         "presets", *NEW_PRESETS], env=_ENV, capture_output=True, text=True,
                        timeout=900, cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  plans = json.loads(proc.stdout.strip().splitlines()[-1])
  for name in NEW_PRESETS:
    r = plans[name]
    assert r["num_params"] == model_presets.PUBLISHED_NUM_PARAMS[name], name
    # float32 master weights over 8 devices (norm scales, replicated, add a little)
    assert 4 * r["num_params"] / 8 <= r["param_bytes"] < 1.01 * 4 * r["num_params"] / 8
    assert r["total_bytes"] > 3 * r["param_bytes"] and r["fits"], (name, r)


def test_moe_preset_counts_total_and_active_parameters_and_flops():
  """Qwen3-30B-A3B: the card's "30.5B in total and 3.3B activated"; its model FLOPs per token
  are those of the activated matmul weights (8 of 128 experts, the router, attention)."""
  import math

  from memdyn_jax.models import flops, registry
  from memdyn_jax.train import loss as loss_lib

  cfg = model_presets.preset_config("qwen3-30b-a3b")
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
          cfg.norm_topk_prob, cfg.qk_norm) == (128, 8, 768, True, "head")
  total, active = models.num_params(cfg), registry.num_active_params(cfg)
  assert total == model_presets.PUBLISHED_NUM_PARAMS["qwen3-30b-a3b"]
  assert round(total / 1e9, 1) == 30.5 and 3.3e9 <= active < 3.4e9
  norms = sum(math.prod(shape) for path, shape in models.param_shapes(cfg).items()
              if "norm" in path)
  embeddings = 2 * cfg.vocab_size * cfg.hidden_size  # untied: embedding and LM head
  assert flops.decoder_flops_per_token(cfg) == 2 * (active - embeddings - norms)
  # HF adds the load-balancing loss only with output_router_logits, false in its config
  assert loss_lib.router_aux_coefficient("hf", cfg) == 0.0
  assert loss_lib.router_aux_coefficient("on", cfg) == 0.001


def test_plan_scale_compiles_the_moe_preset():
  """`plan_scale --model=qwen3-30b-a3b`: the train step compiles at full size on 8 fake
  devices (the CPU's dense experts; test_plan_tpu compiles the TPU's ragged dots), every
  weight, the experts included, split 8 ways."""
  proc = subprocess.run([sys.executable, os.path.join(_HERE, "plan_scale_worker.py"),
                         "presets", "qwen3-30b-a3b"], env=_ENV, capture_output=True, text=True,
                        timeout=900, cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(proc.stdout.strip().splitlines()[-1])["qwen3-30b-a3b"]
  n = model_presets.PUBLISHED_NUM_PARAMS["qwen3-30b-a3b"]
  assert r["num_params"] == n
  assert 4 * n / 8 <= r["param_bytes"] < 1.01 * 4 * n / 8
  assert r["total_bytes"] > 3 * r["param_bytes"] and r["fits"], r


def test_lever_space_and_lower_bound():
  cfg = model_presets.preset_config("llama3-8b")
  n = models.num_params(cfg)
  assert plan.state_lower_bound(cfg, (1, 8, 1), "mixed") == int(n * 16 / 8)
  assert plan.state_lower_bound(cfg, (1, 4, 2), "bf16") == int(n * 10 / 8)
  assert plan.state_lower_bound(cfg, (2, 4, 1), "mixed") == int(n * 16 / 4)  # data replicates
  ladders = plan.candidate_space(4, 16, tensor_options=(1, 2), remats=("none", "full"))
  first = ladders[0]
  assert [c.micro_batch for c in first] == [4, 8, 16]
  assert first[0].mesh_shape == (1, 4, 1) and first[0].remat == "none"
  assert [(l[0].remat, l[0].mesh_shape) for l in ladders] == [
      ("none", (1, 4, 1)), ("none", (1, 2, 2)), ("full", (1, 4, 1)), ("full", (1, 2, 2))]
  assert plan.candidate_space(3, 16) == []  # 16 rows do not split over 3 devices
  assert plan.format_bytes(3 * 2**30) == "3.00 GiB" and plan.format_bytes(5) == "5 B"


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown accelerator"):
    plan.plan_scale("llama3-8b", (1, 1, 1), accelerator="a100")
  with pytest.raises(ValueError, match="xla_force_host_platform_device_count=4096"):
    plan.plan_scale("gpt-neo-2.7b", (1, 4096, 1), accelerator="v5e")


def test_cli_prints_a_plan(tmp_path):
  cfg = tmp_path / "config.json"
  cfg.write_text(json.dumps(dict(model_type="gpt_neo", vocab_size=256, hidden_size=64,
                                 num_layers=2, num_heads=4, max_position_embeddings=128,
                                 attention_types=[[["global", "local"], 1]], window_size=8)))
  out = tmp_path / "plan.json"
  proc = subprocess.run(
      [sys.executable, os.path.join(_ROOT, "experiments", "plan_scale.py"), f"--model={cfg}",
       "--mesh=2,2,1", "--global_batch=8", "--seq_len=32", "--accelerator=h100",
       "--nosampling", f"--json_out={out}"],
      env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=600,
      cwd=_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "FITS h100" in proc.stdout
  report = json.loads(out.read_text())
  assert report["mesh_shape"] == [2, 2, 1] and report["devices"] == 4 and report["fits"]
