"""Known bases and the optimizer they were pretrained with, with its source.

The study compares finetuning with the base's own pretraining optimizer
against a switched one, so it needs that optimizer on record. `BASES` holds
the Hub bases whose providers published it; `pretraining_optimizer(ref)` is
the label `reproduce.bases` gives a base (`adamw`, `muon`: the optimizer
preset names of optim/presets.py), and `lookup(ref)` the whole record.

`evidence` says how directly the source states it: "stated" (the paper says
this model, or the series' recipe it names for every size, was pretrained with
that optimizer) or "series" (the model's own report does not restate it; an
earlier report of the same series does, and the label rests on the series
keeping it). The authors' own GPT-2-small bases (nanoGPT checkpoints) carry
their optimizer in their run, not here.
"""

from __future__ import annotations

import dataclasses

from optconsist_jax import paths


@dataclasses.dataclass(frozen=True)
class Base:
  """A pretrained base with a published pretraining optimizer.

  Attributes:
    hub_id: the Hugging Face repo (`org/name`).
    model_type: its config.json model_type (io/hf_layout.py,
      io/hf_deepseek.py), or the architecture it has when this project
      cannot load it.
    preset: the model/config.py preset with its shapes ("" when none).
    optimizer: the pretraining optimizer, as an optim/presets.py name.
    evidence: "stated" or "series" (module docstring).
    source: citation, with the section that states the optimizer.
  """

  hub_id: str
  model_type: str
  preset: str
  optimizer: str
  evidence: str
  source: str


_LLAMA2 = ("Touvron et al. 2023, Llama 2, arXiv 2307.09288, sec. 2.2: AdamW,"
           " beta1 0.9, beta2 0.95, eps 1e-5, weight decay 0.1")
_LLAMA3 = ("Llama Team 2024, The Llama 3 Herd of Models, arXiv 2407.21783,"
           " sec. 3.4.1: AdamW (the pretraining recipe, stated with the 405B"
           " model's schedule)")
_OLMO2 = ("OLMo et al. 2024, 2 OLMo 2 Furious, arXiv 2501.00656, sec. 3 and"
          " its pretraining hyperparameter table: AdamW, beta (0.9, 0.95),"
          " eps 1e-8, weight decay 0.1")
_QWEN = ("Bai et al. 2023, Qwen Technical Report, arXiv 2309.16609, sec. 2.3:"
         " AdamW, beta1 0.9, beta2 0.95, eps 1e-8; not restated in the"
         " Qwen2.5 (arXiv 2412.15115) or Qwen3 (arXiv 2505.09388) reports")
_MOONLIGHT = ("Liu et al. 2025, Muon is Scalable for LLM Training, arXiv"
              " 2502.16982 (abstract and model card): Moonlight-16B-A3B"
              " pretrained with Muon (with weight decay and per-shape update"
              " scaling) on 5.7T tokens")

BASES: dict[str, Base] = {b.hub_id.lower(): b for b in (
    Base("meta-llama/Llama-2-7b-hf", "llama", "llama2_7b", "adamw", "stated",
         _LLAMA2),
    Base("meta-llama/Llama-2-13b-hf", "llama", "llama2_13b", "adamw",
         "stated", _LLAMA2),
    Base("meta-llama/Llama-2-70b-hf", "llama", "llama2_70b", "adamw",
         "stated", _LLAMA2),
    Base("meta-llama/Llama-3.1-8B", "llama", "llama3_1_8b", "adamw", "stated",
         _LLAMA3),
    Base("allenai/OLMo-2-1124-7B", "olmo2", "olmo2_7b", "adamw", "stated",
         _OLMO2),
    Base("Qwen/Qwen2.5-7B", "qwen2", "qwen2_5_7b", "adamw", "series", _QWEN),
    Base("Qwen/Qwen3-8B-Base", "qwen3", "qwen3_8b", "adamw", "series", _QWEN),
    # A mixture of experts (DeepSeek-V3 layout: io/hf_deepseek.py; its shapes
    # are a model/deepseek_v3_config.py preset, not a model/config.py one);
    # its tokenizer is tiktoken.model (data/tiktoken_bpe.py).
    Base("moonshotai/Moonlight-16B-A3B", "deepseek_v3", "", "muon", "stated",
         _MOONLIGHT),
)}


def lookup(ref: str) -> Base:
  """The record of a Hub reference (`org/name[@revision]`, `hf://...`).

  Raises:
    KeyError: not a known base; the message lists the known ones.
  """
  parsed = paths.parse_ref(ref)
  key = (parsed.repo_id if parsed is not None else ref).lower()
  try:
    return BASES[key]
  except KeyError:
    known = sorted(b.hub_id for b in BASES.values())
    raise KeyError(f"{ref!r} is not in the provenance table of bases with a"
                   f" published pretraining optimizer; known: {known}."
                   " Label it yourself (NAME:PATH).") from None


def pretraining_optimizer(ref: str) -> str:
  """The optimizer `ref` was pretrained with (an optim/presets.py name)."""
  return lookup(ref).optimizer


def by_preset(preset: str) -> Base:
  """The record whose shapes are the model/config.py preset `preset`.

  Raises:
    KeyError: no known base has that preset; the message lists those that do.
  """
  for base in BASES.values():
    if base.preset and base.preset == preset:
      return base
  known = sorted(b.preset for b in BASES.values() if b.preset)
  raise KeyError(f"model preset {preset!r} is no base of the provenance"
                 f" table; presets of known bases: {known}")
