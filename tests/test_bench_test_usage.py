"""The suite's per-test usage record (tests/conftest.py) and its summary
(bench/test_usage.py)."""

import importlib.util
import json
import os
import pathlib
import subprocess
import sys
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
_SPEC = importlib.util.spec_from_file_location(
    "test_usage", REPO / "bench" / "test_usage.py")
test_usage = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(test_usage)


def test_spins_for_the_record():
  """The test the next one runs in a pytest of its own: ~0.3 s of CPU."""
  end = time.process_time() + 0.3
  while time.process_time() < end:
    pass


def test_each_phase_is_recorded_with_its_cpu(tmp_path):
  usage = tmp_path / "usage.jsonl"
  env = dict(os.environ, OPTCONSIST_TEST_USAGE=str(usage))
  p = subprocess.run(
      [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
       "-p", "no:xdist", f"{__file__}::test_spins_for_the_record"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stdout + p.stderr
  lines = [json.loads(l) for l in usage.read_text().splitlines()]
  assert [l["phase"] for l in lines] == ["setup", "call", "teardown"]
  call = lines[1]
  assert call["test"].endswith("::test_spins_for_the_record")
  assert 0.3 <= call["cpu"] < 5 and call["wall"] >= 0.3
  tests = test_usage.load(str(usage))
  (total,) = tests.values()
  assert total["cpu"] == pytest.approx(sum(l["cpu"] for l in lines))


def test_summary_ranks_by_cpu_and_by_waiting(tmp_path):
  rows = [
      # A subprocess-heavy test, a test waiting on others, a cheap one.
      ("t::sub", "call", 10.0, 0.1, 9.0), ("t::sub", "setup", 1.0, 1.0, 0.0),
      ("t::wait", "call", 20.0, 2.0, 0.0),
      ("t::cheap", "call", 0.5, 0.5, 0.0),
  ]
  path = tmp_path / "u.jsonl"
  path.write_text("".join(json.dumps({
      "test": t, "phase": ph, "worker": "gw0", "start": 100.0, "wall": w,
      "cpu": c, "sys": 0.0, "children_cpu": ch, "voluntary_switches": 1,
      "involuntary_switches": 0, "load1": 1.0}) + "\n"
                          for t, ph, w, c, ch in rows))
  tests = test_usage.load(str(path))
  assert tests["t::sub"]["wall"] == 11.0 and tests["t::sub"]["cpu"] == 1.1
  text = test_usage.summary(tests, top=3)
  by_cpu, by_wait = text.split("waiting longest")
  order = [l.split()[-1] for l in by_cpu.splitlines() if l.endswith(
      ("sub", "wait", "cheap"))]
  assert order == ["t::sub", "t::wait", "t::cheap"]  # 10.1, 2, 0.5 CPU s
  assert [l.split()[-1] for l in by_wait.splitlines()[2:]][0] == "t::wait"
  path.write_text("not json\n")
  with pytest.raises(SystemExit, match="u.jsonl:1: not a JSON line"):
    test_usage.load(str(path))
