"""The AOT planner: HLO collective counting, CPU mesh and a TPU topology."""

import importlib.util
import json

import jax
from jax.sharding import NamedSharding, PartitionSpec as P
import pytest

from optconsist_jax import sharding
from optconsist_jax.model import preset
from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import __main__ as plan
from optconsist_jax.tools.plan import aot as planner

HLO = """\
HloModule jit_step, entry_computation_layout={()->f32[]}

%add (a: f32[], b: f32[]) -> f32[] {
  %a = f32[] parameter(0)
  %b = f32[] parameter(1)
  ROOT %s = f32[] add(%a, %b)
}

%all-reduce-scatter.1 (input.1: f32[64]) -> f32[16] {
  %input.1 = f32[64]{0} parameter(0)
  %all-reduce.9 = f32[64]{0} all-reduce(%input.1), replica_groups={{0,1,2,3}}, to_apply=%add
  ROOT %ds = f32[16]{0} dynamic-slice(%all-reduce.9, %c), dynamic_slice_sizes={16}
}

%inner_body (p.2: (s32[], bf16[4,16])) -> (s32[], bf16[4,16]) {
  %p.2 = (s32[], bf16[4,16]{1,0}) parameter(0)
  %x.2 = bf16[4,16]{1,0} get-tuple-element(%p.2), index=1
  %cp = bf16[4,16]{1,0} collective-permute(%x.2), source_target_pairs={{0,1}}
  ROOT %t.2 = (s32[], bf16[4,16]{1,0}) tuple(%i, %cp)
}

%inner_cond (p.3: (s32[], bf16[4,16])) -> pred[] {
  %p.3 = (s32[], bf16[4,16]{1,0}) parameter(0)
  %c.3 = s32[]{:T(128)} constant(5)
  %i.3 = s32[] get-tuple-element(%p.3), index=0
  ROOT %lt = pred[] compare(%i.3, %c.3), direction=LT
}

%outer_body (p.1: (s32[], f32[16])) -> (s32[], f32[16]) {
  %p.1 = (s32[], f32[16]{0}) parameter(0)
  %x.1 = f32[16]{0} get-tuple-element(%p.1), index=1
  %ag = bf16[8,16]{1,0} all-gather(%y), dimensions={0}
  %full = f32[64]{0} broadcast(%x.1), dimensions={}
  %rs = f32[16]{0} fusion(%full), kind=kCustom, calls=%all-reduce-scatter.1
  %w = (s32[], bf16[4,16]{1,0}) while(%t0), condition=%inner_cond, body=%inner_body
  ROOT %t.1 = (s32[], f32[16]{0}) tuple(%i, %rs)
}

%outer_cond (p.4: (s32[], f32[16])) -> pred[] {
  %p.4 = (s32[], f32[16]{0}) parameter(0)
  ROOT %lt.4 = pred[] compare(%a.4, %b.4), direction=LT
}

ENTRY %main (arg: f32[1024]) -> f32[] {
  %arg = f32[1024]{0} parameter(0)
  %ar = f32[1024]{0} all-reduce(%arg), replica_groups={{0,1}}, to_apply=%add
  %ags = (f32[256]{0}, f32[1024]{0}) all-gather-start(%arg.q), dimensions={0}
  %agd = f32[1024]{0} all-gather-done(%ags)
  %arg.q = f32[256]{0} parameter(1)
  %loop = (s32[], f32[16]{0}) while(%init), condition=%outer_cond, body=%outer_body, backend_config={"known_trip_count":{"n":"3"}}
  %a2a = s32[2,8]{1,0} all-to-all(%tok), dimensions={0}
  %async-collective-start.1 = (bf16[2,16]{1,0}, bf16[8,16]{1,0}) fusion(%w0), kind=kCustom, calls=%gather_start
  %fusion.7 = (f32[4]{0}, bf16[2,16]{1,0}, bf16[8,16]{1,0}) fusion(%x0, %async-collective-start.1), kind=kCustom, calls=%async_collective_fusion.7
  %async-collective-done.1 = bf16[8,16]{1,0} fusion(%fusion.7), kind=kCustom, calls=%gather_done
  ROOT %r = f32[] constant(0)
}

%gather_start (q.1: bf16[2,16]) -> (bf16[2,16], bf16[8,16]) {
  %q.1 = bf16[2,16]{1,0} parameter(0)
  %g.1 = bf16[8,16]{1,0} all-gather(%q.1), dimensions={0}
  ROOT %t.5 = (bf16[2,16]{1,0}, bf16[8,16]{1,0}) tuple(%q.1, %g.1)
}

%async_collective_fusion.7 (q.2: bf16[2,16]) -> (f32[4], bf16[2,16], bf16[8,16]) {
  %q.2 = bf16[2,16]{1,0} parameter(0)
  %g.2 = bf16[8,16]{1,0} all-gather(%q.2), dimensions={0}
  ROOT %t.6 = (f32[4]{0}, bf16[2,16]{1,0}, bf16[8,16]{1,0}) tuple(%z, %q.2, %g.2)
}

%gather_done (q.3: bf16[2,16]) -> bf16[8,16] {
  %q.3 = bf16[2,16]{1,0} parameter(0)
  ROOT %g.3 = bf16[8,16]{1,0} all-gather(%q.3), dimensions={0}
}
"""


