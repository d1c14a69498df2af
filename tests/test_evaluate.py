"""The eval job: checkpoints -> results objects, resharding, LoRA, bad input."""

import dataclasses
import io
import json
import os
import shutil

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from etils import epath

from optconsist_jax.evaluate import watch as ev_lib
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate import results
from optconsist_jax import sharding
from optconsist_jax.train import setup as train_setup
from optconsist_jax.train.config import ExperimentConfig
from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.evaluate import job
from optconsist_jax.evaluate import suite
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import checkpointer as run_checkpoints
from optconsist_jax.io import weights
from optconsist_jax.model import Llama, preset
from optconsist_jax.typed_config import to_jsonable

MODEL = preset("tiny_gqa").replace(vocab_size=2048, initializer_range=0.1)
LORA = {"rank": 4, "alpha": 8.0, "dropout": 0.0, "targets": ["q", "v", "down"]}
TOTAL_STEPS, EPOCHS = 6, 3


def eval_config(mesh=None, **kw):
  """Small evals; a benchmark of multiple_choice runs only when named."""
  mc = dict(hellaswag="", arc_challenge="", winogrande="")
  mc.update(kw.pop("multiple_choice", dict(
      arc_challenge="synthetic", winogrande="synthetic", limit=3,
      batch_size=4, max_len=128)))
  d = dict(
      mesh=mesh or {"preset": "fsdp"},
      math=dict(protocols=("metamath",), limit=2, batch_size=2,
                max_new_tokens=6),
      multiple_choice=mc,
      lm_loss=dict(path="", limit=0, max_len=32, batch_size=2),
      base="adamw", watch=dict(poll_secs=1.0, idle_timeout_secs=0.0,
                               retries=2))
  d.update(kw)
  return EvalConfig.from_dict(d)


def write_run(w, lora=None, init_from="", model=MODEL, kind="auto"):
  """W/config.json as train.py writes it; returns the checkpoints' identity."""
  config = ExperimentConfig.from_dict({
      "model": to_jsonable(model), "lora": lora,
      "train": {"num_epochs": EPOCHS, "num_steps": 0},
      "optim": {"groups": {"adamw": {"optimizer": "adamw", "schedule": {
          "kind": "cosine", "peak": 1e-3, "total_steps": TOTAL_STEPS}}},
                "routes": [["all", "adamw"]]},
      "data": {"format": "synthetic", "seed": 0, "synthetic_examples": 40,
               "tokenizer_path": ""},
      "init_from": {"path": init_from, "kind": kind}})
  train_setup.write_config(config, epath.Path(w))
  with open(os.path.join(w, "heldout.txt"), "w") as f:
    f.write("The cat sat on the mat.\n\nTwo plus two is four, said Ava.\n")
  return weights.identity(config.model, config.lora)


def make_model(seed, lora=None):
  model = Llama(MODEL, rngs=nnx.Rngs(seed))
  if lora:
    from optconsist_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora_lib.apply_lora(model, lora_lib.LoRAConfig.from_dict(lora),
                        rngs=nnx.Rngs(seed + 1))
    # Trained-looking adapters: B != 0 so merging changes the weights.
    for path, v in nnx.iter_graph(model):
      if isinstance(v, lora_lib.LoRAParam) and "lora_b" in str(path[-1]):
        v[...] = 0.05 * jax.random.normal(jax.random.key(seed), v.shape)
  return model


def save(w, identity, step, model, epoch_end=False):
  ck = run_checkpoints.RunCheckpoints(w, run_checkpoints.CheckpointConfig(
      keep=None, async_save=False), identity)
  ck.save(step, params=nnx.state(model), opt_state={"count": jnp.zeros(())},
          epoch=step * EPOCHS // TOTAL_STEPS, epoch_end=epoch_end)
  ck.close()


@pytest.fixture(scope="module")
def tokenizer():
  return Tokenizer.tiny()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tokenizer):
  """A run with checkpoints at steps 2 and 4, evaluated once."""
  w = str(tmp_path_factory.mktemp("run"))
  identity = write_run(w)
  models = {2: make_model(2), 4: make_model(4)}
  save(w, identity, 2, models[2], epoch_end=True)
  save(w, identity, 4, models[4])
  # A save still in flight: never read.
  os.makedirs(os.path.join(w, "checkpoints",
                           "6.orbax-checkpoint-tmp-123", "params"))
  config = eval_config(lm_loss=dict(path=os.path.join(w, "heldout.txt"),
                                    max_len=32, batch_size=2))
  out = io.StringIO()
  res = ev_lib.evaluate_workdir(w, config, out=out)
  return w, config, models, res, out.getvalue()


