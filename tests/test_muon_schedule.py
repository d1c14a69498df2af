"""Where Muon's Newton-Schulz loops sit relative to the backward pass in the
compiled step (bench/muon_step.py --parts schedule; docs/optimizers.md)."""

import importlib.util
import pathlib
import sys

import pytest

PATH = pathlib.Path(__file__).resolve().parent.parent / "bench" / "muon_step.py"


@pytest.fixture(scope="module")
def bench():
  # bench/ is not a package.
  spec = importlib.util.spec_from_file_location("bench_muon_step", PATH)
  module = importlib.util.module_from_spec(spec)
  sys.modules["bench_muon_step"] = module
  spec.loader.exec_module(module)
  yield module
  del sys.modules["bench_muon_step"]


def test_schedule_parser_on_a_hand_written_entry(bench):
  hlo = """HloModule m, is_scheduled=true

ENTRY %main (p: f32[4]) -> f32[4] {
  %p = f32[4]{0} parameter(0)
  %g1 = f32[4]{0} multiply(%p, %p), metadata={op_name="jit(f)/transpose(jvp())/mul"}
  %g2 = f32[4]{0} add(%p, %p), metadata={op_name="jit(f)/transpose(jvp())/add"}
  %w = (s32[], f32[4]{0}) while(%g1), condition=%c, body=%b, metadata={op_name="jit(f)/while"}
  %g3 = f32[4]{0} negate(%g2), metadata={op_name="jit(f)/transpose(jvp())/neg"}
  ROOT %r = f32[4]{0} add(%g3, %g3)
}
"""
  out = bench.schedule_overlap(hlo)
  assert out["backward_ops"] == 3 and out["ns_loops"] == 1
  assert out["first_ns_loop_at"] == 3 and out["last_backward_op_at"] == 4
  assert out["backward_ops_scheduled_after_first_ns_loop"] == 1
  # The loop reads g1 only: g2 and g3 are independent of it.
  assert out["backward_ops_independent_of_each_ns_loop"] == [2]


def test_clipped_step_orthogonalizes_after_the_whole_backward(bench):
  # Global-norm clipping makes every update depend on every gradient.
  out = bench.schedule_figures(scan_layers=True, clip=True)
  assert out["ns_loops"] == 3  # q/o, k/v and gate/up/down shape groups
  assert out["backward_ops_independent_of_each_ns_loop"] == [0, 0, 0]
  assert out["first_ns_loop_at"] > out["last_backward_op_at"]


def test_unrolled_unclipped_step_lets_xla_interleave(bench):
  # The check above can fail: without clipping and with unrolled layers
  # an NS loop needs only its group's gradients, and XLA's schedule puts
  # some backward ops after the first NS loop.
  out = bench.schedule_figures(scan_layers=False, clip=False)
  assert min(out["backward_ops_independent_of_each_ns_loop"]) > 0
  assert out["backward_ops_scheduled_after_first_ns_loop"] > 0
