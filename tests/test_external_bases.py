"""`reproduce.bases`: labels from NAME:PATH or the provenance table, tokenizers."""

import json
import pathlib

import pytest

from optconsist_jax.experiments import external_bases
from optconsist_jax.experiments import study
from optconsist_jax.io import provenance

REPO = pathlib.Path(__file__).resolve().parent.parent
TOKENIZERS = REPO / "tests" / "fixtures" / "hf_tokenizers"


def test_a_known_hub_id_needs_no_name():
  llama3, moon = external_bases.parse(
      "meta-llama/Llama-3.1-8B,moonshotai/Moonlight-16B-A3B")
  (qwen3,) = external_bases.parse(["muon:hf://Qwen/Qwen3-8B-Base@main"])
  # Labels come from the table (each record's optimizer, not a constant).
  assert (llama3.name, llama3.path, llama3.hub_id) == (
      provenance.BASES["meta-llama/llama-3.1-8b"].optimizer,
      "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B")
  assert moon.name == "muon" == provenance.BASES[
      "moonshotai/moonlight-16b-a3b"].optimizer
  assert "arXiv 2502.16982" in moon.label_source
  # NAME:PATH wins over the table, and says so.
  assert (qwen3.name, qwen3.hub_id) == ("muon", "Qwen/Qwen3-8B-Base")
  assert "overrides the table's adamw" in qwen3.label_source
  assert external_bases.ExternalBase("adamw", "/x").label_source == (
      "given as NAME:PATH")


def test_unknown_or_clashing_bases_are_one_line_errors(tmp_path):
  with pytest.raises(ValueError) as e:
    external_bases.parse("some-org/some-model")
  msg = str(e.value)
  assert msg.startswith("reproduce config.reproduce.bases: 'some-org/some-"
                        "model' is not in the provenance table")
  assert "adamw:some-org/some-model" in msg and "\n" not in msg
  for base in provenance.BASES.values():  # the known ids are listed
    assert base.hub_id in msg
  # A local folder that names no known base.
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "config.json").write_text(
      json.dumps({"model_type": "llama", "_name_or_path": "me/my-model"}))
  with pytest.raises(ValueError, match=r"plain' names no base of the"
                     r" provenance table .* write NAME:PATH"):
    external_bases.parse(str(tmp_path / "plain"))
  # Two AdamW bases: one study compares one base per optimizer.
  with pytest.raises(ValueError, match=r"base name 'adamw' given twice"
                     r" \(meta-llama/Llama-3.1-8B and Qwen/Qwen2.5-7B\)"):
    external_bases.parse("meta-llama/Llama-3.1-8B,Qwen/Qwen2.5-7B")
  with pytest.raises(ValueError, match=r"entry 'adamw' is not NAME:PATH"):
    external_bases.parse("adamw")
  with pytest.raises(ValueError, match=r"entry ':x' is not NAME:PATH"):
    external_bases.parse(":x")


def test_a_local_folder_is_known_by_its_config_or_cache_location(tmp_path):
  named = tmp_path / "olmo"
  named.mkdir()
  (named / "config.json").write_text(json.dumps(
      {"model_type": "olmo2", "_name_or_path": "allenai/OLMo-2-1124-7B"}))
  cached = (tmp_path / "hub" / "models--Moonshotai--Moonlight-16B-A3B"
            / "snapshots" / "0123abc")
  cached.mkdir(parents=True)
  (olmo,) = external_bases.parse(str(named))
  assert (olmo.name, olmo.path, olmo.hub_id) == (
      "adamw", str(named), "allenai/OLMo-2-1124-7B")
  (moon,) = external_bases.parse([str(cached)])
  assert (moon.name, moon.hub_id) == ("muon", "moonshotai/Moonlight-16B-A3B")
  assert external_bases.identify(str(named)).preset == "olmo2_7b"


def test_study_plans_a_hub_base_with_its_label_and_tokenizer():
  rc = study.ReproConfig.from_dict(dict(
      model={}, finetune=dict(methods=("adamw", "muon"),
                              lrs=dict(adamw=(1e-5,), muon=(1e-5,))),
      reproduce=dict(bases="Qwen/Qwen2.5-7B")))
  (base,) = study.plan_bases(rc, "/w")
  assert (base.name, base.kind, base.tokenizer_path) == (
      "adamw", "hf", "Qwen/Qwen2.5-7B")
  _, runs = study.plan_runs(rc, "/w", "/w/train.json")
  assert sorted(r.labels["method"] for r in runs) == ["adamw", "muon"]
  assert {r.labels["base"] for r in runs} == {"adamw"}


def test_tokenizer_of_a_folder(tmp_path):
  # tokenizer.json (Llama-3, Qwen, OLMo-2 folders) as well as tokenizer.model.
  folder = TOKENIZERS / "qwen2"
  assert external_bases.tokenizer_of(str(folder), "hf", "") == str(folder)
  sp = tmp_path / "sp"
  sp.mkdir()
  (sp / "tokenizer.model").write_bytes(b"")
  assert external_bases.tokenizer_of(str(sp), "hf", "") == str(
      sp / "tokenizer.model")
  assert external_bases.tokenizer_of(str(tmp_path), "hf", "dflt") == "dflt"
  tok = study.load_tokenizer(external_bases.tokenizer_of(str(folder), "hf", ""))
  expected = json.loads((folder / "expected.json").read_text())
  assert tok.vocab_size == expected["len"]
