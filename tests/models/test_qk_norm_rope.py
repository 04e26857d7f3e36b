"""The pieces Qwen3, OLMo 2 and Gemma 3 share through `layers` and `ModelConfig`: RMSNorm
styles (against HF's own norm modules, in bfloat16 where they differ), q/k norms per head or
per projection (parameters, logical axes), per-layer RoPE as data, and the config fields
these families do not implement. Logit parity is tests/models/test_parity.py's."""
import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from memdyn_jax import models, testing
from memdyn_jax.models import layers
from memdyn_jax.models.config import LayerRope
from memdyn_jax.plan import programs


def _hf_norm(style, dim):
  from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
  from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
  from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
  hf_norms = {"cast_then_scale": Qwen3RMSNorm, "scale_then_cast": Olmo2RMSNorm,
              "one_plus_scale": Gemma3RMSNorm}
  return hf_norms[style](dim, eps=1e-6)


@pytest.mark.parametrize("style", ["cast_then_scale", "scale_then_cast", "one_plus_scale"])
@pytest.mark.parametrize("shape", [(16,), (4, 16)])  # per head; a whole 4-head projection
def test_rms_norm_styles_are_hfs_norms_in_bfloat16(style, shape):
  """Each style casts where its HF module does: in bfloat16 the three differ, and each
  matches its own module (up to float32 rounding that flips a last bf16 bit)."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5) + shape).astype(np.float32) * 3
  weight = rng.normal(size=shape).astype(np.float32)
  axes = ("norm",) if len(shape) == 1 else ("heads", "head_dim")
  ours = layers.rms_norm(style, shape, 1e-6, axes=axes, param_dtype=jnp.bfloat16)
  ours.scale[...] = jnp.asarray(weight, jnp.bfloat16)
  out = np.asarray(ours(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32))
  dim = int(np.prod(shape))
  hf = _hf_norm(style, dim).to(torch.bfloat16)
  with torch.no_grad():
    hf.weight.copy_(torch.tensor(weight.reshape(-1)))
    ref = hf(torch.tensor(x.reshape(2, 5, dim)).to(torch.bfloat16)).float().numpy()
  ref = ref.reshape(out.shape)
  assert out.dtype == np.float32 and ours(jnp.asarray(x, jnp.bfloat16)).dtype == jnp.bfloat16
  np.testing.assert_allclose(out, ref, rtol=2**-7, atol=1e-6)  # one bf16 ulp
  assert (out == ref).mean() > 0.97
  if style != "one_plus_scale":  # Llama's and OLMo 2's casts differ: the other style misses
    other_style = "scale_then_cast" if style == "cast_then_scale" else "cast_then_scale"
    other = layers.rms_norm(other_style, shape, 1e-6, axes=axes, param_dtype=jnp.bfloat16)
    other.scale[...] = ours.scale[...]
    missed = np.asarray(other(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)) != ref
    assert missed.mean() > 0.05


def test_rms_norm_style_is_checked():
  with pytest.raises(ValueError, match="style 'rms'"):
    layers.rms_norm("rms", 8, 1e-6)
  with pytest.raises(ValueError, match="qk_norm 'layer'"):
    layers.Attention(16, 2, 2, 8, qkv_bias=False, out_bias=False, qk_norm="layer")


@pytest.mark.parametrize("name,qk_norm,style,q_norm,k_norm", [
    ("llama", "none", "cast_then_scale", None, None),
    # one (head_dim,) weight per layer, shared by the heads
    ("qwen3", "head", "cast_then_scale", ((2, 16), ("layers", "norm")), ((2, 16), ("layers", "norm"))),
    ("qwen3_moe", "head", "cast_then_scale", ((2, 16), ("layers", "norm")),
     ((2, 16), ("layers", "norm"))),
    # over the whole projection: sharded like it (heads over the tensor axis)
    ("olmo2", "projection", "scale_then_cast", ((2, 4, 12), ("layers", "heads", "head_dim")),
     ((2, 2, 12), ("layers", "kv_heads", "head_dim"))),
    ("gemma3_text", "head", "one_plus_scale", ((6, 16), ("layers", "norm")),
     ((6, 16), ("layers", "norm"))),
])
def test_qk_norm_parameters_per_head_and_per_projection(name, qk_norm, style, q_norm, k_norm):
  cfg = models.from_hf_config(testing.hf_config(name).to_dict())
  assert (cfg.qk_norm, cfg.qk_norm_style) == (qk_norm, style)
  state = nnx.state(models.abstract_model(cfg), nnx.Param)
  found = {".".join(map(str, path)): (tuple(var.shape), tuple(var.get_metadata()["logical_axes"]))
           for path, var in nnx.to_flat_state(state)}
  assert found.get("blocks.self_attn.q_norm.scale") == q_norm
  assert found.get("blocks.self_attn.k_norm.scale") == k_norm


def test_gemma3_layer_types_give_per_layer_windows_and_ropes():
  cfg = models.from_hf_config(testing.hf_config("gemma3_text").to_dict())
  assert cfg.layer_windows == (5, 5, 5, 5, 5, 0)  # 5 local : 1 global
  local, glob = LayerRope(20.0, False, True), LayerRope(10000.0, True, True)
  assert cfg.rope_layers() == (local,) * 5 + (glob,)
  assert (cfg.rope_type, cfg.rope) == ("linear", {"factor": 4.0})
  assert cfg.attn_scale == 24 ** -0.5
  # The planner's 1- and 2-layer variants keep the per-layer data of their layers.
  two = programs.layer_variant(cfg, 2)
  assert two.layer_windows == (5, 5) and two.rope_layers() == (local,) * 2
  with pytest.raises(ValueError, match="layer_rope_thetas"):
    dataclasses.replace(cfg, num_layers=7).rope_layers()


def test_per_layer_ropes_change_the_logits():
  """Giving every layer the global RoPE (or the local one) changes Gemma 3's logits: the
  per-layer RoPE the parity test checks is not a no-op at its sequence lengths."""
  cfg = models.from_hf_config(testing.hf_config("gemma3_text").to_dict())
  model = models.build_model(cfg, seed=2)
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, 2, 13, (0, 4))
  ref = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  for thetas, scaled in (((10000.0,) * 6, (True,) * 6), ((20.0,) * 6, (False,) * 6)):
    other = models.build_model(dataclasses.replace(cfg, layer_rope_thetas=thetas,
                                                   layer_rope_scaled=scaled))
    nnx.update(other, nnx.state(model))
    out = np.asarray(other(jnp.asarray(ids), jnp.asarray(mask)))
    assert np.abs(out - ref)[mask.astype(bool)].max() > 1e-2


@pytest.mark.parametrize("name,overrides,field", [
    ("gemma3_text", dict(use_bidirectional_attention=True), "use_bidirectional_attention"),
    ("gemma3_text", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                       "original_max_position_embeddings": 64}), "rope_type"),
    ("gemma3_text", dict(rope_parameters={
        "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10.0},
        "full_attention": {"rope_type": "default", "rope_theta": 1e4}}),
     "rope_parameters.sliding_attention.rope_type"),
    ("qwen3", dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    ("qwen3", dict(hidden_act="relu"), "hidden_act"),
    ("olmo2", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                 "original_max_position_embeddings": 64}), "rope_type"),
])
def test_unsupported_config_fields_name_the_field(name, overrides, field):
  cfg = dict(testing.TINY_CONFIGS[name], model_type=name, **overrides)
  with pytest.raises(ValueError, match=field):
    models.from_hf_config(cfg)


def test_hf_layer_types_are_checked_and_give_the_windows():
  import types

  from memdyn_jax.models import config

  hf = types.SimpleNamespace(num_hidden_layers=3, sliding_window=4,
                             layer_types=["sliding_attention", "full_attention",
                                          "sliding_attention"])
  assert config.windows_of_layer_types(hf) == (4, 0, 4)
  assert config.windows_of_layer_types(types.SimpleNamespace(
      **{**vars(hf), "sliding_window": None})) == (0, 0, 0)  # HF's "sliding off"
  with pytest.raises(ValueError, match="layer_types.*names 2 layers, not num_hidden_layers = 3"):
    config.layer_types(types.SimpleNamespace(**{**vars(hf), "layer_types": ["full_attention"] * 2}))
  with pytest.raises(ValueError, match="'chunked_attention' is not supported"):
    config.layer_types(types.SimpleNamespace(
        **{**vars(hf), "layer_types": ["full_attention", "chunked_attention", "full_attention"]}))
