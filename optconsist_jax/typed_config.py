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
  """`cls(**d)` after `check_keys`; a type error names `where` too."""
  if isinstance(d, cls):
    return d
  d = as_dict(d)
  check_keys(cls, d, where)
  try:
    return cls(**d)
  except TypeError as e:
    raise ValueError(f"{where}: {e}") from e
