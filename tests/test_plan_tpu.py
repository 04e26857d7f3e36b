"""The study's programs through the real TPU compiler (libtpu, deviceless, on this CPU
machine): a tiny model's train step compiles with the splash kernel, the scorer and the
sampler compile, memory and the compiler's time estimate are reported; slice names map to
topologies; a TPU lowering failure would fail here."""
from __future__ import annotations

import json
import os

import pytest

from memdyn_jax import models, plan
from memdyn_jax.models import flops as flops_lib
from memdyn_jax.plan import study

from conftest import assert_one_line_error, run_binary

needs_libtpu = pytest.mark.skipif(not plan.tpu_compiler_available(),
                                  reason="libtpu (the TPU compiler) is not installed")

# Every dimension splits over 4 chips; 256-token sequences are two splash tiles.
TINY = dict(model_type="llama", vocab_size=512, hidden_size=256, intermediate_size=512,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024, tie_word_embeddings=False)


def tiny_config(**overrides):
  return models.from_hf_config({**TINY, **overrides})


# ----------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name,chips,topology", [
    ("v5p-8", 4, "v5p:2x2x1"), ("v5p-16", 8, "v5p:2x2x2"), ("v5p-64", 32, "v5p:2x4x4"),
    ("v5p-128", 64, "v5p:4x4x4"), ("v4-8", 4, "v4:2x2x1"), ("v5e-1", 1, "v5e:1x1"),
    ("v5e-4", 4, "v5e:2x2"), ("v5e-8", 8, "v5e:2x4"), ("v5e-16", 16, "v5e:4x4"),
    ("v5litepod-32", 32, "v5e:4x8"), ("v6e-256", 256, "v6e:16x16"), ("h100-8", 8, None),
])
def test_slice_names_map_to_chips_and_topologies(name, chips, topology):
  target = plan.parse_target(name)
  assert target.num_chips == chips and target.topology == topology
  assert target.name == name.replace("v5litepod", "v5e")


@pytest.mark.parametrize("name,needle", [
    ("v5p-6", "does not come in slices of 3"), ("v5e-2", "does not come in slices of 2"),
    ("v5p-7", "TensorCores per chip"), ("v7x-8", "is not a target"), ("v5p", "is not a target"),
])
def test_bad_targets_are_named(name, needle):
  with pytest.raises(plan.TargetError, match=needle) as e:
    plan.parse_target(name)
  assert e.value.field == "target"


def test_missing_libtpu_is_one_line_with_the_install_command(monkeypatch):
  from memdyn_jax.plan import chips
  monkeypatch.setattr(chips, "tpu_compiler_available", lambda: False)
  with pytest.raises(plan.TargetError, match=r'pip install "jax\[tpu\]=='):
    chips.target_devices(plan.parse_target("v5p-8"))


def test_depth_extrapolation_is_linear_in_layers():
  one = plan.programs.Cost(10.0, 100.0, 1.0)
  two = plan.programs.Cost(16.0, 150.0, 1.5)
  assert plan.programs.depth_extrapolated(one, two, 32) == plan.programs.Cost(196.0, 1650.0,
                                                                             16.5)
  assert plan.programs.depth_extrapolated(one, two, 1) == one
  assert plan.programs.depth_extrapolated(one, plan.programs.Cost(16.0, 150.0, None),
                                          4).seconds is None


# ----------------------------------------------------------------------------- XLA:TPU


@needs_libtpu
def test_target_platform_is_the_mesh_in_scopes_not_the_default_backend():
  import jax
  from memdyn_jax import sharding

  mesh = sharding.make_mesh(1, 4, 1, devices=plan.target_devices(plan.parse_target("v5e-4")))
  assert sharding.target_platform() == jax.default_backend() == "cpu"
  with jax.set_mesh(mesh):
    assert sharding.target_platform() == "tpu"


@needs_libtpu
def test_loading_the_tpu_compiler_leaves_the_environment_as_it_was():
  """libtpu is told a fake TPU host for its load only: a subprocess started after a plan (a
  training binary) must not see one, or it would start jax.distributed."""
  before = dict(os.environ)
  plan.target_devices(plan.parse_target("v5p-8"))
  assert dict(os.environ) == before


