"""A finetuning run's optimizer state from its base run (init_from.optimizer_state).

The frozen-second-moment AdamW against a numpy transcription of its equations
(Kingma & Ba 2015, Algorithm 1, with v held fixed; Loshchilov & Hutter 2019
decay); "carried" against the base's optimizer state as Orbax saved it (read
back raw, without our code), restored sharded on the 8 fake CPU devices;
the schedule's restart at step 0 by its effect (a warmup that starts at 0
leaves the params unchanged on the first step); and the refusals.
"""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest

import tiny_config
from optconsist_jax import optim as optim_lib
from optconsist_jax import sharding
from optconsist_jax import train
from optconsist_jax.io import checkpoint_layout as checkpoints
from optconsist_jax.optim import frozen_second_moment as fsm
from optconsist_jax.train import base_optimizer_state
from optconsist_jax.train import population
from optconsist_jax.train import setup as setup_lib

BASE_STEPS = 3
OVERRIDES = {
    "data.synthetic_examples": 24, "data.seq_len": 128,
    "data.global_batch_size": 8, "train.num_epochs": 0,
    "train.num_steps": BASE_STEPS, "train.log_every": 1,
    "train.stats_every": 0, "train.progress_every_secs": 1000.0,
    "train.parameter_overview": False, "checkpoint.every_steps": 1000}


def _numpy_frozen_adamw(params, grads_seq, nu, nu_count, lr, b1, b2, eps, wd):
  """The update equations of optim/frozen_second_moment.py, in numpy."""
  p, m = params.copy(), np.zeros_like(params)
  v_hat = nu / (1 - b2**nu_count)
  for t, g in enumerate(grads_seq, 1):
    m = b1 * m + (1 - b1) * g
    m_hat = m / (1 - b1**t)
    p = p - lr * (m_hat / (np.sqrt(v_hat) + eps) + wd * p)
  return p


def test_frozen_second_moment_matches_numpy():
  rng = np.random.default_rng(0)
  shape = (4, 3)
  p0 = rng.normal(size=shape).astype(np.float32)
  nu = rng.uniform(1e-4, 1e-2, size=shape).astype(np.float32)
  grads = [rng.normal(size=shape).astype(np.float32) for _ in range(4)]
  lr, b1, b2, eps, wd, nu_count = 1e-2, 0.9, 0.95, 1e-8, 0.1, 7
  tx = fsm.adamw(lr, b1=b1, b2=b2, eps=eps, weight_decay=wd)
  params = {"w": jnp.asarray(p0)}
  state = tx.init(params)
  base = optax.ScaleByAdamState(count=jnp.asarray(nu_count, jnp.int32),
                                mu={"w": jnp.ones(shape)},
                                nu={"w": jnp.asarray(nu)})
  state = fsm.adopt_second_moment(state, (base, optax.EmptyState()),
                                  where="test")
  for g in grads:
    updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  want = _numpy_frozen_adamw(p0, grads, nu, nu_count, lr, b1, b2, eps, wd)
  np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=2e-5,
                             atol=1e-6)
  inner = state[0]
  np.testing.assert_array_equal(np.asarray(inner.nu["w"]), nu)  # frozen
  assert int(inner.nu_count) == nu_count and int(inner.count) == len(grads)


def test_frozen_second_moment_refuses_a_base_without_adam():
  tx = fsm.adamw(1e-3)
  state = tx.init({"w": jnp.zeros(2)})
  with pytest.raises(ValueError, match="where-key.*0 Adam state"):
    fsm.adopt_second_moment(state, (optax.EmptyState(),), where="where-key")


@pytest.fixture(scope="module")
def adamw_base(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("adamw_base")
  train.train(tiny_config.load("adamw", OVERRIDES), workdir)
  return workdir


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree):
  """{"1/0/mu/embed/value": numpy array}, NamedTuple fields by name."""
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in p): np.asarray(v) for p, v in flat}


