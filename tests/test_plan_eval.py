"""The eval plan: the eval job's own programs compiled with abstract inputs.

On 8 CPU devices with a tiny model: the compiled arguments are the bytes the
real sharded params occupy on one device (counted from arrays placed by
`probes.init_params`, not from the plan's ShapeDtypeStructs), and the
compiled probe programs, fed real arrays, give the numbers
evaluate/probes.py gives when the job runs it.
"""

import json

from flax import nnx
import jax
import numpy as np
import pytest

from optconsist_jax import sharding
from optconsist_jax.evaluate import probes
from optconsist_jax.evaluate import probes_geometry as geometry
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.model import preset
from optconsist_jax.tools.plan import __main__ as plan_cli
from optconsist_jax.tools.plan import aot
from optconsist_jax.tools.plan import eval_plan

MODEL = preset("tiny_gqa")
B, T = 8, 16
CONFIG = {
    "math": {"protocols": ("metamath",), "max_new_tokens": 8,
             "batch_size": 8},
    "multiple_choice": {"batch_size": 8, "max_len": 32},
    "lm_loss": {"batch_size": 8, "max_len": 32},
    "probes": {"fractions": (0.05, 0.5), "batch_size": B, "seq_len": T}}


@pytest.fixture(scope="module")
def setup():
  spec = eval_plan.EvalPlanSpec(model=MODEL, eval_config=CONFIG,
                                topology="cpu-8")
  devices, _ = aot.topology_devices("cpu-8")
  progs, mesh_shape, _, ref_bytes = eval_plan.programs(spec, devices)
  return spec, {p.name: p for p in progs}, mesh_shape, ref_bytes


def _device_bytes(tree) -> int:
  """Bytes on device 0 of real arrays (their addressable shards)."""
  return int(sum(x.addressable_shards[0].data.nbytes
                 for x in jax.tree.leaves(tree)))


def _real(prog):
  """Real base/finetuned params and a batch in the program's shardings."""
  config = EvalConfig.from_dict(CONFIG)
  mesh = jax.tree.leaves(prog.args[2])[0].sharding.mesh
  base = probes.init_params(MODEL, 3, mesh=mesh, rules=config.mesh.rules)
  noise = probes.init_params(MODEL, 4, mesh=mesh, rules=config.mesh.rules)
  ft = jax.tree.map(lambda a, b: a + 0.05 * b, base, noise)
  rows = np.random.default_rng(0).integers(0, MODEL.vocab_size, (B, T + 1))
  batch = jax.device_put(probes.lm_batch(rows),
                         jax.tree.map(lambda s: s.sharding, prog.args[-1]))
  return base, ft, batch


def test_programs_cover_the_job_and_layout(setup):
  _, progs, mesh_shape, _ = setup
  assert mesh_shape == {"data": 1, "fsdp": 8, "tensor": 1}
  names = set(progs)
  assert {"lm_loss", "multiple_choice", "math_prefill/metamath",
          "math_decode/metamath", "probe_second_order",
          "probe_activations"} <= names
  # One reference and one update per weight matrix of the model.
  kinds = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
           "down_proj")
  for k in kinds:
    assert any(n.startswith("probe_update/") and k in n for n in names)
    assert any(n.startswith("probe_reference/") and k in n for n in names)
  assert "probe_update/embed" in names and "probe_update/lm_head/kernel" in names


def test_second_order_compiled_memory_and_values(setup):
  """Args = 2 x one model's params per device + rest + batch; same numbers."""
  _, progs, _, _ = setup
  prog = progs["probe_second_order"]
  compiled, seconds = eval_plan.compile_program(prog)
  assert seconds > 0
  base, ft, batch = _real(prog)
  rest = prog.args[1]
  params_dev = _device_bytes(base)
  # tiny_gqa: every matrix splits 8 ways over fsdp; only norms are whole.
  norms = sum(x.size * 4 for p, x in jax.tree_util.tree_flatten_with_path(
      nnx.to_pure_dict(base))[0] if "norm" in sharding.path_name(p))
  assert params_dev == (MODEL.num_params() * 4 - norms) // 8 + norms
  mem = compiled.memory_analysis()
  assert mem.argument_size_in_bytes == (
      2 * params_dev + _device_bytes(batch)
      + eval_plan.shard_bytes(rest))

  sums, grad = compiled(rest, base, ft, batch)
  graphdef = prog.args[0]
  want = probes.second_order(graphdef, rest, base, ft, batch)
  np.testing.assert_allclose(float(sums["loss_base"]),
                             want["probe/loss_base"], rtol=1e-5)
  np.testing.assert_allclose(float(sums["loss_ft"]),
                             want["probe/loss_finetuned"], rtol=1e-5)
  np.testing.assert_allclose(float(sums["pred1"]),
                             want["probe/loss_change_pred1"], rtol=1e-4)
  np.testing.assert_allclose(float(sums["quad"]), want["probe/curvature"],
                             rtol=1e-4)
  # The gradient output is one float32 copy of the params per device.
  assert mem.output_size_in_bytes >= params_dev
  assert _device_bytes(grad) == params_dev


