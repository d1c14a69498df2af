"""The package's shape: floors, no import cycle, small modules, few top ones.

Read from the source with `ast` (nothing is imported): every `import` and
`from ... import` of an optconsist_jax module, at module level or deferred
inside a function (a deferred import hides a cycle from Python, not from the
design), is an edge of the module graph. Each edge goes to the same or a lower
floor (DESIGN.md: nothing imports upward), and a function-level import says
why it is deferred (a heavy or optional import) in a `deferred:` comment.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "optconsist_jax"
MAX_LINES = 500
MAX_TOP_MODULES = 8
# The first name under optconsist_jax -> its floor; imports go level or down.
FLOORS = {
    "errors": 0, "typed_config": 0, "paths": 0, "platforms": 0, "storage": 0,
    "sharding": 1, "metric_writers": 1, "metrics": 1,
    "model": 2, "optim": 2,
    "io": 3,
    "data": 4,
    "train": 5,
    "evaluate": 6,
    "report": 7,
    "experiments": 8, "tools": 8,
}
# Re-export shims of old import paths (kept one release, DESIGN.md
# "Contracts"): they import their new, higher home by design.
SHIMS = {
    "optconsist_jax.evals": "evals/ moved to evaluate/",
    "optconsist_jax.generate": "generate.py moved to model/generate.py",
}
DEFERRED = "deferred:"


def modules(package: pathlib.Path = PACKAGE) -> dict[str, pathlib.Path]:
  """Dotted module name -> file, for every .py under the package."""
  out = {}
  for path in sorted(package.rglob("*.py")):
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
      parts = parts[:-1]
    out[".".join(parts)] = path
  return out


def imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
  """The package modules `path` imports, anywhere in its body."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name in known}
    elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
      for alias in node.names:
        full = f"{node.module}.{alias.name}"
        if full in known:
          out.add(full)
        elif node.module in known:
          out.add(node.module)
  out.discard(name)
  return out


