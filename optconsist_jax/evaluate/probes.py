"""Probes of a finetuning update against its base: the paper's mechanism.

The paper (arXiv 2605.06654) attributes forgetting to how well an update
fits the "fingerprint" the pretraining optimizer left on the base. These
probes measure that for one finetuned checkpoint W_ft of a base W_base
(update dW = W_ft - W_base; a LoRA model is merged first, model/lora.py
`merge`), on one held-out batch:

1. Update geometry (probes_geometry.py): the share of ||dW||_F^2 inside the
   top-k singular subspaces of W_base against its random baseline, the
   principal-angle overlap of dW with the pretraining displacement
   W_base - W_init (Bjorck & Golub 1973), stable rank and spectral norm of
   dW (the update-rank view of Biderman et al. 2024, "LoRA Learns Less and
   Forgets Less", arXiv 2405.09673), per kind of matrix and over the model.
2. Second-order forgetting: with L the token-mean LM loss on the batch,
   g0 = grad L(W_base) and H0 its Hessian,
       L(W_ft) - L(W_base) ~ g0 . dW + 1/2 dW^T H0 dW,
   the first- and second-order predictions next to the measured change, and
   the curvature ratio dW^T H0 dW / ||dW||^2 (the Rayleigh quotient of H0
   along the update: how sharp the loss is in the direction the finetuning
   moved). H0 dW is one forward-over-reverse Hessian-vector product
   (`jax.jvp` of `jax.grad`; Pearlmutter 1994, "Fast exact multiplication
   by the Hessian", Neural Computation 6); no Hessian is formed. The loss,
   its gradient and g0 . dW come out of the same pass.
3. Activation drift: the per-layer residual-stream statistics the model
   reports (`forward(return_stats=True)` of either family: mean, RMS,
   max |x|, kurtosis; model/llama.py `residual_stats`) of W_ft minus those
   of W_base on the batch, per layer and averaged over layers. The
   statistics cover every position of the batch, so feed full rows of
   packed text (no padding).

Everything runs under `jax.jit` on the params' own shardings: on an eval mesh
the probes compute on sharded params (SVDs gather one matrix at a time;
probes_geometry.py gives the memory). The curvature probe works in float32
on float32 copies of the params (bf16 weights are upcast, the update is
taken in float32): about 5 float32 copies of the params (base, update,
gradient, H dW, and the finetuned point) plus twice a forward pass's
activations.

`evaluate` returns all of it as one flat dict of floats (keys `probe/...`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from optconsist_jax import sharding
from optconsist_jax.evaluate import probes_geometry as geometry
from optconsist_jax.model import architecture
from optconsist_jax.model import lora as lora_lib
from optconsist_jax.model import loss as loss_lib

Batch = Mapping[str, Any]
STATS = ("mean", "rms", "max_abs", "kurtosis")
# The three probes (module doc), as `evaluate(which=...)` names them.
KINDS = ("geometry", "second_order", "activations")


def lm_batch(rows_BT: Any) -> dict[str, np.ndarray]:
  """A next-token batch of full token rows [B, T+1]: every position counts."""
  rows_BT = np.asarray(rows_BT, np.int32)
  if rows_BT.ndim != 2 or rows_BT.shape[1] < 2:
    raise ValueError(f"probes.lm_batch: expected token rows [B, T+1] with"
                     f" T >= 1, got shape {rows_BT.shape}")
  return {"inputs": rows_BT[:, :-1], "targets": rows_BT[:, 1:],
          "weights": np.ones(rows_BT[:, 1:].shape, np.float32)}


def pack_rows(tokenizer: Any, texts: Sequence[str], seq_len: int,
              max_rows: int | None = None) -> np.ndarray:
  """BOS + text + EOS of every text, concatenated and cut into full rows.

  Returns int32 [rows, seq_len] (rows of `seq_len + 1` tokens make
  `lm_batch` inputs of seq_len). The remainder that does not fill a row is
  dropped; raises when the texts do not fill one row.
  """
  stream: list[int] = []
  for t in texts:
    stream += [tokenizer.bos_id, *tokenizer.encode(t), tokenizer.eos_id]
    if max_rows is not None and len(stream) >= max_rows * seq_len:
      break
  n = len(stream) // seq_len
  if max_rows is not None:
    n = min(n, max_rows)
  if n == 0:
    raise ValueError(f"pack_rows: the texts give {len(stream)} tokens,"
                     f" fewer than one row of seq_len={seq_len}")
  return np.asarray(stream[:n * seq_len], np.int32).reshape(n, seq_len)


def split_model(model: nnx.Module) -> tuple[Any, nnx.State, nnx.State]:
  """(graphdef, nnx.Param state, the rest) of a model, LoRA merged first."""
  if jax.tree.leaves(nnx.state(model, lora_lib.LoRAParam)):
    model = lora_lib.merge(model)
  return nnx.split(model, nnx.Param, ...)


def _params(x: Any) -> nnx.State:
  if isinstance(x, nnx.Module):
    return split_model(x)[1]
  return x


def _f32(tree: Any) -> Any:
  return jax.tree.map(lambda a: a.astype(jnp.float32), tree)


def _vdot(a: Any, b: Any) -> jax.Array:
  return sum(jnp.sum(x * y) for x, y in zip(jax.tree.leaves(a),
                                            jax.tree.leaves(b)))


def batch_loss(graphdef: Any, rest: nnx.State, params: nnx.State,
               batch: Batch) -> jax.Array:
  """Token-mean cross-entropy of the model (graphdef, params, rest) on batch.

  The training loss (model/loss.py `masked_cross_entropy`) with the batch's
  optional positions and segment ids.
  """
  model = nnx.merge(graphdef, params, rest)
  logits = model.forward(batch["inputs"], batch.get("positions"),
                         batch.get("segment_ids")).logits_BTV
  total, count = loss_lib.masked_cross_entropy(logits, batch["targets"],
                                               batch["weights"])
  return total / jnp.maximum(count, 1.0)


def hvp(f, params: Any, v: Any) -> tuple[jax.Array, jax.Array, Any, Any]:
  """(f(p), grad f(p) . v, grad f(p), H(p) v) by forward-over-reverse.

  One `jax.jvp` of `jax.value_and_grad(f)` (Pearlmutter 1994); `v` has the
  structure and dtypes of `params`.
  """
  (value, grad), (dvalue, hv) = jax.jvp(jax.value_and_grad(f), (params,),
                                        (v,))
  return value, dvalue, grad, hv


def grad_layout(params: Any) -> tuple[Any, tuple[Any, ...]] | None:
  """(treedef, shardings) of params on a mesh, for `_second_order`; or None.

  Hashable, so it goes into the jitted function as a static argument.
  """
  leaves, treedef = jax.tree.flatten(params)
  shardings = tuple(getattr(x, "sharding", None) for x in leaves)
  if not all(isinstance(s, jax.sharding.NamedSharding) for s in shardings):
    return None
  return treedef, shardings


@functools.partial(jax.jit, static_argnames=("graphdef", "layout"))
def _second_order(graphdef, rest, base, finetuned, batch, layout=None):
  """One batch's sums: losses, g0 . dW, dW^T H0 dW, ||dW||^2, and g0.

  `layout` (`grad_layout(base)`) keeps g0 in the params' shardings; left to
  the compiler, a float32 gradient may come out whole on every device
  (tools/plan/eval_plan.py measured that).
  """
  base, finetuned = _f32(base), _f32(finetuned)
  update = jax.tree.map(jnp.subtract, finetuned, base)
  loss = functools.partial(batch_loss, graphdef, rest, batch=batch)
  loss_base, pred1, grad, h_update = hvp(loss, base, update)
  if layout is not None:
    grad = jax.lax.with_sharding_constraint(grad, jax.tree.unflatten(*layout))
  return {"loss_base": loss_base, "loss_ft": loss(finetuned), "pred1": pred1,
          "quad": _vdot(update, h_update),
          "norm2": _vdot(update, update)}, grad


@jax.jit
def _add(a, b):
  return jax.tree.map(jnp.add, a, b)


@jax.jit
def _second_order_summary(sums, grad_sum, n):
  """The probe's numbers from sums over n equal batches (means of them)."""
  m = jax.tree.map(lambda x: x / n, sums)
  grad2 = _vdot(grad_sum, grad_sum) / (n * n)
  return {
      "probe/loss_base": m["loss_base"],
      "probe/loss_finetuned": m["loss_ft"],
      "probe/loss_change": m["loss_ft"] - m["loss_base"],
      "probe/loss_change_pred1": m["pred1"],
      "probe/loss_change_pred2": m["pred1"] + 0.5 * m["quad"],
      "probe/curvature": m["quad"],
      "probe/curvature_ratio": m["quad"] / jnp.maximum(m["norm2"], 1e-30),
      "probe/param_update_norm": jnp.sqrt(m["norm2"]),
      "probe/grad_norm_base": jnp.sqrt(grad2),
      "probe/grad_update_cos": m["pred1"] / jnp.maximum(
          jnp.sqrt(grad2 * m["norm2"]), 1e-30),
  }


