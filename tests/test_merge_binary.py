"""experiments/merge.py and memdyn_jax/merging/run.py on two tiny checkpoints: the merged
run directory restores with checkpoints.restore (linear = the numpy mean), its HF export
loads with the same logits, --evaluate writes records, a re-run skips; base-relative
methods, greedy soup, checkpoint selectors and one-line errors for bad inputs."""
from __future__ import annotations

import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from memdyn_jax.train import checkpoints
from memdyn_jax.merging import run as merged_run
from memdyn_jax import merging, models
from memdyn_jax.evaluation import records
from memdyn_jax.merging import MergeConfig

from conftest import EVAL_CLI_FLAGS, EVAL_TASK_KWARGS, assert_one_line_error, run_binary

# No gradient-variance flags: its default shape (5 minibatches of 8) is sized to --num_train=4.
EVAL_FLAGS = (f"--task_kwargs={json.dumps(EVAL_TASK_KWARGS)}",
              *[f for f in EVAL_CLI_FLAGS if not f.startswith("--grad_variance")])


def run_cli(*args):
  return run_binary("merge.py", *args)


def params_of(model):
  return [np.asarray(x) for x in jax.tree.leaves(nnx.state(model, nnx.Param))]


@pytest.fixture(scope="module")
def linear_merge(tiny_run, tmp_path_factory):
  """(run_dir, merged dir, completed process): uniform soup of steps 2 and 4, evaluated."""
  run_dir, _ = tiny_run
  out = str(tmp_path_factory.mktemp("merge") / "soup")
  proc = run_cli(f"--checkpoints={run_dir}:2-4", f"--output_dir={out}", "--evaluate",
                 *EVAL_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "merge.py: gradient variance over 4 minibatches of 1: the train subset has 4" \
      in proc.stdout, proc.stdout
  return run_dir, out, proc


def test_linear_merge_restores_to_the_mean_and_records_its_sources(linear_merge):
  run_dir, out, _ = linear_merge
  merged, meta = checkpoints.restore(out)
  a, _ = checkpoints.restore(run_dir, 2)
  b, _ = checkpoints.restore(run_dir, 4)
  for got, x, y in zip(params_of(merged), params_of(a), params_of(b)):
    np.testing.assert_allclose(got, (x + y) / 2, rtol=1e-6, atol=1e-7)
  info = merged_run.read_merge_info(out)
  assert info["method"] == "linear" and info["step"] == meta["step"] == 4
  assert info["sources"] == [{"run_dir": run_dir, "step": 2}, {"run_dir": run_dir, "step": 4}]
  assert info["base"] is None and info["t"] is None and info["lambda"] is None
  # Defaults are recorded as resolved: the uniform soup's weights, linear's normalize.
  assert info["weights"] == [1.0, 1.0] and info["normalize"] is True
  assert meta["merge"] == info and meta["epoch"] == checkpoints.read_meta(run_dir, 4)["epoch"]
  run_info = checkpoints.read_run_info(out)
  source_info = checkpoints.read_run_info(run_dir)
  assert run_info["model"] == source_info["model"] and run_info["config"] == source_info["config"]
  assert json.load(open(os.path.join(out, "examples.json"))) == json.load(
      open(os.path.join(run_dir, "examples.json")))
  assert not os.path.exists(out + ".partial")


def test_hf_export_loads_with_the_same_logits(linear_merge):
  _, out, _ = linear_merge
  merged, _ = checkpoints.restore(out)
  exported, _ = models.from_pretrained(os.path.join(out, merged_run.HF_DIR))
  tok = models.load_tokenizer(os.path.join(out, merged_run.HF_DIR))
  ids = np.asarray([tok("Question: 3 + 4 =")["input_ids"]])
  mask = np.ones_like(ids)
  np.testing.assert_allclose(np.asarray(exported(ids, mask)), np.asarray(merged(ids, mask)),
                             atol=1e-5)


def test_evaluate_writes_records_and_a_rerun_skips(linear_merge):
  run_dir, out, proc = linear_merge
  assert records.list_done(out) == {(4, "train", None), (4, "test", None),
                                    (4, "perturbed", "First")}
  rows = records.read_jsonl(records.record_path(out, 4, "test"))
  assert len(rows) == 4 and all(r["perplexity"] > 1 for r in rows)
  config = records.read_config(out)
  assert config["task"] == "synthetic_arith" and config["task_kwargs"] == EVAL_TASK_KWARGS
  before = os.stat(os.path.join(out, "run.json")).st_mtime_ns
  again = run_cli(f"--checkpoints={run_dir}:2-4", f"--output_dir={out}", "--evaluate",
                  *EVAL_FLAGS)
  assert again.returncode == 0, again.stderr[-3000:]
  assert "already holds this merge" in again.stdout
  assert "all records already present" in again.stdout
  assert os.stat(os.path.join(out, "run.json")).st_mtime_ns == before
  # The same directory asked for another merge: refused, naming the flag.
  other = run_cli(f"--checkpoints={run_dir}:4,{run_dir}:2", f"--output_dir={out}")
  assert other.returncode == 2 and "--output_dir" in other.stderr and "holds another merge" \
      in other.stderr


# ------------------------------------------------------------------------------ library


def test_a_folder_named_like_the_partial_merge_is_never_removed(tiny_run, tmp_path):
  """A merge writes into <output_dir>.partial and removes an interrupted attempt there
  first: only one it marked itself, never a user's folder of that name."""
  run_dir, _ = tiny_run
  out = tmp_path / "soup"
  user = tmp_path / "soup.partial"
  user.mkdir()
  (user / "notes.txt").write_text("keep me")
  assert_one_line_error(run_cli(f"--checkpoints={run_dir}:2-4", f"--output_dir={out}"),
                        "merge.py", "--output_dir")
  assert os.listdir(user) == ["notes.txt"] and not out.exists()
  shutil.rmtree(user)
  interrupted = tmp_path / "soup.partial"
  from memdyn_jax import fileio
  fileio.mark_output(str(interrupted), merged_run.MERGE_PARTIAL, str(out))
  (interrupted / "half_written").write_text("x")
  proc = run_cli(f"--checkpoints={run_dir}:2-4", f"--output_dir={out}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not interrupted.exists() and checkpoints.list_steps(str(out)) == [4]


def test_selectors(tiny_run):
  run_dir, _ = tiny_run
  parse = merged_run.parse_checkpoints
  assert [r.step for r in parse([f"{run_dir}:all"])] == [2, 4]
  assert [r.step for r in parse([f"{run_dir}:last", f"{run_dir}:3-9"])] == [4]
  epochs = {s: checkpoints.read_meta(run_dir, s)["epoch"] for s in (2, 4)}
  assert [r.step for r in parse([f"{run_dir}:epochs={epochs[2]}-{epochs[4]}"])] == [2, 4]
  assert [r.step for r in parse([f"{run_dir}:epochs={epochs[4]}"])] == [4]
  for bad, needle in [(f"{run_dir}:3", "no checkpoint at step 3"), (run_dir, "RUN_DIR:STEP"),
                      (f"{run_dir}:epochs=99", "no checkpoint at epochs"),
                      ("/nonexistent:1", "not a training run")]:
    with pytest.raises(merged_run.MergeInputError, match=needle):
      parse([bad])


def test_task_arithmetic_defaults_to_the_runs_base_and_matches_merge_pytrees(tiny_run, tmp_path):
  run_dir, base_dir = tiny_run
  refs = merged_run.parse_checkpoints([f"{run_dir}:all"])
  config = MergeConfig("task_arithmetic", lambda_=0.5, weights=(1.0, 2.0))
  outcome = merged_run.merge_to_run_dir(str(tmp_path / "ta"), "task_arithmetic", refs,
                                        config=config, log=lambda m: None)
  assert outcome.info["base"] == {"hf_dir": base_dir} and not outcome.skipped
  assert outcome.info["lambda"] == 0.5 and outcome.info["weights"] == [1.0, 2.0]
  base, _ = models.from_pretrained(base_dir)
  inputs = [nnx.state(checkpoints.restore(run_dir, s)[0], nnx.Param) for s in (2, 4)]
  want = merging.merge_pytrees(config, nnx.state(base, nnx.Param), inputs)
  got, _ = checkpoints.restore(str(tmp_path / "ta"))
  for x, y in zip(params_of(got), [np.asarray(v) for v in jax.tree.leaves(want)]):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def test_greedy_soup_keeps_a_candidate_only_if_the_score_rises(tiny_run, tmp_path):
  run_dir, _ = tiny_run
  refs = merged_run.parse_checkpoints([f"{run_dir}:all"])
  fingerprint = lambda model: sum(float(np.sum(x)) for x in params_of(model))
  own = {fingerprint(checkpoints.restore(run_dir, s)[0]): score for s, score in ((2, 0.5),
                                                                                 (4, 1.0))}

  def score(model):  # each step alone scores as set above, any average 0.7
    return next((v for k, v in own.items() if np.isclose(k, fingerprint(model), rtol=1e-9)),
                0.7)

  outcome = merged_run.merge_to_run_dir(str(tmp_path / "soup"), "greedy_soup", refs,
                                        soup_score=score, soup_validation={"split": "test"},
                                        log=lambda m: None)
  info = outcome.info
  assert info["sources"] == [{"run_dir": run_dir, "step": 4}] and info["step"] == 4
  assert len(info["candidates"]) == 2 and info["validation"]["split"] == "test"
  assert info["validation"]["candidate_scores"] == [0.5, 1.0]
  assert info["validation"]["history"] == [[0, 0.7, False]]
  got, _ = checkpoints.restore(str(tmp_path / "soup"))
  for x, y in zip(params_of(got), params_of(checkpoints.restore(run_dir, 4)[0])):
    np.testing.assert_array_equal(x, y)


def test_greedy_soup_binary_scores_candidates_on_the_validation_split(tiny_run, tmp_path):
  run_dir, _ = tiny_run
  out = str(tmp_path / "greedy")
  # No --task_kwargs: the validation task is built with the run's (its examples.json).
  proc = run_cli(f"--checkpoints={run_dir}:all", f"--output_dir={out}",
                 "--method=greedy_soup", "--validation_split=test", "--validation_examples=2",
                 *EVAL_CLI_FLAGS)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = merged_run.read_merge_info(out)
  validation = info["validation"]
  assert (validation["split"], validation["examples"], validation["metric"]) == (
      "test", 2, "accuracy")
  assert validation["sampling"]["n"] == 2 and validation["sampling"]["max_new_tokens"] == 8
  assert len(validation["candidate_scores"]) == 2 and len(info["candidates"]) == 2
  assert "greedy soup:" in proc.stdout


# ------------------------------------------------------------------------------ stacked layers


@pytest.fixture(scope="module")
def two_layer_run(tiny_run, tmp_path_factory):
  """(run_dir, base_dir): `tiny_run`'s recipe (task, tokenizer, training, checkpoints at
  steps 2 and 4) on a two-layer base: tiny_run's one layer cannot tell a merge per layer
  from one over the whole stack."""
  from memdyn_jax.tasks import synthetic_arith as sa
  from memdyn_jax.train import loop, task_run
  from memdyn_jax.train.config import TrainConfig

  _, tiny_base = tiny_run
  root = tmp_path_factory.mktemp("two_layers")
  base = str(root / "base")
  shutil.copytree(tiny_base, base)  # its tokenizer
  with open(os.path.join(base, "config.json")) as f:
    cfg = models.from_hf_config({**json.load(f), "num_hidden_layers": 2})
  models.save_pretrained(models.build_model(cfg, seed=1), cfg, base)
  task = sa.SyntheticArithTask(seed=0, **EVAL_TASK_KWARGS)
  tok = models.load_tokenizer(base, padding_side="right")
  train_cfg = TrainConfig(learning_rate=1e-2, num_epochs=2, global_batch_size=6,
                          warmup_steps=1, save_every_steps=2, max_length=256,
                          overlength="truncate")
  data, ids = loop.task_train_data(tok, task, task.load("train"), train_cfg)
  run_dir = str(root / "run")
  loop.train(train_cfg, data, base, run_dir, progress=False, async_checkpoints=False)
  task_run.write_examples_listing(
      run_dir, task_run.TaskSpec("synthetic_arith", {"seed": 0, **EVAL_TASK_KWARGS}), ids)
  assert checkpoints.list_steps(run_dir) == [2, 4]
  return run_dir, base


@pytest.mark.parametrize("flags,config,with_base", [
    (["--method=ties", "--density=0.4"], MergeConfig("ties", density=0.4), True),
    (["--method=slerp", "--t=0.3"], MergeConfig("slerp", t=0.3), False)],
    ids=["ties", "slerp"])
def test_binary_merges_the_stacked_blocks_one_layer_at_a_time(two_layer_run, tmp_path, flags,
                                                              config, with_base):
  """What mergekit does on the HF layout (one tensor per layer): every layer's slice of a
  stacked block parameter is merged on its own; the stack merged whole is another result."""
  run_dir, base_dir = two_layer_run
  out = str(tmp_path / "merged")
  proc = run_cli(f"--checkpoints={run_dir}:all", f"--output_dir={out}", *flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = merging.PytreeSource(nnx.state(checkpoints.restore(out)[0], nnx.Param))
  inputs = [merging.PytreeSource(nnx.state(checkpoints.restore(run_dir, s)[0], nnx.Param))
            for s in (2, 4)]
  base = (merging.PytreeSource(nnx.state(models.from_pretrained(base_dir)[0], nnx.Param))
          if with_base else None)
  axes = merging.layer_axes_of(inputs[0].tree)
  differs = 0
  for path in got.paths():
    name = merging.path_str(path)
    xs = [np.asarray(m.get(path)) for m in inputs]
    b = None if base is None else np.asarray(base.get(path))
    whole = np.asarray(merging.merge_tensor(config, path, xs, b))
    if name.startswith("blocks/"):  # the decoder's stack: (layers, ...)
      assert axes[name] == (0,) and xs[0].shape[0] == 2, name
      want = np.stack([merging.merge_tensor(config, path, [x[l] for x in xs],
                                            None if b is None else b[l]) for l in range(2)])
      differs += not np.allclose(whole, want, rtol=1e-5, atol=1e-6)
    else:
      assert axes[name] == (), name
      want = whole
    np.testing.assert_allclose(np.asarray(got.get(path)), want, rtol=1e-6, atol=1e-7,
                               err_msg=name)
  assert differs >= 5, differs  # most stacked tensors: per layer is another merge
  # Straight from the checkpoints, the sources read the stacked axes from the run's model.
  source = merging.OrbaxCheckpointSource(run_dir, 4)
  try:
    assert {merging.path_str(p): source.layer_axes(p) for p in source.paths()} == axes
  finally:
    source.close()


# ------------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def bad_runs(tiny_run, tmp_path_factory):
  """(corrupt run dir, run dir with one tensor of another shape), both with a step 4."""
  run_dir, _ = tiny_run
  root = tmp_path_factory.mktemp("bad")
  corrupt = str(root / "corrupt")
  shutil.copytree(run_dir, corrupt, ignore=shutil.ignore_patterns("eval"))
  params = os.path.join(corrupt, "checkpoints", "4", "params")
  for d, _, files in os.walk(params):
    for f in files:
      if "/d" in d[len(params):]:  # the array data files (ocdbt): truncated
        open(os.path.join(d, f), "wb").close()
  other = str(root / "other")
  os.makedirs(other)
  for name in ("run.json", "model_config.json"):
    shutil.copy(os.path.join(run_dir, name), other)
  state = nnx.state(checkpoints.restore(run_dir, 4)[0], nnx.Param)
  flat = nnx.to_flat_state(state)
  path, var = list(flat)[0]
  changed = nnx.from_flat_state([(p, v.replace(np.zeros((3,) + v.shape, np.float32)))
                                 if p == path else (p, v) for p, v in flat])
  checkpoints.save_params(other, 4, changed, {"step": 4})
  return corrupt, other, ".".join(map(str, path))


@pytest.mark.parametrize("args,needle", [
    ([], "--checkpoints is required"),
    (["--checkpoints={run}:4"], "--output_dir is required"),
    (["--checkpoints={run}:3", "--output_dir={tmp}/o"], "--checkpoints: "),
    (["--checkpoints={run}:all", "--output_dir={tmp}/o", "--method=ties"], "--density"),
    (["--checkpoints={run}:all", "--output_dir={tmp}/o", "--weights=1,2,3"], "--weights"),
    (["--checkpoints={run}:all", "--output_dir={tmp}/o", "--method=slerp", "--t=2"], "--t"),
    (["--checkpoints={run}:all", "--output_dir={tmp}/o", "--method=greedy_soup"],
     "--validation_split"),
    (["--checkpoints={run}:all", "--output_dir={tmp}/o", "--method=greedy_soup",
      "--validation_split=nope"], "--validation_split: task 'synthetic_arith' cannot load"),
    (["--checkpoints={run}:all", "--output_dir={tmp}/o", "--base=/nonexistent"], "--base"),
    (["--checkpoints={run}:4,{corrupt}:4", "--output_dir={tmp}/o"], "--checkpoints: "),
    (["--checkpoints={run}:4,{other}:4", "--output_dir={tmp}/o"], "has shape"),
    (["--checkpoints={run}:4", "--output_dir={run}"], "--output_dir"),
])
def test_bad_inputs_give_one_line_error(args, needle, tiny_run, bad_runs, tmp_path):
  run_dir, _ = tiny_run
  corrupt, other, _ = bad_runs
  subst = {"{run}": run_dir, "{tmp}": str(tmp_path), "{corrupt}": corrupt, "{other}": other}
  for key, value in subst.items():
    args = [a.replace(key, value) for a in args]
  assert_one_line_error(run_cli(*args), "merge.py", needle)
  assert not os.path.exists(str(tmp_path / "o"))


def test_a_base_of_an_unsupported_architecture_is_refused_when_parsed(tmp_path):
  """--base naming an HF directory of an architecture the models do not implement fails
  when the flag is read, naming it, before any checkpoint is opened."""
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "mamba"}))
  with pytest.raises(merged_run.MergeInputError) as e:
    merged_run.parse_base(str(tmp_path))
  assert e.value.field == "base" and "'mamba' is not supported" in e.value.message


