"""Hugging Face Hub references: model weights and dataset files by repo id.

A Hub reference is `org/name` or `org/name@revision` (a branch, tag or commit
hash), optionally written `hf://org/name[@revision]`. A bare `org/name` that
exists as a local path is the local path (so local folders behave exactly as
before); `hf://...` is always the Hub. Without a revision, `main` is used.

Downloads go through `huggingface_hub` (`snapshot_download`,
`hf_hub_download`) into its shared cache, so a second call, another run or
another tool (transformers, lm-eval) reuses the files. The environment
configures everything, read at call time:

  HF_TOKEN          token for gated / private repos (meta-llama/* is gated:
                    accept its license on the Hub first)
  HF_HUB_CACHE      cache directory (default HF_HOME/hub, ~/.cache/huggingface/hub)
  HF_ENDPOINT       the Hub's URL (a mirror, or a test server)
  HF_HUB_OFFLINE=1  use only what is already in the cache

Multi-host jobs: every process downloads into its own host's cache (Cloud
TPU VM workers do not share disks, so "process 0 downloads, the rest wait"
would leave the other hosts without files). Processes that share one cache
(several processes per host, or a shared file system) do not race:
`huggingface_hub` takes a file lock per blob and moves each finished download
into place atomically, so the second process waits and then reuses the file.

Errors (a wrong repo id, a gated repo without a token, an unknown revision, a
missing file, no network and no cached copy) raise `HubError` with a one-line
message naming the repo, revision and file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence

# Hub references are parsed where every user-given path is (paths.py).
from optconsist_jax.paths import DEFAULT_REVISION  # noqa: F401
from optconsist_jax.paths import HF_SCHEME  # noqa: F401
from optconsist_jax.paths import HubError
from optconsist_jax.paths import HubRef
from optconsist_jax.paths import is_hub_ref  # noqa: F401
from optconsist_jax.paths import parse_ref

# What `hf.load` needs from a model repo: config, tokenizer, safetensors
# (single file or shards + index). Never the *.bin / *.pth / *.gguf copies.
MODEL_FILES = ("config.json", "tokenizer.model", "*.safetensors",
               "*.safetensors.index.json")
# A model repo's tokenizer: SentencePiece, or tokenizer.json (or, Moonlight's,
# tiktoken.model) with its config.
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tiktoken.model",
                   "tokenizer_config.json", "special_tokens_map.json")

def _env_true(name: str) -> bool:
  return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _settings() -> dict:
  """Keyword arguments for huggingface_hub from the environment, read now."""
  cache = os.environ.get("HF_HUB_CACHE")
  if not cache and os.environ.get("HF_HOME"):
    cache = os.path.join(os.environ["HF_HOME"], "hub")
  endpoint = os.environ.get("HF_ENDPOINT")
  return dict(cache_dir=cache or None,
              endpoint=endpoint.rstrip("/") if endpoint else None,
              local_files_only=_env_true("HF_HUB_OFFLINE"))


def _endpoint() -> str:
  return (os.environ.get("HF_ENDPOINT") or "https://huggingface.co").rstrip("/")


def _one_line(e: BaseException) -> str:
  lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
  return lines[0] if lines else type(e).__name__


def _hub_error(e: BaseException, ref: HubRef, what: str) -> HubError:
  """A one-line HubError for a huggingface_hub exception."""
  # deferred: optional Hub client (~0.3 s); only Hub references need it.
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  where = f"{ref} ({_endpoint()})"
  if isinstance(e, errors.GatedRepoError):
    msg = (f"{where} is gated: accept its license on the Hub and set HF_TOKEN"
           " to a token of that account")
  elif isinstance(e, errors.RepositoryNotFoundError):
    msg = (f"{where}: no such {ref.repo_type} repo (check the id; a private"
           " repo also needs HF_TOKEN)"
           + ("" if ref.explicit else "; no such local path either"))
  elif isinstance(e, errors.RevisionNotFoundError):
    msg = f"{where}: revision {ref.revision!r} not found"
  elif isinstance(e, errors.LocalEntryNotFoundError):
    msg = (f"{where}: {what} is not in the local cache and the Hub cannot be"
           f" used (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '')!r}):"
           f" {_one_line(e.__cause__ or e)}")
  elif isinstance(e, errors.EntryNotFoundError):
    msg = f"{where}: no file {what} in the repo"
  elif isinstance(e, errors.HFValidationError):
    msg = f"{where}: invalid repo id or revision: {_one_line(e)}"
  else:
    msg = f"{where}: downloading {what} failed: {_one_line(e)}"
  return HubError(msg)


def snapshot(ref: HubRef, patterns: Sequence[str]) -> str:
  """Downloads the files of `ref` matching `patterns`; returns the folder.

  The folder is the cache's snapshot of the resolved commit (files are
  symlinks into the cache's blobs).
  """
  # deferred: optional Hub client (~0.3 s); only Hub references need it.
  from huggingface_hub import snapshot_download  # pylint: disable=g-import-not-at-top
  kw = _settings()
  logging.info("Hub: %s %s from %s", ref, list(patterns), _endpoint())
  try:
    return snapshot_download(ref.repo_id, repo_type=ref.repo_type,
                             revision=ref.revision,
                             allow_patterns=list(patterns), **kw)
  except Exception as e:  # pylint: disable=broad-except
    if _is_hub_exception(e):
      raise _hub_error(e, ref, ", ".join(patterns)) from e
    raise


def download(ref: HubRef, filename: str) -> str:
  """Downloads one file of `ref`; returns its path in the cache."""
  # deferred: optional Hub client (~0.3 s); only Hub references need it.
  from huggingface_hub import hf_hub_download  # pylint: disable=g-import-not-at-top
  kw = _settings()
  logging.info("Hub: %s %s from %s", ref, filename, _endpoint())
  try:
    return hf_hub_download(ref.repo_id, filename, repo_type=ref.repo_type,
                           revision=ref.revision, **kw)
  except Exception as e:  # pylint: disable=broad-except
    if _is_hub_exception(e):
      raise _hub_error(e, ref, filename) from e
    raise


def _is_hub_exception(e: BaseException) -> bool:
  # deferred: optional Hub client (~0.3 s); only Hub references need it.
  from huggingface_hub import errors  # pylint: disable=g-import-not-at-top
  # HfHubHTTPError and LocalEntryNotFoundError are OSErrors too; OSError also
  # covers a cache directory that cannot be written.
  return isinstance(e, (errors.EntryNotFoundError, errors.HFValidationError,
                        OSError))


def model_dir(path: str | os.PathLike,
              patterns: Sequence[str] = MODEL_FILES) -> str:
  """A local Hugging Face model folder for `path`.

  A local path is returned unchanged; a Hub reference is downloaded
  (`patterns`, default config + tokenizer + safetensors) and its cache
  snapshot folder returned.

  Raises:
    HubError: the download failed, or the repo has no config.json / no
      safetensors weights when they were asked for.
  """
  ref = parse_ref(path)
  if ref is None:
    return os.fspath(path)
  folder = snapshot(ref, patterns)
  names = set(os.listdir(folder))
  if "config.json" in patterns and "config.json" not in names:
    raise HubError(f"{ref} ({_endpoint()}): no config.json; not a"
                   " Hugging Face model repo")
  if "*.safetensors" in patterns and not any(
      n.endswith(".safetensors") for n in names):
    raise HubError(f"{ref} ({_endpoint()}): no *.safetensors weights (only"
                   " safetensors checkpoints are supported, not"
                   " pytorch_model.bin)")
  return folder


def tokenizer_file(path: str) -> str:
  """`path`, or for a Hub model reference its tokenizer in the cache.

  Lets a config name the model repo as its tokenizer (`tokenizer_path=
  "meta-llama/Llama-2-7b-hf"`): the tokenizer comes from the same repo and
  revision as the weights. The repo's `tokenizer.model` (SentencePiece) when
  it has one, else the cache folder holding its `tokenizer.json` (Llama-3,
  Qwen, OLMo-2; data/hf_tokenizer.py) or `tiktoken.model` (Moonlight;
  data/tiktoken_bpe.py) and `tokenizer_config.json`.
  """
  ref = parse_ref(path)
  if ref is None:
    return path
  folder = snapshot(ref, TOKENIZER_FILES)
  names = set(os.listdir(folder))
  if "tokenizer.model" in names:
    return os.path.join(folder, "tokenizer.model")
  if not names & {"tokenizer.json", "tiktoken.model"}:
    raise HubError(f"{ref} ({_endpoint()}): no tokenizer.model,"
                   " tokenizer.json or tiktoken.model")
  return folder
