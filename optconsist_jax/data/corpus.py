"""Real text that is present offline: the running Python's standard library.

The small reproduction pretrains on it and measures retention as held-out
language-model loss on it. Documents are deterministic for a given Python
installation: files are visited in sorted order, test suites and vendored
packages are skipped, and the held-out split is chosen by a hash of the file's
relative path (not by position), so adding files does not reshuffle splits.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import os
import sysconfig
import warnings

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages",
              "__pycache__", "lib2to3", "ensurepip", "turtledemo", "venv"}


def _stdlib_files(root: str) -> list[str]:
  out = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
    for name in sorted(filenames):
      if name.endswith(".py"):
        out.append(os.path.join(dirpath, name))
  return out


def _docstrings(source: str) -> list[str]:
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    tree = ast.parse(source)
  docs = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                         ast.AsyncFunctionDef)):
      doc = ast.get_docstring(node, clean=True)
      if doc and len(doc) >= 40:
        docs.append(doc)
  return docs


def _is_heldout(rel_path: str, heldout_fraction: float) -> bool:
  h = int.from_bytes(hashlib.sha256(rel_path.encode()).digest()[:8], "big")
  return (h / 2**64) < heldout_fraction


def python_stdlib_text(split: str = "train", *, kind: str = "docstrings",
                       heldout_fraction: float = 0.05,
                       max_docs: int | None = None,
                       root: str | None = None) -> list[str]:
  """Documents from the standard library's .py files.

  Args:
    split: "train" or "heldout" (files are assigned by a hash of their path).
    kind: "docstrings" (each file's module/class/function docstrings of at
      least 40 characters, joined by blank lines: English prose) or "source"
      (each file's full source text).
    heldout_fraction: share of files in the held-out split.
    max_docs: keep only the first documents (in sorted file order).
    root: stdlib directory; default `sysconfig.get_paths()["stdlib"]`.

  Returns:
    A non-empty list of documents, one per file.
  """
  if split not in ("train", "heldout"):
    raise ValueError(f"python_stdlib_text: split={split!r}; use train/heldout")
  if kind not in ("docstrings", "source"):
    raise ValueError(f"python_stdlib_text: kind={kind!r}; use docstrings/source")
  if not 0.0 < heldout_fraction < 1.0:
    raise ValueError(
        f"python_stdlib_text: heldout_fraction={heldout_fraction} not in (0, 1)")
  root = root or sysconfig.get_paths()["stdlib"]
  docs = _documents(root, split, kind, heldout_fraction)
  if not docs:
    raise ValueError(f"python_stdlib_text: no documents under {root}")
  return list(docs[:max_docs])


# Parsing every stdlib file takes seconds and a run asks several times (the
# tokenizer, the pretraining and retention pipelines, the unigram baseline):
# the installed stdlib does not change while a process runs.
@functools.lru_cache(maxsize=8)
def _documents(root: str, split: str, kind: str,
               heldout_fraction: float) -> tuple[str, ...]:
  want_heldout = split == "heldout"
  docs = []
  for path in _stdlib_files(root):
    rel = os.path.relpath(path, root).replace(os.sep, "/")
    if _is_heldout(rel, heldout_fraction) != want_heldout:
      continue
    try:
      with open(path, encoding="utf-8") as f:
        source = f.read()
      text = source if kind == "source" else "\n\n".join(_docstrings(source))
    except (UnicodeDecodeError, SyntaxError, ValueError):
      continue  # A few stdlib files are deliberately not valid UTF-8/Python.
    if text.strip():
      docs.append(text)
  return tuple(docs)