@needs_libtpu
def test_moe_experts_compile_to_ragged_dots_for_tpu():
  """On a TPU mesh "auto" takes the sorted dispatch: per device in a shard_map, grouped
  matmuls that XLA:TPU compiles as ragged dots, forward and backward (the gradient of a
  loss with the load-balancing term)."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  from memdyn_jax import sharding, testing
  from memdyn_jax.models import moe

  cfg = models.from_hf_config(testing.hf_config("qwen3_moe", vocab_size=256))
  mesh = sharding.make_mesh(1, 4, 1, devices=plan.target_devices(plan.parse_target("v5e-4")))
  graphdef, state = nnx.split(nnx.eval_shape(lambda: models.build_model(cfg,
                                                                         dtype=jnp.bfloat16)))
  state = plan.programs.abstract_state(state, mesh, sharding.DEFAULT_RULES)
  tokens = jax.ShapeDtypeStruct((8, 128), jnp.int32, sharding=sharding.batch_sharding(mesh))

  def loss(state, ids, mask):
    logits, stats = nnx.merge(graphdef, state).logits_and_router_stats(ids, mask)
    return jnp.mean(logits) + moe.load_balancing_loss(stats, cfg.num_experts)

  with jax.set_mesh(mesh):
    lowered = jax.jit(jax.grad(loss)).lower(state, tokens, tokens)
    text = lowered.compile().as_text()
  assert lowered.as_text().count("sdy.manual_computation") >= 2  # a shard_map per layer
  assert "ragged-dot" in text


@pytest.fixture(scope="module")
def tpu_plan():
  """The tiny model's train step (remat, 2 micro-batches), scorer and sampler for v5e-4."""
  if not plan.tpu_compiler_available():
    pytest.skip("libtpu (the TPU compiler) is not installed")
  return plan.plan_scale(tiny_config(), None, 8, 256, remat="full", micro_batch=4,
                         target="v5e-4", sampling=True, scoring=True, sample_batch=8,
                         prompt_len=128, max_new_tokens=64, score_batch=8,
                         samples_per_prompt=2)


@needs_libtpu
def test_train_step_compiles_for_tpu_with_splash_and_reports_memory(tpu_plan):
  r = tpu_plan
  assert r.platform == "tpu" and r.target == "v5e-4" and r.devices == 4
  assert r.train.platform == "tpu"
  # Splash forward and its two backward kernels (dq, dkv), in every layer's loop body.
  assert r.train.mosaic_calls >= 3 and r.train.attention_path.startswith("splash")
  assert r.train.argument_bytes >= r.param_bytes + r.optimizer_bytes
  assert r.train.temp_bytes > 0 and r.train.code_bytes > 0
  assert {c.kind for c in r.train.collectives} >= {"all-gather"}  # fsdp gathers weights
  assert "compiled by XLA:TPU" in r.summary() and "splash" in r.summary()


@needs_libtpu
def test_scorer_and_sampler_compile_for_tpu(tpu_plan):
  r = tpu_plan
  assert r.score.mosaic_calls > 0  # teacher-forced forward: splash, as the model picks on TPU
  assert r.prefill.mosaic_calls > 0  # the prompt attends over its own keys: splash
  assert r.decode.mosaic_calls == 0  # one query token: XLA's attention
  for prog in (r.score, r.prefill, r.decode):
    assert prog.total_bytes > 0 and prog.estimated_seconds > 0 and prog.flops > 0


@needs_libtpu
def test_cost_estimates_count_every_layer_and_micro_batch(tpu_plan):
  r = tpu_plan
  cfg = tiny_config()
  # The compiler's FLOPs cover the model's matmuls (splash kernels are opaque to it, remat
  # adds a forward): between the model FLOPs less attention and twice them, per chip.
  dense = (flops_lib.train_flops(cfg, 8, 256)
           - 3 * 8 * flops_lib.attention_flops(cfg, 256 * 257 / 2)) / 4
  assert 0.9 * dense < r.train.flops < 2 * dense
  # A decode call's figures are one loop iteration: one token for each of the 16 rows.
  step = 16 * (flops_lib.decoder_flops_per_token(cfg) + flops_lib.lm_head_flops_per_token(cfg)
               + flops_lib.attention_flops(cfg, 192)) / 4
  assert 0.8 * step < r.decode.flops < 1.5 * step
  assert r.step_seconds > 0 and 0 < r.mfu < 1
  assert r.tokens_per_second_per_chip == pytest.approx(8 * 256 / (r.step_seconds * 4))
  d = r.to_dict()
  assert d["train"]["attention_path"].startswith("splash") and d["mfu"] == r.mfu


@needs_libtpu
def test_more_layers_cost_more_under_remat(tpu_plan):
  """Under remat the layers are a loop, whose body XLA's cost analysis counts once: the
  depth extrapolation is what makes 4 layers cost about twice 2."""
  four = plan.plan_scale(tiny_config(num_hidden_layers=4), None, 8, 256, remat="full",
                         micro_batch=4, target="v5e-4", sampling=False)
  assert 1.6 < four.train.flops / tpu_plan.train.flops < 2.2
  assert four.step_seconds > 1.3 * tpu_plan.step_seconds