def test_evaluates_complete_checkpoints_and_records_schema(run_dir):
  w, config, _, res, log = run_dir
  assert res.evaluated == [2, 4] and res.failed == []
  records = results.read_workdir(w)
  assert [r.step for r in records] == [2, 4]
  r2, r4 = records
  assert r2.epoch == 1.0 and r4.epoch == pytest.approx(2.0)
  assert (r2.method, r2.base, r2.lr) == ("adamw", "adamw", 1e-3)
  assert r2.retention_metric == "mc/mean"
  assert r2.learning_metric == "math/metamath/acc"
  # The BOS rule is stated in the row: the harness's default for the tiny
  # SentencePiece (Llama-style) tokenizer.
  assert r2.settings == {"mc_add_bos": True}
  for key in ("mc/arc_challenge/acc_norm", "mc/winogrande/acc", "mc/mean",
              "lm_loss/loss", "lm_loss/perplexity", "math/metamath/acc"):
    assert key in r2.metrics
  assert r2.retention == pytest.approx(np.mean(
      [r2.metrics["mc/arc_challenge/acc_norm"],
       r2.metrics["mc/winogrande/acc"]]))
  preds = [json.loads(l) for l in open(os.path.join(
      w, "eval", "predictions", "step_00000002.jsonl"))]
  n_docs = sum(p["eval"] == "lm_loss" for p in preds)
  assert {p["eval"] for p in preds} == {"math/metamath", "mc/arc_challenge",
                                        "mc/winogrande", "lm_loss"}
  assert len(preds) == 2 + 3 + 3 + n_docs and n_docs >= 1
  # The row keeps each item's score, and they make up its metrics.
  lm = r2.items["lm_loss/loss"]
  assert len(lm["sum"]) == n_docs and sum(lm["count"]) == (
      r2.metrics["lm_loss/tokens"])
  assert sum(lm["sum"]) / sum(lm["count"]) == pytest.approx(
      r2.metrics["lm_loss/loss"], rel=1e-4)
  for metric in ("math/metamath/acc", "mc/arc_challenge/acc_norm",
                 "mc/winogrande/acc"):
    assert np.mean(r2.items[metric]["sum"]) == pytest.approx(
        r2.metrics[metric])
  mean = r2.items["mc/mean"]
  assert sum(mean["sum"]) / sum(mean["count"]) == r2.retention
  assert r2.base_id["checkpoint"] == ""  # a run of its own, no init_from
  assert "evaluating step 2" in log
  # A progress line per eval, with its item count and score (as recorded).
  for line in (f"math/metamath: 2 problems, accuracy"
               f" {r2.metrics['math/metamath/acc']:.3f}",
               f"multiple choice: 6 items (arc_challenge, winogrande), mean"
               f" {r2.metrics['mc/mean']:.3f}",
               f"lm_loss: {int(r2.metrics['lm_loss/tokens'])} tokens of"):
    assert log.count(line) >= 1, (line, log)
  assert os.listdir(os.path.join(w, "eval", "metrics"))


