"""Device mesh, logical-axis rules and the shardings they imply.

The model names the axes of every parameter and key activation ("vocab",
"embed", "act_batch", ...). One rules table, `RULES`, maps those logical names
to the axes of a device mesh with three axes, `data`, `fsdp` and `tensor`
(the scheme of MaxText and flax.linen's `logical_axis_rules`):

  batch          over data x fsdp
  embed          over fsdp: ZeRO-3 style FSDP (Rajbhandari et al. 2020, arXiv
                 1910.02054); XLA gathers weights per layer and
                 reduce-scatters grads
  heads, kv_heads, mlp, expert_mlp, vocab
                 over tensor: Megatron-LM tensor parallelism (Shoeybi et al.
                 2019, arXiv 1909.08053), q/k/v/gate/up column-parallel,
                 o/down row-parallel, embedding and head vocab-parallel

An axis of size 1 shards nothing, so a layout is a mesh shape. The presets:

  dp       (data=-1, fsdp=1, tensor=1)  pure data parallel, params replicated
  fsdp     (data=1, fsdp=-1, tensor=1)  FSDP over all devices
  fsdp_tp  (data=1, fsdp=-1, tensor=2)  FSDP x tensor parallel
  dp_fsdp  (data=2, fsdp=-1, tensor=1)  FSDP inside groups, replicas across
                                        `data` (HSDP)

(-1 fills with the remaining devices.) Any other layout is sizes plus
`extra_rules`, rules put in front of the table, so they win: e.g.
`{"preset": "fsdp_tp", "extra_rules": [("vocab", None)]}` keeps the embedding
and head out of tensor parallelism. A rule naming an axis the mesh does not
have, or a mesh axis of size > 1 that no rule uses (which would silently
replicate over it), is an error.

Multi-slice: `MeshConfig.dcn_data` > 1 puts `dcn_data` slices on the outer part
of the `data` axis (`mesh_utils.create_hybrid_device_mesh`), so only the
data-parallel gradient all-reduce crosses the data-center network and the
rules stay the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import dataclasses
import math
from typing import Any, Union

import flax
from flax import nnx
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optconsist_jax import typed_config

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# A rule maps one logical axis name to a mesh axis, several mesh axes (the dim
# is split over their product, major to minor), or None (replicated). The first
# rule for a name wins.
MeshAxes = Union[str, tuple[str, ...], None]
Rules = tuple[tuple[str, MeshAxes], ...]

ACTIVATION_NAMES = ("act_batch", "act_length", "act_embed", "act_heads",
                    "act_kv_heads", "act_mlp", "act_vocab")

# The one table (see the module docstring); axes of size 1 shard nothing.
RULES: Rules = (
    ("vocab", "tensor"), ("embed", "fsdp"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("mlp", "tensor"), ("norm", None), ("layers", None),
    ("positions", None), ("lora_rank", None), ("expert", None),
    ("expert_mlp", "tensor"), ("latent", None), ("act_batch", ("data", "fsdp")),
    ("act_length", None), ("act_embed", None), ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"), ("act_mlp", "tensor"), ("act_vocab", "tensor"),
)

# name -> (data, fsdp, tensor). -1 fills with the remaining devices.
_PRESETS: dict[str, tuple[int, int, int]] = {
    "dp": (-1, 1, 1),
    "fsdp": (1, -1, 1),
    "fsdp_tp": (1, -1, 2),
    "dp_fsdp": (2, -1, 1),
}


def preset_names() -> list[str]:
  return sorted(_PRESETS)


def as_rules(rules: Sequence[Sequence[Any]]) -> Rules:
  """Normalizes a rules table (lists from a config) to hashable tuples."""
  out = []
  for i, rule in enumerate(rules):
    if len(rule) != 2 or not isinstance(rule[0], str):
      raise ValueError(
          f"sharding rules[{i}]={rule!r}: expected (logical_name, mesh_axis |"
          " tuple of mesh axes | None)")
    name, axes = rule
    if isinstance(axes, (list, tuple)):
      axes = tuple(axes)
      if not all(isinstance(a, str) for a in axes):
        raise ValueError(f"sharding rules[{i}]={rule!r}: mesh axes must be str")
    elif axes is not None and not isinstance(axes, str):
      raise ValueError(f"sharding rules[{i}]={rule!r}: mesh axes must be str,"
                       " a tuple of str, or None")
    out.append((name, axes))
  return tuple(out)


def _axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def check_rules(rules: Rules, axis_names: Sequence[str]) -> None:
  """Raises if a rule names a mesh axis the mesh does not have."""
  for name, axes in rules:
    for axis in _axes_tuple(axes):
      if axis not in axis_names:
        raise ValueError(
            f"sharding rule ({name!r} -> {axes!r}) names unknown mesh axis"
            f" {axis!r}; mesh axes are {tuple(axis_names)}")


def effective_rules(rules: Rules) -> dict[str, MeshAxes]:
  """{logical name: mesh axes} with the first rule for each name."""
  out: dict[str, MeshAxes] = {}
  for name, axes in rules:
    out.setdefault(name, axes)
  return out


def check_axes_used(rules: Rules, axis_sizes: Mapping[str, int]) -> None:
  """Raises if a mesh axis of size > 1 is used by no (winning) rule.

  Such an axis would replicate everything over it: devices doing the same
  work, which is never what a layout means.
  """
  used = {a for axes in effective_rules(rules).values()
          for a in _axes_tuple(axes)}
  for axis, size in axis_sizes.items():
    if size > 1 and axis not in used:
      raise ValueError(
          f"mesh axis {axis!r} has size {size} but no sharding rule maps a"
          f" logical name to it (rules for it are overridden by extra_rules"
          f" or absent), so every array would be replicated over it; set"
          f" {axis}=1 or add a rule that uses it")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Mesh axis sizes, and rules that take precedence over `RULES`.

  Attributes:
    data: size of the `data` axis within one slice (-1: fill).
    fsdp: size of the `fsdp` axis (-1: fill).
    tensor: size of the `tensor` axis (-1: fill).
    dcn_data: number of slices; multiplies the `data` axis across slices.
    extra_rules: (logical name, mesh axes) rules put before `RULES`; the
      first rule for a name wins, so these override the table.
  """

  data: int = 1
  fsdp: int = -1
  tensor: int = 1
  dcn_data: int = 1
  extra_rules: Rules = ()

  def __post_init__(self):
    object.__setattr__(self, "extra_rules", as_rules(self.extra_rules))
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    fills = [k for k, v in sizes.items() if v == -1]
    if len(fills) > 1:
      raise ValueError(f"MeshConfig: at most one axis may be -1, got {fills}")
    for k, v in {**sizes, "dcn_data": self.dcn_data}.items():
      if v == 0 or v < -1 or (k == "dcn_data" and v < 1):
        raise ValueError(f"MeshConfig.{k}={v}: expected a positive size"
                         + ("" if k == "dcn_data" else " or -1"))
    try:
      check_rules(self.extra_rules, MESH_AXES)
    except ValueError as e:
      raise ValueError(f"MeshConfig.extra_rules: {e}") from None
    check_axes_used(self.rules, sizes)

  @property
  def rules(self) -> Rules:
    """The rules table of this layout: `extra_rules` then `RULES`."""
    return self.extra_rules + RULES

  @classmethod
  def preset(cls, name: str, **overrides) -> MeshConfig:
    """The named mesh shape; keyword overrides replace sizes or extra_rules."""
    if name not in _PRESETS:
      raise ValueError(f"unknown mesh preset {name!r}; valid presets:"
                       f" {preset_names()}")
    data, fsdp, tensor = _PRESETS[name]
    base = dict(data=data, fsdp=fsdp, tensor=tensor)
    base.update(overrides)
    return cls(**base)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> MeshConfig:
    """From a config dict; a `preset` key starts from a preset.

    None values (unset ml_collections placeholders, so that `--config.mesh.
    fsdp=4` can override a preset's size) keep the preset's value.
    """
    d = {k: v for k, v in d.items() if v is not None}
    name = d.pop("preset", None)
    if "rules" in d:
      raise ValueError(
          "mesh config: 'rules' (a whole table) is gone: set the sizes and"
          " put overriding rules in 'extra_rules' (prepended to"
          " optconsist_jax.sharding.RULES)")
    typed_config.check_keys(cls, d, "mesh config", extra=("preset",))
    return cls.preset(name, **d) if name else cls(**d)

  def axis_sizes(self, num_devices: int) -> dict[str, int]:
    """Sizes of (data, fsdp, tensor) of the full mesh, -1 resolved.

    `data` includes the `dcn_data` factor.
    """
    sizes = {"data": self.data, "fsdp": self.fsdp, "tensor": self.tensor}
    per_slice, rem = divmod(num_devices, self.dcn_data)
    if rem:
      raise ValueError(f"MeshConfig.dcn_data={self.dcn_data} does not divide"
                       f" the {num_devices} devices")
    known = math.prod(v for v in sizes.values() if v != -1)
    for k, v in sizes.items():
      if v == -1:
        if per_slice % known:
          raise ValueError(
              f"MeshConfig: cannot fill {k}=-1: the other axes"
              f" ({known} devices) do not divide {per_slice} devices per"
              " slice")
        sizes[k] = per_slice // known
    if math.prod(sizes.values()) != per_slice:
      raise ValueError(
          f"MeshConfig: mesh size data*fsdp*tensor = {sizes['data']}*"
          f"{sizes['fsdp']}*{sizes['tensor']} = {math.prod(sizes.values())}"
          f" per slice x dcn_data={self.dcn_data} does not match the"
          f" {num_devices} devices")
    sizes["data"] *= self.dcn_data
    return sizes