def _batches(batch: Batch | Sequence[Batch]) -> list[dict[str, Any]]:
  out = [dict(batch)] if isinstance(batch, Mapping) else [
      dict(b) for b in batch]
  if not out:
    raise ValueError("probes: no batches given")
  return out


def second_order(graphdef: Any, rest: nnx.State, base: nnx.State,
                 finetuned: nnx.State,
                 batch: Batch | Sequence[Batch]) -> dict[str, float]:
  """Measured vs first/second-order predicted loss change (module doc, 2).

  Args:
    graphdef, rest: from `split_model(base_model)`.
    base, finetuned: nnx.Param states of the same tree (the trainable
      params; frozen ones go in `rest`).
    batch: inputs, targets, weights [B, T] (positions, segment_ids
      optional), e.g. `lm_batch(rows)`; or a sequence of such batches with
      equal token weights (full rows of `pack_rows`), whose mean loss is L:
      one HVP per batch, the gradients summed (one more float32 copy of the
      params).

  Returns:
    probe/loss_base, loss_finetuned, loss_change (measured), loss_change_pred1
    (g0 . dW), loss_change_pred2 (+ 1/2 dW^T H0 dW), curvature (dW^T H0 dW),
    curvature_ratio (/ ||dW||^2), param_update_norm (every param),
    grad_norm_base (||g0||), grad_update_cos (g0 . dW / ||g0|| ||dW||).
  """
  finetuned = _aligned(base, finetuned)
  sums, grad_sum = None, None
  batches = _batches(batch)
  layout = grad_layout(base)
  for b in batches:
    s, g = _second_order(graphdef, rest, base, finetuned, b, layout=layout)
    sums = s if sums is None else _add(sums, s)
    grad_sum = g if grad_sum is None else _add(grad_sum, g)
  out = _second_order_summary(sums, grad_sum, float(len(batches)))
  return {k: float(v) for k, v in jax.device_get(out).items()}


