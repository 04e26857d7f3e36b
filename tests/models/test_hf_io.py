"""HF checkpoint round trips and bad-input errors."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from memdyn_jax import models, testing
from memdyn_jax.models import hf_io


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma2", "gpt_neo", "qwen3",
                                  "qwen3_tied_sliding", "olmo2", "gemma3_text", "smollm3",
                                  "phi3", "phi3_longrope", "qwen3_moe"])
def test_round_trip_transformers_loads_identical_tensors(name, tmp_path):
  src = testing.save_tiny_hf_model(name, str(tmp_path / "src"), seed=3)
  model, cfg = models.from_pretrained(src)
  out = str(tmp_path / "out")
  models.save_pretrained(model, cfg, out)
  a = transformers.AutoModelForCausalLM.from_pretrained(src).state_dict()
  b = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
  assert sorted(a) == sorted(b)
  for k in a:
    torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
  # and back into JAX: identical parameters
  again, cfg2 = models.from_pretrained(out)
  assert cfg2 == cfg
  from flax import nnx
  for (p1, v1), (p2, v2) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(again))):
    assert p1 == p2
    np.testing.assert_array_equal(np.asarray(v1[...]), np.asarray(v2[...]))


@pytest.mark.parametrize("name", ["llama", "qwen3", "olmo2", "gemma3_text", "phi3",
                                  "qwen3_moe"])
def test_sharded_checkpoint_round_trip(name, tmp_path):
  """Saved in several shards and streamed back shard by shard: HF reads the same tensors,
  and the reloaded model computes the same logits (phi3: fused HF tensors; qwen3_moe: one
  HF tensor per layer and expert)."""
  src = testing.save_tiny_hf_model(name, str(tmp_path / "src"))
  model, cfg = models.from_pretrained(src)
  out = str(tmp_path / "sharded")
  models.save_pretrained(model, cfg, out, max_shard_bytes=40_000)
  index = json.load(open(os.path.join(out, "model.safetensors.index.json")))
  assert len(set(index["weight_map"].values())) > 2
  hf = transformers.AutoModelForCausalLM.from_pretrained(out)
  ref = transformers.AutoModelForCausalLM.from_pretrained(src)
  for k, v in ref.state_dict().items():
    torch.testing.assert_close(hf.state_dict()[k], v, rtol=0, atol=0)
  again, _ = models.from_pretrained(out)
  ids = jnp.arange(10)[None] % cfg.vocab_size
  np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(again(ids)))


def test_bf16_checkpoint_loads_and_saves(tmp_path):
  src = testing.save_tiny_hf_model("llama", str(tmp_path / "src"))
  hf = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16)
  hf.save_pretrained(tmp_path / "bf16")
  model, cfg = models.from_pretrained(str(tmp_path / "bf16"), dtype=jnp.bfloat16)
  assert model.embedding[...].dtype == jnp.bfloat16
  models.save_pretrained(model, cfg, str(tmp_path / "bf16_out"))
  back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "bf16_out")
  for k, v in hf.state_dict().items():
    torch.testing.assert_close(back.state_dict()[k].to(torch.bfloat16), v, rtol=0, atol=0)


def _write_config(path, **cfg):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg, f)


def test_unknown_architecture_is_a_clear_error(tmp_path):
  _write_config(tmp_path, model_type="bert", hidden_size=8)
  with pytest.raises(ValueError, match="model_type.*bert"):
    models.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("overrides,field", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
     "rope_type"),
    (dict(sliding_window=16), "sliding_window"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(num_key_value_heads=4), "num_key_value_heads"),
])
def test_unsupported_config_fields_name_the_field(overrides, field):
  cfg = dict(testing.TINY_CONFIGS["llama"], model_type="llama", **overrides)
  with pytest.raises(ValueError, match=field):
    models.from_hf_config(cfg)


def test_smollm3_reads_which_layers_rotate():
  """HF's rule (a NoPE layer every `no_rope_layer_interval`, or `no_rope_layers` as given);
  SmolLM3-3B's config carries `pretraining_tp` = 2, which HF's SmolLM3 does not read."""
  tiny = dict(testing.TINY_CONFIGS["smollm3"], model_type="smollm3", num_hidden_layers=8)
  cfg = models.from_hf_config(dict(tiny, no_rope_layer_interval=4, pretraining_tp=2))
  assert cfg.layer_uses_rope == (True, True, True, False) * 2
  cfg = models.from_hf_config(dict(tiny, no_rope_layers=[0, 1] * 5))  # HF allows a longer list
  assert cfg.layer_uses_rope == (False, True) * 4
  with pytest.raises(ValueError, match="no_rope_layers"):  # (HF fails itself without layer_types)
    models.from_hf_config(dict(tiny, no_rope_layers=[1, 0], layer_types=["full_attention"] * 8))


def test_missing_shard_and_corrupt_file_are_clear_errors(tmp_path):
  src = testing.save_tiny_hf_model("llama", str(tmp_path / "src"))
  model, cfg = models.from_pretrained(src)
  out = tmp_path / "sharded"
  models.save_pretrained(model, cfg, str(out), max_shard_bytes=40_000)
  shards = sorted(p for p in os.listdir(out) if p.endswith(".safetensors"))
  os.remove(out / shards[1])
  with pytest.raises(FileNotFoundError, match=shards[1]):
    models.from_pretrained(str(out))
  # a truncated single-file checkpoint
  single = tmp_path / "single"
  models.save_pretrained(model, cfg, str(single))
  data = (single / "model.safetensors").read_bytes()
  (single / "model.safetensors").write_bytes(data[: len(data) // 2])
  with pytest.raises(ValueError, match="model.safetensors"):
    models.from_pretrained(str(single))
  # no weights at all
  _write_config(tmp_path / "empty", **dict(testing.TINY_CONFIGS["llama"], model_type="llama"))
  with pytest.raises(FileNotFoundError, match="safetensors"):
    models.from_pretrained(str(tmp_path / "empty"))


def test_missing_tensor_is_named(tmp_path):
  src = testing.save_tiny_hf_model("llama", str(tmp_path / "src"))
  reader = hf_io.SafetensorsFile(os.path.join(src, "model.safetensors"))
  tensors = [(k, np.array(reader.get(k))) for k in reader.keys() if "layers.1.mlp.up_proj" not in k]
  hf_io.write_safetensors(os.path.join(src, "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
    models.from_pretrained(src)


def test_fused_tensors_split_into_our_projections_by_rows(tmp_path):
  """Phi-3's qkv_proj / gate_up_proj are our q/k/v and gate/up kernels, row blocks in order
  (saving re-fuses them: the round trips above); a fused tensor of another size is a clear
  error, not a silent mis-split."""
  src = testing.save_tiny_hf_model("phi3", str(tmp_path / "src"))
  model, cfg = models.from_pretrained(src)
  reader = hf_io.SafetensorsFile(os.path.join(src, "model.safetensors"))
  qkv = np.array(reader.get("model.layers.1.self_attn.qkv_proj.weight"))
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  attn = model.blocks.self_attn
  for x, rows in (("q", slice(0, q)), ("k", slice(q, q + kv)), ("v", slice(q + kv, None))):
    kernel = np.asarray(getattr(attn, f"{x}_proj").kernel[...][1])  # (hidden, heads, head_dim)
    np.testing.assert_array_equal(kernel.reshape(cfg.hidden_size, -1), qkv[rows].T)
  gate_up = np.array(reader.get("model.layers.0.mlp.gate_up_proj.weight"))
  np.testing.assert_array_equal(np.asarray(model.blocks.mlp.up_proj.kernel[...][0]),
                                gate_up[cfg.intermediate_size:].T)
  tensors = [(k, np.array(reader.get(k))) for k in reader.keys()]
  tensors = [(k, v[:-2] if k == "model.layers.1.self_attn.qkv_proj.weight" else v)
             for k, v in tensors]
  hf_io.write_safetensors(os.path.join(src, "model.safetensors"), tensors)
  with pytest.raises(ValueError, match=r"layers\.1\.self_attn\.qkv_proj\.weight: 78 rows, but "
                                       r"the config fuses 48 \+ 16 \+ 16"):
    models.from_pretrained(src)


def test_load_tokenizer_sets_pad_and_left_padding(tmp_path):
  from tokenizers import Tokenizer, models as tok_models, pre_tokenizers
  tok = Tokenizer(tok_models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2, "b": 3}, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
  fast.save_pretrained(tmp_path)
  loaded = models.load_tokenizer(str(tmp_path))
  assert loaded.pad_token == "</s>" and loaded.padding_side == "left"
  batch = loaded(["a b a", "b"], padding=True)
  assert batch["attention_mask"][1] == [0, 0, 1]
