"""Which optimizer trained how much of each base: parameter shares.

A "Muon base" is Muon on the hidden matrices and AdamW on the embeddings,
head and norms (optim/presets.py, as Moonlight: Liu et al. 2025, "Muon is
Scalable for LLM Training", sec. 2); on a model that is mostly embedding
and head it is mostly AdamW-trained. `shares` routes the study model's
parameters the way each pretraining optimizer's preset does
(`optim.builder.assign_groups`) and counts them; `markdown` is the report's
table of them (W/report/parameter_shares.md).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import math
from typing import Any

from flax import nnx
import jax

from optconsist_jax.model import architecture
from optconsist_jax.optim import builder
from optconsist_jax.optim import presets
from optconsist_jax.optim import routing
from optconsist_jax import sharding


def _abstract_params(model: Mapping[str, Any]) -> nnx.State:
  """The nnx.Params (shapes only) of a model config dict of either family."""
  config = architecture.config_from_dict(dict(model))
  return nnx.state(architecture.abstract_model(config), nnx.Param)


def _counts(params: nnx.State, assignment: Mapping[str, str]
            ) -> dict[str, int]:
  out: dict[str, int] = {}
  flat = dict(_flat_sizes(params))
  for name, group in assignment.items():
    out[group] = out.get(group, 0) + flat[name]
  return out


def _flat_sizes(params: nnx.State):
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    yield sharding.path_name(path), math.prod(leaf.shape)


def shares(model: Mapping[str, Any], optimizers: Sequence[str],
           optim_kwargs: Mapping[str, Mapping[str, Any]] | None = None
           ) -> dict[str, dict[str, Any]]:
  """Per pretraining optimizer: parameters, the share each optimizer trains.

  Returns {optimizer: {"parameters": n, "by_optimizer": {name: share},
  "hidden_matrices": share of the blocks' matrices}} for the model
  `model` (a model config dict).
  """
  params = _abstract_params(model)
  total = sum(n for _, n in _flat_sizes(params))
  hidden = _counts(params, routing.assign(
      params, [("hidden_matrix", "hidden"), ("not_hidden_matrix", "rest")]))
  out = {}
  for name in optimizers:
    kwargs = (optim_kwargs or {}).get(name)
    optim = presets.preset(name, kwargs=dict(kwargs) if kwargs else None)
    by_group = _counts(params, builder.assign_groups(optim.to_dict(), params))
    by_optimizer: dict[str, float] = {}
    for group, n in by_group.items():
      opt = optim.groups[group].optimizer
      by_optimizer[opt] = by_optimizer.get(opt, 0.0) + n / total
    out[name] = {"parameters": total, "by_optimizer": by_optimizer,
                 "hidden_matrices": hidden.get("hidden", 0) / total}
  return out


def markdown(table: Mapping[str, Mapping[str, Any]]) -> str:
  """One row per base: parameters and the share each optimizer trained."""
  names = sorted({o for row in table.values() for o in row["by_optimizer"]})
  lines = ["Parameter shares of each base: the fraction of its parameters"
           " each optimizer trained in pretraining (optim/presets.py"
           " routing), and the fraction in the blocks' matrices (q, k, v, o,"
           " gate, up, down; Llama-2-7B: ~96%).", "",
           "| base | parameters | " + " | ".join(f"trained by {n}"
                                                 for n in names)
           + " | in hidden matrices |",
           "|---" * (len(names) + 3) + "|"]
  for base, row in table.items():
    cells = [f"{row['by_optimizer'].get(n, 0.0):.1%}" for n in names]
    lines.append(f"| {base} | {row['parameters']:,} | " + " | ".join(cells)
                 + f" | {row['hidden_matrices']:.1%} |")
  return "\n".join(lines) + "\n"
