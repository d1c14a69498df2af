r"""Downloads the study's datasets from the Hugging Face Hub at pinned revisions.

  python -m optconsist_jax.data.fetch NAME[,NAME...] OUT_DIR [--force]

NAME: metamathqa, gsm8k, hellaswag, arc, winogrande, or all. Each file comes
from its dataset repo at a pinned commit (`SOURCES`, below) through
`huggingface_hub` (shared cache, HF_ENDPOINT / HF_TOKEN / HF_HUB_OFFLINE as in
optconsist_jax.io.hub), is checked, converted to the file the readers
(formats.py), the eval config (configs/llama2_7b_metamath_eval.py) and the
tfds builders (tfds_builders.py) read, read back with its reader, and
written atomically into OUT_DIR:

  metamathqa   MetaMathQA-395K.json      (copied as published)
  gsm8k        gsm8k_train.jsonl, gsm8k_test.jsonl
  hellaswag    hellaswag_val.jsonl
  arc          arc_challenge_test.jsonl  (ARC-Challenge test)
  winogrande   winogrande_val.jsonl      (winogrande_xl validation)

Checks on every file: (1) its sha256 equals the one the Hub reports for it at
the pinned commit (huggingface_hub names each cached LFS blob by that sha256;
a small git file by its git blob sha1, checked the same way); (2) where
`SOURCES` records a sha256, it equals that too; (3) the converted file parses
with its reader and has the published number of records. OUT_DIR/
fetch_manifest.json records repo, revision, path and sha256 of every file.

A file already in OUT_DIR is kept: re-fetched only if this command wrote it
from another source (or with --force), never overwritten silently. So the
launcher can run this on every worker before each job: staged data stays.

Errors (wrong repo id, missing file, checksum mismatch, a file that does not
parse) print one line and exit with status 2.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
import re
import sys
import tempfile

from optconsist_jax.data import formats
from optconsist_jax.io import hub

MANIFEST = "fetch_manifest.json"


class FetchError(RuntimeError):
  """A dataset file that cannot be fetched as pinned; one-line message."""


@dataclasses.dataclass(frozen=True)
class RemoteFile:
  """One file of a dataset repo and what it becomes in OUT_DIR.

  Attributes:
    path: path in the repo.
    out: file written into OUT_DIR.
    rows: number of records the published split has.
    sha256: the file's sha256 from a public record (see Source.provenance),
      or None where none was found: then only the Hub's own sha256 at the
      pinned commit is checked.
  """

  path: str
  out: str
  rows: int
  sha256: str | None = None


@dataclasses.dataclass(frozen=True)
class Source:
  """A dataset repo at a pinned commit.

  Attributes:
    repo_id: the Hub dataset repo (lm-evaluation-harness's `dataset_path`).
    revision: the commit the files are read at.
    files: what to download and write.
    reader: the formats.READERS entry that reads the written files.
    provenance: where the revision and sha256 values were found. They were
      not checked against the Hub from the machine this table was written on
      (no network there); a wrong revision fails with one clear line.
  """

  repo_id: str
  revision: str
  files: tuple[RemoteFile, ...]
  reader: str
  provenance: str


# The one table: repo ids, files, revisions and checksums of every dataset.
SOURCES: dict[str, Source] = {
    "metamathqa": Source(
        "meta-math/MetaMathQA", "aa4f34d3d2d3231299b5b03d9b3e5a20da45aa18",
        (RemoteFile("MetaMathQA-395K.json", "MetaMathQA-395K.json", 395_000,
                    "fb39a5d8c05c042ece92eae37dfd5ea414a5979df2bf3ad3b86411bef8205725"),),
        "metamathqa",
        "revision pinned in several public training recipes and lm-eval"
        " result files (dataset_sha); sha256 from one public recipe's"
        " provenance note. MetaMath paper: arXiv 2309.12284."),
    "gsm8k": Source(
        "openai/gsm8k", "740312add88f781978c0658806c59bc2815b9866",
        (RemoteFile("main/train-00000-of-00001.parquet", "gsm8k_train.jsonl",
                    7_473),
         RemoteFile("main/test-00000-of-00001.parquet", "gsm8k_test.jsonl",
                    1_319)),
        "gsm8k",
        "revision pinned in several public eval/training scripts (an older"
        " commit, cc7b047b6e5bb11b4f1af84efc572db110a51b3c, also appears);"
        " no public sha256 found: unconfirmed, Hub sha256 checked."),
    "hellaswag": Source(
        "Rowan/hellaswag", "218ec52e09a7e7462a5400043bb9a69a41d06b76",
        (RemoteFile("data/validation-00000-of-00001.parquet",
                    "hellaswag_val.jsonl", 10_042,
                    "899813071e1e95efafec90f856e1987d2150fa4d020fc005df6962c259f660cd"),),
        "hellaswag",
        "revision pinned in many public eval configs (lighteval, inspect"
        " wrappers, lm-eval pins); sha256 and the 10,042 rows recorded by two"
        " independent public eval harnesses."),
    "arc": Source(
        "allenai/ai2_arc", "210d026faf9955653af8916fad021475a3f00453",
        (RemoteFile("ARC-Challenge/test-00000-of-00001.parquet",
                    "arc_challenge_test.jsonl", 1_172,
                    "62f03257e737aed263f55c6abf87c7bb0028a44a6bdd2a26eb1279eb42c1d1e9"),),
        "arc",
        "revision pinned in many public eval configs; sha256 (203,808"
        " bytes) as HfApi.dataset_info(files_metadata=True) reported it in"
        " one public data-prep script."),
    "winogrande": Source(
        "allenai/winogrande", "01e74176c63542e6b0bcb004dcdea22d94fb67b5",
        (RemoteFile("winogrande_xl/validation-00000-of-00001.parquet",
                    "winogrande_val.jsonl", 1_267),),
        "winogrande",
        "revision pinned in many public eval configs (winogrande_xl, as"
        " lm-evaluation-harness uses); no public sha256 found: unconfirmed,"
        " Hub sha256 checked."),
}
NAMES = tuple(SOURCES)


def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _git_blob_sha1(path: str) -> str:
  h = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 22), b""):
      h.update(block)
  return h.hexdigest()


def _verify(source: Source, f: RemoteFile, cached: str) -> str:
  """Checks a downloaded file; returns its sha256."""
  where = f"{source.repo_id}@{source.revision} {f.path}"
  got = _sha256(cached)
  # huggingface_hub stores each file under blobs/<etag>: the LFS sha256, or
  # the git blob sha1 of a small file.
  etag = os.path.basename(os.path.realpath(cached))
  if re.fullmatch(r"[0-9a-f]{64}", etag) and got != etag:
    raise FetchError(f"{where}: sha256 {got} differs from the Hub's {etag}"
                     f" (corrupt download; delete {os.path.realpath(cached)}"
                     " and retry)")
  if re.fullmatch(r"[0-9a-f]{40}", etag) and _git_blob_sha1(cached) != etag:
    raise FetchError(f"{where}: content differs from the Hub's git blob"
                     f" {etag} (corrupt download; delete"
                     f" {os.path.realpath(cached)} and retry)")
  if f.sha256 is not None and got != f.sha256:
    raise FetchError(f"{where}: sha256 {got} differs from the pinned"
                     f" {f.sha256} (optconsist_jax.data.fetch.SOURCES)")
  return got


def _write_jsonl_from_parquet(src: str, dst: str) -> None:
  # deferred: pyarrow is heavy; only the parquet sources need it.
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  table = pq.read_table(src)
  with open(dst, "w", encoding="utf-8") as out:
    for batch in table.to_batches():
      for row in batch.to_pylist():
        out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _convert(cached: str, f: RemoteFile, dst: str) -> None:
  if f.path.endswith(".parquet"):
    _write_jsonl_from_parquet(cached, dst)
  elif f.path.endswith((".json", ".jsonl")):
    with open(cached, "rb") as src, open(dst, "wb") as out:
      while block := src.read(1 << 22):
        out.write(block)
  else:
    raise FetchError(f"{f.path}: no conversion for this file type")


def _read_manifest(out_dir: str) -> dict:
  path = os.path.join(out_dir, MANIFEST)
  if not os.path.isfile(path):
    return {}
  with open(path) as f:
    try:
      return json.load(f)
    except json.JSONDecodeError as e:
      raise FetchError(f"{path}: invalid JSON ({e}); delete it to re-fetch")


def _write_manifest(out_dir: str, manifest: dict) -> None:
  path = os.path.join(out_dir, MANIFEST)
  with open(path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
  os.replace(path + ".tmp", path)


def _record(source: Source, f: RemoteFile, sha256: str) -> dict:
  return {"repo": source.repo_id, "revision": source.revision,
          "path": f.path, "sha256": sha256}


def fetch(name: str, out_dir: str, force: bool = False,
          log=print) -> list[str]:
  """Fetches dataset `name` into `out_dir`; returns the files written or kept.

  Raises:
    FetchError: unknown name, checksum mismatch, wrong row count, or a file
      that does not parse (one-line message naming repo, revision, file).
    hub.HubError: the download failed (wrong repo id, missing file, ...).
  """
  if name not in SOURCES:
    raise FetchError(f"unknown dataset {name!r}; expected one of"
                     f" {', '.join(NAMES)} or all")
  source = SOURCES[name]
  ref = hub.HubRef(source.repo_id, source.revision, "dataset")
  os.makedirs(out_dir, exist_ok=True)
  manifest = _read_manifest(out_dir)
  done = []
  for f in source.files:
    dst = os.path.join(out_dir, f.out)
    previous = manifest.get(f.out)
    if os.path.exists(dst) and not force:
      if previous is None:
        log(f"{dst}: exists (not written by fetch); kept (--force replaces"
            " it)")
        done.append(dst)
        continue
      if (previous.get("repo"), previous.get("revision"),
          previous.get("path")) == (source.repo_id, source.revision, f.path):
        log(f"{dst}: already fetched from {ref} {f.path}")
        done.append(dst)
        continue
    log(f"fetching {ref} {f.path}")
    cached = hub.download(ref, f.path)
    sha256 = _verify(source, f, cached)
    fd, tmp = tempfile.mkstemp(dir=out_dir, prefix=f".{f.out}.")
    os.close(fd)
    try:
      _convert(cached, f, tmp)
      try:
        records = formats.READERS[source.reader](tmp)
      except (formats.DataFormatError, ValueError) as e:
        msg = str(e).replace(tmp, f"{f.out} (from {ref} {f.path})")
        raise FetchError(msg.splitlines()[0]) from e
      if len(records) != f.rows:
        raise FetchError(f"{ref} {f.path}: {len(records)} records, the"
                         f" published split has {f.rows}")
      os.replace(tmp, dst)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)
    manifest[f.out] = _record(source, f, sha256)
    _write_manifest(out_dir, manifest)
    pinned = "pinned" if f.sha256 else "Hub's; not pinned in SOURCES"
    log(f"wrote {dst} ({len(records)} records; sha256 {sha256[:12]}..."
        f" {pinned})")
    done.append(dst)
  return done


def _names(arg: str) -> list[str]:
  names = [n.strip() for n in arg.split(",") if n.strip()]
  if names == ["all"]:
    return list(NAMES)
  bad = [n for n in names if n not in SOURCES]
  if bad or not names:
    raise FetchError(f"unknown dataset {', '.join(map(repr, bad)) or repr(arg)};"
                     " expected"
                     f" {', '.join(NAMES)} or all (comma-separated)")
  return names


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m optconsist_jax.data.fetch",
      description="Download the study's datasets from the Hugging Face Hub at"
      " pinned revisions, verify and convert them for the readers.")
  parser.add_argument("names", metavar="NAME",
                      help=f"{', '.join(NAMES)} or all (comma-separated)")
  parser.add_argument("out_dir", metavar="OUT_DIR")
  parser.add_argument("--force", action="store_true",
                      help="replace files already in OUT_DIR")
  args = parser.parse_args(argv)
  try:
    written = []
    for name in _names(args.names):
      written += fetch(name, args.out_dir, force=args.force)
  except (FetchError, hub.HubError) as e:
    print(f"fetch: error: {e}", file=sys.stderr)
    return 2
  print(f"{len(written)} files in {args.out_dir}:"
        f" {', '.join(os.path.basename(w) for w in written)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