def test_collectives_counts_loops_by_trip_count():
  c = hlo_stats.collectives(HLO)
  # Entry: one all-reduce of 4 KiB, one async all-gather (output 4 KiB), one
  # all-to-all of 64 B. Outer loop x3: a bf16[8,16] all-gather (256 B) and a
  # reduce-scatter fusion of f32[64] (256 B; its inner all-reduce is not
  # counted again). Inner loop x5 per outer trip: collective-permute 128 B.
  # A TPU async all-gather (start, continuation, done) of bf16[8,16]: once.
  assert c.count == {"all-gather": 1 + 3 + 1, "reduce-scatter": 3,
                     "all-reduce": 1, "all-to-all": 1,
                     "collective-permute": 15}
  assert c.bytes == {"all-gather": 4096 + 3 * 256 + 256,
                     "reduce-scatter": 3 * 256,
                     "all-reduce": 4096, "all-to-all": 64,
                     "collective-permute": 15 * 128}
  assert c.loops_without_trip_count == 0


def test_loop_without_trip_count_is_reported():
  text = HLO.replace(', backend_config={"known_trip_count":{"n":"3"}}', "")
  c = hlo_stats.collectives(text)
  assert c.loops_without_trip_count == 1
  assert c.count["reduce-scatter"] == 1


def test_cpu_mesh_dp_all_reduces_every_gradient_once(tmp_path):
  """Pure DP, one micro-batch: the gradient all-reduce moves every param once."""
  out = tmp_path / "plan.jsonl"
  md = tmp_path / "plan.md"
  assert plan.main([
      "--model", "tiny_gqa", "--mesh", "dp", "--topology", "cpu-8",
      "--seq_len", "16", "--global_batch", "8", "--per_chip_batch", "1",
      "--dtype", "float32", "--json", str(out), "--markdown", str(md)]) == 0
  row = json.loads(out.read_text().splitlines()[0])
  param_bytes = preset("tiny_gqa").num_params() * 4
  all_reduce = row["all-reduce_gib"] * planner.GIB
  # Gradients plus a few scalars (loss, token count, grad norm).
  assert param_bytes <= all_reduce <= 1.01 * param_bytes + 1024
  assert row["all-gather_gib"] == 0 and row["reduce-scatter_gib"] == 0
  assert row["fits"] is None and row["accum"] == 1
  assert "| cpu-8 | dp 8x1x1 | adamw | 1 |" in md.read_text()


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu (pip install -c constraints.txt libtpu)")
def test_tpu_topology_fsdp_fits_and_gathers():
  r = planner.plan(planner.PlanSpec(
      model="tiny_gqa", mesh="fsdp", topology="v5p-8", seq_len=32,
      global_batch=8, per_chip_batch=1, dtype="bfloat16"))
  assert r.mesh_shape == {"data": 1, "fsdp": 4, "tensor": 1}
  assert r.grad_accum_steps == 2 and r.hbm_gib == 95 and r.fits
  state_bytes = 3 * 4 * preset("tiny_gqa").num_params()  # params + 2 moments
  # Arguments per chip: a quarter of the state (TPU pads small dims to tiles,
  # hence the upper slack) plus the batch.
  assert state_bytes / 4 <= r.argument_bytes <= 2 * state_bytes / 4 + 65536
  assert r.peak_bytes >= r.argument_bytes
  # FSDP gathers every weight (bf16) at least once per micro-batch, and
  # reduce-scatters the gradients.
  assert r.collectives.bytes["all-gather"] >= 2 * (
      2 * preset("tiny_gqa").num_params() * 0.9)
  assert r.collectives.count["reduce-scatter"] > 0
  assert r.collectives.loops_without_trip_count == 0


