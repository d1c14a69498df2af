"""`plan --search` (optconsist_jax.tools.plan.search)."""

import importlib.util
import json

import pytest

from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import __main__ as plan
from optconsist_jax.tools.plan import aot as planner
from optconsist_jax.model import preset
from optconsist_jax.tools.plan import search


def test_candidates_cover_factorizations_that_divide():
  c = search.candidates(4, 768, preset("llama2_7b"), [4, 5, 16], ["full"],
                        max_tensor=2)
  meshes = {x.label() for x in c}
  assert meshes == {"4x1x1", "2x2x1", "1x4x1", "2x1x2", "1x2x2"}
  for x in c:
    # rows per micro-batch x accum = the global batch; 5 never divides 768/4.
    assert x.micro_batch * x.data * x.fsdp * x.accum == 768
    assert x.micro_batch != 5
  # tensor must divide the heads, kv heads, MLP width and vocabulary.
  tiny = search.candidates(8, 16, preset("tiny_gqa"), [1], ["full"],
                           max_tensor=8)
  assert max(x.tensor for x in tiny) == 2  # 2 kv heads
  row = next(x for x in c if x.label() == "1x2x2" and x.micro_batch == 4)
  assert row.overrides() == (
      "--config.mesh.preset=fsdp_tp --config.mesh.data=1 --config.mesh.fsdp=2"
      " --config.mesh.tensor=2 --config.train.grad_accum_steps=96"
      " --config.model.remat_policy=full")


def _result(spec, step_bytes, fits=True):
  kinds = hlo_stats.COLLECTIVE_KINDS
  stats = hlo_stats.CollectiveStats(
      {k: 1 for k in kinds}, {k: 0.0 for k in kinds}, 0,
      {("all-gather", (0, 1, 2, 3)): [1, step_bytes]})
  return planner.PlanResult(
      spec=spec, mesh_shape={"data": 1, "fsdp": 4, "tensor": 1},
      grad_accum_steps=spec.grad_accum_steps, hbm_gib=95.0, argument_bytes=1,
      output_bytes=1, alias_bytes=1, temp_bytes=1, peak_bytes=2 * 2**30,
      fits=fits, collectives=stats, compile_seconds=1.0, trainable_params=10,
      device_coords=[(0, 0, 0, 0), (1, 0, 0, 0), (0, 1, 0, 0), (1, 1, 0, 0)])


def test_json_round_trip_and_ranking():
  base = planner.PlanSpec(model="llama2_7b", topology="v5p-8")
  cands = search.candidates(4, 768, preset("llama2_7b"), [4], ["full"],
                            max_tensor=1)[:3]
  rows = []
  for i, cand in enumerate(cands):
    spec = search.spec_for(base, cand)
    r = _result(spec, 2.0**43 * (3 - i), fits=(i != 1))  # comm.-bound
    back = search.result_from_json(json.loads(json.dumps(
        search.result_to_json(r))))
    assert back == r
    rows.append(search._row(cand, {"result": search.result_to_json(r)},
                            search.step_time.Assumptions(), cached=True))
  ranked = search.rank(rows)
  # Fitting rows by estimated step time (less traffic first), then the rest.
  assert [r.cand for r in ranked] == [cands[2], cands[0], cands[1]]
  table = search.markdown(ranked, base, search.step_time.Assumptions())
  assert "assumptions:" in table and "Discarded:" in table
  assert table.count("--config.mesh.preset=fsdp_tp") == 2


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="needs libtpu")
def test_search_cli_compiles_once_then_reads_the_cache(tmp_path, capsys):
  argv = ["--search", "--model", "tiny_gqa", "--topology", "v5p-8",
          "--seq_len", "32", "--global_batch", "8", "--micro_batches", "2",
          "--remats", "full", "--meshes", "1x4x1", "--cache_dir",
          str(tmp_path / "cache"), "--json", str(tmp_path / "s.jsonl")]
  assert plan.main(argv) == 0
  first = capsys.readouterr().out
  assert "1 to compile" in first and "assumptions:" in first
  assert len(list((tmp_path / "cache").iterdir())) == 1
  row = json.loads((tmp_path / "s.jsonl").read_text().splitlines()[0])
  assert row["fits"] and row["step_s"] > 0 and row["accum"] == 1
  assert plan.main(argv) == 0
  assert "1 cached, 0 to compile" in capsys.readouterr().out


def test_multi_slice_candidates_put_data_over_dcn():
  assert search.tpu_facts.parse_topology("2xv5p-8")[0] == 2
  assert search.tpu_facts.parse_topology("cpu-8") is None
  c = search.candidates(4, 768, preset("llama2_7b"), [4], ["full"],
                        max_tensor=1, slices=2)
  assert {x.label() for x in c} == {"2x4x1x1", "2x2x2x1", "2x1x4x1"}
  for x in c:
    assert x.micro_batch * x.data * x.fsdp * x.dcn * x.accum == 768
    assert "--config.mesh.dcn_data=2" in x.overrides()
    assert search.spec_for(planner.PlanSpec(), x).mesh["dcn_data"] == 2
