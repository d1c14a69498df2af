"""Spec hooks: an optimizer family names the PartitionSpecs of its own state.

Without a hook every optimizer-state leaf is sharded by the default rule of
`optconsist_jax.sharding.state_shardings` (param-shaped and factored leaves
follow their param; any other leaf, such as a Kronecker factor, splits its
largest dim over the FSDP axes). A family that knows better names a function
in its group's config, like an optimizer name:

  groups.main.optimizer   = "psgdax:kron"
  groups.main.state_specs = "my_pkg.kron_specs:state_specs"

The function is called once per init, as

  state_specs(params, **kwargs) -> tree of PartitionSpec | None

with `params` the group's params as ShapeDtypeStructs (other groups' leaves
are optax.MaskedNode) and `kwargs` the group's optimizer kwargs, plus
`weight_decay` and `params_partition_specs` (the params' PartitionSpecs, same
tree) when the function declares them or takes **kwargs: the calling
convention of distributed-kron's `distributed_kron.kron:
get_opt_state_partition_specs(params, scale_by_kron_only=False, **kwargs)`.
What it returns must be a tree prefix of the group's optimizer state;
PartitionSpecs use the mesh axis names (data, fsdp, tensor) and None defers
a subtree to the default rule. The state is wrapped in
`sharding.SpecifiedState`, which carries the specs to `state_shardings`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
import inspect
from typing import Any

import jax
from jax.sharding import NamedSharding, PartitionSpec
import optax

from optconsist_jax import sharding


def _accepts(fn: Callable[..., Any], name: str) -> bool:
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD
                               for p in params.values())


def _is_spec_leaf(x: Any) -> bool:
  return x is None or isinstance(x, PartitionSpec)


def per_leaf(specs: Any, state: Any, where: str) -> tuple[Any, ...]:
  """One PartitionSpec | None per leaf of `state` from a prefix tree."""
  out: list[Any] = []
  default = object()  # a leaf; None is an empty subtree to jax.tree.map
  specs = jax.tree.map(lambda s: default if s is None else s, specs,
                       is_leaf=_is_spec_leaf)

  def take(spec, subtree):
    spec = None if spec is default else spec
    out.extend([spec] * len(jax.tree.leaves(subtree)))
  try:
    jax.tree.map(take, specs, state, is_leaf=lambda x: x is default)
  except (ValueError, TypeError) as e:
    raise ValueError(
        f"{where}: the spec hook's tree is not a prefix of the optimizer"
        f" state ({jax.tree.structure(state)}): {e}") from None
  return tuple(out)


def with_state_specs(tx: optax.GradientTransformation,
                     hook: Callable[..., Any], kwargs: Mapping[str, Any],
                     shardings: Mapping[str, NamedSharding | None], *,
                     where: str) -> optax.GradientTransformationExtraArgs:
  """`tx` whose state carries the PartitionSpecs `hook` gives (module doc).

  Args:
    tx: the group's optimizer.
    hook: the family's spec function.
    kwargs: the group's optimizer kwargs (with weight_decay).
    shardings: {param path: NamedSharding} (`sharding.leaf_shardings`).
    where: the config key, for errors.
  """
  tx = optax.with_extra_args_support(tx)
  call = {k: v for k, v in kwargs.items() if _accepts(hook, k)}

  def init_fn(params):
    state = tx.init(params)
    abstract = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                            params)
    extra = dict(call)
    if _accepts(hook, "params_partition_specs"):
      def spec(path, p):
        s = shardings.get(sharding.path_name(path))
        return s.spec if s is not None else PartitionSpec(*[None] * p.ndim)
      extra.setdefault("params_partition_specs",
                       jax.tree_util.tree_map_with_path(spec, abstract))
    specs = per_leaf(hook(abstract, **extra), state, where)
    return sharding.SpecifiedState(state=state, specs=specs)

  def update_fn(updates, state, params=None, **extra_args):
    updates, inner = tx.update(updates, state.state, params, **extra_args)
    return updates, state.replace(state=inner)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)
