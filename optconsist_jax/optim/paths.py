"""Parameter shardings by path name (optconsist_jax.paths.path_name)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding

from optconsist_jax.paths import path_name


def leaf_shardings(abstract_params: Any) -> dict[str, NamedSharding | None]:
  """Maps each leaf's path name to its NamedSharding (None when it has none)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    s = getattr(leaf, "sharding", None)
    out[path_name(path)] = s if isinstance(s, NamedSharding) else None
  return out
