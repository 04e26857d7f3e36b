"""The training loop end to end: memorization, checkpoints, exact resume after SIGKILL,
NaN guard, SIGTERM, config-change refusal, LoRA and MBC integration."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from flax import nnx

from memdyn_jax.train import checkpoints
from memdyn_jax import models
from memdyn_jax.train import lora as lora_lib
from memdyn_jax.train import loop
from memdyn_jax.train.config import TrainConfig

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = dict(model_type="llama", vocab_size=64, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, tie_word_embeddings=False)
BASE_CFG = TrainConfig(learning_rate=3e-2, num_epochs=4, global_batch_size=8, micro_batch_size=4,
                       warmup_steps=1, schedule="linear", max_grad_norm=1.0,
                       save_every_steps=2, weight_decay=0.01)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("tiny_llama"))
  cfg = models.from_hf_config(TINY)
  models.save_pretrained(models.build_model(cfg, seed=0), cfg, out)
  return out


def make_data(n=16, t=16, seed=0) -> loop.TrainData:
  rng = np.random.RandomState(seed)
  ids = rng.randint(3, 64, (n, t))
  attn = np.ones((n, t))
  tgt = np.zeros((n, t))
  tgt[:, 6:] = 1
  attn[::3, -2:] = 0  # some right padding
  tgt[::3, -2:] = 0
  return loop.TrainData(ids, attn, tgt)


def flat_params(model, wrt=nnx.Param):
  return {".".join(map(str, k)): np.asarray(v[...]) for k, v in
          nnx.to_flat_state(nnx.state(model, wrt))}


def test_train_data_validates():
  with pytest.raises(ValueError, match="target_mask"):
    loop.TrainData(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 4)))
  a, b = make_data(), make_data(seed=1)
  assert a.fingerprint() == make_data().fingerprint() != b.fingerprint()


def test_batch_length_multiple_cuts_shared_padding_without_changing_training(model_dir, tmp_path):
  rng = np.random.RandomState(0)
  n, t = 16, 24
  lengths = rng.randint(8, 17, n)  # every row ends by column 16: columns 16-23 are padding
  attn = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  tgt = attn.copy()
  tgt[:, :4] = 0
  data = loop.TrainData(rng.randint(3, 64, (n, t)) * attn, attn, tgt)
  rows = data.rows(np.arange(4), length_multiple=8)
  assert rows["input_ids"].shape[1] == 8 * -(-int(lengths[:4].max()) // 8)
  assert data.rows(np.arange(4), length_multiple=100)["input_ids"].shape[1] == t  # capped
  cfg = BASE_CFG.replace(num_epochs=2, save_every_steps=0)
  full = loop.train(cfg, data, model_dir, str(tmp_path / "full"), progress=False)
  cut = loop.train(cfg.replace(batch_length_multiple=8), data, model_dir, str(tmp_path / "cut"),
                   progress=False)
  np.testing.assert_allclose(cut.losses, full.losses, rtol=1e-5)
  a, b = flat_params(full.model), flat_params(cut.model)
  for k in a:
    np.testing.assert_allclose(b[k], a[k], atol=1e-5)


def test_train_memorizes_checkpoints_and_restores(model_dir, tmp_path):
  run = str(tmp_path / "run")
  result = loop.train(BASE_CFG.replace(save_every_steps=3), make_data(), model_dir, run,
                      progress=False)
  assert (result.step, result.total_steps, result.preempted) == (8, 8, False)
  assert result.losses[-1] < 0.85 * result.losses[0]  # memorization itself: test_loss_step
  assert checkpoints.list_steps(run) == [3, 6, 8]
  lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in lines] == list(range(1, 9))
  assert {"epoch", "loss", "lr", "grad_norm", "tokens_per_s", "examples_seen"} <= set(lines[0])
  assert lines[-1]["epoch"] == 4.0 and lines[-1]["examples_seen"] == 64
  assert os.listdir(os.path.join(run, "tensorboard"))
  model, meta = checkpoints.restore(run)
  assert meta["step"] == 8 and meta["examples_seen"] == 64 and sum(meta["draw_counts"]) == 64
  got, want = flat_params(model), flat_params(result.model)
  assert got.keys() == want.keys()
  for k in got:
    np.testing.assert_array_equal(got[k], want[k])
  early, meta3 = checkpoints.restore(run, step=3)
  assert meta3["epoch"] == 1.5
  assert not np.array_equal(flat_params(early)["embedding"], want["embedding"])
  # Same run again: already complete, nothing to do.
  again = loop.train(BASE_CFG.replace(save_every_steps=3), make_data(), model_dir, run,
                     progress=False)
  assert again.step == 8 and again.losses == ()
  with pytest.raises(loop.RunExistsError):
    loop.train(BASE_CFG.replace(save_every_steps=3), make_data(), model_dir, run,
               progress=False, resume=False)


def test_epoch_fraction_schedule_and_changed_config(model_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(save_every_steps=0, save_every_epochs=0.75, num_epochs=2)
  loop.train(cfg, make_data(), model_dir, run, progress=False)
  # 0.5 epoch per step: 0.75-epoch marks fall in steps 2 (1.0) and 3 (1.5); 4 is the end.
  assert checkpoints.list_steps(run) == [2, 3, 4]
  with pytest.raises(checkpoints.RunMismatchError, match="learning_rate"):
    loop.train(cfg.replace(learning_rate=5e-3), make_data(), model_dir, run, progress=False)
  with pytest.raises(checkpoints.RunMismatchError, match="fingerprint"):
    loop.train(cfg, make_data(seed=3), model_dir, run, progress=False)


def test_a_run_written_before_a_config_field_existed_resumes(model_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(num_epochs=1)
  loop.train(cfg, make_data(), model_dir, run, progress=False)
  path = os.path.join(run, checkpoints.RUN_INFO)
  info = json.load(open(path))
  del info["config"]["checkpoints_to_save"]  # as a run.json of an earlier version
  json.dump(info, open(path, "w"))
  assert loop.train(cfg, make_data(), model_dir, run, progress=False).step == 2  # resumed
  with pytest.raises(checkpoints.RunMismatchError, match="checkpoints_to_save"):
    loop.train(cfg.replace(checkpoints_to_save=1), make_data(), model_dir, run,
               progress=False)


def test_checkpoints_to_save_keeps_the_spread_that_evaluation_reads(model_dir, tmp_path):
  from memdyn_jax.train.config import checkpoint_steps, spread_steps
  run = str(tmp_path / "run")
  # 2 steps an epoch for 5 epochs, a checkpoint every half epoch: 10 on the cadence.
  cfg = BASE_CFG.replace(save_every_steps=0, save_every_epochs=0.5, num_epochs=5,
                         checkpoints_to_save=3)
  loop.train(cfg, make_data(), model_dir, run, progress=False)
  assert checkpoints.list_steps(run) == spread_steps(range(1, 11), 3) == [4, 7, 10]
  assert checkpoint_steps(cfg, 10, 16) == [4, 7, 10]
  assert checkpoint_steps(cfg.replace(checkpoints_to_save=0), 10, 16) == list(range(1, 11))


_CHILD = textwrap.dedent("""
    import json, os, signal, sys
    import numpy as np
    from memdyn_jax.train import loop
    from memdyn_jax.train.config import TrainConfig
    cfg = TrainConfig.from_dict(json.load(open(sys.argv[1])))
    d = np.load(sys.argv[2])
    data = loop.TrainData(d["input_ids"], d["attention_mask"], d["target_mask"])
    kill_at = int(sys.argv[5])
    def hook(step, record):
      if step == kill_at:  # right after this step's async checkpoint save started
        os.kill(os.getpid(), signal.SIGKILL)
    loop.train(cfg, data, sys.argv[3], sys.argv[4], progress=False, hooks=[hook])
