"""Optimizer families by name: every Optax alias, optax.contrib, and our Muon.

A factory is called as `factory(learning_rate, weight_decay, **kwargs)` (plus
`context=BuildContext(...)` when it declares a `context` parameter) and returns
an optax.GradientTransformation whose updates already include the learning
rate and the sign (like `optax.adamw`). Adding a family is a few lines:

  @registry.register("my_sgd")
  def _my_sgd(learning_rate, weight_decay, momentum=0.9):
    return optax.chain(optax.sgd(learning_rate, momentum),
                       registry.decoupled_weight_decay(weight_decay,
                                                       learning_rate))

and a config entry `groups.<name>.optimizer = "my_sgd"`.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import optax
from optax.contrib import MuonDimensionNumbers

from optconsist_jax.optim import muon as muon_lib

Factory = Callable[..., optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a factory may need besides its kwargs (the params' layout)."""
  mesh: Mesh | None = None
  shardings: dict[str, NamedSharding | None] = dataclasses.field(
      default_factory=dict)


_REGISTRY: dict[str, Factory] = {}


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator adding a factory under `name` (an error if taken)."""
  def add(factory: Factory) -> Factory:
    if name in _REGISTRY:
      raise ValueError(f"optimizer {name!r} is already registered")
    _REGISTRY[name] = factory
    return factory
  return add


def names() -> list[str]:
  return sorted(_REGISTRY)


def get(name: str) -> Factory:
  """The factory for `name`; unknown names list the valid ones."""
  try:
    return _REGISTRY[name]
  except KeyError:
    raise ValueError(
        f"unknown optimizer {name!r}; valid optimizers: {names()}") from None


class DecoupledDecayState(NamedTuple):
  count: jax.Array


def decoupled_weight_decay(weight_decay: float,
                           learning_rate: optax.ScalarOrSchedule
                           ) -> optax.GradientTransformation:
  """Adds -lr_t * wd * param to the updates (Loshchilov & Hutter 2019).

  Chained after an optimizer whose updates already carry -lr_t, this gives
  AdamW-style decay for families that have no weight_decay argument.
  """
  schedule = (learning_rate if callable(learning_rate)
              else (lambda _: learning_rate))

  def init_fn(params):
    del params
    return DecoupledDecayState(jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if not weight_decay:
      return updates, state
    if params is None:
      raise ValueError("decoupled_weight_decay needs params in update()")
    lr = schedule(state.count)
    updates = jax.tree.map(
        lambda u, p: (u - lr * weight_decay * p).astype(u.dtype), updates,
        params)
    return updates, DecoupledDecayState(optax.safe_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _wrap_optax(fn: Callable[..., optax.GradientTransformation]) -> Factory:
  takes_decay = "weight_decay" in inspect.signature(fn).parameters

  def factory(learning_rate, weight_decay, **kwargs):
    if takes_decay:
      return fn(learning_rate=learning_rate, weight_decay=weight_decay,
                **kwargs)
    tx = fn(learning_rate=learning_rate, **kwargs)
    if weight_decay:
      tx = optax.chain(tx, decoupled_weight_decay(weight_decay, learning_rate))
    return tx

  factory.__doc__ = fn.__doc__
  return factory


_OPTAX_ALIASES = (
    "adabelief", "adadelta", "adafactor", "adagrad", "adam", "adamax",
    "adamaxw", "adamw", "adan", "amsgrad", "fromage", "lamb", "lars", "lion",
    "nadam", "nadamw", "noisy_sgd", "novograd", "optimistic_gradient_descent",
    "polyak_sgd", "radam", "rmsprop", "rprop", "sgd", "sign_sgd", "sm3",
    "yogi")
_CONTRIB = (
    "acprop", "ademamix", "adopt", "cocob", "dadapt_adamw", "dog", "dowg",
    "madgrad", "momo", "momo_adam", "prodigy", "schedule_free_adamw",
    "schedule_free_sgd", "simplified_ademamix", "sophia")

for _name in _OPTAX_ALIASES:
  if hasattr(optax, _name):
    register(_name)(_wrap_optax(getattr(optax, _name)))
for _name in _CONTRIB:
  if hasattr(optax.contrib, _name):
    register(f"contrib.{_name}")(_wrap_optax(getattr(optax.contrib, _name)))


def _matrix_dims(params):
  # The last two axes are the matrix, leading axes (scanned layers) a batch.
  return jax.tree.map(
      lambda p: MuonDimensionNumbers(-2, -1) if p.ndim >= 2 else None, params)


@register("contrib.muon")
def _contrib_muon(learning_rate, weight_decay, **kwargs):
  """optax.contrib.muon; stacked [L, in, out] leaves count as L matrices.

  Route only hidden matrices to it: its own rule would also send every other
  >=2-D leaf it sees to Muon, and its Adam branch is Nesterov Adam.
  """
  kwargs.setdefault("muon_weight_dimension_numbers", _matrix_dims)
  return optax.contrib.muon(learning_rate, weight_decay=weight_decay, **kwargs)


@register("muon")
def _muon(learning_rate, weight_decay, *, context: BuildContext, **kwargs):
  """Our Muon (optconsist_jax.optim.muon.muon) on the params' mesh."""
  kwargs.setdefault("mesh", context.mesh)
  kwargs.setdefault("shardings", context.shardings)
  return muon_lib.muon(learning_rate, weight_decay=weight_decay, **kwargs)


def make(name: str, learning_rate: optax.ScalarOrSchedule, weight_decay: float,
         kwargs: dict[str, Any], context: BuildContext, *,
         where: str) -> optax.GradientTransformation:
  """Calls the named factory; bad kwargs name the config key `where`."""
  factory = get(name)
  kwargs = dict(kwargs)
  for reserved in ("learning_rate", "weight_decay", "context"):
    if reserved in kwargs:
      raise ValueError(f"{where}.kwargs.{reserved}: set it on the group "
                       "(schedule / weight_decay), not in kwargs")
  if "context" in inspect.signature(factory).parameters:
    kwargs["context"] = context
  try:
    return factory(learning_rate, weight_decay, **kwargs)
  except TypeError as e:
    raise ValueError(f"{where}: optimizer {name!r} rejected kwargs "
                     f"{sorted(kwargs)}: {e}") from e
