"""Parameter path names ('layers/attn/q_proj/kernel') and their shardings."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
from jax.sharding import NamedSharding


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
