"""AdamW preconditioned by a frozen second moment (the base's).

A finetuning probe of the optimizer-model consistency story (arXiv
2605.06654): if a model pretrained with Adam sits where Adam's per-coordinate
preconditioner fits it, then finetuning with that preconditioner *held fixed*
isolates the preconditioner from the rest of the optimizer. With Adam (Kingma
& Ba, 2015, "Adam: A Method for Stochastic Optimization", Algorithm 1) and
decoupled weight decay (Loshchilov & Hutter, 2019, "Decoupled Weight Decay
Regularization"), step t of this variant is

  m_t     = b1 m_{t-1} + (1 - b1) g_t                     (fresh: m_0 = 0)
  m_hat_t = m_t / (1 - b1^t)
  v_hat   = v_base / (1 - b2^n_base)                      (frozen: not updated)
  u_t     = -lr_t (m_hat_t / (sqrt(v_hat) + eps) + wd theta_{t-1})

where v_base is the second moment of the base's pretraining Adam state after
its n_base steps, bias-corrected with that count once and kept so: Adam's own
update would have gone on to mix g_t^2 into v; here it never does.

`adamw(...)` is the whole optimizer (the registry name `adamw_frozen_nu`);
its state starts with an empty second moment (`nu_count` 0), which
`adopt_second_moment(state, base_state)` fills from a base's optax
`ScaleByAdamState` (the trainer does it when `init_from.optimizer_state` is
`frozen_second_moment`). An update before that is refused by giving NaN:
the trainer never lets it happen.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class FrozenNuAdamState(NamedTuple):
  """State of `scale_by_frozen_second_moment`.

  Attributes:
    count: int32 steps taken by this run (the first moment's bias correction).
    mu: the first moment, fresh.
    nu: the frozen second moment (the base's), never updated.
    nu_count: int32 steps the base took to reach `nu` (its bias correction).
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates
  nu_count: jax.Array


def scale_by_frozen_second_moment(b1: float = 0.9, b2: float = 0.999,
                                  eps: float = 1e-8,
                                  mu_dtype: Any | None = None
                                  ) -> optax.GradientTransformation:
  """Adam's direction m_hat / (sqrt(v_hat) + eps) with v_hat held fixed.

  Args:
    b1: decay of the first moment.
    b2: the base's second-moment decay (its bias correction 1 - b2^n_base).
    eps: added to sqrt(v_hat).
    mu_dtype: first-moment dtype; None = the params'.
  """

  def init_fn(params):
    return FrozenNuAdamState(
        count=jnp.zeros([], jnp.int32),
        mu=optax.tree.zeros_like(params, dtype=mu_dtype),
        nu=optax.tree.zeros_like(params),
        nu_count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    del params
    mu = optax.tree.update_moment(updates, state.mu, b1, 1)
    count = optax.safe_increment(state.count)
    mu_hat = optax.tree.bias_correction(mu, b1, count)
    # nu_count 0 (never adopted) gives 0 / 0 = NaN: refused downstream.
    nu_hat = optax.tree.bias_correction(state.nu, b2, state.nu_count)
    out = jax.tree.map(lambda m, v: m / (jnp.sqrt(v) + eps), mu_hat, nu_hat)
    return out, FrozenNuAdamState(count=count,
                                  mu=optax.tree.cast(mu, mu_dtype),
                                  nu=state.nu, nu_count=state.nu_count)

  return optax.GradientTransformation(init_fn, update_fn)


def adamw(learning_rate: optax.ScalarOrSchedule, b1: float = 0.9,
          b2: float = 0.999, eps: float = 1e-8, weight_decay: float = 0.0,
          mu_dtype: Any | None = None) -> optax.GradientTransformation:
  """AdamW (optax.adamw's chain) with the base's frozen second moment."""
  return optax.chain(
      scale_by_frozen_second_moment(b1=b1, b2=b2, eps=eps, mu_dtype=mu_dtype),
      optax.add_decayed_weights(weight_decay),
      optax.scale_by_learning_rate(learning_rate))


def _is_state(x) -> bool:
  return isinstance(x, (FrozenNuAdamState, optax.ScaleByAdamState))


def adopt_second_moment(state: Any, base_state: Any, *, where: str) -> Any:
  """`state` with each FrozenNuAdamState's nu and nu_count from `base_state`.

  The i-th FrozenNuAdamState of `state` (in tree order) takes the nu and
  count of the i-th optax.ScaleByAdamState of `base_state` (a base run's
  optimizer state of the same routing). Works on traced values (inside the
  state builder's jitted init).

  Raises:
    ValueError: the two hold different numbers of Adam states, or a second
      moment of another tree or shape; the message starts with `where`.
  """
  mine = [x for x in jax.tree.leaves(state, is_leaf=_is_state)
          if isinstance(x, FrozenNuAdamState)]
  theirs = [x for x in jax.tree.leaves(base_state, is_leaf=_is_state)
            if isinstance(x, optax.ScaleByAdamState)]
  if len(mine) != len(theirs) or not mine:
    raise ValueError(
        f"{where}: the finetuning optimizer has {len(mine)} frozen-second-"
        f"moment Adam state(s) but the base's optimizer state has"
        f" {len(theirs)} Adam state(s); they must pair one to one (an AdamW"
        " base finetuned with adamw_frozen_nu on the same routing)")
  for k, (m, b) in enumerate(zip(mine, theirs)):
    ms, bs = jax.tree.structure(m.nu), jax.tree.structure(b.nu)
    shapes = [(x.shape, y.shape) for x, y in
              zip(jax.tree.leaves(m.nu), jax.tree.leaves(b.nu))]
    if ms != bs or any(x != y for x, y in shapes):
      raise ValueError(f"{where}: Adam state {k}'s second moment does not"
                       " match the base's (another model or routing?)")
  pairs = iter(theirs)

  def fill(x):
    if not isinstance(x, FrozenNuAdamState):
      return x
    b = next(pairs)
    nu = jax.tree.map(lambda new, old: old.astype(new.dtype), x.nu, b.nu)
    return x._replace(nu=nu, nu_count=jnp.asarray(b.count, jnp.int32))
  return jax.tree.map(fill, state, is_leaf=_is_state)