@functools.partial(jax.jit, static_argnames=("graphdef",))
def residual_statistics(graphdef, rest, params, batch) -> dict[str, jax.Array]:
  """stat -> [L]: the model's per-layer residual-stream statistics."""
  model = nnx.merge(graphdef, params, rest)
  return model.forward(batch["inputs"], batch.get("positions"),
                       batch.get("segment_ids"), return_stats=True).stats


def residual_summary(graphdef: Any, rest: nnx.State, params: nnx.State,
                     batch: Batch | Sequence[Batch]) -> dict[str, np.ndarray]:
  """stat -> float64 [L] over one batch or several equal ones.

  Across batches (as experiments/fingerprints.py combines them): mean is
  averaged, RMS is the root of the averaged mean square, max |x| the
  maximum, kurtosis the average of the per-batch kurtoses (exact with one
  batch).
  """
  per = []
  for b in _batches(batch):
    s = residual_statistics(graphdef, rest, params, b)
    per.append({k: np.asarray(jax.device_get(v), np.float64)
                for k, v in s.items()})
  stack = {k: np.stack([p[k] for p in per]) for k in STATS}
  return {"mean": stack["mean"].mean(0),
          "rms": np.sqrt(np.mean(np.square(stack["rms"]), 0)),
          "max_abs": stack["max_abs"].max(0),
          "kurtosis": stack["kurtosis"].mean(0)}


def activation_drift(graphdef: Any, rest: nnx.State, base: nnx.State,
                     finetuned: nnx.State, batch: Batch | Sequence[Batch], *,
                     base_stats: Mapping[str, np.ndarray] | None = None
                     ) -> dict[str, float]:
  """Finetuned minus base residual statistics (module doc, 3).

  `batch`: one batch or several (`residual_summary`); `base_stats`: the
  base's `residual_summary` on the same batches, to reuse across
  checkpoints (computed when None).

  Returns, for stat in STATS: probe/act_{stat}_drift/layer{l} (signed),
  probe/act_{stat}_drift/mean (mean over layers of the signed drift),
  probe/act_{stat}_absdrift/mean (mean of |drift|) and
  probe/act_{stat}_base/mean (the base's own level, for scale).
  """
  finetuned = _aligned(base, finetuned)
  stats = {"base": base_stats if base_stats is not None else
           residual_summary(graphdef, rest, base, batch),
           "ft": residual_summary(graphdef, rest, finetuned, batch)}
  out = {}
  for stat in STATS:
    drift_L = stats["ft"][stat] - stats["base"][stat]
    for l, d in enumerate(drift_L):
      out[f"probe/act_{stat}_drift/layer{l}"] = float(d)
    out[f"probe/act_{stat}_drift/mean"] = float(np.mean(drift_L))
    out[f"probe/act_{stat}_absdrift/mean"] = float(np.mean(np.abs(drift_L)))
    out[f"probe/act_{stat}_base/mean"] = float(np.mean(stats["base"][stat]))
  return out


