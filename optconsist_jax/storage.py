"""Reading and writing user paths, on local disk or in a bucket (gs://...).

Every file a command is given or writes (a workdir, data files, tokenizers,
Hugging Face folders, report outputs) goes through these functions, so a
`gs://bucket/...` path works wherever a local one does. They are thin
wrappers over `etils.epath`, which Orbax also uses for its directory work, so
our files and Orbax's checkpoints reach the bucket the same way.

The backend. epath sends gs:// through TensorFlow's `tf.io.gfile` whenever
TensorFlow is installed (tensorflow-datasets' builders use it), unless
`EPATH_USE_TF` is false; then it uses fsspec, i.e. gcsfs for gs://
(etils/epath/gpath.py, `_GPath._backend`). Importing this module sets
`EPATH_USE_TF=false` (unless the environment already says otherwise), so gs://
goes through gcsfs and google-auth's application default credentials, the same
credentials TensorStore (Orbax's array data) uses. gcsfs, google-cloud-storage
and TensorStore all honour a local emulator (`STORAGE_EMULATOR_HOST`,
`TENSORSTORE_GCS_HTTP_URL`); TensorFlow's gfile has no such hook. TensorBoard
event files for a gs:// run are written locally and copied to the bucket on
each flush (metric_writers.MetricWriter). epath caches the choice on its first
gs:// operation, so this module is imported by every module that touches a user
path, ahead of any such operation. gcsfs keeps no listing cache here, so
polling a bucket folder (the eval job's --watch) sees new checkpoints.

Object stores have no append and no atomic rename: `write_text` /
`write_bytes` write a whole object at once (locally through a temporary file
and `os.replace`, so a reader never sees half a file), and nothing here
appends. Libraries that need a local file (safetensors' memory map,
SentencePiece) get one from `local_copy`, which downloads a bucket object or
folder into a cache directory once.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
import contextlib
import fnmatch
import hashlib
import os
import shutil
import tempfile
from typing import IO
import uuid

from etils import epath
import fsspec.config

from optconsist_jax import paths

# etils.epath reads this on its first gs:// operation (and caches the answer).
os.environ.setdefault("EPATH_USE_TF", "false")
# gcsfs caches folder listings for the life of the process; the eval job
# polls W/checkpoints for folders other processes write, so no listing cache
# (fsspec applies these defaults to every filesystem it makes).
for _protocol in ("gs", "gcs"):
  fsspec.config.conf.setdefault(_protocol, {}).setdefault(
      "use_listings_cache", False)

# Where bucket files that a library must read from local disk are downloaded
# (`local_copy`); default ~/.cache/optconsist_jax/gcs.
CACHE_ENV = "OPTCONSIST_STORAGE_CACHE"


def is_remote(path: str | os.PathLike) -> bool:
  """True for a bucket (any `scheme://`) path."""
  return paths.is_url(path)


def path(p: str | os.PathLike) -> epath.Path:
  """`p` as an epath.Path (local or gs://)."""
  return epath.Path(p)


def join(base: str | os.PathLike, *parts: str) -> str:
  """`base/part/...` as a string, for local paths and URLs alike."""
  return os.fspath(epath.Path(base).joinpath(*parts))


def exists(p: str | os.PathLike) -> bool:
  return epath.Path(p).exists()


def is_file(p: str | os.PathLike) -> bool:
  """A file (an object in a bucket) at `p`."""
  q = epath.Path(p)
  return q.exists() and not q.is_dir()


def is_dir(p: str | os.PathLike) -> bool:
  """A folder at `p` (on a bucket: some object under `p/`)."""
  return epath.Path(p).is_dir()


def listdir(p: str | os.PathLike) -> list[str]:
  """Sorted names of the entries of folder `p` ([] when it is absent)."""
  q = epath.Path(p)
  if not q.is_dir():
    return []
  return sorted(c.name for c in q.iterdir())


def makedirs(p: str | os.PathLike) -> None:
  """Creates folder `p` and its parents (a no-op on a bucket)."""
  epath.Path(p).mkdir(parents=True, exist_ok=True)


def open_file(p: str | os.PathLike, mode: str = "r") -> IO:
  """`open(p, mode)` for reading ("r", "rb"); writes go through write_*."""
  if mode not in ("r", "rb"):
    raise ValueError(f"open_file reads only; got mode {mode!r}")
  if mode == "r" and not is_remote(p):
    return open(p, encoding="utf-8")  # pylint: disable=consider-using-with
  return epath.Path(p).open(mode)


def read_text(p: str | os.PathLike) -> str:
  return epath.Path(p).read_text(encoding="utf-8")


def read_bytes(p: str | os.PathLike) -> bytes:
  return epath.Path(p).read_bytes()


def write_bytes(p: str | os.PathLike, data: bytes) -> None:
  """Writes `p` whole in one step: readers see the old or the new content.

  On a bucket that is one object upload; locally a temporary file in the
  same folder, then `os.replace`. The parent folder is created.
  """
  if is_remote(p):
    epath.Path(p).write_bytes(data)
    return
  folder = os.path.dirname(os.fspath(p)) or "."
  os.makedirs(folder, exist_ok=True)
  # Hidden, unique, and with the usual permissions (not mkstemp's 0600).
  tmp = os.path.join(folder, f".{os.path.basename(os.fspath(p))}.tmp-"
                     f"{os.getpid()}-{uuid.uuid4().hex[:8]}")
  try:
    with open(tmp, "xb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, p)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_text(p: str | os.PathLike, text: str) -> None:
  """`write_bytes` of `text` in UTF-8."""
  write_bytes(p, text.encode("utf-8"))


def upload(local: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Copies local file `local` to `dest` (local or bucket) in one write."""
  with open(local, "rb") as f:
    write_bytes(dest, f.read())


def upload_dir(local_dir: str | os.PathLike, dest: str | os.PathLike) -> None:
  """Copies every file under local folder `local_dir` to folder `dest`."""
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      upload(os.path.join(root, name), join(dest, *rel.split(os.sep)))


@contextlib.contextmanager
def output_dir(dest: str | os.PathLike) -> Iterator[str]:
  """A local folder to write outputs into, which end up in `dest`.

  For a local `dest`, `dest` itself (created). For a bucket folder, a
  temporary local folder whose files are uploaded to `dest` when the block
  ends without an error (for writers that need a local file: matplotlib,
  safetensors).
  """
  if not is_remote(dest):
    os.makedirs(dest, exist_ok=True)
    yield os.fspath(dest)
    return
  local = tempfile.mkdtemp(prefix="optconsist_out_")
  try:
    yield local
    upload_dir(local, dest)
  finally:
    shutil.rmtree(local, ignore_errors=True)


def cache_dir() -> str:
  return os.environ.get(CACHE_ENV) or os.path.join(
      os.path.expanduser("~"), ".cache", "optconsist_jax", "gcs")


def local_copy(p: str | os.PathLike,
               patterns: Sequence[str] | None = None) -> str:
  """A local path holding what `p` holds: `p` itself when it is local.

  A bucket file, or a bucket folder (its files whose names match one of
  `patterns`, default all; not recursive), is downloaded into `cache_dir()`
  under a name made from the URL, once: a cached file is downloaded again
  when its size or modification time differs from the object's.
  """
  s = os.fspath(p)
  if not is_remote(s):
    return s
  src = epath.Path(s)
  key = hashlib.sha256(s.rstrip("/").encode()).hexdigest()[:16]
  dest = os.path.join(cache_dir(), key, src.name)
  if not src.is_dir():
    _download(src, dest)
    return dest
  os.makedirs(dest, exist_ok=True)
  for child in src.iterdir():
    if child.is_dir() or (patterns is not None and not any(
        fnmatch.fnmatch(child.name, pat) for pat in patterns)):
      continue
    _download(child, os.path.join(dest, child.name))
  return dest


def _download(src: epath.Path, dest: str) -> None:
  if not src.exists():
    raise FileNotFoundError(f"{src} does not exist")
  st = src.stat()
  if (os.path.isfile(dest) and os.path.getsize(dest) == st.length
      and int(os.path.getmtime(dest)) == st.mtime):
    return
  os.makedirs(os.path.dirname(dest), exist_ok=True)
  tmp = f"{dest}.part-{os.getpid()}"
  with src.open("rb") as fin, open(tmp, "wb") as fout:
    while chunk := fin.read(64 << 20):
      fout.write(chunk)
  # The object's time, so a changed object is downloaded again.
  os.utime(tmp, (st.mtime, st.mtime))
  os.replace(tmp, dest)
