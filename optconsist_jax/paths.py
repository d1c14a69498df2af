"""Paths to strings: user-given file paths, and parameter paths.

`path_name` is the one spelling of a parameter's path in a pytree
('layers/attn/q_proj/kernel'), used in messages, routing and file formats.

User-given paths are made absolute once where a command line hands them over.

Every command (train, evaluate, reproduce, memorization, fingerprints, report,
plan, the data CLIs, launch) passes the paths it was given through `resolve`
before doing anything else, so a relative path means "relative to the
directory the command was started in" everywhere downstream. That matters
because Orbax refuses relative checkpoint paths, and because worker processes
or later stages must not depend on the current directory. URLs such as
`gs://bucket/run` (anything with a `scheme://`) are left as they are, and so
are Hugging Face Hub references among a config's input paths
(`org/name[@revision]` that is not a local path; hub.parse_ref).
"""

from __future__ import annotations

from collections.abc import Sequence
import os
import re
from typing import Any

from optconsist_jax.io import hub

_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_url(path: str | os.PathLike) -> bool:
  """True for `scheme://...` (gs://, s3://, http://, ...)."""
  return bool(_URL.match(os.fspath(path)))


def resolve(path: str | os.PathLike | None, *,
            hub_refs: bool = False) -> str | None:
  """An absolute, normalized local path; URLs, "" and None unchanged.

  `~` is expanded. The path need not exist. hub_refs: also leave Hub
  references unchanged (for inputs; never for an output directory such as a
  workdir, whose `runs/name` form would read as a repo id).
  """
  if path is None:
    return None
  path = os.fspath(path)
  if not path or is_url(path) or (hub_refs and hub.is_hub_ref(path)):
    return path
  return os.path.abspath(os.path.expanduser(path))


def resolve_keys(config: dict, keys: tuple[str, ...],
                 keep: tuple[str, ...] = ()) -> dict:
  """A copy of a nested config dict with the dotted `keys` resolved.

  Keys absent from `config` (or set to None/"") are left alone, so one list of
  path keys serves configs that have only some of them; so are values in
  `keep` (words such as "synthetic" that name a built-in source, not a file)
  and Hugging Face Hub references.
  """
  out = dict(config)
  for key in keys:
    head, _, rest = key.partition(".")
    if head not in out:
      continue
    if rest:
      if isinstance(out[head], dict):
        out[head] = resolve_keys(out[head], (rest,), keep)
    elif (isinstance(out[head], (str, os.PathLike))
          and os.fspath(out[head]) not in keep):
      out[head] = resolve(out[head], hub_refs=True)
  return out


def path_name(path: Sequence[Any]) -> str:
  """'layers/attn/q_proj/kernel' for a jax key path (NNX `.value` dropped)."""
  # Imported here: the Cloud TPU launcher uses this module on machines
  # without jax.
  import jax  # pylint: disable=g-import-not-at-top
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
