"""A vmapped population equals its members trained alone (8 fake CPU devices).

Each member of `train_population` is compared with `train.train` run alone on
that member's config: per-step losses, the checkpoints written (steps, epoch
marks, params), config.json. Members differ in init seed, data seed and
learning rate; controls check that the single runs differ from each other by
far more than the tolerance, so a population that shared a data order, an
init or a learning rate between members would fail the comparison.
"""

import json
import pathlib

import jax
from flax import nnx
import numpy as np
import orbax.checkpoint as ocp
import pytest

from optconsist_jax.train import config as config_types
from optconsist_jax import sharding
from optconsist_jax import train
from optconsist_jax.evaluate import job
from optconsist_jax.train import population
from optconsist_jax.io import checkpoint_layout as checkpoints
from optconsist_jax.io import weights

# Its fixtures are built once per test session (session scope: a module
# fixture is rebuilt whenever xdist interleaves another module's tests), and
# every test here runs on the same xdist worker (make test: --dist loadgroup).
pytestmark = pytest.mark.xdist_group("population_adamw_runs")

REPO = pathlib.Path(__file__).resolve().parent.parent
CONFIG = REPO / "configs" / "tiny_metamath.py"

# Two epochs of 2-3 steps (the packing, so the length, depends on data.seed):
# the runs cross an epoch-end checkpoint.
OVERRIDES = {
    "data.synthetic_examples": 24,
    "data.seq_len": 128,
    "data.global_batch_size": 8,
    "train.num_epochs": 2,
    "train.num_steps": 0,
    "train.log_every": 1,
    "train.stats_every": 0,
    "train.progress_every_secs": 1000.0,
    "train.parameter_overview": False,
    "checkpoint.every_steps": 1000,
}
# Same-step losses of one run computed alone and inside the population
# differ by float32 reassociation of the batched matmuls only.
LOSS_RTOL = 2e-5
PARAM_ATOL = 2e-5


def _config(arg, seed=0, data_seed=0, lr_scale=None, **extra):
  """tiny_metamath:arg with a member's seeds and learning rates.

  lr_scale: {group: factor} on each optimizer group's peak learning rate.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("tiny_metamath", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config(arg)
  values = {**OVERRIDES, "train.seed": seed, "data.seed": data_seed, **extra}
  for key, value in values.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  for group, factor in (lr_scale or {}).items():
    c.optim.groups[group].schedule.peak *= factor
  return config_types.ExperimentConfig.from_dict(c.to_dict())


def _params(step_dir):
  """{path: numpy array} of a checkpoint's params."""
  ref = pathlib.Path(step_dir) / checkpoints.PARAMS
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(ref).item_metadata.tree
    as_numpy = jax.tree.map(
        lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)
    tree = ckptr.restore(ref, args=ocp.args.PyTreeRestore(
        restore_args=as_numpy))
  return _flat(tree)


