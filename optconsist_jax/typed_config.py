"""Plain config dicts (ml_collections) to typed dataclasses, at the boundary.

Every config section converts through `check_keys` / `from_dict`, so an
unknown key is always reported the same way: the section it was found in, the
unknown keys, and the valid ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
import dataclasses
from typing import Any, TypeVar

T = TypeVar("T")


def as_dict(d: Any) -> dict[str, Any]:
  """A plain dict from a dict, an ml_collections.ConfigDict or None."""
  if d is None:
    return {}
  if hasattr(d, "to_dict"):
    d = d.to_dict()
  return dict(d)


def check_keys(cls: type, d: Mapping[str, Any], where: str,
               extra: Iterable[str] = ()) -> None:
  """Raises ValueError naming `where` when `d` has keys `cls` lacks."""
  known = {f.name for f in dataclasses.fields(cls)} | set(extra)
  unknown = sorted(set(d) - known)
  if unknown:
    raise ValueError(f"{where}: unknown keys {unknown}; valid keys:"
                     f" {sorted(known)}")


def from_dict(cls: type[T], d: Any, where: str) -> T:
  """`cls(**d)` after `check_keys`; a type error names `where` too.

  A field whose default is a dataclass is a nested section: its dict is
  converted the same way (by its class's own `from_dict(d)` when it has one,
  e.g. sharding.MeshConfig with presets), errors naming `where.field`.
  """
  if isinstance(d, cls):
    return d
  d = as_dict(d)
  check_keys(cls, d, where)
  kwargs = {}
  for f in dataclasses.fields(cls):
    if f.name not in d:
      continue
    value, section = d[f.name], _section_type(f)
    if section is not None and not isinstance(value, section):
      value = _section(section, value, f"{where}.{f.name}")
    kwargs[f.name] = value
  try:
    return cls(**kwargs)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from e


def _section_type(f: dataclasses.Field) -> type | None:
  """The dataclass of a nested section (from the field's default), or None."""
  if f.default is not dataclasses.MISSING:
    default = f.default
  elif f.default_factory is not dataclasses.MISSING:
    default = f.default_factory()
  else:
    return None
  if dataclasses.is_dataclass(default) and not isinstance(default, type):
    return type(default)
  return None


def _section(cls: type[T], d: Any, where: str) -> T:
  own = getattr(cls, "from_dict", None)
  if own is None:
    return from_dict(cls, d, where)
  try:
    return own(as_dict(d))
  except (TypeError, ValueError) as e:
    msg = str(e)
    raise ValueError(msg if msg.startswith(where) else f"{where}: {msg}"
                     ) from e

def to_jsonable(x: Any) -> Any:
  """Dataclasses, tuples, dtypes... -> JSON-able builtins."""
  if dataclasses.is_dataclass(x) and not isinstance(x, type):
    return {f.name: to_jsonable(getattr(x, f.name))
            for f in dataclasses.fields(x)}
  if isinstance(x, Mapping):
    return {str(k): to_jsonable(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [to_jsonable(v) for v in x]
  if x is None or isinstance(x, (bool, int, float, str)):
    return x
  return str(x)
