"""A local Google Cloud Storage emulator: the bucket of the tests and the rehearsal.

`running(bucket)` starts gcp-storage-emulator (PyPI, pure Python; the JSON
API that gcsfs, google-cloud-storage and TensorStore speak; in the `test`
extra) on 127.0.0.1 at a free port, in memory, with `bucket` created, and
yields the environment that points the real clients at it; the tests, the pod
rehearsal (tools/rehearse) and the commands they start run unchanged against
it.

One gap of the emulator is filled (`_serve`, run as this module's main): its
media downloads lack the `x-goog-generation` header that Cloud Storage sends
and TensorStore reads for every object it reads back (an OCDBT manifest that
a save updates), which TensorStore reports as "Malformed StorageGeneration".

The environment:

- STORAGE_EMULATOR_HOST: gcsfs (etils.epath's gs:// backend, see
  optconsist_jax/storage.py, which Orbax uses for its directories and
  metadata) and google-cloud-storage; both then send no credentials.
- TENSORSTORE_GCS_HTTP_URL: TensorStore's gcs driver (Orbax's array data).
  With no credentials found TensorStore goes on unauthenticated (it logs
  one line saying so), which the emulator accepts.
- GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false: gcsfs would otherwise ask the
  Storage Control API (gRPC, which the emulator lacks) for each bucket's
  layout and log a warning per bucket.
- EPATH_USE_TF=false: what importing optconsist_jax.storage sets; set here
  too so a test process reaches the bucket through epath before that import.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@contextlib.contextmanager
def running(bucket: str = "test-bucket", timeout_s: float = 60.0):
  """Starts the emulator; yields {env var: value} for its clients."""
  port = _free_port()
  url = f"http://127.0.0.1:{port}"
  # Its log goes to a file: a full pipe would stall the server.
  log = tempfile.TemporaryFile(mode="w+")  # pylint: disable=consider-using-with
  proc = subprocess.Popen(  # pylint: disable=consider-using-with
      [sys.executable, "-m", __spec__.name, str(port), bucket],
      stdout=subprocess.DEVNULL, stderr=log, text=True)
  try:
    deadline = time.monotonic() + timeout_s
    while True:
      try:
        with urllib.request.urlopen(
            f"{url}/storage/v1/b/{bucket}", timeout=2) as r:
          if r.status == 200:
            break
      except OSError:
        pass
      if proc.poll() is not None or time.monotonic() > deadline:
        log.seek(0)
        raise RuntimeError(f"the GCS emulator did not start at {url}:"
                           f" {log.read()[-2000:]}")
      time.sleep(0.2)
    yield {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "EPATH_USE_TF": "false",
    }
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
    log.close()


def _serve(port: int, bucket: str) -> None:
  """The emulator, with Cloud Storage's generation headers on downloads."""
  import logging  # deferred: only the server process configures logging.

  # Before the server module is imported: its routes hold the function.
  # deferred: the emulator (test extra) is needed only in its own process.
  from gcp_storage_emulator.handlers import objects  # pylint: disable=g-import-not-at-top
  download = objects.download

  def download_with_generation(request, response, storage, *args, **kwargs):
    try:
      obj = storage.get_file_obj(request.params["bucket_name"],
                                 request.params["object_id"])
    except Exception:  # pylint: disable=broad-except
      obj = None  # Not found: the emulator's own handler answers 404.
    if obj is not None:
      response["x-goog-generation"] = str(obj["generation"])
      response["x-goog-metageneration"] = str(obj["metageneration"])
    return download(request, response, storage, *args, **kwargs)

  objects.download = download_with_generation
  # deferred: after `objects.download` is replaced (above).
  from gcp_storage_emulator import server  # pylint: disable=g-import-not-at-top
  logging.basicConfig(level=logging.CRITICAL)
  server.create_server("127.0.0.1", port, in_memory=True,
                       default_bucket=bucket).run()


if __name__ == "__main__":
  _serve(int(sys.argv[1]), sys.argv[2])