def test_unknown_topology_and_bad_batch_are_errors():
  with pytest.raises(ValueError, match="unknown topology 'v9-8'"):
    planner.topology_devices("v9-8")
  with pytest.raises(ValueError, match="not a multiple of per_chip_batch x"
                     " chips = 24"):
    planner.plan(planner.PlanSpec(model="tiny_gqa", topology="cpu-8",
                                  seq_len=8, global_batch=20,
                                  per_chip_batch=3))


def test_spec_from_a_training_config():
  spec_file = importlib.util.spec_from_file_location(
      "tiny_metamath", "configs/tiny_metamath.py")
  module = importlib.util.module_from_spec(spec_file)
  spec_file.loader.exec_module(module)
  spec = planner.spec_from_config(module.get_config("lora"), "v5e-4")
  assert spec.topology == "v5e-4" and spec.optimizer == "lora"
  assert spec.seq_len == 192 and spec.global_batch == 16
  # The config's sections, parsed by ExperimentConfig (the one parser).
  assert spec.model == preset("tiny_gqa").replace(
      **{k: v for k, v in module.get_config("lora").model.items()
         if k != "preset"})
  assert spec.mesh == sharding.MeshConfig.preset("fsdp")
  assert (spec.lora_config.rank, spec.lora_config.alpha) == (8, 16.0)
  # The optimizer is the config's (LoRA's AdamW at 1e-2), not a preset.
  assert spec.optim_config.groups["adamw"].schedule.peak == 1e-2
  assert planner.spec_from_config(module.get_config("muon")).optimizer == "muon"
  assert planner.spec_from_config(module.get_config("adamw"),
                                  grad_accum_steps=4).grad_accum_steps == 4


def test_opt_state_bytes_per_chip_and_replicated_leaf_warning(tmp_path):
  """AdamW on FSDP x 8: mu + nu per chip is 2 x params / 8; Kron planned."""
  out = tmp_path / "plan.jsonl"
  md = tmp_path / "plan.md"
  assert plan.main([
      "--model", "tiny_gqa", "--mesh", "fsdp", "--topology", "cpu-8",
      "--seq_len", "16", "--global_batch", "8", "--per_chip_batch", "1",
      "--dtype", "float32", "--json", str(out), "--markdown", str(md)]) == 0
  row = json.loads(out.read_text().splitlines()[0])
  cfg = preset("tiny_gqa")
  # Every param dim tiny_gqa splits over fsdp divides by 8 except the norms
  # (replicated, 4 bytes x embed x (2 x layers + 1)) and AdamW's two counts.
  norms = 4 * cfg.hidden_size * (2 * cfg.num_layers + 1)
  param_bytes = cfg.num_params() * 4
  expected = 2 * ((param_bytes - norms) / 8 + norms) + 2 * 4
  assert row["opt_state_gib"] * planner.GIB == pytest.approx(expected)
  assert row["replicated_opt_leaves"] == []
  text = md.read_text()
  assert "opt state GiB/chip |" in text and "WARNING" not in text