def test_rerun_skips_evaluated_and_resumes(run_dir):
  w, config, models, _, _ = run_dir
  out = io.StringIO()
  res = ev_lib.evaluate_workdir(w, config, out=out)
  assert res.evaluated == [] and "nothing new" in out.getvalue()
  # A crash before a checkpoint's results object was written: that
  # checkpoint (only) is evaluated again.
  os.remove(os.path.join(w, "eval", "results", "step_00000004.json"))
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert res.evaluated == [4]
  assert [r.step for r in results.read_workdir(w)] == [2, 4]
  # A workdir of the old layout: its results.jsonl (with a line torn by a
  # crash during an append) counts as evaluated; the torn record is
  # evaluated again, and its new object merges with the old file's rows.
  folder = os.path.join(w, "eval", "results")
  rows = [open(os.path.join(folder, n)).read() for n in sorted(
      os.listdir(folder))]
  shutil.rmtree(folder)
  with open(os.path.join(w, "eval", "results.jsonl"), "w") as f:
    f.write(rows[0] + rows[1][:20])
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert res.evaluated == [4]
  assert [r.step for r in results.read_workdir(w)] == [2, 4]
  assert os.listdir(folder) == ["step_00000004.json"]


def test_other_mesh_same_numbers(run_dir, tokenizer):
  w, config, models, _, _ = run_dir
  want = {r.step: r for r in results.read_workdir(w)}
  other = dataclasses.replace(
      config, mesh=sharding.MeshConfig.preset("fsdp_tp", fsdp=4, tensor=2))
  ev = job.Evaluator(w, other, tokenizer=tokenizer)
  info = [c for c in ckpt_lib.list_checkpoints(w) if c.step == 4][0]
  model = ev.checkpoint_model(info.path)
  kernel = nnx.state(model, nnx.Param)["layers"]["mlp"]["up_proj"]["kernel"]
  assert len(kernel[...].sharding.device_set) == 8  # really resharded
  metrics, _ = suite.run_evals(model, tokenizer, ev.data, other)
  for k, v in want[4].metrics.items():
    if "seconds" not in k and "tokens_per_second" not in k:
      assert metrics[k] == pytest.approx(v, rel=1e-4, abs=1e-5), k
  # And the same as the in-memory model that was saved, without any mesh.
  direct, _ = suite.run_evals(models[4], tokenizer, ev.data, other)
  assert direct["lm_loss/loss"] == pytest.approx(metrics["lm_loss/loss"],
                                                 rel=1e-5)


def test_corrupt_checkpoint_reported_and_skipped(tmp_path, capsys):
  w = str(tmp_path / "run")
  identity = write_run(w)
  save(w, identity, 2, make_model(2))
  save(w, identity, 4, make_model(4))
  # Step 2: the params were truncated / lost after the save was committed.
  params = os.path.join(w, "checkpoints", "2", "params")
  shutil.rmtree(params)
  os.makedirs(params)
  with open(os.path.join(params, "_METADATA"), "w") as f:
    f.write("{garbage")
  config = eval_config(math=dict(protocols=()),
                       multiple_choice=dict(winogrande="synthetic", limit=2))
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert res.failed == [2] and res.evaluated == [4]
  err = capsys.readouterr().err
  # One line naming the step and the cause, not TensorStore's spec dump.
  (line,) = [x for x in err.splitlines() if x.startswith("ERROR:")]
  assert line.startswith("ERROR: checkpoint step 2 (")
  assert "checkpoints/2) is unreadable: " in line
  assert "skipped (rerun to retry)" in line and "tensorstore_spec" not in line
  assert len(line) < 500
  # A rerun tries it again; the report only has the good one.
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert res.evaluated == [] and res.failed == [2]
  assert [r.step for r in results.read_workdir(w)] == [4]