def test_activations_compiled_values(setup):
  _, progs, _, _ = setup
  prog = progs["probe_activations"]
  compiled, _ = eval_plan.compile_program(prog)
  _, ft, batch = _real(prog)
  got = compiled(prog.args[1], ft, batch)
  want = probes.residual_summary(prog.args[0], prog.args[1], ft, batch)
  for k in probes.STATS:
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-5)


def test_resident_bytes_count_what_the_job_holds(setup):
  """Update of one matrix: base + finetuned + batch beside its args, and
  every other matrix's references."""
  _, progs, _, ref_bytes = setup
  model_bytes = eval_plan.shard_bytes(progs["lm_loss"].args[1])
  batch = eval_plan.shard_bytes(progs["probe_second_order"].args[-1])
  updates = [n for n in progs if n.startswith("probe_update/")]
  assert set(ref_bytes) == {n.split("/", 1)[1] for n in updates}
  for name in updates:
    p = progs[name]
    assert p.resident_other == 2 * model_bytes + batch - eval_plan.shard_bytes(
        p.args[1:3])
    assert set(p.held_refs) == set(ref_bytes) - {name.split("/", 1)[1]}


def test_update_takes_its_references_as_compiled(setup):
  """The update's arguments are the reference program's outputs (as its
  compile lays them out) + W_base + W_ft; held references then count their
  compiled bytes."""
  spec, progs, _, _ = setup
  r = eval_plan.plan_eval(spec, only=("probe_reference/embed",
                                      "probe_update/embed",
                                      "probe_activations"))
  ref, upd, act = r.programs
  assert (ref.name, upd.name, act.name) == (
      "probe_reference/embed", "probe_update/embed", "probe_activations")
  w = eval_plan.shard_bytes(progs["probe_update/embed"].args[1:3])
  # Outputs count the result tuple's pointer table (8 bytes per output).
  assert 0 <= ref.output_bytes + w - upd.argument_bytes <= 8 * 4
  assert act.refs_estimated  # the other matrices' were not compiled
  # The statistics never use the final norm, the head, the targets or the
  # weights: the compiler drops those arguments, the job still holds them.
  prog = progs["probe_activations"]
  params = geometry.pure_params(prog.args[2])
  unused = [v for k, v in params.items()
            if k.startswith(("lm_head", "final_norm", "norm"))]
  assert len(unused) == 2, sorted(params)
  unused += [prog.args[3]["targets"], prog.args[3]["weights"]]
  assert eval_plan.pruned_bytes(prog, act) == eval_plan.shard_bytes(unused)
  assert ref.combined_bytes == ref.peak_bytes + ref.resident_other_bytes


def test_cli_plans_and_writes(tmp_path, capsys):
  out = tmp_path / "plan.jsonl"
  md = tmp_path / "plan.md"
  assert plan_cli.main([
      "--eval", "--model", "tiny_gqa", "--topology", "cpu-8",
      "--param_dtype", "float32", "--dtype", "float32",
      "--only", "probe_activations,lm_loss", "--json", str(out),
      "--markdown", str(md)]) == 0
  rows = [json.loads(l) for l in out.read_text().splitlines()]
  # In the order --only names them.
  assert [r["program"] for r in rows] == ["probe_activations", "lm_loss"]
  for r in rows:
    assert r["combined_gib"] == pytest.approx(
        r["peak_gib"] + r["resident_other_gib"])
    assert r["args_gib"] > 0 and r["fits"] is None
  text = capsys.readouterr().out
  assert "largest combined residency:" in text
  assert "eval plan written to" in text and "| probe_activations |" in md.read_text()


def test_lm_loss_args_are_one_model_plus_replicated_tokens(setup):
  _, progs, _, _ = setup
  prog = progs["lm_loss"]
  compiled, _ = eval_plan.compile_program(prog)
  model_bytes = eval_plan.shard_bytes(prog.args[1])
  tokens = 8 * 32 * 4 * 4  # inputs, targets, weights, segments, replicated
  assert compiled.memory_analysis().argument_size_in_bytes == (
      model_bytes + tokens)