def test_merge_requests_record_every_default_resolved(tmp_path):
  """t, lambda, normalize and the weights are recorded as used (was null), so an explicit
  default is the same merge as an omitted one; a request recorded with nulls still matches."""
  refs = [merged_run.CheckpointRef("/r", 2), merged_run.CheckpointRef("/r", 4)]
  request = lambda method, **kw: merged_run.merge_request(method, refs, None,
                                                          MergeConfig(method, **kw))
  slerp = request("slerp")
  assert slerp == request("slerp", t=0.5, normalize=False)
  assert (slerp["t"], slerp["normalize"], slerp["weights"], slerp["lambda"]) == (
      0.5, False, None, None)
  linear = request("linear")
  assert linear == request("linear", weights=(1, 1), normalize=True)
  assert linear["weights"] == [1.0, 1.0] and linear["t"] is None
  assert request("task_arithmetic")["lambda"] == 1.0
  assert request("task_arithmetic")["normalize"] is False
  old = {**slerp, "t": None, "normalize": None}  # as recorded before defaults were resolved
  assert merged_run._stated_request(str(tmp_path), old) == slerp
  old = {**linear, "weights": None, "normalize": None}
  assert merged_run._stated_request(str(tmp_path), old) == linear


def test_slerp_records_its_t_and_an_explicit_default_is_the_same_merge(tiny_run, tmp_path):
  """The walk: merge.py --method=slerp recorded t: null and refused --t=0.5 as another
  merge; the help named no default."""
  run_dir, _ = tiny_run
  out = str(tmp_path / "slerp")
  args = (f"--checkpoints={run_dir}:2,{run_dir}:4", f"--output_dir={out}", "--method=slerp")
  proc = run_cli(*args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  info = merged_run.read_merge_info(out)
  assert info["t"] == 0.5 and info["request"]["t"] == 0.5
  proc = run_cli(*args, "--t=0.5")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "already holds this merge" in proc.stdout
  assert "(default: 0.5)" in run_cli("--help").stdout
