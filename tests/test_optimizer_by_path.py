"""A new optimizer family without editing the package: one config entry.

This module defines a transform (`make`, sign descent on an EMA of the
gradients, i.e. signum written from scratch); the tiny training config names
it by import path; it trains, the planner compiles it and the eval job labels
it. Nothing in optconsist_jax or configs/ knows this module.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from optconsist_jax.evaluate import job
from optconsist_jax import optim
from optconsist_jax.tools.plan import aot as planner
from optconsist_jax import train
from optconsist_jax.train.config import ExperimentConfig

REPO = pathlib.Path(__file__).resolve().parent.parent
NAME = f"{__name__}:make"  # e.g. "test_optimizer_by_path:make"


def make(learning_rate, beta=0.9):
  """-lr * sign(EMA of the gradients): the user's new family."""
  def init(params):
    return jax.tree.map(jnp.zeros_like, params)

  def update(grads, ema, params=None):
    del params
    ema = jax.tree.map(lambda m, g: beta * m + (1 - beta) * g, ema, grads)
    return jax.tree.map(jnp.sign, ema), ema

  return optax.chain(optax.GradientTransformation(init, update),
                     optax.scale_by_learning_rate(learning_rate))


def _tiny_config(arg):
  spec = importlib.util.spec_from_file_location(
      "tiny_metamath", REPO / "configs" / "tiny_metamath.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(arg)
  c.data.synthetic_examples = 64
  c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.train.num_steps = 6
  c.train.log_every = 1
  c.checkpoint.every_steps = 0
  c.checkpoint.async_save = False
  return c


def test_the_factory_is_the_transform_it_names():
  params = {"w": jnp.array([1.0, -2.0, 3.0])}
  cfg = optim.presets.preset(NAME, peak_lr=0.5, schedule="constant",
                             warmup_fraction=0.0, clip_norm=None,
                             kwargs={"beta": 0.5})
  tx = optim.build(cfg, params)
  grads = {"w": jnp.array([0.2, -4.0, 0.0])}
  u, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(u["w"], -0.5 * np.sign([0.1, -2.0, 0.0]))


def test_a_config_naming_it_trains_plans_and_is_labelled(tmp_path):
  c = _tiny_config(NAME)
  assert c.optim.groups.main.optimizer == NAME
  config = ExperimentConfig.from_dict(c.to_dict())
  result = train.train(config, tmp_path)
  losses = [result.losses[s] for s in sorted(result.losses)]
  assert result.step == 6 and all(np.isfinite(losses))
  assert losses[-1] < losses[0], losses

  # The eval job reads the run's config.json and labels it by the optimizer.
  run = job.read_run(tmp_path)
  assert run.method == NAME
  assert run.lr == 3e-3

  # The planner compiles the same config on 8 CPU devices.
  r = planner.plan(planner.spec_from_config(c, "cpu-8", grad_accum_steps=1))
  assert r.spec.optimizer == NAME
  assert r.trainable_params == config.model.num_params()
  assert r.peak_bytes > 0 and r.collectives is not None