def _flat(tree):
  """{"a/b/0": numpy array} of a nested tree (int and str keys alike)."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in p):
          np.asarray(v) for p, v in flat}


def _ckpts(workdir):
  return [(c.step, c.epoch) for c in checkpoints.list_checkpoints(workdir)
          if c.complete]


def _max_param_diff(a_dir, b_dir):
  a, b = _params(a_dir), _params(b_dir)
  assert a.keys() == b.keys()
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a)


def _assert_same_run(ref_result, losses, pop_dir):
  """A population member's outputs against the same run trained alone.

  losses: the member's losses over all its segments.
  """
  ref_dir = pathlib.Path(ref_result.workdir)
  pop_dir = pathlib.Path(pop_dir)
  assert sorted(losses) == sorted(ref_result.losses)
  steps = sorted(ref_result.losses)
  np.testing.assert_allclose([losses[s] for s in steps],
                             [ref_result.losses[s] for s in steps],
                             rtol=LOSS_RTOL, atol=0)
  epochs = [(s, e) for s, e in _ckpts(ref_dir) if e is not None]
  assert len(epochs) == 2 and epochs[-1][0] == ref_result.step
  assert [(s, e) for s, e in _ckpts(pop_dir) if e is not None] == epochs
  for step, _ in epochs:
    diff = _max_param_diff(checkpoints.checkpoint_dir(ref_dir) / str(step),
                           checkpoints.checkpoint_dir(pop_dir) / str(step))
    assert diff < PARAM_ATOL, (step, diff)
  assert (json.loads((pop_dir / "config.json").read_text())
          == json.loads((ref_dir / "config.json").read_text()))


def _train_both(tmp_path, name, configs):
  """Each config alone, then all as one uninterrupted population."""
  refs = [train.train(c, tmp_path / f"{name}_ref{k}")
          for k, c in enumerate(configs)]
  dirs = [tmp_path / f"{name}_pop{k}" for k in range(len(configs))]
  pop = population.train_population(configs, dirs)
  for ref, member, d in zip(refs, pop, dirs):
    assert member.step == ref.step and member.stopped == "done"
    _assert_same_run(ref, member.losses, d)
  return refs, pop


# AdamW: member 1 differs from member 0 in init seed, data seed (a packing
# with fewer steps) and learning rate; member 2 only in learning rate.
ADAMW_MEMBERS = [dict(seed=0, data_seed=0),
                 dict(seed=1, data_seed=2, lr_scale={"adamw": 0.3}),
                 dict(seed=0, data_seed=0, lr_scale={"adamw": 0.3})]


@pytest.fixture(scope="session")
def adamw_runs(tmp_path_factory):
  """Single runs, and the population in segments with mixed starts.

  Member 0 first trains alone to step 2; the population then runs to step 4
  (member 0 does 2 steps, the others 4; member 1 ends there) and, resumed,
  to the end (members 0 and 2; member 1 is finished).
  """
  tmp = tmp_path_factory.mktemp("adamw")
  configs = [_config("adamw", **m, **{"train.stats_every": 2})
             for m in ADAMW_MEMBERS]
  refs = [train.train(c, tmp / f"ref{k}") for k, c in enumerate(configs)]
  dirs = [tmp / f"pop{k}" for k in range(len(configs))]
  first = train.train(configs[0], dirs[0], stop_after=2)
  segments = [population.train_population(configs, dirs, stop_after=4),
              population.train_population(configs, dirs)]
  return configs, refs, dirs, first, segments


def test_adamw_population_resumed_equals_single_runs(adamw_runs):
  configs, refs, dirs, first, segments = adamw_runs
  assert [r.step for r in refs] == [6, 4, 6]  # Packings of data seeds 0, 2.
  assert first.stopped == "preempted" and sorted(first.losses) == [1, 2]
  part, full = segments
  assert [r.step for r in part] == [4, 4, 4]
  assert [r.stopped for r in part] == ["preempted", "done", "preempted"]
  assert [sorted(r.losses) for r in part] == [[3, 4], [1, 2, 3, 4],
                                               [1, 2, 3, 4]]
  assert part[0].perf["population_size"] == 3
  assert [r.step for r in full] == [6, 4, 6]
  assert [r.stopped for r in full] == ["done"] * 3
  assert [sorted(r.losses) for r in full] == [[5, 6], [], [5, 6]]
  for k, (ref, d) in enumerate(zip(refs, dirs)):
    losses = {**part[k].losses, **full[k].losses}
    if k == 0:
      losses.update(first.losses)
    _assert_same_run(ref, losses, d)


def test_finished_population_is_skipped(adamw_runs):
  """As train.train on a finished workdir: nothing trained or written."""
  configs, refs, dirs, _, _ = adamw_runs
  listing = [sorted(p.name for p in checkpoints.checkpoint_dir(d).iterdir())
             for d in dirs]
  again = population.train_population(configs, dirs)
  assert [r.step for r in again] == [r.step for r in refs]
  assert [r.losses for r in again] == [{}, {}, {}]
  assert [r.stopped for r in again] == ["done"] * 3
  assert [sorted(p.name for p in checkpoints.checkpoint_dir(d).iterdir())
          for d in dirs] == listing


def test_controls_single_runs_differ(adamw_runs):
  """A shared data order or LR would move a member far off its own run."""
  configs, refs, _, _, _ = adamw_runs
  final = [checkpoints.checkpoint_dir(r.workdir) / str(r.step) for r in refs]
  # Learning rate alone (members 0 and 2: same init and data): the same
  # first loss, far apart after training.
  assert refs[0].losses[1] == pytest.approx(refs[2].losses[1], rel=1e-6)
  assert _max_param_diff(final[0], final[2]) > 100 * PARAM_ATOL
  assert abs(refs[0].losses[6] - refs[2].losses[6]) > 100 * LOSS_RTOL
  # Data order: members 0 and 1 see different first batches.
  from optconsist_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  first = [next(pipeline.build_pipeline(c.data).iterator())["inputs"]
           for c in configs[:2]]
  assert not np.array_equal(first[0], first[1])


def test_checkpoints_read_by_eval_loader(adamw_runs):
  """The eval job labels and restores a member's checkpoints unchanged."""
  configs, refs, dirs, _, _ = adamw_runs
  mesh = sharding.make_mesh(configs[1].mesh)
  workdir, ref = dirs[1], refs[1]
  run = job.read_run(workdir)
  assert run.lr == pytest.approx(configs[1].optim.groups["adamw"].schedule.peak)
  assert run.lr == pytest.approx(0.3 * configs[0].optim.groups[
      "adamw"].schedule.peak)
  assert len(_ckpts(workdir)) >= 2
  for step, epoch in _ckpts(workdir):
    step_dir = checkpoints.checkpoint_dir(workdir) / str(step)
    meta = checkpoints.read_meta(step_dir)
    info = job.run_info(meta["config"], str(step_dir))
    assert info.lr == run.lr and info.final_step == ref.step
    model = weights.restore_run_model(
        step_dir, info.model, lora=info.lora, mesh=mesh,
        rules=configs[1].mesh.rules, model_identity=info.identity)
    restored = _flat(nnx.state(model, nnx.Param).to_pure_dict())
    want = _params(checkpoints.checkpoint_dir(ref.workdir) / str(step))
    assert restored.keys() == want.keys()
    for k in want:
      np.testing.assert_allclose(restored[k], want[k], rtol=0,
                                 atol=PARAM_ATOL, err_msg=f"{step} {k}")
    assert epoch is None or epoch == step // info.steps_per_epoch


