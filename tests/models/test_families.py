"""Model families are registered, not wired in: a family declared in one place (here, a test)
is read, built, loaded and saved by the generic machinery with no other module touched.

The family used is HF's `iquestcoder`: a model type of its own whose config subclasses
Llama's and whose model *is* `LlamaForCausalLM`, so it is an alias of an existing block and
HF PyTorch is still the reference.
"""
import dataclasses
import json
import os
import re
import sys
import textwrap

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from memdyn_jax import models, testing
from memdyn_jax.models import families as families_package
from memdyn_jax.models import registry
from memdyn_jax.models.families import llama

ALIAS = "iquestcoder"
TINY = dict(vocab_size=211, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, head_dim=8,
            max_position_embeddings=128, tie_word_embeddings=False)


def alias_family() -> registry.Family:
  """HF's `iquestcoder` read as Llama: Llama's config reader, key map and model."""
  return registry.Family(name=ALIAS, model_types={ALIAS: "LlamaForCausalLM"},
                         config_fields=llama.llama_fields, key_rules=llama.key_rules,
                         model_class=llama.LlamaForCausalLM, tiny_configs={ALIAS: TINY})


@pytest.fixture
def registered():
  family = registry.register(alias_family())
  yield family
  registry.unregister(family.name)


def test_the_alias_is_unsupported_until_registered():
  with pytest.raises(ValueError, match=f"'model_type' = '{ALIAS}' is not supported"):
    models.from_hf_config(dict(TINY, model_type=ALIAS))
  assert ALIAS not in testing.TINY_CONFIGS


def test_a_family_registered_in_a_test_loads_matches_hf_and_saves(registered, tmp_path):
  assert ALIAS in registry.supported_model_types() and ALIAS in testing.TINY_CONFIGS
  hf = testing.make_hf_model(testing.hf_config(ALIAS), seed=1)
  assert type(hf) is transformers.LlamaForCausalLM
  hf.save_pretrained(tmp_path / "src")
  model, cfg = models.from_pretrained(str(tmp_path / "src"))
  assert (cfg.family, cfg.model_type) == (ALIAS, ALIAS)
  assert isinstance(model, llama.LlamaForCausalLM)

  ids, mask, positions = testing.left_padded_batch(cfg.vocab_size, 3, 11, (0, 3, 7))
  with torch.no_grad():
    ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
             position_ids=torch.tensor(positions, dtype=torch.long)).logits.numpy()
  ours = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
  assert np.abs(ours - ref)[mask.astype(bool)].max() <= 1e-4

  out = str(tmp_path / "out")
  models.save_pretrained(model, cfg, out)
  written = json.load(open(os.path.join(out, "config.json")))
  assert written["model_type"] == ALIAS and written["architectures"] == ["LlamaForCausalLM"]
  back = transformers.AutoModelForCausalLM.from_pretrained(out).state_dict()
  for k, v in hf.state_dict().items():
    torch.testing.assert_close(back[k], v, rtol=0, atol=0, msg=k)
  assert models.from_pretrained(out)[1] == cfg


def test_unregistering_removes_the_family_everywhere():
  registry.register(alias_family())
  assert models.from_hf_config(dict(TINY, model_type=ALIAS)).family == ALIAS
  registry.unregister(ALIAS)
  with pytest.raises(ValueError, match="is not supported"):
    models.from_hf_config(dict(TINY, model_type=ALIAS))
  assert ALIAS not in testing.TINY_CONFIGS and ALIAS not in registry.families()


@pytest.mark.parametrize("change,taken", [
    (dict(name="llama"), "name 'llama'"),
    (dict(model_types={"qwen2": "Qwen2ForCausalLM"}), "model_type 'qwen2' (family 'llama')"),
    (dict(tiny_configs={"gemma2": dict(model_type=ALIAS)}), "tiny config 'gemma2'"),
])
def test_a_name_taken_by_another_family_is_refused(change, taken):
  family = dataclasses.replace(alias_family(), **change)
  with pytest.raises(ValueError, match="already registered: " + re.escape(taken)):
    registry.register(family)
  assert ALIAS not in registry.supported_model_types()


def test_a_tiny_config_of_a_model_type_the_family_does_not_read_is_refused():
  bad = dataclasses.replace(alias_family(), tiny_configs={"x": TINY})
  with pytest.raises(ValueError, match=r"tiny configs \['x'\]"):
    registry.register(bad)


def _fresh_registry(monkeypatch, extra_dir):
  """The registry as before its first look-up, with `extra_dir` on the families' path."""
  monkeypatch.setattr(families_package, "__path__", [*families_package.__path__, str(extra_dir)])
  for table in ("_FAMILIES", "_BY_MODEL_TYPE", "_TINY"):
    monkeypatch.setattr(registry, table, {})
  monkeypatch.setattr(registry, "_discovered", False)


def _write_family_module(directory, module, text):
  (directory / f"{module}.py").write_text(textwrap.dedent(text))
  return f"{families_package.__name__}.{module}"


ALIAS_MODULE = f"""
    from memdyn_jax.models.families import llama
    from memdyn_jax.models.registry import Family

    FAMILY = Family(name={ALIAS!r}, model_types={{{ALIAS!r}: "LlamaForCausalLM"}},
                    config_fields=llama.llama_fields, key_rules=llama.key_rules,
                    model_class=llama.LlamaForCausalLM)
"""


def test_a_new_module_in_the_families_package_is_a_new_family(monkeypatch, tmp_path):
  """Adding the module is all it takes: the first look-up finds it beside the built-ins."""
  _fresh_registry(monkeypatch, tmp_path)
  name = _write_family_module(tmp_path, "alias_family", ALIAS_MODULE)
  try:
    cfg = models.from_hf_config(dict(TINY, model_type=ALIAS))
    assert cfg.family == ALIAS
    assert {"llama", "gemma2", "gpt_neo", ALIAS} <= set(registry.families())
    assert models.num_params(cfg) > 0
  finally:
    sys.modules.pop(name, None)


def test_two_modules_claiming_one_model_type_fail_every_look_up(monkeypatch, tmp_path):
  _fresh_registry(monkeypatch, tmp_path)
  name = _write_family_module(tmp_path, "another_llama", ALIAS_MODULE.replace(ALIAS, "llama"))
  try:
    for _ in range(2):  # not only the first: a half-registered table would answer the second
      with pytest.raises(ValueError, match="model_type 'llama'"):
        registry.supported_model_types()
  finally:
    sys.modules.pop(name, None)


def test_a_module_without_a_family_is_named(monkeypatch, tmp_path):
  _fresh_registry(monkeypatch, tmp_path)
  name = _write_family_module(tmp_path, "not_a_family", "X = 1\n")
  try:
    with pytest.raises(TypeError, match="not_a_family declares no `FAMILY"):
      registry.families()
  finally:
    sys.modules.pop(name, None)
