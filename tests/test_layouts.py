"""The measured layout sweep (optconsist_jax.tools.layouts) on 8 CPU devices."""

import importlib.util
import json
import math
import os
import statistics

import jax
import pytest

from optconsist_jax.tools import layouts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_config() -> dict:
  path = os.path.join(ROOT, "configs", "tiny_metamath.py")
  spec = importlib.util.spec_from_file_location("tiny_metamath", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config().to_dict()
  config["data"].update(seq_len=32, global_batch_size=16)
  return config


def test_parse_layouts():
  got = layouts.parse_layouts("1x8x1, 2x2x2:4:dots")
  assert got == [layouts.Layout(1, 8, 1),
                 layouts.Layout(2, 2, 2, accum=4, remat="dots")]
  with pytest.raises(ValueError, match="'2x4'"):
    layouts.parse_layouts("2x4")


@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices")
def test_sweep_writes_table_and_chart(tmp_path):
  config = _tiny_config()
  sweep = [layouts.Layout(1, 8, 1), layouts.Layout(2, 2, 2, accum=2)]
  records = [layouts.measure(config, l, steps=2) for l in sweep]
  paths = layouts.write(records, str(tmp_path))
  assert [os.path.basename(p) for p in paths] == list(layouts.FILES)
  saved = json.loads((tmp_path / "layouts.json").read_text())["records"]
  assert [r["mesh"] for r in saved] == [
      {"data": 1, "fsdp": 8, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2}]
  for r in saved:
    assert r["tokens_per_step"] == 16 * 32
    assert r["tokens_per_s"] == pytest.approx(r["tokens_per_step"]
                                              / r["step_s"])
    assert r["tokens_per_s_per_chip"] == pytest.approx(r["tokens_per_s"] / 8)
    assert r["step_s"] == pytest.approx(statistics.median(r["step_s_all"]))
    assert r["mfu"] is None and r["estimate"] is None  # CPU: no peak, no ICI
  # FSDP shards weights (gathers), tensor x data all-reduces: both move bytes.
  assert all(r["collective_bytes"] > 0 for r in saved)
  assert saved[1]["grad_accum_steps"] == 2
  # Same init, batch and steps: the layouts compute the same training run.
  assert math.isclose(saved[0]["loss"], saved[1]["loss"], rel_tol=1e-3)
  table = (tmp_path / "layouts.md").read_text()
  assert "| 1x8x1 | 1 |" in table and "| 2x2x2:2 | 2 |" in table
  png = (tmp_path / "layouts.png").read_bytes()
  assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
  with pytest.raises(FileExistsError, match="layouts.json exists"):
    layouts.write(records, str(tmp_path))
