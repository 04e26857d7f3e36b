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
  result = {"max_diff": diff, "placements": placements, "shard_model_same": same}
  if cfg.is_moe:
    result.update(_moe_paths(single, sharded, mesh, ids_s, mask_s, ids, mask))
  print(json.dumps(result))


def _moe_paths(single, sharded, mesh, ids_s, mask_s, ids, mask):
  """A mixture of experts' sorted dispatch (`ragged`: per device in a shard_map) on the mesh
  against the dense experts on one device: logits, and the gradient of a loss with the
  load-balancing term (the shard_map's transpose) for every parameter."""
  from memdyn_jax.models import moe

  def loss(model, ids, mask):
    logits, stats = model.logits_and_router_stats(ids, mask)
    real = mask.astype(jnp.float32)[..., None]
    return (jnp.sum(jnp.tanh(logits) * real) / jnp.sum(real)
            + 0.1 * moe.load_balancing_loss(stats, model.cfg.num_experts))

  moe.set_moe_impl(single, "dense")
  ref_logits = np.asarray(single(jnp.asarray(ids), jnp.asarray(mask)))
  ref_grads = nnx.grad(loss)(single, jnp.asarray(ids), jnp.asarray(mask))
  moe.set_moe_impl(sharded, "ragged")
  graphdef, state = nnx.split(sharded)

  @jax.jit
  def logits_and_grads(state, ids, mask):
    model = nnx.merge(graphdef, state)
    return model(ids, mask), nnx.grad(loss)(model, ids, mask)

  with jax.set_mesh(mesh):
    logits, grads = logits_and_grads(state, ids_s, mask_s)
    hlo = jax.jit(logits_and_grads).lower(state, ids_s, mask_s).as_text()
  real = mask.astype(bool)
  grad_diff = max(float(np.abs(np.asarray(a[...]) - np.asarray(b[...])).max())
                  for (_, a), (_, b) in zip(nnx.to_flat_state(ref_grads), nnx.to_flat_state(grads)))
  return {"ragged_max_diff": float(np.abs(np.asarray(logits) - ref_logits)[real].max()),
          "ragged_grad_max_diff": grad_diff,
          "experts_in_shard_map": "sdy.manual_computation" in hlo}


if __name__ == "__main__":
  main(sys.argv[1])
