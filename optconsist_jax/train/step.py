"""The jitted train step (the state it advances: train/state.py).

`make_train_step` returns a jitted `(state, batch) -> (state, metrics)` with
explicit in/out shardings, a donated state and gradient accumulation over
micro-batches (`lax.scan`). The loss is the token-mean of
`optconsist_jax.model.loss.masked_cross_entropy` over the whole global batch,
the same number however the batch is split.

Multi-host: `maybe_initialize_distributed()` first, then `global_batch()` turns
each process's rows into one global array (each process feeds only its slice).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from optconsist_jax import sharding
from optconsist_jax.model import loss as loss_lib
from optconsist_jax.train.state import TrainState

BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


def _group_stats(updates: Any, param_groups: Any) -> dict[str, jax.Array]:
  """update_norm/<group> and update_rms/<group> over the leaves of each group."""
  flat = jax.tree_util.tree_flatten_with_path(updates)[0]
  leaves = [x for _, x in flat]
  if isinstance(param_groups, Mapping) and all(
      isinstance(k, str) and isinstance(v, str)
      for k, v in param_groups.items()):
    names = [sharding.path_name(p) for p, _ in flat]
    missing = sorted(set(names) - set(param_groups))
    if missing:
      raise ValueError(f"param_groups has no group for params {missing[:5]}")
    groups = [param_groups[n] for n in names]
  else:
    groups = jax.tree.leaves(param_groups)
  if len(leaves) != len(groups):
    raise ValueError(
        f"param_groups has {len(groups)} leaves but the params have"
        f" {len(leaves)}; build it by mapping over the params tree")
  sumsq: dict[str, jax.Array] = {}
  count: dict[str, int] = {}
  for u, g in zip(leaves, groups):
    g = str(g)
    sumsq[g] = sumsq.get(g, 0.0) + jnp.sum(jnp.square(u.astype(jnp.float32)))
    count[g] = count.get(g, 0) + u.size
  out = {}
  for g in sorted(sumsq):
    out[f"update_norm/{g}"] = jnp.sqrt(sumsq[g])
    out[f"update_rms/{g}"] = jnp.sqrt(sumsq[g] / max(count[g], 1))
  return out


def microbatches(batch: Mapping[str, jax.Array], grad_accum_steps: int,
                 constrain: sharding.LogicalConstraint | None = None
                 ) -> dict[str, jax.Array]:
  """[B, T] -> [A, B/A, T] with micro-batch i = rows i, i+A, i+2A, ...

  Strided rows keep each micro-batch spread over all batch shards (a
  contiguous split would put micro-batch i on a few devices only).
  """
  out = {}
  for k, x in batch.items():
    b = x.shape[0]
    if b % grad_accum_steps:
      raise ValueError(f"batch[{k!r}] has {b} rows, not divisible by"
                       f" grad_accum_steps={grad_accum_steps}")
    x = x.reshape(b // grad_accum_steps, grad_accum_steps,
                  *x.shape[1:]).swapaxes(0, 1)
    if constrain is not None:
      x = constrain(x, (None, "act_batch", "act_length"))
    out[k] = x
  return out


def train_step_fn(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    constrain: sharding.LogicalConstraint | None = None,
    grad_accum_steps: int = 1,
    param_groups: Any | None = None,
) -> Callable[[TrainState, dict[str, jax.Array], Any],
              tuple[TrainState, dict[str, jax.Array]]]:
  """The unjitted step of `make_train_step`, the dropout seed an argument.

  Returns step(state, batch, dropout_seed) -> (new_state, metrics), where
  dropout_seed is None (deterministic) or an integer scalar, traced or not:
  `jax.vmap` over it (and the state and batch) trains a population of runs
  in one program (optconsist_jax.train.population). The arguments are
  those of `make_train_step`; `constrain` places the micro-batches.
  """

  def sum_loss(params, frozen, mb, rng):
    model = nnx.merge(graphdef, params, frozen)
    out = model.forward(mb["inputs"], mb["positions"], mb["segment_ids"],
                        dropout_rng=rng)
    return loss_lib.masked_cross_entropy(out.logits_BTV, mb["targets"],
                                         mb["weights"])

  grad_fn = jax.value_and_grad(sum_loss, has_aux=True)

  def step(state: TrainState, batch, dropout_seed):
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
      raise ValueError(f"batch is missing keys {missing}; expected"
                       f" {BATCH_KEYS}")
    batch = {k: batch[k] for k in BATCH_KEYS}
    rng = (None if dropout_seed is None else
           jax.random.fold_in(jax.random.key(dropout_seed), state.step))

    def micro(carry, xs):
      grads_acc, loss_acc, count_acc = carry
      mb, i = xs
      mb_rng = None if rng is None else jax.random.fold_in(rng, i)
      (loss_sum, count), grads = grad_fn(state.params, state.frozen, mb,
                                         mb_rng)
      grads_acc = jax.tree.map(jnp.add, grads_acc, grads)
      return (grads_acc, loss_acc + loss_sum, count_acc + count), None

    zeros = jax.tree.map(jnp.zeros_like, state.params)
    init = (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32))
    if grad_accum_steps == 1:
      (grads, loss_sum, count), _ = micro(init, (batch, 0))
    else:
      mbs = microbatches(batch, grad_accum_steps, constrain)
      (grads, loss_sum, count), _ = jax.lax.scan(
          micro, init, (mbs, jnp.arange(grad_accum_steps)))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: (g / denom).astype(g.dtype), grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {
        "loss": loss_sum / denom,
        "grad_norm": optax.tree.norm(grads),
        "num_tokens": count,
    }
    if param_groups is not None:
      metrics.update(_group_stats(updates, param_groups))
    new_state = state.replace(step=state.step + 1, params=params,
                              opt_state=opt_state)
    return new_state, metrics

  return step


def make_train_step(
    graphdef: nnx.GraphDef,
    tx: optax.GradientTransformation,
    *,
    mesh: Mesh,
    rules: sharding.Rules,
    state_shardings: TrainState,
    grad_accum_steps: int = 1,
    param_groups: Any | None = None,
    dropout_seed: int | None = None,
    donate: bool = True,
) -> Callable[[TrainState, dict[str, jax.Array]],
              tuple[TrainState, dict[str, jax.Array]]]:
  """The jitted train step.

  Args:
    graphdef: from `state.StateBuilder`.
    tx: the optimizer the state was created with.
    mesh: device mesh.
    rules: logical-axis rules table.
    state_shardings: from `state.StateBuilder.abstract_state`.
    grad_accum_steps: micro-batches per step; the batch's rows must divide.
    param_groups: optional group name per param: a pytree with the
      structure of `state.params` and a str per leaf, or {path name: group}
      as `optconsist_jax.optim.assign_groups` returns; adds
      update_norm/<g> and update_rms/<g> to the metrics.
    dropout_seed: if set, adapters get dropout randomness
      fold_in(key(seed), step); None runs deterministically.
    donate: donate the input state's buffers.

  Returns:
    step(state, batch) -> (new_state, metrics) where batch is the dict of
    [B, T] arrays of the batch contract and metrics holds float32 scalars
    loss, grad_norm, num_tokens (and the per-group update stats).
  """
  rules = sharding.as_rules(rules)
  batch_sh = sharding.batch_sharding(mesh, rules)
  replicated = NamedSharding(mesh, PartitionSpec())
  step_fn = train_step_fn(
      graphdef, tx, constrain=sharding.LogicalConstraint(mesh, rules),
      grad_accum_steps=grad_accum_steps, param_groups=param_groups)

  def step(state: TrainState, batch):
    return step_fn(state, batch, dropout_seed)

  jitted = jax.jit(step, in_shardings=(state_shardings, batch_sh),
                   out_shardings=(state_shardings, replicated),
                   donate_argnums=(0,) if donate else ())
  return jitted


def stats_fn(graphdef: nnx.GraphDef
             ) -> Callable[[nnx.State, nnx.State, dict[str, jax.Array]], Any]:
  """Unjitted (params, frozen, batch) -> residual-stream statistics per layer.

  One forward pass with `return_stats=True` (the optimizer fingerprint the
  trainer logs every `train.stats_every` steps).
  """

  def stats(params, frozen, batch):
    model = nnx.merge(graphdef, params, frozen)
    return model.forward(batch["inputs"], batch["positions"],
                         batch["segment_ids"], return_stats=True).stats
  return stats


def abstract_batch(batch_size: int, seq_len: int, mesh: Mesh,
                   rules: sharding.Rules) -> dict[str, jax.ShapeDtypeStruct]:
  """ShapeDtypeStructs of a [B, T] batch in its sharding (for AOT compiles)."""
  sh = sharding.batch_sharding(mesh, sharding.as_rules(rules))
  dtypes = {"inputs": jnp.int32, "targets": jnp.int32, "weights": jnp.float32,
            "positions": jnp.int32, "segment_ids": jnp.int32}
  return {k: jax.ShapeDtypeStruct((batch_size, seq_len), dtypes[k],
                                  sharding=sh) for k in BATCH_KEYS}


def global_batch(local_batch: Mapping[str, Any], mesh: Mesh,
                 rules: sharding.Rules) -> dict[str, jax.Array]:
  """One global jax.Array per key from this process's rows.

  Each process passes only its own rows (global rows / process_count, in
  process order); `jax.make_array_from_process_local_data` places them on
  this process's devices. On one process the local batch is the global batch.
  """
  sh = sharding.batch_sharding(mesh, sharding.as_rules(rules))
  return {k: jax.make_array_from_process_local_data(sh, np.asarray(v))
          for k, v in local_batch.items()}