def test_no_checkpoints_says_so_or_waits(tmp_path):
  w = str(tmp_path / "run")
  identity = write_run(w)
  config = eval_config(math=dict(protocols=()),
                       multiple_choice=dict(winogrande="synthetic", limit=2),
                       watch=dict(poll_secs=5.0, idle_timeout_secs=100.0))
  out = io.StringIO()
  res = ev_lib.evaluate_workdir(w, config, out=out)
  assert res.evaluated == [] and "no checkpoints in" in out.getvalue()
  assert "--watch" in out.getvalue()

  # --watch: waits; a checkpoint appears while it sleeps; the final step ends
  # the watch.
  now = [0.0]
  sleeps = []

  def fake_sleep(s):
    sleeps.append(s)
    now[0] += s
    if len(sleeps) == 2:
      save(w, identity, TOTAL_STEPS, make_model(6), epoch_end=True)

  out = io.StringIO()
  res = ev_lib.evaluate_workdir(w, config, watch=True, sleep=fake_sleep,
                                clock=lambda: now[0], out=out)
  assert res.evaluated == [TOTAL_STEPS] and sleeps == [5.0, 5.0]
  assert "waiting for new checkpoints" in out.getvalue()
  assert f"final step {TOTAL_STEPS} evaluated" in out.getvalue()

  # Nothing new for idle_timeout_secs: stops.
  w2 = str(tmp_path / "run2")
  write_run(w2)
  now[0], sleeps[:] = 0.0, []
  out = io.StringIO()
  res = ev_lib.evaluate_workdir(w2, config, watch=True,
                                sleep=lambda s: (sleeps.append(s),
                                                 now.__setitem__(0, now[0] + s)),
                                clock=lambda: now[0], out=out)
  assert res.evaluated == [] and len(sleeps) == 20
  assert "no new checkpoint for 100 s" in out.getvalue()


def test_lora_checkpoint_evaluated_merged_and_hf_base(tmp_path, tokenizer):
  from optconsist_jax.io import hf  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
  base = make_model(7)
  hf_dir = str(tmp_path / "hf_base")
  hf.save(MODEL, base, hf_dir)
  w = str(tmp_path / "lora_run")
  identity = write_run(w, lora=LORA, init_from=hf_dir)
  tuned = make_model(7, lora=LORA)
  save(w, identity, 2, tuned)
  config = eval_config(
      math=dict(protocols=()), multiple_choice=dict(winogrande="synthetic",
                                                    limit=2),
      lm_loss=dict(path=os.path.join(w, "heldout.txt"), max_len=32,
                   batch_size=2))
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert res.base_evaluated and res.evaluated == [2]
  base_rec, lora_rec = results.read_workdir(w)
  assert base_rec.is_base and base_rec.checkpoint == hf_dir
  assert (base_rec.method, base_rec.step) == ("base", 0)
  assert lora_rec.method == "lora" and not lora_rec.is_base
  ev = job.Evaluator(w, config, tokenizer=tokenizer)
  want_lora, _ = suite.run_evals(lora_lib.merge(tuned), tokenizer, ev.data,
                                  config)
  want_base, _ = suite.run_evals(base, tokenizer, ev.data, config)
  assert lora_rec.metrics["lm_loss/loss"] == pytest.approx(
      want_lora["lm_loss/loss"], rel=1e-5)
  assert base_rec.metrics["lm_loss/loss"] == pytest.approx(
      want_base["lm_loss/loss"], rel=1e-5)
  # The adapters matter, so the comparison above is not vacuous.
  assert abs(want_lora["lm_loss/loss"] - want_base["lm_loss/loss"]) > 1e-3
  # The base is evaluated once.
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert not res.base_evaluated and res.evaluated == []


def test_bad_eval_config_is_named():
  with pytest.raises(ValueError, match=r"config.math: unknown keys \['shots'"):
    eval_config(math=dict(shots=3))
  with pytest.raises(ValueError, match="math.protocols: unknown"):
    eval_config(math=dict(protocols=("mmlu",)))
  with pytest.raises(FileNotFoundError, match="config.json not found"):
    job.read_run("/nonexistent/run")


def _run_config(w):
  with open(os.path.join(w, "config.json")) as f:
    return json.load(f)