def make_mesh(mesh_config: MeshConfig, devices: Sequence[Any] | None = None
              ) -> Mesh:
  """The (data, fsdp, tensor) mesh with Auto axis types.

  Args:
    mesh_config: axis sizes.
    devices: the devices to lay out (default: all of `jax.devices()`; TPU
      topology devices from `jax.experimental.topologies` work too).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_config.axis_sizes(len(devices))
  check_axes_used(mesh_config.rules, sizes)
  shape = tuple(sizes[k] for k in MESH_AXES)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  if mesh_config.dcn_data > 1:
    ici = (shape[0] // mesh_config.dcn_data, *shape[1:])
    dcn = (mesh_config.dcn_data, 1, 1)
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices)
    return Mesh(grid, MESH_AXES, axis_types=auto)
  return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


def _lookup(name: str, rules: Rules) -> MeshAxes:
  for rule_name, axes in rules:
    if rule_name == name:
      return axes
  raise ValueError(
      f"logical axis name {name!r} has no rule in the sharding rules table;"
      f" add ({name!r}, None) to replicate it. Names with rules:"
      f" {sorted({n for n, _ in rules})}")


def logical_to_spec(names: Sequence[str | None], rules: Rules) -> PartitionSpec:
  """PartitionSpec for an array whose dims carry these logical names.

  None names stay unsharded. A mesh axis used by two dims is an error.
  """
  spec, used = [], {}
  for i, name in enumerate(names):
    axes = None if name is None else _lookup(name, rules)
    for axis in _axes_tuple(axes):
      if axis in used:
        raise ValueError(
            f"logical names {tuple(names)}: mesh axis {axis!r} is mapped from"
            f" both {used[axis]!r} and {name!r}; one array dim per mesh axis")
      used[axis] = name
    spec.append(axes)
  return PartitionSpec(*spec)


def axes_size(mesh: Mesh, axes: MeshAxes) -> int:
  """Number of shards a dim mapped to `axes` is split into."""
  return math.prod(mesh.shape[a] for a in _axes_tuple(axes))


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


@flax.struct.dataclass
class SpecifiedState:
  """An optimizer state with the PartitionSpecs its family's spec hook chose:
  `specs` holds one PartitionSpec or None (`state_shardings`' default rule)
  per leaf of `state` (`jax.tree.leaves` order) as static aux data."""
  state: Any
  specs: tuple[PartitionSpec | None, ...] = flax.struct.field(
      pytree_node=False)


def _largest_dim_spec(mesh: Mesh, shape: Sequence[int],
                      fsdp: tuple[str, ...]) -> PartitionSpec:
  n = axes_size(mesh, fsdp)
  dims = [d for d, s in enumerate(shape) if n > 1 and s % n == 0]
  best = max(dims, key=lambda d: (shape[d], -d)) if dims else None
  axes = fsdp[0] if len(fsdp) == 1 else fsdp
  return PartitionSpec(*(axes if d == best else None
                         for d in range(len(shape))))


def _factor_spec(param_shape: tuple[int, ...], spec: tuple[MeshAxes, ...],
                 shape: tuple[int, ...]) -> tuple[MeshAxes, ...] | None:
  """The param's spec on `shape`'s dims (one dropped or set to 1), or None."""
  if shape == param_shape:
    return spec
  for k in range(len(param_shape)):
    if param_shape[:k] + param_shape[k + 1:] == shape:
      return spec[:k] + spec[k + 1:]
    if shape == param_shape[:k] + (1,) + param_shape[k + 1:]:
      return spec[:k] + (None,) + spec[k + 1:]
  return None


def _param_index(tree: Any) -> dict[str, list[Any]]:
  """{last path key: [(path keys, shape, names)]} of param-shaped Variables."""
  out: dict[str, list[Any]] = {}
  for path, v in jax.tree_util.tree_flatten_with_path(
      tree, is_leaf=_is_variable)[0]:
    shape = getattr(v.get_value(), "shape", None) if _is_variable(v) else None
    names = v.get_metadata().get("out_sharding") if shape else None
    if names and len(names) == len(shape):
      keys = path_name(path).split("/")
      out.setdefault(keys[-1], []).append((keys, tuple(shape), tuple(names)))
  return out


def _match_param(index: dict[str, list[Any]], keys: list[str]) -> Any:
  """(shape, names) of the param whose path shares the longest run of keys
  with `keys` (optax maps over the params, so a state leaf's path holds its
  param's); None when none does or params of different layout tie."""
  best, found = 0, set()
  for end, key in enumerate(keys):
    for p_keys, shape, names in index.get(key, ()):
      k = 1
      while k < len(p_keys) and k <= end and p_keys[-1 - k] == keys[end - k]:
        k += 1
      if k >= best:
        best, found = k, (found if k == best else set()) | {(shape, names)}
  return found.pop() if len(found) == 1 else None


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules) -> Any:
  """A NamedSharding for every leaf of a (possibly abstract) state.

  Params, and nnx.Variables whose rank matches their 'out_sharding' logical
  names (moments optax maps over the params), follow those names. Any other
  optimizer-state leaf gets: in a `SpecifiedState`, its family hook's spec;
  else, if its key path matches a param's (`_match_param`) and its shape is
  the param's with at most one dim dropped or set to 1 (Adafactor's
  factored moments, arXiv 1804.04235), the param's spec on the kept dims;
  else (Shampoo / PSGD Kron [d, d] factors, arXiv 1802.09568, 1512.04202)
  its largest dim divisible by the FSDP axes' size (those `embed` maps to)
  over them. Scalars replicate; mesh axes not dividing a dim are dropped.

  Returns:
    A pytree of the same structure (Variables keep their metadata and hold a
    NamedSharding), usable as jit in/out_shardings.

  Raises:
    ValueError: a rule names an unknown mesh axis, a mesh axis of size > 1
      is used by no rule, a name has no rule, or a param's dim is not
      divisible by the product of its mesh axes.
  """
  rules = as_rules(rules)
  check_rules(rules, mesh.axis_names)
  check_axes_used(rules, dict(mesh.shape))
  fsdp = tuple(a for a in _axes_tuple(effective_rules(rules).get("embed"))
               if mesh.shape[a] > 1)
  index = _param_index(abstract_state)

  def default(path, x, spec=None):
    shape = tuple(getattr(x, "shape", ()))
    if spec is None and shape:
      hit = _match_param(index, path_name(path).split("/"))
      spec = None if hit is None else _factor_spec(
          hit[0], tuple(logical_to_spec(hit[1], rules)), shape)
    if spec is None:
      return NamedSharding(mesh, _largest_dim_spec(mesh, shape, fsdp))
    return NamedSharding(mesh, PartitionSpec(*(
        a if s % axes_size(mesh, a) == 0 else None
        for s, a in zip(shape, spec))))

  def one(path, leaf):
    if isinstance(leaf, SpecifiedState):
      flat, treedef = jax.tree_util.tree_flatten_with_path(leaf.state)
      if len(flat) != len(leaf.specs):
        raise ValueError(f"{path_name(path)!r}: {len(leaf.specs)} specs for"
                         f" {len(flat)} optimizer-state leaves")
      return leaf.replace(state=jax.tree_util.tree_unflatten(treedef, [
          default(path + p, x, s) for (p, x), s in zip(flat, leaf.specs)]))
    if not _is_variable(leaf):
      return default(path, leaf)
    value = leaf.get_value()
    shape = getattr(value, "shape", None)
    names = leaf.get_metadata().get("out_sharding")
    if shape is None or not names or len(names) != len(shape):
      # A family's per-param container (e.g. a list of factors), a MaskedNode
      return leaf.replace(jax.tree_util.tree_map_with_path(
          lambda p, x: default(path + p, x), value))
    try:
      spec = logical_to_spec(names, rules)
    except ValueError as e:
      raise ValueError(f"param {path_name(path)!r}: {e}") from None
    for dim, (size, axes) in enumerate(zip(shape, spec)):
      n = axes_size(mesh, axes)
      if size % n:
        raise ValueError(
            f"param {path_name(path)!r} shape {tuple(shape)}: dim {dim}"
            f" ({names[dim]!r}, size {size}) is not divisible by mesh axes"
            f" {axes!r} of size {n}; change the mesh or the rule for"
            f" {names[dim]!r}")
    return leaf.replace(NamedSharding(mesh, spec))

  return jax.tree_util.tree_map_with_path(
      one, abstract_state,
      is_leaf=lambda x: _is_variable(x) or isinstance(x, SpecifiedState))


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
  """Sharding of the [B, T] arrays of a training batch."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", "act_length"),
                                             as_rules(rules)))


@dataclasses.dataclass(frozen=True)
class LogicalConstraint:
  """`constrain(x, names)` for the model: a sharding constraint by rules.

  Frozen and hashable, so it can live in an nnx graphdef. Mesh axes that do not
  divide an activation dim (e.g. 2 kv heads over a tensor axis of 4) are
  dropped for that dim, leaving the choice to XLA, rather than failing.
  """

  mesh: Mesh
  rules: Rules

  def __post_init__(self):
    object.__setattr__(self, "rules", as_rules(self.rules))
    check_rules(self.rules, self.mesh.axis_names)

  def __call__(self, x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    spec = logical_to_spec(names, self.rules)
    fitted = [axes if size % axes_size(self.mesh, axes) == 0 else None
              for size, axes in zip(x.shape, spec)]
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(self.mesh, PartitionSpec(*fitted)))


# ---------------------------------------------------------------------------
# Parameter paths.


def path_name(path: Sequence[Any]) -> str:
  """'layers/attn/q_proj/kernel' for a jax key path (NNX `.value` dropped)."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      if k.name not in ("value", "raw_value"):
        parts.append(k.name)
    elif isinstance(k, jax.tree_util.FlattenedIndexKey):
      parts.append(str(k.key))
    else:
      parts.append(str(k))
  return "/".join(parts)


def leaf_shardings(abstract_params: Any) -> dict[str, NamedSharding | None]:
  """Maps each leaf's path name to its NamedSharding (None when it has none)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    s = getattr(leaf, "sharding", None)
    out[path_name(path)] = s if isinstance(s, NamedSharding) else None
  return out
