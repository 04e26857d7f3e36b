"""One module per model family, each declaring `FAMILY = registry.Family(...)`: its HF
model types, HF config translator, weight-key map, NNX model and tiny test configs.

`memdyn_jax.models.registry` imports every public module here on its first look-up, so a
new family is a new module here (and its test); see the registry's docstring.
"""
