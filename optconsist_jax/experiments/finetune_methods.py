"""Finetuning method names of the study: an optimizer, or one with a base state.

  adamw, muon, lion, lora, ...   the optimizer preset (optim/presets.py),
                                 optimizer state fresh
  FAMILY+carried                 FAMILY with the base run's optimizer state
                                 carried over (init_from.optimizer_state
                                 "carried": Adam's moments and count, Muon's
                                 momentum); only on a base pretrained with
                                 FAMILY (the state must exist and fit)
  adamw+frozen_nu                AdamW preconditioned by the AdamW base's
                                 frozen second moment ("frozen_second_moment",
                                 optim/frozen_second_moment.py); only on an
                                 AdamW base

The variants are a causal check of the paper's story (arXiv 2605.06654): if
matched finetuning forgets less because the base sits where its optimizer's
own state (moments, preconditioner) fits it, carrying that state over, or
freezing Adam's preconditioner at the base's, should forget less still than a
fresh matched optimizer at equal learning. A variant runs only on the bases
its family pretrained (`applies`); the report compares it with the fresh
matched method of its base (report/consistency.py role_of).
"""

from __future__ import annotations

from typing import Any

# Method suffix -> init_from.optimizer_state.
VARIANTS = {"carried": "carried", "frozen_nu": "frozen_second_moment"}
FROZEN_OPTIMIZER = "adamw_frozen_nu"


def parse(method: str) -> tuple[str, str]:
  """(family, variant) of a method name; variant "" for a plain one.

  Raises:
    ValueError: an unknown variant, or frozen_nu on a family other than
      adamw; the message names `reproduce config.finetune.methods`.
  """
  family, sep, variant = method.partition("+")
  where = f"reproduce config.finetune.methods: {method!r}"
  if not sep:
    return method, ""
  if variant not in VARIANTS:
    raise ValueError(f"{where}: unknown variant {variant!r}; expected"
                     f" FAMILY+one of {sorted(VARIANTS)}")
  if family == "lora":
    raise ValueError(f"{where}: LoRA adapters have no base optimizer state")
  if variant == "frozen_nu" and family != "adamw":
    raise ValueError(f"{where}: frozen_nu is AdamW's (its second moment);"
                     " use adamw+frozen_nu")
  return family, variant


def optimizer_state(method: str) -> str:
  """The run's init_from.optimizer_state."""
  _, variant = parse(method)
  return VARIANTS[variant] if variant else "fresh"


def applies(method: str, base_name: str) -> bool:
  """Whether the plan runs `method` on a base pretrained with `base_name`."""
  family, variant = parse(method)
  return not variant or family == base_name


def optim_dict(method: str, preset_dict: dict[str, Any]) -> dict[str, Any]:
  """The family preset's optim section, adjusted for the variant."""
  _, variant = parse(method)
  if variant != "frozen_nu":
    return preset_dict
  groups = {name: dict(g, optimizer=FROZEN_OPTIMIZER)
            if g["optimizer"] == "adamw" else g
            for name, g in preset_dict["groups"].items()}
  return dict(preset_dict, groups=groups)
