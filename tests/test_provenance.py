"""The provenance table of bases and their pretraining optimizers."""

import json
import os
import shutil

import pytest

from optconsist_jax.data import hf_tokenizer
from optconsist_jax.experiments import external_bases
from optconsist_jax.io import hf_layout
from optconsist_jax.io import provenance
from optconsist_jax.model import preset
from optconsist_jax.optim import presets as optim_presets

TIKTOKEN_FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures",
                                "tiktoken", "moonlight")


def test_every_base_is_consistent():
  for key, base in provenance.BASES.items():
    assert key == base.hub_id.lower()
    assert base.evidence in ("stated", "series")
    assert "arXiv" in base.source
    # The label is an optimizer preset the study can run.
    assert base.optimizer in optim_presets.names(), base
    if base.preset:  # loadable here: the preset is of the base's model_type
      assert hf_layout.model_type(preset(base.preset)) == base.model_type


def test_lookup_accepts_hub_references():
  assert provenance.pretraining_optimizer("meta-llama/Llama-2-7b-hf") == "adamw"
  assert provenance.lookup("hf://Qwen/Qwen3-8B-Base@main").preset == "qwen3_8b"
  assert provenance.lookup("allenai/olmo-2-1124-7b@a1b2c3").model_type == (
      "olmo2")
  assert provenance.pretraining_optimizer(
      "moonshotai/Moonlight-16B-A3B") == "muon"


def test_unknown_base_lists_the_known_ones():
  with pytest.raises(KeyError, match="meta-llama/Llama-3.1-8B") as e:
    provenance.lookup("some-org/some-model")
  assert "NAME:PATH" in str(e.value)


def test_by_preset_finds_the_record_of_a_model_preset():
  for base in provenance.BASES.values():
    if base.preset:
      assert provenance.by_preset(base.preset) is base
  with pytest.raises(KeyError, match=r"'tiny_mha' is no base.*'olmo2_7b'"):
    provenance.by_preset("tiny_mha")
  with pytest.raises(KeyError):
    provenance.by_preset("")  # Moonlight has no preset; "" names none


def test_a_local_moonlight_folder_is_labelled_muon(tmp_path):
  """A Hugging Face folder of Moonlight (config.json naming the repo, its
  tiktoken.model tokenizer) is the Muon base, with its own tokenizer."""
  folder = tmp_path / "Moonlight-16B-A3B"
  shutil.copytree(TIKTOKEN_FIXTURE, folder)
  (folder / "config.json").write_text(json.dumps({
      "model_type": "deepseek_v3",
      "architectures": ["DeepseekV3ForCausalLM"],
      "_name_or_path": "moonshotai/Moonlight-16B-A3B"}))
  record = external_bases.identify(str(folder))
  assert record is provenance.lookup("moonshotai/Moonlight-16B-A3B")
  assert (record.optimizer, record.model_type) == ("muon", "deepseek_v3")
  assert "arXiv 2502.16982" in record.source
  (base,) = external_bases.parse([str(folder)])
  assert (base.name, base.hub_id) == ("muon", "moonshotai/Moonlight-16B-A3B")
  tok_path = external_bases.tokenizer_of(str(folder), "hf", "")
  assert tok_path == str(folder)
  tok = hf_tokenizer.HFTokenizer.load(tok_path)
  assert tok.id_to_piece(tok.bos_id) == "[BOS]"
  # Another deepseek_v3 folder names no base: no label is guessed.
  (folder / "config.json").write_text(json.dumps(
      {"model_type": "deepseek_v3", "_name_or_path": "some-org/other-moe"}))
  assert external_bases.identify(str(folder)) is None
