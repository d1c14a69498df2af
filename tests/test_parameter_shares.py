"""Parameter shares per optimizer of the study's bases, against hand counts."""

import pytest

from optconsist_jax.experiments import parameter_shares
from optconsist_jax.model import LlamaConfig

import study_config

_config = study_config.config_dict


def hand_count(m):
  """(total, in the blocks' matrices) from the architecture's formulas."""
  d, i, v = m["hidden_size"], m["intermediate_size"], m["vocab_size"]
  kv = m["num_kv_heads"] * d // m["num_heads"]
  matrices = m["num_layers"] * (2 * d * d + 2 * d * kv + 3 * d * i)
  norms = (2 * m["num_layers"] + 1) * d
  return matrices + norms + 2 * v * d, matrices


@pytest.mark.parametrize("mode,at_least,below", [("causal", 0.40, 0.50),
                                                 ("quick", 0.70, 1.0),
                                                 ("standard", 0.70, 1.0)])
def test_shares_match_hand_counts(mode, at_least, below):
  model = _config(mode)["model"]
  table = parameter_shares.shares(model, ("adamw", "muon", "lion"))
  total, matrices = hand_count(model)
  assert total == LlamaConfig.from_dict(dict(model)).num_params()
  for row in table.values():
    assert row["parameters"] == total
    assert row["hidden_matrices"] == pytest.approx(matrices / total)
    assert sum(row["by_optimizer"].values()) == pytest.approx(1.0)
  assert at_least <= table["muon"]["hidden_matrices"] < below
  # The Muon base: Muon on exactly the hidden matrices, AdamW on the rest.
  assert table["muon"]["by_optimizer"]["muon"] == pytest.approx(
      matrices / total)
  assert table["muon"]["by_optimizer"]["adamw"] == pytest.approx(
      1 - matrices / total)
  assert table["adamw"]["by_optimizer"] == {"adamw": pytest.approx(1.0)}
  assert table["lion"]["by_optimizer"] == {"lion": pytest.approx(1.0)}
  text = parameter_shares.markdown(table)
  assert f"| muon | {total:,} |" in text
  assert "trained by muon" in text
