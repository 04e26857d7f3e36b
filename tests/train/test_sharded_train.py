"""1 device vs 8 forced host devices (data x fsdp x tensor = 2x2x2): same losses, and a
checkpoint written on 8 devices restores onto 1. Runs in a subprocess so XLA_FLAGS is set
before JAX initialises."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from flax import nnx
    from memdyn_jax.train import checkpoints
    from memdyn_jax import models, sharding
    from memdyn_jax.train import loop
    from memdyn_jax.train.config import TrainConfig
    assert jax.device_count() == 8, jax.devices()
    out = sys.argv[1]
    hf = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=64, tie_word_embeddings=False)
    mcfg = models.from_hf_config(hf)
    models.save_pretrained(models.build_model(mcfg, seed=0), mcfg, out + "/model")
    rng = np.random.RandomState(0)
    ids = rng.randint(3, 64, (16, 16)); attn = np.ones((16, 16)); tgt = np.zeros((16, 16))
    tgt[:, 5:] = 1; attn[::4, -3:] = 0; tgt[::4, -3:] = 0
    data = loop.TrainData(ids, attn, tgt)
    cfg = TrainConfig(learning_rate=3e-2, num_epochs=2, global_batch_size=8, micro_batch_size=4,
                      warmup_steps=1, weight_decay=0.01, max_grad_norm=1.0)
    one = sharding.make_mesh(devices=jax.devices()[:1])
    eight = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    r1 = loop.train(cfg, data, out + "/model", out + "/one", mesh=one, progress=False)
    r8 = loop.train(cfg, data, out + "/model", out + "/eight", mesh=eight, progress=False)
    shardings = {".".join(map(str, k)): str(v[...].sharding.spec)
                 for k, v in nnx.to_flat_state(nnx.state(r8.model, nnx.Param))}
    restored, _ = checkpoints.restore(out + "/eight", mesh=one)
    p1 = {".".join(map(str, k)): np.asarray(v[...]) for k, v in
          nnx.to_flat_state(nnx.state(r1.model, nnx.Param))}
    pr = {".".join(map(str, k)): np.asarray(v[...]) for k, v in
          nnx.to_flat_state(nnx.state(restored, nnx.Param))}
    diff = max(float(np.abs(p1[k] - pr[k]).max()) for k in p1)
    print("RESULT" + json.dumps({"one": r1.losses, "eight": r8.losses, "param_diff": diff,
                                 "shardings": shardings}))
""")


def test_one_vs_eight_devices_same_losses(tmp_path):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT")][-1]
  res = json.loads(line[len("RESULT"):])
  np.testing.assert_allclose(res["eight"], res["one"], rtol=0, atol=1e-5)
  assert res["param_diff"] < 1e-4
  # Parameters really were split over fsdp / tensor on the 8-device mesh.
  assert "fsdp" in res["shardings"]["blocks.mlp.up_proj.kernel"]
  assert "tensor" in res["shardings"]["blocks.mlp.up_proj.kernel"]
