"""The paper's optimizer setups as OptimConfigs: one function, `preset`.

  preset("adamw")         AdamW on every trainable parameter
  preset("muon")          Muon on the hidden matrices (q, k, v, o, gate, up,
                          down), AdamW on the rest
  preset("muon_gspmd")    the same, Newton-Schulz sharded by GSPMD
  preset("muon_contrib")  optax.contrib.muon on the hidden matrices
  preset("lora")          AdamW on the LoRA adapters (lora_a / lora_b)
  preset("kron")          PSGD Kron (Li 2018, arXiv 1512.04202; `psgdax`,
                          the `kron` extra) on every trainable parameter,
                          its preconditioners updated every step
  preset(<any optimizer>) that optimizer on every trainable parameter: an
                          Optax name (`lion`, `signum`, `contrib.prodigy`) or
                          an import path (`my_pkg.my_opt:make`), see
                          optim/registry.py

Defaults are the paper's setup (arXiv 2605.06654, following Biderman et al.
2024, "LoRA Learns Less and Forgets Less", arXiv 2405.09673): a cosine
schedule with 10% warmup down to 1% of the peak, weight decay 0, gradient
norm clipped to 1.0; peak LR 1e-5 for full finetuning and 1e-4 for LoRA.
Muon uses Nesterov momentum 0.95 and 5 Newton-Schulz steps with the
`rms_match` scale 0.2 * sqrt(max(m, n)) (Liu et al. 2025, "Muon is Scalable
for LLM Training", arXiv 2502.16982), which puts its update RMS on AdamW's,
so both groups share the peak LR.

`total_steps=0` (the default) means "the run's length": train.py fills it in
(`ExperimentConfig.resolve_total_steps`), the warmup fraction is kept. Use
`.to_dict()` to place a preset in an ml_collections config.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from optconsist_jax.optim import registry
from optconsist_jax.optim.config import GroupConfig
from optconsist_jax.optim.config import OptimConfig
from optconsist_jax.optim.schedules import ScheduleConfig

ADAMW_KWARGS = {"b1": 0.9, "b2": 0.999, "eps": 1e-8}
MUON_KWARGS = {"scale": "rms_match", "strategy": "stacked", "ns_steps": 5,
               "ns_dtype": "float32", "beta": 0.95}


@dataclasses.dataclass(frozen=True)
class _Family:
  optimizer: str            # the main group's registry name
  routes: str               # "all", "lora" or "hidden_matrix" (+ AdamW)
  kwargs: dict[str, Any]    # the main group's default kwargs
  peak_lr: float


_FAMILIES = {
    "adamw": _Family("adamw", "all", ADAMW_KWARGS, 1e-5),
    "lora": _Family("adamw", "lora", ADAMW_KWARGS, 1e-4),
    "muon": _Family("muon", "hidden_matrix", MUON_KWARGS, 1e-5),
    "muon_gspmd": _Family("muon", "hidden_matrix",
                          {**MUON_KWARGS, "strategy": "gspmd"}, 1e-5),
    "muon_contrib": _Family("contrib.muon", "hidden_matrix", {}, 1e-5),
    # psgdax's default update probability anneals from 1 after 500 steps
    # and draws a coin per step; a vmapped population computes both branches
    # of that coin anyway, so every step updates (deterministic, and what a
    # short run does by default).
    "kron": _Family("psgdax:kron", "all",
                    {"preconditioner_update_probability": 1.0}, 1e-5),
}


def names() -> list[str]:
  """The named presets (any optimizer name is a preset too)."""
  return sorted(_FAMILIES)


def preset(name: str = "adamw", *, peak_lr: float | None = None,
           total_steps: int = 0, warmup_fraction: float = 0.1,
           floor: float = 0.01, schedule: str = "cosine",
           weight_decay: float = 0.0, kwargs: dict[str, Any] | None = None,
           adam_peak_lr: float | None = None,
           adam_kwargs: dict[str, Any] | None = None,
           clip_norm: float | None = 1.0) -> OptimConfig:
  """The optimizer config of a named preset or of any optimizer.

  Args:
    name: a preset (`names()`) or an optimizer name (optim/registry.py),
      which then runs on every trainable parameter.
    peak_lr: the peak learning rate (default: the preset's; 1e-5 otherwise).
    total_steps: schedule length; 0 = the run's length, filled by train.py.
    warmup_fraction: linear warmup as a fraction of total_steps.
    floor: final learning rate as a fraction of the peak.
    schedule: constant, linear or cosine.
    weight_decay: decoupled weight decay of every group.
    kwargs: the main optimizer's keyword arguments (over the preset's).
    adam_peak_lr: the AdamW group's peak LR beside a matrix optimizer (muon
      presets; default: peak_lr).
    adam_kwargs: keyword arguments of the AdamW group (over b1=0.9,
      b2=0.999, eps=1e-8): the only group of adamw and lora, the non-matrix
      group of the muon presets; unused by other optimizers.
    clip_norm: global gradient-norm clipping (None: off).

  Returns:
    An OptimConfig.
  """
  family = _FAMILIES.get(name)
  if family is None:
    registry.get(name)  # an unknown name fails here, naming the valid ones
    family = _Family(name, "all", {}, 1e-5)
  peak = family.peak_lr if peak_lr is None else peak_lr

  def group(optimizer, lr, group_kwargs):
    return GroupConfig(
        optimizer=optimizer, kwargs=group_kwargs,
        schedule=ScheduleConfig(kind=schedule, peak=lr,
                                total_steps=total_steps,
                                warmup_fraction=warmup_fraction, floor=floor),
        weight_decay=weight_decay)

  adam = {**ADAMW_KWARGS, **(adam_kwargs or {})}
  main_kwargs = {**(adam if family.optimizer == "adamw" else family.kwargs),
                 **(kwargs or {})}
  if family.routes == "hidden_matrix":
    return OptimConfig(
        groups={
            "muon": group(family.optimizer, peak, main_kwargs),
            "adamw": group("adamw", peak if adam_peak_lr is None
                           else adam_peak_lr, adam)},
        routes=(("hidden_matrix", "muon"), ("not_hidden_matrix", "adamw")),
        clip_norm=clip_norm)
  group_name = "adamw" if family.optimizer == "adamw" else "main"
  return OptimConfig(groups={group_name: group(family.optimizer, peak,
                                               main_kwargs)},
                     routes=((family.routes, group_name),),
                     clip_norm=clip_norm)