def test_muon_members_equal_single_runs(tmp_path):
  # The two groups' learning rates scale by different factors.
  configs = [_config("muon"),
             _config("muon", seed=1, data_seed=1,
                     lr_scale={"muon": 0.5, "adamw": 0.3})]
  _train_both(tmp_path, "muon", configs)


def test_lora_members_equal_single_runs(tmp_path, adamw_runs):
  """LoRA from trained bases, a different one per member (pretraining seeds
  of one base); adapter init and dropout per member seed."""
  refs = adamw_runs[1]
  configs = [_config("lora", **{"init_from.path": refs[0].workdir}),
             _config("lora", seed=1, data_seed=1, lr_scale={"adamw": 0.3},
                     **{"init_from.path": refs[1].workdir,
                        "train.dropout_seed": 7})]
  assert configs[0].lora.dropout > 0
  _train_both(tmp_path, "lora", configs)


def test_members_differing_elsewhere_are_refused(tmp_path):
  configs = [_config("adamw"), _config("adamw", **{"train.num_epochs": 3})]
  with pytest.raises(ValueError, match=r"member 1 .*train\.num_epochs"):
    population.train_population(configs, [tmp_path / "a", tmp_path / "b"])
  configs = [_config("adamw"),
             _config("adamw", **{"optim.groups.adamw.weight_decay": 0.1})]
  with pytest.raises(ValueError, match=r"optim\.groups\.adamw\.weight_decay"):
    population.train_population(configs, [tmp_path / "a", tmp_path / "b"])
  with pytest.raises(ValueError, match="not distinct"):
    population.train_population([_config("adamw")] * 2, [tmp_path / "a"] * 2)
  assert not (tmp_path / "a").exists()
