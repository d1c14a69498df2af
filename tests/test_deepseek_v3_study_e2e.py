"""The small study end to end on a tiny DeepSeek-V3 base from a local "Hub".

tests/fixtures/hub/deepseek_v3 is a tiny random `deepseek_v3` checkpoint
(multi-head latent attention, 8 routed experts + 1 shared, a dense first
layer) with the llama3 tokenizer fixture's tokenizer.json, written by
transformers (tests/make_hf_deepseek_fixtures.py). The study's mini mode
takes it as an external base labelled Muon-pretrained (as Moonlight is;
`reproduce.bases=muon:PATH`, a folder no provenance entry names), finetunes
it with AdamW, Muon and LoRA (adapters on every linear layer and on each
routed expert), evaluates every checkpoint and the base with the update
probes, and writes the report.
"""

import json
import pathlib

import numpy as np
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.experiments import study
from optconsist_jax.io import hf
from optconsist_jax.model import deepseek_v3

import study_config

REPO = pathlib.Path(__file__).resolve().parent.parent
FOLDER = REPO / "tests" / "fixtures" / "hub" / "deepseek_v3"
METHODS = ("adamw", "muon", "lora")


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  return study_config.run_mini_study(
      tmp_path_factory.mktemp("deepseek_study"), f"muon:{FOLDER}", METHODS,
      probes=True)


@pytest.mark.slow
@pytest.mark.xdist_group("deepseek_study_e2e")
def test_the_folder_is_loaded_as_deepseek_v3(study_run):
  _, _, bases, runs = study_run
  (base,) = bases
  assert (base.name, base.kind, base.tokenizer_path) == (
      "muon", "hf", str(FOLDER))
  assert study.load_tokenizer(base.tokenizer_path).vocab_size == 600
  # Every run took the folder's architecture: a DeepseekV3Config.
  assert sorted(r.labels["method"] for r in runs) == sorted(METHODS)
  for run in runs:
    model = json.loads((pathlib.Path(run.workdir) / "config.json"
                        ).read_text())["model"]
    assert (model["n_routed_experts"], model["kv_lora_rank"],
            model["q_lora_rank"], model["vocab_size"]) == (8, 8, None, 640)
  # What the study loaded is transformers' model: logits on a prompt (ids
  # from transformers' tokenizer) match transformers'.
  _, loaded = hf.load(str(FOLDER))
  assert isinstance(loaded, deepseek_v3.DeepseekV3)
  prompt = json.loads((FOLDER / "expected" / "prompt.json").read_text())
  logits = np.asarray(loaded(np.asarray([prompt["ids"]], np.int32)))
  np.testing.assert_allclose(
      logits, np.load(FOLDER / "expected" / "logits.npy"), atol=1e-4, rtol=0)


@pytest.mark.slow
@pytest.mark.xdist_group("deepseek_study_e2e")
def test_each_method_is_evaluated_with_the_update_probes(study_run):
  _, _, _, runs = study_run
  records = {r.labels["method"]: results.read_workdir(r.workdir)
             for r in runs}
  # The base is scored once (in the first run's workdir), each finetuned
  # checkpoint once.
  assert sum(r.is_base for rs in records.values() for r in rs) == 1
  for method, rs in records.items():
    (ft,) = [r for r in rs if not r.is_base]
    assert np.isfinite(ft.learning) and np.isfinite(ft.retention), method
    m = ft.metrics
    # The probes see MLA's projections, the dense and shared-expert MLPs
    # and each routed expert's matrix.
    for kind in ("q", "kv_a", "kv_b", "o", "gate", "shared_up",
                 "expert_gate", "expert_up", "expert_down", "all"):
      assert m[f"probe/update_norm/{kind}"] > 0, (method, kind)
    assert m["probe/stable_rank/expert_down"] >= 1.0
    # LoRA leaves the router, the embedding and the head alone; full
    # finetuning moves them.
    for kind in ("router", "embed", "head"):
      assert (m[f"probe/update_norm/{kind}"] > 0) == (method != "lora"), (
          method, kind)
    # Each expert's update is its adapter's, of rank <= 2 (the mini mode's
    # lora_rank): its stable rank cannot exceed 2.
    if method == "lora":
      for kind in ("expert_gate", "expert_up", "expert_down", "kv_b"):
        assert m[f"probe/stable_rank/{kind}"] <= 2.0 + 1e-6, kind
    assert np.isfinite(m["probe/loss_change"])
    assert [k for k in m if k.startswith("probe/act_rms_drift/layer")] == [
        f"probe/act_rms_drift/layer{i}" for i in range(3)]  # 3 layers


@pytest.mark.slow
@pytest.mark.xdist_group("deepseek_study_e2e")
def test_the_report_has_the_base_and_each_method(study_run):
  w, outputs, _, _ = study_run
  summary = json.loads(pathlib.Path(outputs["summary_json"]).read_text())
  rows = {(s["base"], s["method"]): s["role"] for s in summary}
  assert rows == {("muon", "adamw"): "mismatched",
                  ("muon", "muon"): "matched",
                  ("muon", "lora"): "lora"}
  assert pathlib.Path(outputs["muon_base_png"]).stat().st_size > 0
  info = json.loads((w / "run_info.json").read_text())
  assert info["base_labels"] == {"muon": "given as NAME:PATH"}