""")


def test_sigkill_then_resume_is_bitwise_exact(model_dir, tmp_path):
  cfg = BASE_CFG.replace(data_fraction=0.75, num_epochs=3)  # 6 steps over a 12-example subset
  data = make_data()
  cfg_path, data_path = tmp_path / "cfg.json", tmp_path / "data.npz"
  cfg_path.write_text(cfg.to_json())
  np.savez(data_path, input_ids=data.input_ids, attention_mask=data.attention_mask,
           target_mask=data.target_mask)
  run = str(tmp_path / "killed")
  child = subprocess.run(
      [sys.executable, "-c", _CHILD, str(cfg_path), str(data_path), model_dir, run, "4"],
      cwd=REPO, capture_output=True, text=True, timeout=300)
  assert child.returncode == -signal.SIGKILL, child.stderr[-3000:]
  saved = checkpoints.list_steps(run)
  assert saved and max(saved) <= 4
  resumed = loop.train(cfg, data, model_dir, run, progress=False)
  assert resumed.step == cfg.total_steps(16) == 5
  assert len(resumed.losses) == 5 - max(saved)
  straight = loop.train(cfg, data, model_dir, str(tmp_path / "straight"), progress=False)
  a, b = flat_params(resumed.model), flat_params(straight.model)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  np.testing.assert_array_equal(resumed.losses, straight.losses[max(saved):])
  lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in lines] == [1, 2, 3, 4, 5]
  assert json.load(open(os.path.join(run, "subset.json")))["data_fraction"] == 0.75


def test_nan_guard_names_step_and_keeps_last_checkpoint(model_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(learning_rate=1e30, schedule="constant", warmup_steps=0,
                         max_grad_norm=0.0, weight_decay=0.0, save_every_steps=1,
                         optimizer="adam")
  with pytest.raises(loop.NonFiniteError, match=r"step (\d+).*last good checkpoint: step"):
    loop.train(cfg, make_data(), model_dir, run, progress=False)
  steps = checkpoints.list_steps(run)
  assert steps
  model, meta = checkpoints.restore(run)
  assert meta["step"] == steps[-1]
  assert all(np.isfinite(v).all() for v in flat_params(model).values())


def test_nan_guard_without_step_saves_writes_no_checkpoint(model_dir, tmp_path):
  # The only checkpoint would be the last step's: the guard stops before it and logs only
  # finite steps.
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(learning_rate=1e30, schedule="constant", warmup_steps=0,
                         max_grad_norm=0.0, weight_decay=0.0, save_every_steps=0,
                         log_every_steps=1, optimizer="adam", num_epochs=6)
  with pytest.raises(loop.NonFiniteError, match=r"step (\d+).*last good checkpoint: none"):
    loop.train(cfg, make_data(), model_dir, run, progress=False)
  assert checkpoints.list_steps(run) == []
  lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
  assert all(np.isfinite(r["loss"]) for r in lines)
  assert [r["step"] for r in lines] == list(range(1, len(lines) + 1))


def test_metrics_log_every_step_in_order(model_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(save_every_steps=3, log_every_steps=1)  # 8 steps, saves at 3, 6, 8
  result = loop.train(cfg, make_data(), model_dir, run, progress=False)
  lines = [json.loads(x) for x in open(os.path.join(run, "metrics.jsonl"))]
  assert [r["step"] for r in lines] == list(range(1, 9))
  assert [r["loss"] for r in lines] == list(result.losses)
  assert [r["epoch"] for r in lines] == [0.5 * k for k in range(1, 9)]
  assert checkpoints.list_steps(run) == [3, 6, 8]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_saves_then_stops(model_dir, tmp_path, signum):
  run = str(tmp_path / "run")
  before = {s: signal.getsignal(s) for s in loop.STOP_SIGNALS}

  def hook(step, record):
    if step == 3:
      os.kill(os.getpid(), signum)

  result = loop.train(BASE_CFG.replace(save_every_steps=0), make_data(), model_dir, run,
                      progress=False, hooks=[hook])
  assert result.preempted and result.step == 3 and result.stop_signal == signum
  assert checkpoints.list_steps(run) == [3]
  assert {s: signal.getsignal(s) for s in loop.STOP_SIGNALS} == before  # handlers restored


def test_a_stop_signal_during_the_last_step_changes_nothing(model_dir, tmp_path):
  run = str(tmp_path / "run")

  def hook(step, record):
    if step == 8:  # the last: the run is complete once it is saved
      os.kill(os.getpid(), signal.SIGTERM)

  result = loop.train(BASE_CFG.replace(save_every_steps=0), make_data(), model_dir, run,
                      progress=False, hooks=[hook])
  assert not result.preempted and result.stop_signal is None and result.step == 8


def test_a_resumed_run_says_so(model_dir, tmp_path):
  """The walk: a resumed run said nothing (only its progress bar started at 22/750)."""
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(save_every_steps=0)
  lines = []

  def stop_at_3(step, record):
    if step == 3:
      os.kill(os.getpid(), signal.SIGTERM)

  loop.train(cfg, make_data(), model_dir, run, progress=False, hooks=[stop_at_3],
             log_line=lines.append)
  compiling = f"{run}: compiling the train step (the first step waits for it)"
  assert lines == [compiling]
  lines.clear()
  assert loop.train(cfg, make_data(), model_dir, run, progress=False,
                    log_line=lines.append).step == 8
  assert lines == [f"{run}: resumed from step 3 of 8", compiling]


def test_a_second_ctrl_c_aborts_at_once():
  with pytest.raises(KeyboardInterrupt):
    with loop.StopSignals() as stop:
      os.kill(os.getpid(), signal.SIGINT)
      assert stop.signum == signal.SIGINT
      os.kill(os.getpid(), signal.SIGINT)


def test_lora_trains_only_adapters(model_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(lora_rank=2, lora_alpha=4.0, lora_dropout=0.1, num_epochs=1,
                         lora_target_modules=("q_proj", "v_proj"), weight_decay=0.0)
  result = loop.train(cfg, make_data(), model_dir, run, progress=False)
  base, _ = models.from_pretrained(model_dir)
  base_p = flat_params(base)
  trained_p = flat_params(result.model)
  for k, v in base_p.items():
    np.testing.assert_array_equal(trained_p[k], v, err_msg=k)  # base untouched
  lora_p = flat_params(result.model, lora_lib.LoraParam)
  assert lora_p and any(np.abs(v).max() > 0 for k, v in lora_p.items() if "lora_b" in k)
  merged, meta = checkpoints.restore(run)
  assert not lora_lib.has_lora(merged) and meta["run"]["model"]["lora"]
  expected = flat_params(lora_lib.merge_lora(result.model))
  for k, v in flat_params(merged).items():
    np.testing.assert_allclose(v, expected[k], rtol=1e-6, atol=1e-7, err_msg=k)


def test_mbc_sampler_refreshes_scores(model_dir, tmp_path):
  run = str(tmp_path / "run")
  cfg = BASE_CFG.replace(sampler="mbc", mbc_refresh_steps=2, num_epochs=2, save_every_steps=0)
  result = loop.train(cfg, make_data(), model_dir, run, progress=False)
  _, meta = checkpoints.restore(run)
  assert result.step == 4 and sum(meta["draw_counts"]) == 32
  assert meta["sampler"]  # sampler state (scores) is checkpointed


def test_metrics_resume_rewrite_is_atomic_and_drops_a_torn_line(tmp_path, monkeypatch):
  run = tmp_path / "run"
  run.mkdir()
  path = run / "metrics.jsonl"
  full = "".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, 6))
  path.write_text(full + '{"step": 6, "lo')  # killed mid-write of step 6
  # A kill during the rewrite (here: the rename fails) leaves every logged line in place.
  real_replace = os.replace

  def killed(*args):
    raise KeyboardInterrupt

  monkeypatch.setattr(os, "replace", killed)
  with pytest.raises(KeyboardInterrupt):
    loop.MetricsWriter(str(run), start_step=3, enabled=True)
  assert path.read_text().startswith(full) and os.listdir(run) == ["metrics.jsonl"]
  monkeypatch.setattr(os, "replace", real_replace)
  writer = loop.MetricsWriter(str(run), start_step=3, enabled=True)
  writer.write({"step": 4, "loss": 0.5})
  writer.close()
  assert [json.loads(x)["step"] for x in open(path)] == [1, 2, 3, 4]
  # A torn line at the end is dropped even when it is past nothing else.
  path.write_text(full + '{"step"')
  loop.MetricsWriter(str(run), start_step=5, enabled=True).close()
  assert path.read_text() == full
  path.write_text('{"step": 1}\n{bad\n{"step": 2}\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
    loop.MetricsWriter(str(run), start_step=5, enabled=True)
