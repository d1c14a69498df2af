"""The provenance table of bases and their pretraining optimizers."""

import pytest

from optconsist_jax.io import hf_layout
from optconsist_jax.io import provenance
from optconsist_jax.model import preset
from optconsist_jax.optim import presets as optim_presets


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