def import_graph(package: pathlib.Path = PACKAGE) -> dict[str, set[str]]:
  mods = modules(package)
  return {name: imports(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[frozenset[str]]:
  """Strongly connected components with more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = set()
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.add(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(frozenset(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def floor(name: str) -> int | None:
  """The floor of a dotted module name; None for a name with none."""
  parts = name.split(".")
  if parts == ["optconsist_jax"]:
    return 0  # The package's docstring-only __init__.
  return FLOORS.get(parts[1])


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
  """"a (floor) -> b (floor)" for each import to a higher floor, and each
  module outside the floor table."""
  out = []
  for name in sorted(graph):
    if name in SHIMS:
      continue
    own = floor(name)
    if own is None:
      out.append(f"{name}: no floor (add it to FLOORS)")
      continue
    for target in sorted(graph[name]):
      to = floor(target)
      if to is not None and to > own:
        out.append(f"{name} ({own}) -> {target} ({to})")
  return out


def _function_level_imports(tree: ast.AST) -> list[ast.stmt]:
  """Import statements inside a function (at any depth)."""
  out = []
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      for child in ast.walk(node):
        if isinstance(child, (ast.Import, ast.ImportFrom)):
          out.append(child)
  return sorted(set(out), key=lambda n: n.lineno)


def undeclared_deferred_imports(path: pathlib.Path) -> list[int]:
  """Lines of function-level imports without a `deferred:` reason.

  The reason is a comment on the import's own line(s) or on the line above;
  a run of consecutive imports shares the comment above its first one.
  """
  source = path.read_text()
  lines = source.splitlines()
  nodes = _function_level_imports(ast.parse(source, filename=str(path)))
  by_end = {n.end_lineno: n for n in nodes}

  def declared(node) -> bool:
    if any(DEFERRED in lines[i - 1]
           for i in range(node.lineno, node.end_lineno + 1)):
      return True
    above = node.lineno - 1
    if above in by_end:
      return declared(by_end[above])
    return above >= 1 and DEFERRED in lines[above - 1]

  return [n.lineno for n in nodes if not declared(n)]


def top_level_modules(package: pathlib.Path = PACKAGE) -> list[str]:
  return sorted(p.name for p in package.glob("*.py") if p.name != "__init__.py")


def test_cycle_finder_finds_a_planted_cycle(tmp_path):
  """The checker itself: a two-module cycle through a deferred import."""
  pkg = tmp_path / "optconsist_jax"
  (pkg / "io").mkdir(parents=True)
  (pkg / "__init__.py").write_text("")
  (pkg / "io" / "__init__.py").write_text("")
  (pkg / "a.py").write_text("from optconsist_jax.io import b\n")
  (pkg / "io" / "b.py").write_text(
      "def f():\n  from optconsist_jax import a\n  return a\n")
  (pkg / "c.py").write_text("import optconsist_jax.a\n")
  graph = import_graph(pkg)
  assert graph["optconsist_jax.c"] == {"optconsist_jax.a"}
  assert cycles(graph) == [frozenset({"optconsist_jax.a",
                                      "optconsist_jax.io.b"})]


def test_no_import_cycle():
  found = [sorted(c) for c in cycles(import_graph())]
  assert not found, f"import cycles: {found}"


def test_no_module_over_500_lines():
  long = {}
  for path in modules().values():
    rel = str(path.relative_to(PACKAGE.parent))
    n = len(path.read_text().splitlines())
    if n > MAX_LINES:
      long[rel] = n
  assert not long, f"modules over {MAX_LINES} lines: {long}"


def _planted_package(tmp_path) -> pathlib.Path:
  pkg = tmp_path / "optconsist_jax"
  for sub in ("model", "train", "evals"):
    (pkg / sub).mkdir(parents=True)
    (pkg / sub / "__init__.py").write_text("")
  (pkg / "__init__.py").write_text("")
  (pkg / "paths.py").write_text("import os\n")
  return pkg


def test_floor_checker_finds_a_planted_upward_import(tmp_path):
  """The checker itself: a deferred import from model/ up into train/."""
  pkg = _planted_package(tmp_path)
  (pkg / "train" / "loop.py").write_text(
      "from optconsist_jax.model import llama\nfrom optconsist_jax import"
      " paths\n")
  (pkg / "model" / "llama.py").write_text(
      "from optconsist_jax import paths\n\n\ndef f():\n"
      "  from optconsist_jax.train import loop  # deferred: a planted cycle\n"
      "  return loop\n")
  # A shim may import upward; an unknown top-level name has no floor.
  (pkg / "evals" / "math.py").write_text(
      "from optconsist_jax.train import loop\n")
  (pkg / "extra.py").write_text("")
  global SHIMS
  saved, SHIMS = SHIMS, {"optconsist_jax.evals.math": "planted shim"}
  try:
    found = upward_imports(import_graph(pkg))
  finally:
    SHIMS = saved
  assert found == [
      "optconsist_jax.evals: no floor (add it to FLOORS)",
      "optconsist_jax.extra: no floor (add it to FLOORS)",
      "optconsist_jax.model.llama (2) -> optconsist_jax.train.loop (5)"]


def test_imports_go_level_or_down():
  found = upward_imports(import_graph())
  assert not found, "imports to a higher floor:\n" + "\n".join(found)


def test_at_most_8_top_level_modules():
  top = top_level_modules()
  assert len(top) <= MAX_TOP_MODULES, f"{len(top)} top-level modules: {top}"


def test_deferred_checker_on_a_planted_module(tmp_path):
  path = tmp_path / "m.py"
  path.write_text(
      "import os\n\n\n"
      "def f():\n"
      "  import json\n"                                 # 5: no reason
      "  import csv  # deferred: a reason\n"            # 6
      "  # deferred: heavy, shared by the run below\n"  # 7
      "  from xml import (\n"                          # 8
      "      dom)\n"                                    # 9
      "  import html\n"                                 # 10: same run
      "  x = 1\n"
      "  import zlib\n"                                 # 12: run broken
      "  return os, json, csv, dom, html, x, zlib\n")
  assert undeclared_deferred_imports(path) == [5, 12]


def test_function_level_imports_say_why_deferred():
  found = {}
  for path in modules().values():
    lines = undeclared_deferred_imports(path)
    if lines:
      found[str(path.relative_to(PACKAGE.parent))] = lines
  report = "\n".join(f"{f}: lines {v}" for f, v in sorted(found.items()))
  assert not found, (
      f"function-level imports without a '{DEFERRED}' reason (a comment on"
      " the line or the line above; move imports that defer nothing to the"
      f" top):\n{report}")
