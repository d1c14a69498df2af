"""The paper's optimizer setups as OptimConfig factories.

Defaults follow REFERENCE.md: cosine schedule with 10% warmup down to 1% of
peak, weight decay 0, grad-norm clip 1.0; full finetuning LR 1e-5 (AdamW),
Muon LR matched through `rms_match` scaling (0.2 * sqrt(max(m, n))) with
Nesterov 0.95 and 5 NS steps, AdamW on everything that is not a hidden
matrix; LoRA LR 1e-4 on the adapters only. Use `.to_dict()` to place one in an
ml_collections config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optconsist_jax.optim.config import GroupConfig
from optconsist_jax.optim.config import OptimConfig
from optconsist_jax.optim.schedules import ScheduleConfig


def _schedule(peak, total_steps, warmup_fraction, floor, kind):
  return ScheduleConfig(kind=kind, peak=peak, total_steps=total_steps,
                        warmup_fraction=warmup_fraction if total_steps else 0.0,
                        floor=floor)


def _adamw_group(peak, total_steps, warmup_fraction, floor, kind,
                 weight_decay, b1, b2, eps):
  return GroupConfig(
      optimizer="adamw", kwargs={"b1": b1, "b2": b2, "eps": eps},
      schedule=_schedule(peak, total_steps, warmup_fraction, floor, kind),
      weight_decay=weight_decay)


def adamw(*, peak_lr: float = 1e-5, total_steps: int = 1000,
          warmup_fraction: float = 0.1, floor: float = 0.01,
          schedule: str = "cosine", weight_decay: float = 0.0,
          b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8,
          clip_norm: float | None = 1.0) -> OptimConfig:
  """AdamW on every trainable parameter."""
  return OptimConfig(
      groups={"adamw": _adamw_group(peak_lr, total_steps, warmup_fraction,
                                    floor, schedule, weight_decay, b1, b2,
                                    eps)},
      routes=(("all", "adamw"),), clip_norm=clip_norm)


def muon(*, peak_lr: float = 1e-5, adam_peak_lr: float | None = None,
         total_steps: int = 1000, warmup_fraction: float = 0.1,
         floor: float = 0.01, schedule: str = "cosine",
         weight_decay: float = 0.0, scale: str = "rms_match",
         strategy: str = "stacked", ns_steps: int = 5,
         ns_dtype: str = "float32", beta: float = 0.95,
         muon_kwargs: dict[str, Any] | None = None, b1: float = 0.9,
         b2: float = 0.999, eps: float = 1e-8,
         clip_norm: float | None = 1.0) -> OptimConfig:
  """Muon on hidden matrices (q,k,v,o,gate,up,down), AdamW on the rest.

  With scale='rms_match' the Muon LR is on AdamW's scale, so by default both
  groups share `peak_lr`; `adam_peak_lr` overrides the AdamW group's.
  """
  kwargs = {"scale": scale, "strategy": strategy, "ns_steps": ns_steps,
            "ns_dtype": ns_dtype, "beta": beta, **(muon_kwargs or {})}
  return OptimConfig(
      groups={
          "muon": GroupConfig(
              optimizer="muon", kwargs=kwargs,
              schedule=_schedule(peak_lr, total_steps, warmup_fraction, floor,
                                 schedule),
              weight_decay=weight_decay),
          "adamw": _adamw_group(
              peak_lr if adam_peak_lr is None else adam_peak_lr, total_steps,
              warmup_fraction, floor, schedule, weight_decay, b1, b2, eps),
      },
      routes=(("hidden_matrix", "muon"), ("not_hidden_matrix", "adamw")),
      clip_norm=clip_norm)


def lora(*, peak_lr: float = 1e-4, **adamw_kwargs) -> OptimConfig:
  """AdamW on the LoRA adapters (lora_a / lora_b); nothing else may be given.

  Keyword arguments are `adamw`'s (schedule, weight decay, betas, clipping).
  """
  return dataclasses.replace(adamw(peak_lr=peak_lr, **adamw_kwargs),
                             routes=(("lora", "adamw"),))