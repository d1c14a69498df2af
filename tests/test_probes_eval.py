"""The update probes as an eval of the eval job: base, init, records, meshes.

A base "pretraining run" whose checkpoint records its init seed is its init
plus a planted rank-1 displacement P per matrix; a finetuning run from it
moves by 0.5 P. The job must rebuild the init from the base's recorded seed
(the overlap of the update with W_base - W_init is then exactly 1 at k = 1;
a wrong init gives a near-random overlap), measure the loss change the model
itself gives on the packed held-out rows (recomputed here with numpy), and
give the same numbers on a sharded and a replicated eval mesh.
"""

import io
import json
import os

from etils import epath
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.evaluate import job
from optconsist_jax.evaluate import results
from optconsist_jax.evaluate import watch as ev_lib
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.config import ProbesEvalConfig
from optconsist_jax.io import checkpointer as run_checkpoints
from optconsist_jax.io import weights
from optconsist_jax.model import Llama, preset
from optconsist_jax.train import setup as train_setup
from optconsist_jax.train.config import ExperimentConfig
from optconsist_jax.typed_config import to_jsonable

MODEL = preset("tiny_gqa").replace(vocab_size=2048, num_layers=2)
BASE_SEED = 7
SEQ_LEN, BATCH, BATCHES = 16, 2, 2
TEXT = "\n\n".join(
    f"Document {i}: the cat sat on mat number {i}; two plus {i} is {i + 2}."
    for i in range(12))


def run_config(init_from="", seed=0):
  return ExperimentConfig.from_dict({
      "model": to_jsonable(MODEL),
      "train": {"num_steps": 4, "seed": seed},
      "optim": {"groups": {"adamw": {"optimizer": "adamw", "schedule": {
          "kind": "cosine", "peak": 1e-3, "total_steps": 4}}},
                "routes": [["all", "adamw"]]},
      "data": {"format": "synthetic", "seed": 0, "synthetic_examples": 40,
               "tokenizer_path": ""},
      "init_from": {"path": init_from, "kind": "orbax" if init_from
                    else "auto"}})


def save(w, config, step, params):
  train_setup.write_config(config, epath.Path(w))
  ck = run_checkpoints.RunCheckpoints(
      w, run_checkpoints.CheckpointConfig(keep=None, async_save=False),
      weights.identity(config.model, None),
      run_config=json.loads(config.to_json()))
  ck.save(step, params=params, opt_state={"count": jnp.zeros(())})
  ck.close()


def rank_one(params, scale, seed):
  """A rank-1 matrix on every kernel and embedding (zero elsewhere)."""
  rng = np.random.default_rng(seed)

  def one(path, x):
    name = "/".join(str(getattr(p, "key", p)) for p in path)
    if x.ndim < 2 or "norm" in name:
      return np.zeros(x.shape, np.float32)
    u = rng.normal(size=(*x.shape[:-1], 1))
    v = rng.normal(size=(*x.shape[:-2], 1, x.shape[-1]))
    return (scale * u * v / np.sqrt(x.shape[-2] * x.shape[-1])
            ).astype(np.float32)
  return jax.tree_util.tree_map_with_path(one, params)


def add(a, b):
  return jax.tree.map(lambda x, y: (np.asarray(x) + y).astype(np.float32),
                      a, b)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  """(base W, finetuning W, base params, finetuned params, held-out file)."""
  root = tmp_path_factory.mktemp("probes_eval")
  init = nnx.to_pure_dict(nnx.state(Llama(MODEL, rngs=nnx.Rngs(BASE_SEED)),
                                    nnx.Param))
  displacement = rank_one(init, 1.0, 0)
  base = add(init, displacement)
  finetuned = add(base, jax.tree.map(lambda d: 0.5 * d, displacement))
  bw, fw = str(root / "base"), str(root / "ft")
  save(bw, run_config(seed=BASE_SEED), 10, base)
  save(fw, run_config(init_from=bw, seed=1), 2, finetuned)
  text = str(root / "heldout.txt")
  with open(text, "w") as f:
    f.write(TEXT)
  return bw, fw, base, finetuned, text


def eval_config(text, mesh="fsdp", **probe_kw):
  return EvalConfig.from_dict(dict(
      mesh={"preset": mesh}, math=dict(protocols=()),
      multiple_choice=dict(hellaswag="", arc_challenge="", winogrande=""),
      lm_loss=dict(path=text, limit=0, max_len=32, batch_size=2),
      base_model="none", base="adamw",
      probes=dict(enabled=True, fractions=(0.01,), batch_size=BATCH,
                  seq_len=SEQ_LEN, hvp_batches=BATCHES, **probe_kw)))


def _evaluate(fw, config):
  for name in os.listdir(os.path.join(fw, "eval", "results")) if (
      os.path.isdir(os.path.join(fw, "eval", "results"))) else ():
    os.remove(os.path.join(fw, "eval", "results", name))
  out = io.StringIO()
  ev_lib.evaluate_workdir(fw, config, out=out)
  (record,) = results.read_workdir(fw)
  return record, out.getvalue()


