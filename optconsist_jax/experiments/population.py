"""Training runs that differ only in seed and learning rate, as one population.

Contract (the reproduction driver relies on it): `train_population(configs,
workdirs)` takes ordinary `optconsist_jax.train` experiment configs that agree
on everything except `train.seed`, `data.seed`, `train.dropout_seed` and the
optimizer's peak learning rate, and leaves each workdir exactly as
`train.train(config, workdir)` would (config.json, a checkpoint per epoch),
returning one `train.TrainResult` per member in order.

This first version trains the members one after another.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

from optconsist_jax import config_types


def train_population(configs: Sequence[config_types.ExperimentConfig],
                     workdirs: Sequence[str | os.PathLike]) -> list:
  from optconsist_jax import train  # pylint: disable=g-import-not-at-top
  if len(configs) != len(workdirs):
    raise ValueError(f"{len(configs)} configs but {len(workdirs)} workdirs")
  return [train.train(c, w) for c, w in zip(configs, workdirs)]
