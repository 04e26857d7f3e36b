"""The pieces Qwen3, OLMo 2 and Gemma 3 share through `layers` and `ModelConfig`: RMSNorm
styles (against HF's own norm modules, in bfloat16 where they differ), q/k norms per head or
per projection (parameters, logical axes), per-layer RoPE as data, and the config fields
these families do not implement. Logit parity is tests/models/test_parity.py's."""
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from memdyn_jax import models, testing
from memdyn_jax.models import layers


def _hf_norm(style, dim):
  from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
  from transformers.models.olmo2.modeling_olmo2 import Olmo2RMSNorm
  from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm
  return {"llama": Qwen3RMSNorm, "olmo": Olmo2RMSNorm, "gemma": Gemma3RMSNorm}[style](
      dim, eps=1e-6)


@pytest.mark.parametrize("style", ["llama", "olmo", "gemma"])
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
  if style != "gemma":  # Llama's and OLMo 2's casts differ: the other style misses
    other = layers.rms_norm("olmo" if style == "llama" else "llama", shape, 1e-6, axes=axes,
                            param_dtype=jnp.bfloat16)
    other.scale[...] = ours.scale[...]
    missed = np.asarray(other(jnp.asarray(x, jnp.bfloat16)).astype(jnp.float32)) != ref
    assert missed.mean() > 0.05


def test_rms_norm_style_is_checked():
  with pytest.raises(ValueError, match="style 'rms'"):
    layers.rms_norm("rms", 8, 1e-6)
  with pytest.raises(ValueError, match="qk_norm 'layer'"):
    layers.Attention(16, 2, 2, 8, qkv_bias=False, out_bias=False, qk_norm="layer")


@pytest.mark.parametrize("name,qk_norm,style,q_norm,k_norm", [
    ("llama", "none", "llama", None, None),
    # one (head_dim,) weight per layer, shared by the heads
    ("qwen3", "head", "llama", ((2, 16), ("layers", "norm")), ((2, 16), ("layers", "norm"))),
    # over the whole projection: sharded like it (heads over the tensor axis)
    ("olmo2", "projection", "olmo", ((2, 4, 12), ("layers", "heads", "head_dim")),
     ((2, 2, 12), ("layers", "kv_heads", "head_dim"))),
])
def test_qk_norm_parameters_per_head_and_per_projection(name, qk_norm, style, q_norm, k_norm):
  cfg = models.from_hf_config(testing.hf_config(name).to_dict())
  assert (cfg.qk_norm, cfg.qk_norm_style) == (qk_norm, style)
  state = nnx.state(models.abstract_model(cfg), nnx.Param)
  found = {".".join(map(str, path)): (tuple(var.shape), tuple(var.get_metadata()["logical_axes"]))
           for path, var in nnx.to_flat_state(state)}
  assert found.get("blocks.self_attn.q_norm.scale") == q_norm
  assert found.get("blocks.self_attn.k_norm.scale") == k_norm


@pytest.mark.parametrize("name,overrides,field", [
    ("qwen3", dict(layer_types=["full_attention", "chunked_attention"]), "layer_types"),
    ("qwen3", dict(hidden_act="relu"), "hidden_act"),
    ("olmo2", dict(rope_scaling={"rope_type": "yarn", "factor": 2.0,
                                 "original_max_position_embeddings": 64}), "rope_type"),
])
def test_unsupported_config_fields_name_the_field(name, overrides, field):
  cfg = dict(testing.TINY_CONFIGS[name], model_type=name, **overrides)
  with pytest.raises(ValueError, match=field):
    models.from_hf_config(cfg)
