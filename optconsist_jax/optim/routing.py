"""Routing of parameters to optimizer groups by path regex or named predicate.

A rule is (pattern, group). `pattern` is either a predicate name from
PREDICATES or a regular expression matched against the whole '/'-joined
parameter path (e.g. `layers/attn/(q|k)_proj/kernel`). Params under `layers/`
(DeepSeek-V3: `dense_layers/`, `moe_layers/`) carry one leading stack axis
(the scanned layers), so "matrix" means two axes after that stack; routed
experts' weights (`moe_layers/mlp/{gate,up,down}_proj`, [L, E, in, out]) are
hidden matrices stacked over layers and experts, which Muon orthogonalizes one
[in, out] matrix at a time (optim/muon.py: leading axes are a stack).

`hidden_matrix` (what the muon presets orthogonalize) is every matrix but:
  the embedding and the output head   (Jordan 2024, "Muon": "embedding and
                                       classifier head ... should be
                                       optimized by AdamW"; Liu et al. 2025,
                                       arXiv 2502.16982, the same split),
  norm scales and biases              (vectors; never matrices),
  MoE routers / gates (`router`, `gate` as a whole path key, not
  `gate_proj`)                         (a [d, experts] logit map, not a
                                       hidden linear map; Moonlight's
                                       DeepSeek-V3-style MoE keeps it on AdamW;
                                       docs/optimizers.md "Muon on MoE"),
  LoRA adapters `lora_a` / `lora_b`    (rank-r factors: orthogonalizing
                                       them is not Muon on the weight they
                                       update; the paper's LoRA arm is
                                       AdamW). Route `lora` to a Muon group
                                       explicitly to try it.
DeepSeek-V3 / Moonlight (model/deepseek_v3.py): MLA's low-rank projections
(q_a_proj, q_b_proj, kv_a_proj_with_mqa, kv_b_proj), the shared experts and
each routed expert's matrices are hidden matrices, as Moonlight's released
Muon (github.com/MoonshotAI/Moonlight, examples/toy_train.py: every weight
with ndim >= 2 but embed_tokens and lm_head, where transformers holds each
expert as its own 2-D Linear) routes them. Keeping the router on AdamW is
our choice: that rule would orthogonalize it. The experts' selection bias
(`router_bias`, e_score_correction_bias) is a RoutingBias, not an nnx.Param:
no optimizer sees it and finetuning keeps it fixed (DeepSeek-V3, arXiv
2412.19437 section 2.1.2, moves it by a load-balance rule, not gradients).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import re
from typing import Any

import jax

from optconsist_jax.sharding import path_name

MODES = ("strict", "first")


def _stack_axes(path: str) -> int:
  return 1 if re.match(r"(dense_|moe_)?layers/", path) else 0


def _is_matrix(path: str, shape: tuple[int, ...]) -> bool:
  return len(shape) - _stack_axes(path) >= 2


def _is_embedding(path: str, shape) -> bool:
  del shape
  return re.search(r"(^|/)embed(/|$)", path) is not None


def _is_lm_head(path: str, shape) -> bool:
  del shape
  return re.search(r"(^|/)lm_head(/|$)", path) is not None


def _is_norm(path: str, shape) -> bool:
  del shape
  return re.search(r"(^|/)[^/]*norm[^/]*/", path) is not None


def _is_lora(path: str, shape) -> bool:
  del shape
  return re.search(r"(^|/)lora_[ab]$", path) is not None


def _is_bias(path: str, shape) -> bool:
  del shape
  return re.search(r"(^|/)bias$", path) is not None


def _is_router(path: str, shape) -> bool:
  del shape
  return re.search(r"(^|/)(router|gate)(/|$)", path) is not None


def _is_hidden_matrix(path: str, shape) -> bool:
  return _is_matrix(path, shape) and not any(
      rule(path, shape) for rule in (_is_embedding, _is_lm_head, _is_norm,
                                     _is_bias, _is_router, _is_lora))


PREDICATES: dict[str, Callable[[str, tuple[int, ...]], bool]] = {
    "all": lambda path, shape: True,
    # The q, k, v, o, gate, up, down kernels (and any other 2-D weight that is
    # none of the embedding, the output head, a norm, a bias, an MoE router
    # and a LoRA adapter; module docstring).
    "hidden_matrix": _is_hidden_matrix,
    "not_hidden_matrix": lambda p, s: not _is_hidden_matrix(p, s),
    "embedding": _is_embedding,
    "lm_head": _is_lm_head,
    "norm": _is_norm,
    "lora": _is_lora,
    "bias": _is_bias,
    "router": _is_router,
}


def _matcher(pattern: str) -> Callable[[str, tuple[int, ...]], bool]:
  if pattern in PREDICATES:
    return PREDICATES[pattern]
  try:
    regex = re.compile(pattern)
  except re.error as e:
    raise ValueError(f"optim routes: pattern {pattern!r} is neither a "
                     f"predicate {sorted(PREDICATES)} nor a regex: {e}") from e
  return lambda path, shape: regex.fullmatch(path) is not None


def assign(abstract_params: Any, routes: Sequence[tuple[str, str]],
           mode: str = "strict") -> dict[str, str]:
  """Returns {param path: group name}.

  Args:
    abstract_params: pytree (nnx.State) of arrays or ShapeDtypeStructs.
    routes: ordered (pattern, group) rules.
    mode: 'strict' (exactly one rule must match each param) or 'first' (the
      first matching rule wins; at least one must match).

  Raises:
    ValueError naming the parameter that no rule, or (strict) several rules,
    match.
  """
  if mode not in MODES:
    raise ValueError(f"optim route_mode={mode!r}; expected one of {MODES}")
  matchers = [(pattern, group, _matcher(pattern)) for pattern, group in routes]
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]:
    name = path_name(path)
    shape = tuple(leaf.shape)
    hits = [(p, g) for p, g, match in matchers if match(name, shape)]
    if not hits:
      raise ValueError(
          f"optim routes: parameter {name!r} (shape {shape}) matches no rule "
          f"in {[p for p, _ in routes]}")
    if mode == "strict" and len(hits) > 1:
      raise ValueError(
          f"optim routes: parameter {name!r} (shape {shape}) matches "
          f"{len(hits)} rules {hits}; make them disjoint or use "
          "route_mode='first'")
    out[name] = hits[0][1]
  return out


def labels(assignment: dict[str, str], tree: Any) -> Any:
  """A tree shaped like `tree` holding each leaf's group name."""
  def label(path, _):
    name = path_name(path)
    if name not in assignment:
      raise ValueError(f"optim: parameter {name!r} was not in the abstract "
                       "params given to optim.build")
    return assignment[name]
  return jax.tree_util.tree_map_with_path(label, tree)