@needs_libtpu
def test_study_cost_of_a_paper_grid(tpu_plan):
  a = study.StudyAssumptions(train_examples=512, test_examples=64, train_len=256,
                             prompt_len=128, max_new_tokens=64, samples_per_prompt=2,
                             eval_train_examples=32, sample_batch=8, score_batch=8,
                             micro_batch=4, include_base=True)
  cost = study.study_cost(tiny_config(), "kang_llama3_gsm8k", "v5e-4", a,
                          plan=_with_batch(tpu_plan, 128))
  assert len(cost.runs) == 13
  first = cost.runs[0]  # lr 5e-5, 6 epochs, full: 512 * 6 / 128 = 24 steps, 6 checkpoints
  assert (first.steps, first.checkpoints) == (24, 6)
  assert first.train_seconds == pytest.approx(24 * tpu_plan.step_seconds)
  per_call = tpu_plan.prefill.estimated_seconds + 64 * tpu_plan.decode.estimated_seconds
  assert cost.sample_call_seconds == pytest.approx(per_call)
  prompts = 32 + 64  # 12 sampling and 12 scoring calls per checkpoint
  assert first.eval_seconds == pytest.approx(6 * (12 * per_call + 12 * cost.score_call_seconds))
  quarter = cost.runs[-1]  # 12 epochs of a quarter: the steps of 3 full epochs
  assert quarter.steps == 12 and quarter.checkpoints == 12
  assert cost.total_chip_hours == pytest.approx(cost.train_chip_hours + cost.eval_chip_hours)
  text = cost.markdown()
  assert "| **total** | " in text and "decoded in full" in text and str(prompts - 64) in text
  with pytest.raises(plan.TargetError, match="TPU"):
    study.study_cost(tiny_config(), "kang_llama3_gsm8k", "h100-8", a)


def _with_batch(report, global_batch):
  """The tiny plan relabelled to the paper grid's batch (its step time is the tiny one's)."""
  import dataclasses
  return dataclasses.replace(report, global_batch=global_batch)


def test_lengths_from_data_take_the_quantile_rounded_up_to_the_tile(gsm8k_dir, tokenizer_bos):
  import numpy as np
  from memdyn_jax.tasks import base

  task = base.get_task("gsm8k")
  lengths = study.lengths_from_data(task, tokenizer_bos, str(gsm8k_dir), quantile=0.5)
  examples = task.load("train", str(gsm8k_dir))
  prompts = [len(tokenizer_bos(task.format_prompt(e.question))["input_ids"]) for e in examples]
  assert lengths["examples"] == len(examples)
  assert lengths["prompt"]["quantile"] == pytest.approx(float(np.median(prompts)))
  assert lengths["prompt_len"] == study.round_up(np.median(prompts))
  assert lengths["prompt_len"] % 128 == 0 and lengths["train_len"] >= lengths["prompt_len"]
  assert study.round_up(1) == 128 and study.round_up(128) == 128 and study.round_up(129) == 256


# ----------------------------------------------------------------------------- the binary


@needs_libtpu
def test_binary_plans_a_tpu_target(tmp_path):
  config = tmp_path / "config.json"
  config.write_text(json.dumps(TINY))
  out = tmp_path / "plan.json"
  proc = run_binary("plan_scale.py", f"--model={config}", "--target=v5e-4", "--global_batch=8",
                    "--seq_len=256", "--micro_batch=8", "--nosampling", "--noscoring",
                    f"--json_out={out}", timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "compiled by XLA:TPU" in proc.stdout and "attention: splash" in proc.stdout
  assert "tokens/s/chip, MFU" in proc.stdout
  report = json.loads(out.read_text())
  assert report["platform"] == "tpu" and report["train"]["mosaic_calls"] > 0


@pytest.mark.parametrize("args,needle", [
    (["--target=v5p-6"], "--target: v5p does not come in slices of 3 chips"),
    (["--target=tpu9"], "--target: 'tpu9' is not a target"),
    (["--target=v5p-8", "--mesh=1,8,1"], "--mesh: mesh 1,8,1 has 8 devices; v5p-8 has 4"),
    (["--paper_grid=kang_llama3_gsm8k"], "--paper_grid needs --target"),
    (["--target=v5p-8", "--paper_grid=nope"], "--paper_grid: 'nope' is not one of"),
])
def test_binary_bad_targets_are_one_line(args, needle):
  assert_one_line_error(run_binary("plan_scale.py", *args), "plan_scale.py", needle)


@needs_libtpu
def test_a_program_too_big_for_the_chip_is_reported_not_raised():
  """XLA:TPU refuses to compile a program that cannot fit HBM; the plan says so (its stated
  requirement as the temporaries) instead of failing, and a search moves on."""
  # 1.2B parameters on one 16 GB v5e chip: fp32 weights, Adam moments and gradients.
  big = tiny_config(vocab_size=131072, hidden_size=4096, intermediate_size=8192,
                    num_hidden_layers=1, num_attention_heads=32, num_key_value_heads=8)
  r = plan.plan_scale(big, None, 1, 128, remat="none", target="v5e-1", sampling=False,
                      estimate=False)
  assert r.train.out_of_memory and "memory" in r.train.out_of_memory.lower()
  assert r.train.temp_bytes > 15 * 2**30 and not r.fits
  assert "the compiler refused it" in r.summary() and "DOES NOT FIT" in r.summary()


def test_out_of_memory_message_is_parsed():
  from memdyn_jax.plan import programs

  class FakeMesh:
    class devices:  # noqa: N801 - stands in for a numpy array of devices
      class flat:  # noqa: N801
        def __class_getitem__(cls, i):
          return type("D", (), {"platform": "tpu"})()
  message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (19.34G) exceeds available HBM (15.75G).\nmore")
  r = programs._out_of_memory_report("train_step", FakeMesh, message, 1.0)
  assert r.temp_bytes == int(19.34 * 2**30) and r.out_of_memory.startswith("RESOURCE")