def _saved_opt_state(workdir):
  """The optimizer state as Orbax wrote it, read raw (numpy, no target)."""
  ref = pathlib.Path(workdir) / "checkpoints" / str(BASE_STEPS) / (
      checkpoints.OPT_STATE)
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(ref).item_metadata.tree
    tree = ckptr.restore(ref, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
  return _flat(tree)


class _NoCheckpoints:
  def restore_newest(self, **unused):
    return None


def _initial(arg, base, mode, **extra):
  config = tiny_config.load(arg, {
      **OVERRIDES, "train.num_steps": 4, "init_from.path": str(base),
      "init_from.optimizer_state": mode, **extra}).resolve_total_steps(4)
  mesh = sharding.make_mesh(config.mesh)
  setup_lib.preflight(config, mesh)
  s = setup_lib.setup(config, mesh)
  state, _, how = setup_lib.initial_state(config, s, _NoCheckpoints(), None)
  return config, s, state, how


def test_carried_restores_the_base_moments_and_counts(adamw_base):
  saved = _saved_opt_state(adamw_base)
  config, s, state, how = _initial(
      "adamw", adamw_base, "carried",
      **{"optim.groups.adamw.schedule.warmup_fraction": 0.5})
  assert "optimizer state: carried" in how
  ours = _flat(state.opt_state)
  assert ours.keys() == saved.keys()
  for k in saved:
    np.testing.assert_array_equal(ours[k], saved[k], err_msg=k)
  counts = [k for k in saved if k.endswith("count")]
  assert counts and all(int(saved[k]) == BASE_STEPS for k in counts)
  assert any(np.abs(saved[k]).max() > 0 for k in saved if "/nu/" in k)
  # Sharded like the fresh state (8 fake devices: the fsdp axis is used).
  for a, sh in zip(jax.tree.leaves(state.opt_state),
                   jax.tree.leaves(s.shardings.opt_state)):
    assert a.sharding.is_equivalent_to(sh, a.ndim)
  assert s.schedule_offset == BASE_STEPS
  # The schedule restarts at 0: its warmup starts at lr 0, so the first
  # step leaves the params as they were (a schedule read at the carried
  # count, past its warmup, would move them).
  assert config.optim.groups["adamw"].schedule.warmup() == 2
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, new_opt = s.tx.update(grads, state.opt_state, state.params)
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(updates)) == 0
  fresh_tx = optim_lib.build(config.optim, s.builder.abstract_params)
  moved, _ = fresh_tx.update(grads, state.opt_state, state.params)
  assert max(float(jnp.abs(u).max()) for u in jax.tree.leaves(moved)) > 0
  adam = new_opt[1][0]
  assert int(adam.count) == BASE_STEPS + 1  # bias correction goes on


def test_frozen_second_moment_takes_the_base_nu(adamw_base):
  saved = _saved_opt_state(adamw_base)
  _, _, state, _ = _initial(
      "adamw", adamw_base, "frozen_second_moment",
      **{"optim.groups.adamw.optimizer": "adamw_frozen_nu"})
  inner = state.opt_state[1][0]
  assert isinstance(inner, fsm.FrozenNuAdamState)
  assert int(inner.nu_count) == BASE_STEPS and int(inner.count) == 0
  nu = _flat(inner.nu)
  for k, v in nu.items():
    np.testing.assert_array_equal(v, saved[f"1/0/nu/{k}"], err_msg=k)
  assert all(not np.any(v) for v in _flat(inner.mu).values())


def test_refusals(adamw_base, tmp_path):
  key = "config.init_from.optimizer_state"
  with pytest.raises(ValueError, match=f"{key}='carried'.*routes.*differ"
                     f".*{adamw_base}"):
    _initial("lion", adamw_base, "carried")
  with pytest.raises(ValueError, match=f"{key}='carried'.*groups.adamw"
                     f".optimizer='lion'.*{adamw_base}.*'adamw'"):
    _initial("adamw", adamw_base, "carried",
             **{"optim.groups.adamw.optimizer": "lion"})
  with pytest.raises(ValueError, match="adamw_frozen_nu.*needs " + key):
    _initial("adamw", adamw_base, "fresh",
             **{"optim.groups.adamw.optimizer": "adamw_frozen_nu"})
  hf = tmp_path / "hf"
  hf.mkdir()
  (hf / "config.json").write_text("{}")
  (hf / "model.safetensors").write_text("")
  with pytest.raises(ValueError, match=f"{key}='carried'.*hf base.*carries"
                     " no optimizer state"):
    base_optimizer_state.check(tiny_config.load("adamw", {
        **OVERRIDES, "init_from.path": str(hf),
        "init_from.optimizer_state": "carried"}))
  with pytest.raises(ValueError, match=f"{key}='kept'; expected one of"):
    tiny_config.load("adamw", {"init_from.optimizer_state": "kept"})


def test_carried_population_equals_its_runs_alone(adamw_base, tmp_path):
  """A vmapped population of carried-state runs (the study trains them so)
  equals each run trained alone; a fresh-state run is the control."""
  peak = tiny_config.load("adamw").optim.groups["adamw"].schedule.peak

  def config(seed, scale, mode="carried"):
    return tiny_config.load("adamw", {
        **OVERRIDES, "train.num_steps": 4, "train.seed": seed,
        "data.seed": seed, "init_from.path": str(adamw_base),
        "init_from.optimizer_state": mode,
        "optim.groups.adamw.schedule.peak": peak * scale})
  configs = [config(0, 1.0), config(1, 0.3)]
  refs = [train.train(c, tmp_path / f"ref{k}") for k, c in enumerate(configs)]
  pop = population.train_population(
      configs, [tmp_path / f"pop{k}" for k in range(2)])
  for ref, member in zip(refs, pop):
    steps = sorted(ref.losses)
    assert sorted(member.losses) == steps == [1, 2, 3, 4]
    np.testing.assert_allclose([member.losses[s] for s in steps],
                               [ref.losses[s] for s in steps], rtol=2e-5)
  fresh = train.train(config(0, 1.0, "fresh"), tmp_path / "fresh")
  assert max(abs(fresh.losses[s] - refs[0].losses[s]) / refs[0].losses[s]
             for s in (2, 3, 4)) > 1e-3
