"""PSGD Kron's matmul flops per optimizer step, for the planner's roofline.

tools/plan/step_time.py adds an optimizer update's matmuls to the step
time; this counts PSGD Kron's (psgdax 0.1.1, `psgdax/psgd.py`; Li 2018,
arXiv 1512.04202) from its source. Each
parameter of numel N gets one factor per dim of size d: a dense d x d
("triangular") one unless d <= 1, d > max_size_triangular (8192), d^2 >
max_skew_triangular (1) x N, ndim < min_ndim_triangular (2) or
memory_save_mode makes it diagonal (`_init_Q_exprs`; without
`scanned_layers` a scanned [layers, m, n] stack is one 3-D tensor, its
layers dim a factor too). Per step, with T the triangular dims:

  precondition  P G = Q^H Q G (`_precond_grad`, one einsum): jnp.einsum's
                path (opt_einsum) forms Q^H Q and applies it, 2 d^3 + 2 d N
                per d in T (applying Q and Q^H in turn, 4 d N, when
                cheaper); diagonal factors are elementwise. Runs every step
                on the momentum at `precond_grads_precision` (default None:
                DEFAULT, one bf16 pass on TPU).
  update        (`update_preconditioner`, default mode Q0.5EQ1.5) with the
                probability `preconditioner_update_probability` (a number;
                psgdax's default schedule is 1 for its first 500 steps,
                counted as 1): the same preconditioning of the damped
                gradient, then per d in T the Gram term1 = Pg Pg^H over the
                other dims (2 d N), term1 @ Q (2 d^3), the Procrustes step's
                R Q and R (R Q) (4 d^3), and two spectral-norm bounds (4
                [32, d] x [d, d] products each, 512 d^2); at
                `precond_update_precision` (default "tensorfloat32": HIGH,
                3 bf16 passes on TPU; `jax.lax.Precision`). QUAD mode: term1
                @ Q and P @ term1 (4 d^3) and one norm bound (256 d^2).

Not counted: elementwise work (diagonal factors, damping noise, clipping),
the 1%-probability balancing, EQ mode (triangular solves; noted, not
counted), the lazy init's scale. Float32 operands take the passes of their
precision; both bf16 (precond_dtype and params) take one. Kron's factors
are sharded by `optconsist_jax.sharding.state_shardings` (a d x d factor's
largest dim over the FSDP axes) and GSPMD partitions the einsums: the
count is the total over the mesh's chips divided by the chips, a lower
bound of the busiest chip (as for Muon's `gspmd` strategy).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from typing import Any

# bf16 passes per float32 matmul on TPU (`jax.lax.Precision`).
_PRECISION_PASSES = {"DEFAULT": 1, "HIGH": 3, "HIGHEST": 6}
# PSGD Kron as an import path (optim/registry.py).
KRON_OPTIMIZERS = ("psgdax:kron", "psgdax.psgd:kron")


@dataclasses.dataclass(frozen=True)
class KronFlops:
  """Matmul flops of PSGD Kron on one parameter (module docstring).

  Attributes:
    precondition: Q^H Q applied to the momentum, every step.
    update: one preconditioner update (the preconditioning of the damped
      gradient included).
    triangular: the dims with a dense d x d factor.
  """

  precondition: float
  update: float
  triangular: tuple[int, ...]


def kron_triangular(shape: tuple[int, ...], *, max_size_triangular: int = 8192,
                    max_skew_triangular: float = 1.0,
                    min_ndim_triangular: int = 2,
                    memory_save_mode: str | None = None) -> list[bool]:
  """Which dims of a parameter psgdax gives a dense (triangular) factor.

  psgdax `_init_Q_exprs`: diagonal when d <= 1, d > max_size_triangular,
  d^2 > max_skew_triangular x numel, ndim < min_ndim_triangular, or
  memory_save_mode ("one_diag": the largest dim, the last of equal ones as
  psgdax's reversed argsort picks it; "all_diag": every dim) says so.
  """
  numel = math.prod(shape)
  diag = [False] * len(shape)
  if memory_save_mode == "all_diag":
    diag = [True] * len(shape)
  elif memory_save_mode == "one_diag":
    # np.argsort(shape)[::-1][0]: the last index among the largest dims.
    diag[max(range(len(shape)), key=lambda i: (shape[i], i))] = True
  elif memory_save_mode is not None:
    raise ValueError(f"memory_save_mode={memory_save_mode!r}")
  return [not (d <= 1 or d > max_size_triangular
               or d * d > max_skew_triangular * numel
               or len(shape) < min_ndim_triangular or diag[i])
          for i, d in enumerate(shape)]


def kron_flops(shape: tuple[int, ...], *, mode: str = "Q0.5EQ1.5",
               **triangular_kwargs) -> KronFlops:
  """PSGD Kron's matmul flops for one parameter of `shape` (module docstring).

  Args:
    shape: the parameter's shape (a scanned stack whole, as psgdax sees it
      without `scanned_layers`).
    mode: psgdax's preconditioner_mode: "Q0.5EQ1.5" (default) or "QUAD".
    **triangular_kwargs: `kron_triangular`'s (psgdax's kwargs of those names).
  """
  if mode not in ("Q0.5EQ1.5", "Q0p5EQ1p5", "QUAD"):
    raise ValueError(f"preconditioner_mode={mode!r}: only Q0.5EQ1.5 and QUAD"
                     " are counted")
  numel = math.prod(shape)
  dims = tuple(d for d, tri in zip(shape, kron_triangular(
      shape, **triangular_kwargs)) if tri)
  # Q^H Q G: opt_einsum's cheaper order per dim (forming Q^H Q first wins
  # when d^2 < N, which max_skew_triangular = 1 guarantees).
  apply = sum(min(4 * d * numel, 2 * d**3 + 2 * d * numel) for d in dims)
  # A spectral-norm bound: 2 iterations of 2 [32, d] @ [d, d], 256 d^2.
  bound = 2 * 2 * 2 * 32
  if mode == "QUAD":
    per_dim = [2 * d * numel + 4 * d**3 + bound * d * d for d in dims]
  else:
    per_dim = [2 * d * numel + 6 * d**3 + 2 * bound * d * d for d in dims]
  return KronFlops(precondition=float(apply),
                   update=float(apply + sum(per_dim)), triangular=dims)


def pass_flops(kw: dict[str, Any], leaves: dict[str, Any],
                     chips: int) -> tuple[float, str]:
  """(bf16-pass flops per chip, note) of a psgdax kron group (module docstring)."""
  # deferred: jax and the optimizers, which the plan CLI configures first.
  import jax  # pylint: disable=g-import-not-at-top
  from optconsist_jax.optim import registry  # pylint: disable=g-import-not-at-top
  # The group's kwargs over psgdax's own defaults (whichever version).
  fn = registry.import_callable(KRON_OPTIMIZERS[0])
  params = inspect.signature(fn).parameters
  kw = {name: p.default for name, p in params.items()
        if p.default is not inspect.Parameter.empty} | dict(kw)
  mode = getattr(kw["preconditioner_mode"], "value", kw["preconditioner_mode"])
  if mode == "EQ":
    return 0.0, "EQ mode: matmuls not counted"
  prob = kw["preconditioner_update_probability"]
  # psgdax's default schedule holds 1 for its first 500 steps.
  prob = float(prob) if isinstance(prob, (int, float)) else 1.0

  def passes(precision, operand_dtype):
    if operand_dtype == "bfloat16":
      return 1
    return _PRECISION_PASSES[jax.lax.Precision(precision).name]
  tri = {k: kw[k] for k in ("max_size_triangular", "max_skew_triangular",
                            "min_ndim_triangular", "memory_save_mode")}
  total, dense = 0.0, 0
  for x in leaves.values():
    f = kron_flops(tuple(x.shape), mode=mode, **tri)
    bf16 = jax.numpy.bfloat16
    operand = ("bfloat16" if kw["precond_dtype"] is not None
               and jax.numpy.dtype(kw["precond_dtype"]) == bf16
               and x.dtype == bf16 else "float32")
    total += (f.precondition * passes(kw["precond_grads_precision"], operand)
              + prob * f.update
              * passes(kw["precond_update_precision"], operand))
    dense += len(f.triangular)
  return total / chips, (
      f"PSGD Kron {mode}, {dense} dense factors, update probability {prob:g},"
      f" update at {kw['precond_update_precision']}, preconditioning at"
      f" {kw['precond_grads_precision'] or 'default'} precision: total /"
      f" {chips} chips {total:.3e} bf16-pass flops")
