"""Two local processes (jax.distributed, gloo CPU collectives, 2 devices each) train with
the same losses as one process on one device: the multi-host path, on one machine."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np

from memdyn_jax import models
from memdyn_jax import sharding as sharding_lib
from memdyn_jax.train import loop
from memdyn_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HF = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
          max_position_embeddings=64, tie_word_embeddings=False)
CFG = TrainConfig(learning_rate=3e-2, num_epochs=2, global_batch_size=8, micro_batch_size=4,
                  warmup_steps=1, weight_decay=0.01, save_every_steps=2)

# Process 1 lags LAG_S behind process 0 before training (a slow host): longer than the 30 s
# a gloo peer is given to set up a communicator, so training must line processes up first.
LAG_S = 35
_CHILD = textwrap.dedent("""
    import json, sys, time
    import jax
    import numpy as np
    from memdyn_jax import sharding
    from memdyn_jax.train import loop
    from memdyn_jax.train.config import TrainConfig
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    port, pid, out, lag = sys.argv[1], int(sys.argv[2]), sys.argv[3], float(sys.argv[4])
    jax.distributed.initialize(coordinator_address="127.0.0.1:" + port, num_processes=2,
                               process_id=pid)
    assert jax.device_count() == 4 and jax.local_device_count() == 2
    time.sleep(lag * pid)  # after the backends met
    d = np.load(out + "/data.npz")
    data = loop.TrainData(d["input_ids"], d["attention_mask"], d["target_mask"])
    cfg = TrainConfig.from_dict(json.load(open(out + "/cfg.json")))
    mesh = sharding.make_mesh(data=2, fsdp=2)
    r = loop.train(cfg, data, out + "/model", out + "/run", mesh=mesh, progress=False)
    print("RESULT" + json.dumps({"losses": r.losses, "process": pid}), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def make_data():
  rng = np.random.RandomState(0)
  ids = rng.randint(3, 64, (16, 16))
  attn = np.ones((16, 16))
  tgt = np.zeros((16, 16))
  tgt[:, 5:] = 1
  attn[::4, -3:] = 0
  tgt[::4, -3:] = 0
  return loop.TrainData(ids, attn, tgt)


def test_two_processes_match_one(tmp_path):
  cfg = models.from_hf_config(HF)
  models.save_pretrained(models.build_model(cfg, seed=0), cfg, str(tmp_path / "model"))
  data = make_data()
  np.savez(tmp_path / "data.npz", input_ids=data.input_ids, attention_mask=data.attention_mask,
           target_mask=data.target_mask)
  (tmp_path / "cfg.json").write_text(CFG.to_json())
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  port = str(_free_port())
  procs = [subprocess.Popen([sys.executable, "-c", _CHILD, port, str(i), str(tmp_path),
                             str(LAG_S)],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for i in range(2)]
  outs = []
  try:
    for p in procs:
      out, err = p.communicate(timeout=400)
      assert p.returncode == 0, err[-4000:]
      outs.append(out)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  results = [json.loads([x for x in o.splitlines() if x.startswith("RESULT")][-1][6:])
             for o in outs]
  one = loop.train(CFG, data, str(tmp_path / "model"), str(tmp_path / "single"),
                   mesh=sharding_lib.make_mesh(devices=jax.devices()[:1]), progress=False)
  for r in results:
    np.testing.assert_allclose(r["losses"], one.losses, rtol=0, atol=1e-5)
  from memdyn_jax.train import checkpoints
  assert checkpoints.list_steps(str(tmp_path / "run")) == [2, 4]