def _nll(params, rows):
  """Token-mean next-token NLL of the rows, log-softmax in numpy."""
  model = Llama(MODEL, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  nnx.replace_by_pure_dict(state, params)
  nnx.update(model, state)
  logits = np.asarray(model(jnp.asarray(rows[:, :-1])), np.float64)
  logp = logits - logits.max(-1, keepdims=True)
  logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
  picked = np.take_along_axis(logp, rows[:, 1:, None], -1)[..., 0]
  return -picked.mean()


def test_job_probes_against_the_recorded_init_and_numpy(workdirs):
  _, fw, base, finetuned, text = workdirs
  job._LAST_PROBE_BASE.clear()  # pylint: disable=protected-access
  record, log = _evaluate(fw, eval_config(text))
  m = record.metrics
  # The init came from the base's recorded seed: dW = 0.5 P is P's subspace.
  for side in ("left", "right"):
    assert m[f"probe/pretrain_overlap_top1pct_{side}/all"] == pytest.approx(
        1.0, abs=1e-4)
    assert m[f"probe/pretrain_overlap_top1pct_{side}_random/all"] < 0.05
  # A rank-1 update has stable rank 1.
  assert m["probe/stable_rank/all"] == pytest.approx(1.0, abs=1e-3)
  # The measured loss change, on rows packed independently of pack_rows.
  tok = Tokenizer.tiny()
  stream = []
  for doc in TEXT.split("\n\n"):
    stream += [tok.bos_id, *tok.encode(doc), tok.eos_id]
  rows = np.asarray(stream[:BATCH * BATCHES * (SEQ_LEN + 1)]).reshape(
      -1, SEQ_LEN + 1)
  want = _nll(finetuned, rows) - _nll(base, rows)
  assert m["probe/loss_change"] == pytest.approx(want, rel=1e-3, abs=1e-4)
  assert m["probe/loss_base"] == pytest.approx(_nll(base, rows), rel=1e-4)
  # Activation drift is there; timings are recorded per checkpoint.
  assert "probe/act_rms_absdrift/mean" in m
  assert m["probe_seconds"] > 0 and m["probe_setup_seconds"] > 0
  assert m["eval_seconds"] > 0
  assert "probes: base" in log and "numbers vs" in log
  # A second job on the same base reuses what the first prepared.
  again, log2 = _evaluate(fw, eval_config(text))
  assert "prepared before" in log2 and "probe_setup_seconds" not in (
      again.metrics)
  for k in m:
    if k.startswith("probe/"):
      assert again.metrics[k] == m[k], k
  print(f"\nprobe eval: setup {m['probe_setup_seconds']:.2f} s, per"
        f" checkpoint {m['probe_seconds']:.2f} s, other evals"
        f" {m['eval_seconds']:.2f} s")


def test_sharded_mesh_gives_the_replicated_numbers(workdirs):
  _, fw, _, _, text = workdirs
  sharded, _ = _evaluate(fw, eval_config(text, mesh="fsdp"))
  replicated, _ = _evaluate(fw, eval_config(text, mesh="dp"))
  keys = [k for k in sharded.metrics if k.startswith("probe/")]
  assert len(keys) > 50
  for k in keys:
    assert replicated.metrics[k] == pytest.approx(
        sharded.metrics[k], rel=2e-3, abs=2e-5), k


def test_which_probes_and_no_base(workdirs, tmp_path):
  bw, fw, _, _, text = workdirs
  record, _ = _evaluate(fw, eval_config(text, which=("second_order",)))
  keys = {k for k in record.metrics if k.startswith("probe/")}
  assert "probe/curvature_ratio" in keys
  assert not any("share" in k or "act_" in k for k in keys)
  # A random-init run (the base itself) has no base: said, nothing probed.
  out = io.StringIO()
  ev_lib.evaluate_workdir(bw, eval_config(text), out=out)
  (rec,) = results.read_workdir(bw)
  assert not any(k.startswith("probe") for k in rec.metrics)
  assert "random init" in out.getvalue()


def test_probes_config_errors_name_the_key():
  with pytest.raises(ValueError, match="probes.which"):
    ProbesEvalConfig(which=("geometry", "hessian"))
  with pytest.raises(ValueError, match="probes.fractions"):
    ProbesEvalConfig(fractions=(0.0,))
  with pytest.raises(ValueError, match="probes.hvp_batches"):
    ProbesEvalConfig(hvp_batches=0)
  with pytest.raises(ValueError, match="unknown keys"):
    EvalConfig.from_dict({"probes": {"k": 3}})


def test_too_little_text_is_a_clear_error(workdirs, tmp_path):
  _, fw, _, _, _ = workdirs
  short = str(tmp_path / "short.txt")
  with open(short, "w") as f:
    f.write("Just a few words.")
  with pytest.raises(ValueError, match="probes need batch_size x"
                     " hvp_batches"):
    _evaluate(fw, eval_config(short))