def _aligned(base: nnx.State, finetuned: Any) -> nnx.State:
  """`finetuned`'s arrays in `base`'s tree (Variable metadata may differ)."""
  a = geometry.pure_params(base)
  b = geometry.pure_params(finetuned)
  if set(a) != set(b):
    raise ValueError("probes: base and finetuned params differ in paths:"
                     f" only in base {sorted(set(a) - set(b))[:5]}, only in"
                     f" finetuned {sorted(set(b) - set(a))[:5]}")
  for k in a:
    if tuple(a[k].shape) != tuple(b[k].shape):
      raise ValueError(f"probes: param {k!r} has shape {b[k].shape} in the"
                       f" finetuned model, {a[k].shape} in the base")
  aligned = jax.tree.map(lambda x: x, base)
  pure = (nnx.to_pure_dict(finetuned) if isinstance(finetuned, nnx.State)
          else finetuned)
  nnx.replace_by_pure_dict(aligned, pure)
  return aligned


def init_params(model_config: architecture.ModelConfig, seed: int, *,
                mesh: jax.sharding.Mesh | None = None,
                rules: sharding.Rules | None = None) -> nnx.State:
  """The nnx.Params a base was initialized with (`make_model(config, seed)`).

  Either family (model/architecture.py dispatches on the config). Born
  sharded on `mesh` by `rules` (sharding.state_shardings) when given, so a
  7B init never sits whole on one device.
  """
  def init():
    return nnx.state(architecture.make_model(model_config, seed=seed),
                     nnx.Param)
  if mesh is None:
    return jax.jit(init)()
  abstract = nnx.state(architecture.abstract_model(model_config, seed=seed),
                       nnx.Param)
  shardings = sharding.state_shardings(abstract, mesh,
                                       rules or sharding.RULES)
  return jax.jit(init, out_shardings=shardings)()


def evaluate(base: nnx.Module, finetuned: nnx.Module | nnx.State,
             batch: Batch | Sequence[Batch], *, init: Any | None = None,
             fractions: Sequence[float] = geometry.DEFAULT_FRACTIONS,
             reference: geometry.Reference | None = None,
             layer_batch: int | None = None,
             which: Sequence[str] = KINDS,
             base_stats: Mapping[str, np.ndarray] | None = None
             ) -> dict[str, float]:
  """The probes of `finetuned` against `base`, as one flat dict of floats.

  Args:
    base: the base model (its graphdef runs the loss and the statistics).
    finetuned: the finetuned model (LoRA adapters are merged) or its
      nnx.Param state.
    batch: held-out inputs/targets/weights [B, T] (`lm_batch(rows)` of
      packed text), or several such batches of full rows.
    init: the base's init params (`init_params(config, seed)`), or None to
      skip the pretraining-overlap probe.
    fractions: top-k subspace sizes as fractions of min(m, n).
    reference: `probes_geometry.reference(base, init, fractions=...)` to
      reuse across checkpoints of one base (its SVDs are the expensive,
      checkpoint-independent half); computed here when None.
    layer_batch: layers decomposed at once along the stacked layer axis
      (None: one per device of the params' mesh).
    which: a subset of KINDS: "geometry", "second_order", "activations".
    base_stats: the base's `residual_summary` on `batch`, reused across
      checkpoints (computed when None).

  Returns:
    The keys of `probes_geometry.update_geometry`, `second_order` and
    `activation_drift` (those `which` names), each `probe/...`.
  """
  bad = sorted(set(which) - set(KINDS))
  if bad:
    raise ValueError(f"probes: unknown probes {bad}; valid: {KINDS}")
  graphdef, base_params, rest = split_model(base)
  ft_params = _aligned(base_params, _params(finetuned))
  out: dict[str, float] = {}
  if "geometry" in which:
    if reference is None:
      reference = geometry.reference(base_params, init, fractions=fractions,
                                     layer_batch=layer_batch)
    out.update(geometry.update_geometry(reference, base_params, ft_params,
                                        layer_batch=layer_batch))
  if "second_order" in which:
    out.update(second_order(graphdef, rest, base_params, ft_params, batch))
  if "activations" in which:
    out.update(activation_drift(graphdef, rest, base_params, ft_params,
                                 batch, base_stats=base_stats))
  return out
