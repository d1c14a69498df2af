"""User-given paths: local files, URLs (gs://...) and Hugging Face Hub references.

User-given paths are made absolute once where a command line hands them over.

Every command (train, evaluate, reproduce, memorization, fingerprints, report,
plan, the data CLIs, launch) passes the paths it was given through `resolve`
before doing anything else, so a relative path means "relative to the
directory the command was started in" everywhere downstream. That matters
because Orbax refuses relative checkpoint paths, and because worker processes
or later stages must not depend on the current directory. URLs such as
`gs://bucket/run` (anything with a `scheme://`) are left as they are, and so
are Hugging Face Hub references among a config's input paths
(`org/name[@revision]` that is not a local path; `parse_ref`).

A Hub reference is `org/name` or `org/name@revision` (a branch, tag or commit
hash), optionally written `hf://org/name[@revision]`; io/hub.py downloads it.
"""

from __future__ import annotations

import dataclasses
import os
import re


HF_SCHEME = "hf://"
DEFAULT_REVISION = "main"

# org/name as the Hub allows them (letters, digits, '-', '_', '.'), then an
# optional @revision (branch, tag, commit; may contain '/': refs/pr/1).
_REPO_ID = r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*"
_REF = re.compile(rf"(?P<repo>{_REPO_ID})(?:@(?P<rev>[^\s@]+))?")


# Bare paths ending like these are files, never repo ids.
_FILE_SUFFIXES = (".model", ".json", ".jsonl", ".pt", ".pth", ".bin",
                  ".safetensors", ".txt", ".parquet", ".gguf", ".npy")


class HubError(RuntimeError):
  """A Hub download that cannot succeed; the message is one line."""


@dataclasses.dataclass(frozen=True)
class HubRef:
  """A repo on the Hub at a revision."""

  repo_id: str
  revision: str = DEFAULT_REVISION
  repo_type: str = "model"
  # Written hf://...; a bare org/name could also have been a missing local path.
  explicit: bool = dataclasses.field(default=True, compare=False)

  def __str__(self) -> str:
    kind = "" if self.repo_type == "model" else f"{self.repo_type} "
    return f"{kind}{self.repo_id}@{self.revision}"


def parse_ref(path: str | os.PathLike | None,
              repo_type: str = "model") -> HubRef | None:
  """The Hub reference `path` names, or None for a local (or gs://) path.

  `hf://org/name[@rev]` is always a Hub reference. A bare `org/name[@rev]` is
  one unless it exists on local disk or its name ends like a file
  (`_FILE_SUFFIXES`: `dir/tokenizer.model` is a missing file, not a repo).
  """
  if path is None:
    return None
  s = os.fspath(path)
  explicit = s.startswith(HF_SCHEME)
  if explicit:
    s = s[len(HF_SCHEME):]
  m = _REF.fullmatch(s)
  if m is None:
    if explicit:
      raise HubError(f"{os.fspath(path)!r}: expected hf://org/name or"
                     " hf://org/name@revision")
    return None
  if not explicit and (os.path.exists(s) or s.endswith(_FILE_SUFFIXES)):
    return None
  return HubRef(m["repo"], m["rev"] or DEFAULT_REVISION, repo_type, explicit)


def is_hub_ref(path: str | os.PathLike | None) -> bool:
  return parse_ref(path) is not None


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
  if not path or is_url(path) or (hub_refs and is_hub_ref(path)):
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
