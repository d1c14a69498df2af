"""A Hugging Face Hub stand-in on 127.0.0.1 for offline tests.

Serves repos in the Hub's URL layout, with the headers `huggingface_hub`
reads (its file_download.py / hf_api.py / utils/_http.py):

  GET  /api/{models,datasets}/{repo}/revision/{rev}   -> {"id", "sha", "siblings"}
  GET  /api/{models,datasets}/{repo}/tree/{rev}       -> [{"type", "oid", "size",
                                                          "path", "lfs"?}]
  HEAD/GET /{repo}/resolve/{rev}/{path}               (models)
  HEAD/GET /datasets/{repo}/resolve/{rev}/{path}      (datasets)

A resolve answer carries X-Repo-Commit and an ETag (the git blob sha1). LFS
files (here: everything but small text files) answer 302 to a second server
on another port, the "CDN", with X-Linked-Etag (the sha256) and
X-Linked-Size, as the Hub does; the CDN refuses requests that carry an
Authorization header, so a test fails if the client leaks the token to it.
Errors use the Hub's X-Error-Code values: RepoNotFound, GatedRepo,
RevisionNotFound, EntryNotFound.

Both servers listen on 127.0.0.1 only, on ports the OS picks, and stop when
the `with` block ends or, at the latest, after `max_seconds`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import http.server
import json
import threading
import urllib.parse

# Binary files, and text files this large, are LFS files (as a repo's
# .gitattributes makes them); small text files are plain git blobs.
LFS_MIN_BYTES = 10_000
_TEXT = (".json", ".jsonl", ".md", ".txt")


def git_blob_sha1(data: bytes) -> str:
  return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclasses.dataclass
class Repo:
  """One repo: files at one commit, reachable by branch name or commit."""

  files: dict[str, bytes]
  commit: str = "0123456789abcdef0123456789abcdef01234567"
  branches: tuple[str, ...] = ("main",)
  token: str | None = None  # gated: requests need "Authorization: Bearer <token>"

  def is_lfs(self, path: str) -> bool:
    data = self.files[path]
    return len(data) >= LFS_MIN_BYTES or not path.endswith(_TEXT)


class FakeHub:
  """Context manager: `with FakeHub(repos) as hub: hub.endpoint ...`.

  Args:
    repos: {("model" | "dataset", "org/name"): Repo}.
    max_seconds: both servers shut down after this long regardless.
  """

  def __init__(self, repos: dict[tuple[str, str], Repo],
               max_seconds: float = 300.0):
    self.repos = repos
    self.max_seconds = max_seconds
    self.requests: list[tuple[str, str]] = []  # (method, path)
    self.cdn_auth_leaks = 0
    self._lock = threading.Lock()

  # ------------------------------------------------------------------ servers

  def __enter__(self) -> FakeHub:
    hub = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def do_GET(self):  # pylint: disable=invalid-name
        hub._handle(self, body=True)

      def do_HEAD(self):  # pylint: disable=invalid-name
        hub._handle(self, body=False)

    class CdnHandler(Handler):

      def do_GET(self):  # pylint: disable=invalid-name
        hub._serve_blob(self, body=True)

      def do_HEAD(self):  # pylint: disable=invalid-name
        hub._serve_blob(self, body=False)

    self._hub = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._cdn = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CdnHandler)
    self._threads = [threading.Thread(target=s.serve_forever, daemon=True)
                     for s in (self._hub, self._cdn)]
    for t in self._threads:
      t.start()
    self._timer = threading.Timer(self.max_seconds, self._shutdown)
    self._timer.daemon = True
    self._timer.start()
    return self

  def __exit__(self, *exc):
    self._timer.cancel()
    self._shutdown()

  def _shutdown(self):
    for s in (self._hub, self._cdn):
      s.shutdown()
      s.server_close()

  @property
  def endpoint(self) -> str:
    return f"http://127.0.0.1:{self._hub.server_address[1]}"

  @property
  def cdn(self) -> str:
    return f"http://127.0.0.1:{self._cdn.server_address[1]}"

  def count(self, method: str, fragment: str) -> int:
    with self._lock:
      return sum(1 for m, p in self.requests if m == method and fragment in p)

  # ------------------------------------------------------------------ replies

  @staticmethod
  def _reply(h, status: int, body: bytes = b"", headers=None,
             send_body: bool = True):
    h.send_response(status)
    for k, v in (headers or {}).items():
      h.send_header(k, v)
    h.send_header("Content-Length", str(len(body)))
    h.end_headers()
    if send_body and body:
      h.wfile.write(body)

  def _error(self, h, status: int, code: str, send_body: bool, extra=None):
    body = json.dumps({"error": code}).encode()
    self._reply(h, status, body, {"X-Error-Code": code,
                                  "X-Error-Message": code,
                                  "Content-Type": "application/json",
                                  **(extra or {})}, send_body)

  def _repo(self, h, kind: str, repo_id: str, send_body: bool):
    repo = self.repos.get((kind, repo_id))
    if repo is None:
      self._error(h, 404, "RepoNotFound", send_body)
      return None
    if repo.token is not None and (
        h.headers.get("Authorization") != f"Bearer {repo.token}"):
      self._error(h, 401, "GatedRepo", send_body)
      return None
    return repo

  def _commit(self, h, repo: Repo, rev: str, send_body: bool):
    if rev in repo.branches or rev == repo.commit:
      return repo.commit
    self._error(h, 404, "RevisionNotFound", send_body)
    return None

  def _handle(self, h, body: bool):
    path = urllib.parse.urlsplit(h.path).path
    with self._lock:
      self.requests.append((h.command, path))
    parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
    # /api/{models,datasets}/{org}/{name}/{revision|tree}/{rev}[/...]
    if parts[:1] == ["api"] and len(parts) >= 6 and parts[1] in (
        "models", "datasets"):
      kind = parts[1][:-1]
      repo = self._repo(h, kind, "/".join(parts[2:4]), body)
      if repo is None:
        return
      commit = self._commit(h, repo, parts[5], body)
      if commit is None:
        return
      if parts[4] == "revision":
        info = {"id": "/".join(parts[2:4]), "sha": commit, "private": False,
                "siblings": [{"rfilename": p} for p in sorted(repo.files)]}
        payload = json.dumps(info).encode()
      elif parts[4] == "tree":
        entries = []
        for p, data in sorted(repo.files.items()):
          e = {"type": "file", "oid": git_blob_sha1(data), "size": len(data),
               "path": p}
          if repo.is_lfs(p):
            e["lfs"] = {"oid": hashlib.sha256(data).hexdigest(),
                        "size": len(data), "pointerSize": 134}
          entries.append(e)
        payload = json.dumps(entries).encode()
      else:
        self._error(h, 404, "NotFound", body)
        return
      self._reply(h, 200, payload, {"Content-Type": "application/json"}, body)
      return
    # /[datasets/]{org}/{name}/resolve/{rev}/{path...}
    kind = "model"
    if parts[:1] == ["datasets"]:
      kind, parts = "dataset", parts[1:]
    if len(parts) < 5 or parts[2] != "resolve":
      self._error(h, 404, "NotFound", body)
      return
    repo = self._repo(h, kind, "/".join(parts[:2]), body)
    if repo is None:
      return
    commit = self._commit(h, repo, parts[3], body)
    if commit is None:
      return
    file_path = "/".join(parts[4:])
    if file_path not in repo.files:
      self._error(h, 404, "EntryNotFound", body, {"X-Repo-Commit": commit})
      return
    data = repo.files[file_path]
    headers = {"X-Repo-Commit": commit, "ETag": f'"{git_blob_sha1(data)}"'}
    if repo.is_lfs(file_path):
      sha256 = hashlib.sha256(data).hexdigest()
      headers.update({"Location": f"{self.cdn}/blobs/{sha256}",
                      "X-Linked-Etag": f'"{sha256}"',
                      "X-Linked-Size": str(len(data))})
      self._reply(h, 302, b"", headers, body)
      return
    self._reply(h, 200, data, headers, body)

  def _serve_blob(self, h, body: bool):
    path = urllib.parse.urlsplit(h.path).path
    with self._lock:
      self.requests.append((h.command, "cdn:" + path))
    if h.headers.get("Authorization"):
      with self._lock:
        self.cdn_auth_leaks += 1
      self._reply(h, 403, b"token sent to the CDN", send_body=body)
      return
    sha256 = path.rsplit("/", 1)[-1]
    for repo in self.repos.values():
      for data in repo.files.values():
        if hashlib.sha256(data).hexdigest() == sha256:
          self._reply(h, 200, data, {"ETag": f'"{sha256}"'}, body)
          return
    self._reply(h, 404, b"no such blob", send_body=body)
