"""Each base family end to end: finetune, evaluate, report from a local "Hub".

tests/fixtures/hub/{llama3,qwen2,qwen3,olmo2} are tiny random checkpoints
with their tokenizer.json, written by transformers
(tests/make_hub_fixtures.py). The study's mini mode takes all four as
external bases (`reproduce.bases=NAME:PATH,...`, folders no Hub id names),
finetunes each, evaluates every checkpoint and base, and writes the report.
"""

import json
import pathlib

import numpy as np
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.experiments import study

import study_config

REPO = pathlib.Path(__file__).resolve().parent.parent
HUB = REPO / "tests" / "fixtures" / "hub"

# What makes each family itself (model/config.py switches from config.json).
FAMILIES = {
    "llama3": {"rope_type": "llama3", "qkv_bias": False, "qk_norm": "none",
               "norm_placement": "pre"},
    "qwen2": {"rope_type": "default", "qkv_bias": True, "qk_norm": "none",
              "norm_placement": "pre", "tie_embeddings": True},
    "qwen3": {"qkv_bias": False, "qk_norm": "head", "norm_placement": "pre"},
    "olmo2": {"qkv_bias": False, "qk_norm": "full", "norm_placement": "post"},
}


# One study over all four (one population and one eval compile per family,
# not per family and method): each folder is a base labelled by the NAME
# before it, and every base is finetuned with AdamW, so the report has the
# matched row (the base labelled adamw) and three switched ones.
LABELS = {"llama3": "adamw", "qwen2": "muon", "qwen3": "lion",
          "olmo2": "adafactor"}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
  return study_config.run_mini_study(
      tmp_path_factory.mktemp("families"),
      ",".join(f"{LABELS[f]}:{HUB / f}" for f in FAMILIES), ("adamw",),
      probes=False)


@pytest.mark.slow
@pytest.mark.xdist_group("families_e2e")
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_is_loaded_as_itself(family, study_run):
  from optconsist_jax.io import hf  # pylint: disable=g-import-not-at-top
  _, _, bases, runs = study_run
  folder = HUB / family
  (base,) = [b for b in bases if b.workdir == str(folder)]
  # The folder's tokenizer.json (600 pieces), not the shipped SentencePiece
  # one (2,048).
  assert (base.name, base.kind, base.tokenizer_path) == (
      LABELS[family], "hf", str(folder))
  assert study.load_tokenizer(base.tokenizer_path).vocab_size == 600
  # The finetuning run took the folder's architecture: this family's.
  (run,) = [r for r in runs if r.base is base]
  model = json.loads((pathlib.Path(run.workdir) / "config.json"
                      ).read_text())["model"]
  for key, value in FAMILIES[family].items():
    assert model[key] == value, key
  assert model["vocab_size"] == 640
  # What the study loaded from that folder is transformers' model: logits
  # on a prompt (ids from transformers' tokenizer) match transformers'.
  _, loaded = hf.load(str(folder))
  prompt = json.loads((folder / "expected" / "prompt.json").read_text())
  logits = np.asarray(loaded(np.asarray([prompt["ids"]], np.int32)))
  np.testing.assert_allclose(
      logits, np.load(folder / "expected" / "logits.npy"), atol=1e-4, rtol=0)
  # Its base point and finetuned checkpoint were evaluated.
  records = results.read_workdir(run.workdir)
  assert sorted(r.is_base for r in records if r.base == LABELS[family]) == [
      False, True]


@pytest.mark.slow
@pytest.mark.xdist_group("families_e2e")
def test_the_report_has_a_row_per_base(study_run):
  w, outputs, _, _ = study_run
  summary = json.loads(pathlib.Path(outputs["summary_json"]).read_text())
  rows = {(s["base"], s["method"]): s["role"] for s in summary}
  assert rows == {(label, "adamw"): ("matched" if label == "adamw" else
                                     "mismatched")
                  for label in LABELS.values()}
  for label in LABELS.values():
    assert pathlib.Path(outputs[f"{label}_base_png"]).stat().st_size > 0
  info = json.loads((w / "run_info.json").read_text())
  assert info["base_labels"] == {label: "given as NAME:PATH"
                                 for label in LABELS.values()}