def test_replicated_opt_state_leaf_over_threshold_is_flagged():
  mesh = jax.make_mesh((8,), ("fsdp",), devices=jax.devices()[:8])
  big = 32 * 2**20  # float32 elements: 128 MiB
  state = {
      "q": jax.ShapeDtypeStruct((big,), "float32",
                                sharding=NamedSharding(mesh, P())),
      "sharded": jax.ShapeDtypeStruct((big,), "float32",
                                      sharding=NamedSharding(mesh, P("fsdp"))),
      "small": jax.ShapeDtypeStruct((1024,), "float32",
                                    sharding=NamedSharding(mesh, P())),
  }
  total, flagged = planner.opt_state_per_chip(state, mesh.size)
  assert total == 4 * big + 4 * big // 8 + 4 * 1024
  assert flagged == [("q", 4 * big)]
  result = planner.PlanResult(
      spec=planner.PlanSpec(topology="cpu-8", optimizer="kron"),
      mesh_shape={"data": 1, "fsdp": 8, "tensor": 1}, grad_accum_steps=1,
      hbm_gib=None, argument_bytes=0, output_bytes=0, alias_bytes=0,
      temp_bytes=0, peak_bytes=0, fits=None, collectives=None,
      compile_seconds=0.0, trainable_params=0, opt_state_bytes=total,
      replicated_opt_leaves=flagged)
  table = plan.markdown_table([result])
  assert "WARNING: cpu-8 kron: optimizer-state leaf q is replicated," in table
  assert "128.00 MiB per chip" in table


def test_deepseek_v3_expert_parallel_plan_on_cpu(tmp_path):
  """A tiny DeepSeek-V3 (MoE) compiles; experts split over `data`.

  Pure data parallelism with the extra rule expert=data: every chip holds
  1/8 of the routed experts (and of the router's expert columns and the
  routing bias), the rest replicated. Arguments per chip are then, counted
  from the config's shapes: params + AdamW's two moments (trainable params
  only: the routing bias is not one) + the batch's five [B, T] 4-byte
  arrays over 8 chips.
  """
  from optconsist_jax.model import architecture  # pylint: disable=g-import-not-at-top
  out = tmp_path / "plan.jsonl"
  md = tmp_path / "plan.md"
  assert plan.main([
      "--model", "tiny_deepseek_v3", "--mesh", "dp", "--extra_rules",
      "expert=data", "--topology", "cpu-8", "--seq_len", "16",
      "--global_batch", "8", "--per_chip_batch", "1", "--dtype", "float32",
      "--json", str(out), "--markdown", str(md)]) == 0
  row = json.loads(out.read_text().splitlines()[0])
  c = architecture.preset("tiny_deepseek_v3")
  lm, e, d = c.num_moe_layers, c.n_routed_experts, c.hidden_size
  experts = lm * e * 3 * d * c.moe_intermediate_size + lm * d * e  # + router
  bias = lm * e
  params = c.num_params()  # analytic; tests/test_deepseek_v3.py checks it
  replicated = params - experts - bias
  per_chip_params = replicated + experts / 8
  param_bytes = 4 * (per_chip_params + bias / 8)
  opt_bytes = 4 * 2 * per_chip_params
  batch_bytes = 5 * 4 * 8 * 16 / 8
  args = row["args_gib"] * planner.GIB
  assert row["opt_state_gib"] * planner.GIB == pytest.approx(
      opt_bytes, abs=64)  # + AdamW's step counts
  # + the step counter, RNG key and the like.
  assert param_bytes + opt_bytes + batch_bytes <= args <= (
      param_bytes + opt_bytes + batch_bytes + 1024)
  # The replicated params' gradients are all-reduced over the 8 chips.
  assert row["all-reduce_gib"] * planner.GIB >= 4 * replicated
  assert "| cpu-8 | dp 8x1x1 expert=data | adamw | 1 |" in md.read_text()


def test_extra_rules_flag_parses():
  assert plan.parse_rules("expert=data, expert_mlp=none,x=data+fsdp") == (
      ("expert", "data"), ("expert_mlp", None), ("x", ("data", "fsdp")))
  with pytest.raises(Exception, match="NAME=AXIS"):
    plan.parse_rules("expert")
