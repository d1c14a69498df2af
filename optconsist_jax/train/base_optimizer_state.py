"""A finetuning run's optimizer state taken from its base run (init_from).

`config.init_from.optimizer_state` (io/weights.py InitFromConfig):

  fresh                 the optimizer's own init (nothing here applies)
  carried               the base Orbax run's saved optimizer state, restored
                        into this run's optimizer (same family per group, same
                        routing): Adam's moments and count, Muon's momentum.
                        The counts keep the base's values (Adam's bias
                        correction goes on from there); the learning-rate
                        schedules are read at count - base step
                        (`schedule_offset`), so they start at this run's 0.
  frozen_second_moment  an AdamW (`adamw_frozen_nu`, optim/
                        frozen_second_moment.py) whose second moment and its
                        bias-correction count are the base's, held fixed; the
                        first moment starts fresh. The base must be an AdamW
                        run of the same routing.

Only an Orbax run of this project carries an optimizer state we read: a
Hugging Face base has none, and a nanoGPT ckpt.pt's torch optimizer state is
not read (io/nanogpt.py reads `model` and `model_args` only). Everything is
checked (`check`) before anything compiles; the state is restored straight
into its shardings and adopted inside the state builder's jitted init
(train/state.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax

from optconsist_jax import optim as optim_lib
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import weights
from optconsist_jax.optim import frozen_second_moment

FROZEN_OPTIMIZER = "adamw_frozen_nu"
KEY = "config.init_from.optimizer_state"


def _mode(config) -> str:
  return config.init_from.optimizer_state


def _base_optim(config) -> optim_lib.OptimConfig:
  path = config.init_from.path
  return optim_lib.OptimConfig.from_dict(weights.run_config_of(path)["optim"])


def check(config) -> None:
  """Refuses a setting that cannot work, naming the config key and the base.

  Args:
    config: the run's ExperimentConfig.
  """
  mode, src = _mode(config), config.init_from
  frozen = sorted(n for n, g in config.optim.groups.items()
                  if g.optimizer == FROZEN_OPTIMIZER)
  if mode != "frozen_second_moment" and frozen:
    raise ValueError(
        f"config.optim.groups.{frozen[0]}.optimizer={FROZEN_OPTIMIZER!r}"
        f" needs {KEY}='frozen_second_moment' (its second moment comes from"
        f" the base), not {mode!r}")
  if mode == "fresh":
    return
  if not src.path:
    raise ValueError(f"{KEY}={mode!r} needs config.init_from.path (a base"
                     " Orbax run)")
  kind = weights.kind_of(src.path, src.kind)
  if kind != "orbax":
    raise ValueError(
        f"{KEY}={mode!r}: config.init_from.path={src.path!r} is a {kind}"
        " base, which carries no optimizer state we read (a Hugging Face"
        " folder has none; a nanoGPT ckpt.pt's torch optimizer state is not"
        " read). Use an Orbax run of this project, or"
        f" {KEY}='fresh'")
  if config.lora is not None:
    raise ValueError(f"{KEY}={mode!r}: LoRA adapters have no base optimizer"
                     " state; use 'fresh'")
  try:
    base = _base_optim(config)
  except (OSError, KeyError, ValueError) as e:
    raise ValueError(f"{KEY}={mode!r}: cannot read the optimizer of the base"
                     f" run {src.path!r} ({e})") from None
  mine = config.optim
  if tuple(map(tuple, base.routes)) != tuple(map(tuple, mine.routes)):
    raise ValueError(
        f"{KEY}={mode!r}: config.optim.routes {list(mine.routes)} differ from"
        f" the base run {src.path!r}'s {list(base.routes)}")
  for name, g in mine.groups.items():
    theirs = base.groups.get(name)
    want = g.optimizer
    if mode == "frozen_second_moment":
      want = "adamw" if g.optimizer == FROZEN_OPTIMIZER else g.optimizer
    if theirs is None or theirs.optimizer != want:
      raise ValueError(
          f"{KEY}={mode!r}: config.optim.groups.{name}.optimizer="
          f"{g.optimizer!r} needs the base run {src.path!r} to have trained"
          f" that group with {want!r}; it has"
          f" {theirs.optimizer if theirs else 'no such group'!r}")
  if mode == "frozen_second_moment" and not frozen:
    raise ValueError(
        f"{KEY}='frozen_second_moment' needs an optimizer group with"
        f" optimizer={FROZEN_OPTIMIZER!r} (e.g. config.optim.groups.adamw)")


def schedule_offset(config) -> int:
  """Steps the schedules are shifted by (`optim.build`): the base's, when its
  counts are carried over; else 0."""
  if _mode(config) != "carried":
    return 0
  return ckpt_lib.step_of(config.init_from.path, config.init_from.step)


def load(config, builder, tx, mesh) -> tuple[Any, Callable[[Any, Any], Any]]:
  """(the base's optimizer state, sharded; how the run's state adopts it).

  Args:
    config: the run's ExperimentConfig (`check`ed).
    builder: its state.StateBuilder.
    tx: its optimizer.
    mesh: its mesh.

  Returns:
    `base_opt_state` and `adopt(fresh, base)` for `StateBuilder.init`.
  """
  src, mode = config.init_from, _mode(config)
  if mode == "carried":
    abstract = builder.abstract_state(tx)[0].opt_state
  else:
    base_tx = optim_lib.build(_base_optim(config), builder.abstract_params,
                              mesh=mesh)
    abstract = builder.abstract_state(base_tx)[0].opt_state
  state, _ = ckpt_lib.restore_opt_state(src.path, src.step, abstract)
  if mode == "carried":
    return state, _as_is
  where = f"{KEY}='frozen_second_moment' from {src.path}"
  return state, lambda fresh, base: frozen_second_moment.adopt_second_moment(
      fresh, base, where=where)


def _as_is(fresh, base):
  """The carried state, cast to the fresh one's dtypes (same structure)."""
  return jax.tree.map(lambda f, b: b.astype(f.dtype), fresh, base)
