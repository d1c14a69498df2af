"""Where a test suite's time goes: per test, CPU seconds against wall.

Reads the JSON lines tests/conftest.py appends when OPTCONSIST_TEST_USAGE
names a file (one per test phase: wall, CPU of the worker, CPU of the
subprocesses it waited for, context switches) and prints the tests that cost
the most CPU, the ones whose wall time most exceeds their CPU (waiting:
on locks, on other processes, on a loaded machine), and each worker's busy
time.

  OPTCONSIST_TEST_USAGE=$PWD/usage.jsonl make test
  python bench/test_usage.py usage.jsonl [--top=30]
"""

import argparse
import collections
import json


def load(path: str) -> dict[str, dict[str, float]]:
  """Sums each test's phases: {nodeid: {wall, cpu, children_cpu, ...}}."""
  tests = collections.defaultdict(lambda: collections.defaultdict(float))
  with open(path) as f:
    for n, line in enumerate(f, 1):
      try:
        r = json.loads(line)
      except json.JSONDecodeError as e:
        raise SystemExit(f"{path}:{n}: not a JSON line ({e})") from None
      t = tests[r["test"]]
      for k in ("wall", "cpu", "sys", "children_cpu", "voluntary_switches",
                "involuntary_switches"):
        t[k] += r[k]
      t["start"] = min(t.get("start", r["start"]), r["start"])
      t["end"] = max(t.get("end", 0.0), r["start"] + r["wall"])
      t["worker"] = r["worker"]
  return tests


def summary(tests: dict[str, dict[str, float]], top: int) -> str:
  lines = []
  total_cpu = sum(t["cpu"] + t["children_cpu"] for t in tests.values())
  total_wall = sum(t["wall"] for t in tests.values())
  start = min(t["start"] for t in tests.values())
  end = max(t["end"] for t in tests.values())
  lines.append(f"{len(tests)} tests; span {end - start:.0f} s; test wall"
               f" {total_wall:.0f} s summed over workers; CPU {total_cpu:.0f}"
               " s (workers + their subprocesses)")
  by_worker = collections.defaultdict(float)
  for t in tests.values():
    by_worker[t["worker"]] += t["wall"]
  lines.append("busy per worker: " + ", ".join(
      f"{w} {s:.0f} s" for w, s in sorted(by_worker.items())))

  def table(title, key):
    lines.extend(["", title,
                  f"{'wall':>8} {'cpu':>8} {'child':>8} {'sys':>7}"
                  f" {'vol.sw':>8}  test"])
    for name, t in sorted(tests.items(), key=lambda kv: -key(kv[1]))[:top]:
      lines.append(f"{t['wall']:8.1f} {t['cpu']:8.1f} {t['children_cpu']:8.1f}"
                   f" {t['sys']:7.1f} {int(t['voluntary_switches']):8d}"
                   f"  {name}")

  table(f"The {top} tests with the most CPU (self + subprocesses):",
        lambda t: t["cpu"] + t["children_cpu"])
  table(f"The {top} tests waiting longest (wall - CPU):",
        lambda t: t["wall"] - t["cpu"] - t["children_cpu"])
  return "\n".join(lines)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("usage", help="the JSON lines file OPTCONSIST_TEST_USAGE named")
  p.add_argument("--top", type=int, default=30)
  a = p.parse_args(argv)
  print(summary(load(a.usage), a.top))


if __name__ == "__main__":
  main()
