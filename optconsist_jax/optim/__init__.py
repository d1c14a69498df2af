"""Optimizers: Optax families by config, routing of params to groups, Muon.

  tx = optim.build(optim.OptimConfig.from_dict(config.optim),
                   nnx.state(model, trainable), mesh=mesh)

Presets: `optim.presets.preset("adamw" | "muon" | "lora" | <any optimizer>,
...)`. `optim.muon` is the Muon module (`optim.muon.newton_schulz`). See
optim/config.py for the config tree, optim/registry.py for how optimizer
names resolve (any Optax optimizer, or `pkg.module:function`), optim/muon.py
for Muon and its sharded Newton-Schulz strategies.
"""

from optconsist_jax.optim import muon
from optconsist_jax.optim import presets
from optconsist_jax.optim import registry
from optconsist_jax.optim.builder import assign_groups
from optconsist_jax.optim.builder import build
from optconsist_jax.optim.builder import learning_rates
from optconsist_jax.optim.config import GroupConfig
from optconsist_jax.optim.config import OptimConfig
from optconsist_jax.optim.schedules import ScheduleConfig
from optconsist_jax.optim.schedules import make_schedule
