"""The package's shape: no import cycle, no module over 500 lines.

Read from the source with `ast` (nothing is imported): every `import` and
`from ... import` of an optconsist_jax module, at module level or deferred
inside a function (a deferred import hides a cycle from Python, not from the
design), is an edge of the module graph.
"""

import ast
import pathlib

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "optconsist_jax"
MAX_LINES = 500


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
