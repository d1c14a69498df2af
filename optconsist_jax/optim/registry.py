"""Optimizer families by name: any Optax optimizer, an import path, our Muon.

`groups.<g>.optimizer` in an optim config resolves, in this order, to

  a registered name     `muon` (ours), `contrib.muon` (optax.contrib.muon on
                        stacked matrices), `adamw_frozen_nu` (AdamW with a
                        base's frozen second moment), or one a user
                        registered;
  an import path        `"my_pkg.my_opt:make"`: the callable `make` in module
                        `my_pkg.my_opt` (imported on first use);
  an Optax optimizer    `<name>` or `optax.<name>` for any `optax.<name>`, and
                        `contrib.<name>` or `optax.contrib.<name>` for any
                        `optax.contrib.<name>`, that takes `learning_rate`
                        (e.g. `adamw`, `lion`, `signum`, `contrib.prodigy`).

Nothing lists the Optax names, so a newer Optax's optimizers are reachable as
soon as it is installed. Import paths and Optax functions are called the
Optax way, `fn(learning_rate=schedule, **kwargs)`; `weight_decay` is passed
when the function takes it, else decoupled decay is chained after it
(`decoupled_weight_decay`), and `context=BuildContext(...)` when it declares a
`context` parameter. So a new family is one function and one config entry:

  # my_pkg/my_opt.py
  def make(learning_rate, momentum=0.9):
    return optax.sgd(learning_rate, momentum)

  # the training config
  c.optim = optim.presets.preset("my_pkg.my_opt:make").to_dict()

`register(name)` adds a factory called as
`factory(learning_rate, weight_decay, **kwargs)`; registering a name again
with the same function (a config file executed twice) is harmless.
"""

from __future__ import annotations

from collections.abc import Callable
import dataclasses
import importlib
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding
import optax
from optax.contrib import MuonDimensionNumbers

from optconsist_jax.optim import frozen_second_moment
from optconsist_jax.optim import muon as muon_lib

Factory = Callable[..., optax.GradientTransformation]


@dataclasses.dataclass(frozen=True)
class BuildContext:
  """What a factory may need besides its kwargs (the params' layout)."""
  mesh: Mesh | None = None
  shardings: dict[str, NamedSharding | None] = dataclasses.field(
      default_factory=dict)


_REGISTRY: dict[str, Factory] = {}


def _qualname(fn: Callable[..., Any]) -> str:
  return f"{getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)}"


def register(name: str) -> Callable[[Factory], Factory]:
  """Decorator adding a factory under `name`.

  Registering the same function again, or a function of the same module and
  qualified name (a config file executed twice defines it anew), replaces the
  entry; a different function under a taken name is an error.
  """
  def add(factory: Factory) -> Factory:
    old = _REGISTRY.get(name)
    if old is not None and _qualname(old) != _qualname(factory):
      raise ValueError(f"optimizer {name!r} is already registered to "
                       f"{_qualname(old)}; cannot register {_qualname(factory)}"
                       " under the same name")
    _REGISTRY[name] = factory
    return factory
  return add


def _takes_learning_rate(fn: Any) -> bool:
  if not callable(fn) or isinstance(fn, type):
    return False
  try:
    return "learning_rate" in inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False


def optax_names() -> list[str]:
  """The Optax optimizers of the installed Optax (`contrib.` ones prefixed)."""
  out = [n for n in dir(optax)
         if not n.startswith("_") and _takes_learning_rate(getattr(optax, n))]
  out += [f"contrib.{n}" for n in dir(optax.contrib)
          if not n.startswith("_")
          and _takes_learning_rate(getattr(optax.contrib, n))]
  return out


def names() -> list[str]:
  """Every name `get` resolves (import paths aside)."""
  return sorted(set(_REGISTRY) | set(optax_names()))


def import_callable(name: str) -> Callable[..., Any]:
  """The callable an import path `pkg.module:function` names."""
  module_name, _, attr = name.partition(":")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(f"{name!r}: cannot import module "
                     f"{module_name!r}: {e}") from None
  fn = module
  for part in attr.split("."):
    fn = getattr(fn, part, None)
    if fn is None:
      raise ValueError(f"{name!r}: module {module_name!r} has no "
                       f"{attr!r}")
  if not callable(fn):
    raise ValueError(f"{name!r}: {attr!r} is not callable")
  return fn


def _from_optax(name: str) -> Callable[..., Any] | None:
  short = name.removeprefix("optax.")
  module = optax
  if short.startswith("contrib."):
    module, short = optax.contrib, short.removeprefix("contrib.")
  fn = getattr(module, short, None) if short.isidentifier() else None
  return fn if _takes_learning_rate(fn) else None


def get(name: str) -> Factory:
  """The factory for `name` (see the module docstring for the lookup order).

  Raises:
    ValueError: an unknown name (the message lists the valid ones) or an
      import path that does not import.
  """
  if name in _REGISTRY:
    return _REGISTRY[name]
  if ":" in name:
    return _wrap_optax(import_callable(name))
  fn = _from_optax(name)
  if fn is None:
    raise ValueError(
        f"unknown optimizer {name!r}; valid optimizers: {names()}, or an "
        "import path 'package.module:function'")
  return _wrap_optax(fn)


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
  """A registry factory calling `fn` the Optax way (see module docstring)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    params = {}
  takes_decay = "weight_decay" in params
  takes_context = "context" in params

  def factory(learning_rate, weight_decay, *, context=None, **kwargs):
    if takes_context:
      kwargs["context"] = context
    if takes_decay:
      return fn(learning_rate=learning_rate, weight_decay=weight_decay,
                **kwargs)
    tx = fn(learning_rate=learning_rate, **kwargs)
    if weight_decay:
      tx = optax.chain(tx, decoupled_weight_decay(weight_decay, learning_rate))
    return tx

  factory.__doc__ = fn.__doc__
  return factory


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


@register("adamw_frozen_nu")
def _adamw_frozen_nu(learning_rate, weight_decay, **kwargs):
  """AdamW with the base's frozen second moment (optim/frozen_second_moment.py);
  the trainer fills that moment (`init_from.optimizer_state`)."""
  return frozen_second_moment.adamw(learning_rate, weight_decay=weight_decay,
                                    **kwargs)


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
