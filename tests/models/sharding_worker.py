"""Run in a subprocess with 8 forced host devices (XLA flags must precede jax's start)."""
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from memdyn_jax import models, sharding, testing


def main(checkpoint_dir: str):
  assert jax.device_count() == 8, jax.devices()
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  single, cfg = models.from_pretrained(checkpoint_dir)
  sharded, _ = models.from_pretrained(checkpoint_dir, mesh=mesh)
  placements = {}
  for path, var in nnx.to_flat_state(nnx.state(sharded)):
    key = ".".join(map(str, path))
    axes = var.get_metadata()["logical_axes"]
    want = sharding.logical_to_spec(axes, shape=var[...].shape, mesh=mesh)
    got = var[...].sharding.spec
    assert tuple(got) == tuple(want), (key, got, want)
    placements[key] = [list(a) if isinstance(a, tuple) else a for a in got]
  ids, mask, _ = testing.left_padded_batch(cfg.vocab_size, 4, 12, (0, 3, 5, 0))
  ref = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))
  batch = sharding.batch_sharding(mesh)
  ids_s = jax.device_put(jnp.asarray(ids), batch)
  mask_s = jax.device_put(jnp.asarray(mask), batch)
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def forward(state, ids, mask):
    return nnx.merge(graphdef, state)(ids, mask)

  with jax.set_mesh(mesh):
    out = forward(state, ids_s, mask_s)
  diff = float(np.abs(np.asarray(out) - ref)[mask.astype(bool)].max())
  # shard_model on an existing model gives the same placements
  moved = sharding.shard_model(single, mesh)
  same = all(
      tuple(a[...].sharding.spec) == tuple(b[...].sharding.spec)
      for (_, a), (_, b) in zip(nnx.to_flat_state(nnx.state(moved)), nnx.to_flat_state(nnx.state(sharded))))
  print(json.dumps({"max_diff": diff, "placements": placements, "shard_model_same": same}))


if __name__ == "__main__":
  main(sys.argv[1])
