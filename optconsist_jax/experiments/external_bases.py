"""External bases of the study (`reproduce.bases`): their labels and tokenizers.

`--config.reproduce.bases` lists base models to finetune instead of
pretraining our own, comma-separated. Each entry is

  NAME:PATH   PATH labelled NAME, the optimizer it was pretrained with (an
              optim/presets.py name: `adamw`, `muon`, ...); the report calls
              finetuning with NAME "matched" and any other method
              "mismatched". NAME always wins over the provenance table.
  PATH        a base the provenance table (io/provenance.py) knows, labelled
              with its published pretraining optimizer: a Hub id
              (`meta-llama/Llama-3.1-8B[@rev]`, `hf://...`), or a local
              Hugging Face folder that names one, by the `_name_or_path` of
              its config.json (transformers 4 writes it) or by the Hub
              cache's folder layout (`.../models--ORG--NAME/snapshots/REV`).

PATH is a Hugging Face folder or Hub repo, a nanoGPT `ckpt.pt` or an Orbax
run written by train.py. The report compares one base per pretraining
optimizer, so two bases may not share a label: study two AdamW bases
(Llama-3 and OLMo-2, say) in separate workdirs.

Each base brings its tokenizer (`tokenizer_of`): a Hugging Face folder's
tokenizer.model (SentencePiece) or tokenizer.json (data/hf_tokenizer.py), the
GPT-2 BPE files beside a ckpt.pt, the Orbax run's data.tokenizer_path.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import re

from optconsist_jax.data import gpt2_bpe
from optconsist_jax.io import hub
from optconsist_jax.io import provenance
from optconsist_jax import paths as paths_lib

KEY = "reproduce config.reproduce.bases"

# huggingface_hub's cache: HF_HOME/hub/models--ORG--NAME/snapshots/REVISION.
_CACHE_DIR = re.compile(r"models--(?P<org>[^/\\]+?)--(?P<name>[^/\\]+)"
                        r"[/\\]snapshots[/\\]")


@dataclasses.dataclass(frozen=True)
class ExternalBase:
  """A base model given on the command line.

  Attributes:
    name: its label, the pretraining optimizer (NAME, or the table's).
    path: the weights (a resolved local path, a Hub reference or a URL).
    hub_id: the provenance table's record it matched ("" = none).
  """

  name: str
  path: str
  hub_id: str = ""

  @property
  def label_source(self) -> str:
    """Where `name` came from, in words (for the log and run_info.json)."""
    if not self.hub_id:
      return "given as NAME:PATH"
    record = provenance.BASES[self.hub_id.lower()]
    given = ("" if record.optimizer == self.name else
             f"; NAME:PATH overrides the table's {record.optimizer}")
    return (f"{self.hub_id} in io/provenance.py ({record.evidence}:"
            f" {record.source}){given}")


def identify(path: str) -> provenance.Base | None:
  """The provenance record a base's path names, or None.

  A Hub reference names its repo; a local Hugging Face folder the
  `_name_or_path` of its config.json or its Hub cache location (module
  docstring). Never downloads anything.
  """
  if hub.is_hub_ref(path):
    try:
      return provenance.lookup(path)
    except KeyError:
      return None
  if paths_lib.is_url(path):  # gs://...: nothing to read without fetching
    return None
  candidates = []
  config_file = os.path.join(path, "config.json")
  if os.path.isfile(config_file):
    try:
      with open(config_file, encoding="utf-8") as fh:
        name = json.load(fh).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
      name = None
    if isinstance(name, str) and name:
      candidates.append(name)
  m = _CACHE_DIR.search(os.path.abspath(path) + os.sep)
  if m:
    candidates.append(f"{m['org']}/{m['name']}")
  for ref in candidates:
    record = provenance.BASES.get(ref.strip().lower())
    if record is not None:
      return record
  return None


def _split(entry: str) -> tuple[str, str]:
  """'NAME:PATH' -> (NAME, PATH); a bare PATH -> ('', PATH)."""
  if paths_lib.is_url(entry):  # hf://org/name, gs://...: no NAME
    return "", entry
  name, sep, path = entry.partition(":")
  if not sep:
    return "", entry
  name, path = name.strip(), path.strip()
  if not name or not path:
    raise ValueError(f"{KEY}: entry {entry!r} is not NAME:PATH (e.g."
                     " adamw:path/to/ckpt.pt) or a base of io/provenance.py")
  return name, path


def _unknown(entry: str, why: str) -> ValueError:
  known = sorted(b.hub_id for b in provenance.BASES.values())
  return ValueError(
      f"{KEY}: {entry!r} {why}, so its pretraining optimizer is unknown;"
      f" write NAME:PATH with NAME that optimizer (e.g. adamw:{entry}), or"
      f" name a known base: {', '.join(known)}")


def parse(spec: str | Sequence[str]) -> tuple[ExternalBase, ...]:
  """`adamw:PATH,Qwen/Qwen2.5-7B` (or a list of entries) -> external bases.

  Local paths are resolved against the current directory and must exist;
  Hub references and URLs stay as they are.
  """
  entries = ([e for e in spec.split(",") if e.strip()]
             if isinstance(spec, str) else list(spec))
  out: list[ExternalBase] = []
  for entry in entries:
    entry = str(entry).strip()
    name, path = _split(entry)
    local = paths_lib.resolve(path)
    if os.path.exists(local):
      path = local
    elif not (hub.is_hub_ref(path) or paths_lib.is_url(path)):
      where = f"{name}:{path}" if name else path
      if not name and "/" not in entry:  # `adamw`: a NAME without PATH
        raise ValueError(f"{KEY}: entry {entry!r} is not NAME:PATH (e.g."
                         " adamw:path/to/ckpt.pt) or a base of"
                         " io/provenance.py")
      raise ValueError(f"{KEY}: {where}: no such file or directory")
    record = identify(path)
    if not name:
      if record is None:
        why = ("is not in the provenance table" if hub.is_hub_ref(path) else
               "names no base of the provenance table (config.json"
               " _name_or_path, Hub cache folder)")
        raise _unknown(entry, why)
      name = record.optimizer
    same = [b for b in out if b.name == name]
    if same:
      raise ValueError(
          f"{KEY}: base name {name!r} given twice ({same[0].path} and"
          f" {path}): the report compares one base per pretraining"
          " optimizer; study the others in a workdir of their own")
    out.append(ExternalBase(name, path, record.hub_id if record else ""))
  return tuple(out)


def tokenizer_of(path: str, kind: str, default: str) -> str:
  """The tokenizer that came with an external base (`default` if none).

  kind: the init_from kind of `path` (hf, nanogpt or orbax).
  """
  if kind == "hf":
    # deferred: the tokenizers package; config files import this module.
    from optconsist_jax.data import hf_tokenizer  # pylint: disable=g-import-not-at-top
    # A Hub repo means its tokenizer.model, else its tokenizer.json
    # (hub.tokenizer_file); a folder likewise the one it holds.
    if hub.is_hub_ref(path):
      return path
    sentencepiece = os.path.join(path, "tokenizer.model")
    if os.path.exists(sentencepiece):
      return sentencepiece
    if hf_tokenizer.is_hf_tokenizer_path(path):
      return path
  elif kind == "nanogpt":
    folder = os.path.dirname(path)
    if gpt2_bpe.is_gpt2_bpe_dir(folder):
      return folder
  else:
    for run_dir in (path, os.path.dirname(path),
                    os.path.dirname(os.path.dirname(path))):
      config_file = os.path.join(run_dir, "config.json")
      if os.path.exists(config_file):
        with open(config_file) as fh:
          data = json.load(fh).get("data") or {}
        return data.get("tokenizer_path", default) or ""
  return default