@pytest.mark.parametrize("fault", ["truncated", "missing"])
def test_watch_ends_when_final_step_is_unreadable(tmp_path, capsys, fault):
  """A final checkpoint whose meta is cut short or gone: reported, retried a
  bounded number of passes, and the watch ends instead of waiting forever."""
  w = str(tmp_path / "run")
  identity = write_run(w)
  save(w, identity, 2, make_model(2))
  save(w, identity, TOTAL_STEPS, make_model(6), epoch_end=True)
  meta = os.path.join(w, "checkpoints", str(TOTAL_STEPS), "meta", "metadata")
  if fault == "truncated":
    with open(meta) as f:
      text = f.read()
    with open(meta, "w") as f:
      f.write(text[:len(text) // 2])
  else:
    os.remove(meta)
  config = eval_config(math=dict(protocols=()),
                       multiple_choice=dict(winogrande="synthetic", limit=2),
                       watch=dict(poll_secs=5.0, idle_timeout_secs=0.0,
                                  retries=2))
  sleeps = []
  out = io.StringIO()
  res = ev_lib.evaluate_workdir(w, config, watch=True, sleep=sleeps.append,
                                out=out)
  assert res.evaluated == [2] and res.failed == [TOTAL_STEPS]
  assert sleeps == [5.0, 5.0]  # Tried on 3 passes (1 + 2 retries).
  errs = [x for x in capsys.readouterr().err.splitlines()
          if x.startswith("ERROR:")]
  assert len(errs) == 3
  cause = ("meta/metadata is missing" if fault == "missing"
           else "meta/metadata is unreadable (JSONDecodeError")
  assert all(f"checkpoint step {TOTAL_STEPS} (" in e and cause in e
             for e in errs)
  assert "(1 of 3 tries)" in errs[0] and errs[-1].endswith("given up")
  assert f"final step {TOTAL_STEPS} is unreadable" in out.getvalue()


def test_labels_come_from_the_checkpoint_not_config_json(tmp_path):
  """config.json is rewritten by every train.py invocation; each checkpoint
  keeps the config that wrote it, and the eval job labels from that."""
  w = str(tmp_path / "run")
  identity = write_run(w)
  written_with = _run_config(w)
  ck = run_checkpoints.RunCheckpoints(
      w, run_checkpoints.CheckpointConfig(keep=None, async_save=False), identity,
      run_config=written_with)
  ck.save(2, params=nnx.state(make_model(2)),
          opt_state={"count": jnp.zeros(())}, epoch=1)
  ck.close()
  # Someone trains another optimizer into W (train.py refuses; simulate the
  # old behaviour of a rewritten config.json).
  other = dict(written_with)
  other["optim"] = {"groups": {"muon": {"optimizer": "muon", "schedule": {
      "kind": "cosine", "peak": 0.02, "total_steps": TOTAL_STEPS}}},
                    "routes": [["hidden_matrix", "muon"]]}
  with open(os.path.join(w, "config.json"), "w") as f:
    json.dump(other, f)
  config = eval_config(math=dict(protocols=()),
                       multiple_choice=dict(winogrande="synthetic", limit=2))
  res = ev_lib.evaluate_workdir(w, config, out=io.StringIO())
  assert res.evaluated == [2]
  (rec,) = results.read_workdir(w)
  assert (rec.method, rec.lr) == ("adamw", 1e-3)


def test_base_model_honours_init_from_kind(tmp_path):
  """init_from.kind decides the base model's reader, as it does in train.py.

  A nanoGPT checkpoint under a name "auto" does not recognise (no .pt) reads
  as nanoGPT because the run says kind=nanogpt.
  """
  import types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
  fixture = os.path.join(os.path.dirname(__file__), "fixtures", "nanogpt",
                         "ckpt.pt")
  ckpt = str(tmp_path / "base_weights")
  shutil.copy(fixture, ckpt)
  assert weights.kind_of(ckpt) == "orbax"  # what "auto" would have said
  w = str(tmp_path / "run")
  write_run(w, init_from=ckpt, model=nanogpt.read_config(ckpt),
            kind="nanogpt")
  ev = job.Evaluator(w, eval_config(), data=suite.EvalData([], [], [], []),
                     tokenizer=types.SimpleNamespace(vocab_size=1))
  source = ev.base_source()
  assert (source.path, source.kind) == (ckpt, "nanogpt")
  got = nnx.state(ev.base_model(source), nnx.Param)
  _, want = nanogpt.load_nanogpt(fixture)
  want = nnx.state(want, nnx.Param)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
