"""Multi-host correctness without a pod: 2 processes x 4 CPU devices on localhost.

The same train step (optconsist_jax.train.step) on the same global batches must
give the same losses whether the 8 devices belong to one process or to two
processes joined by `jax.distributed.initialize` (CPU collectives: gloo). In
the two-process run each process builds only its own rows of every batch and
`train_step.global_batch` assembles the global array; the workers check that
the assembled array equals the intended global batch. Both processes then
write one Orbax checkpoint together, restore it, and the single-process run
restores that checkpoint onto its own mesh and finds its own final params.

Run as a script (`python tests/test_multihost.py PORT NUM_PROCESSES PROCESS_ID
WORKDIR OUT_JSON`) it is one worker process.
"""

from __future__ import annotations

import json
import sys

import pytest

NUM_STEPS = 3
GLOBAL_ROWS = 16
SEQ_LEN = 16
GRAD_ACCUM = 2
MODEL_ID = {"preset": "tiny_gqa", "test": "multihost"}


def global_batch_np(step: int) -> dict:
  """The intended global batch of `step` (every process can compute it)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(step)
  tokens = rng.integers(3, 128, size=(GLOBAL_ROWS, SEQ_LEN + 1))
  weights = (rng.random((GLOBAL_ROWS, SEQ_LEN)) < 0.8).astype(np.float32)
  segment_ids = np.ones((GLOBAL_ROWS, SEQ_LEN), np.int32)
  segment_ids[::3, -4:] = 0  # some padding
  weights[segment_ids == 0] = 0.0
  return {
      "inputs": tokens[:, :-1].astype(np.int32),
      "targets": tokens[:, 1:].astype(np.int32),
      "weights": weights,
      "positions": np.broadcast_to(np.arange(SEQ_LEN, dtype=np.int32),
                                   (GLOBAL_ROWS, SEQ_LEN)).copy(),
      "segment_ids": segment_ids,
  }


def build():
  """Mesh, rules, state, step for tiny_gqa with AdamW under the fsdp preset."""
  import optax  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import state as state_lib  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import step as train_step  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import preset  # pylint: disable=g-import-not-at-top

  mesh_config = sharding.MeshConfig.preset("fsdp")
  mesh = sharding.make_mesh(mesh_config)
  rules = mesh_config.rules
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(1e-2, weight_decay=0.0))
  model_config = preset("tiny_gqa")
  builder = state_lib.StateBuilder(model_config, mesh, rules, seed=0)
  state = builder.init(tx)
  abstract, shardings = builder.abstract_state(tx)
  step = train_step.make_train_step(builder.graphdef, tx, mesh=mesh,
                                    rules=rules,
                                    state_shardings=shardings,
                                    grad_accum_steps=GRAD_ACCUM)
  return mesh, rules, state, step, abstract


def train(process_id: int, num_processes: int):
  """Runs NUM_STEPS steps feeding only this process's rows; returns losses."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import step as train_step  # pylint: disable=g-import-not-at-top

  mesh, rules, state, step, abstract = build()
  rows = GLOBAL_ROWS // num_processes
  losses = []
  for i in range(NUM_STEPS):
    full = global_batch_np(i)
    local = {k: v[process_id * rows:(process_id + 1) * rows]
             for k, v in full.items()}
    batch = train_step.global_batch(local, mesh, rules)
    if num_processes > 1:
      # The assembled global array is the intended batch, rows in order.
      for k, v in batch.items():
        gathered = multihost_utils.process_allgather(v, tiled=True)
        np.testing.assert_array_equal(gathered, full[k], err_msg=k)
    state, metrics = step(state, batch)
    losses.append(float(metrics["loss"]))
  return state, losses, abstract


def max_abs_diff(a, b) -> float:
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  diffs = jax.tree.map(lambda x, y: jnp.max(jnp.abs(x - y)), a, b)
  return float(jax.jit(lambda d: jnp.max(jnp.stack(jax.tree.leaves(d))))(
      diffs))


def worker(port: int, num_processes: int, process_id: int, workdir: str,
           out_json: str):
  """One process of the multi-process run."""
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_default_matmul_precision", "highest")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes,
                             process_id=process_id)
  assert jax.process_count() == num_processes
  assert jax.local_device_count() == 4 and jax.device_count() == 8

  from optconsist_jax.io import checkpoint_layout as checkpoints  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import checkpointer as run_checkpoints  # pylint: disable=g-import-not-at-top
  state, losses, abstract = train(process_id, num_processes)
  ckpts = run_checkpoints.RunCheckpoints(
      workdir, run_checkpoints.CheckpointConfig(every_steps=0), MODEL_ID)
  ckpts.save(NUM_STEPS, params=state.params, opt_state=state.opt_state,
             epoch=1, epoch_end=True)
  ckpts.close()
  restored = checkpoints.restore_params(workdir, None, abstract.params,
                                        model=MODEL_ID)
  restore_diff = max_abs_diff(restored, state.params)
  if process_id == 0:
    with open(out_json, "w") as f:
      json.dump({"losses": losses, "restore_diff": restore_diff}, f)
  jax.distributed.shutdown()


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  import numpy as np  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import checkpoint_layout as checkpoints  # pylint: disable=g-import-not-at-top
  from worker_processes import run_workers  # pylint: disable=g-import-not-at-top

  workdir = tmp_path / "run"
  out_json = tmp_path / "out.json"
  run_workers(__file__, [workdir, out_json])
  multi = json.loads(out_json.read_text())

  # The reference: this pytest process, 1 process x 8 devices (conftest).
  state, losses, abstract = train(process_id=0, num_processes=1)
  np.testing.assert_allclose(multi["losses"], losses, rtol=1e-5)
  # Different batches and updated params give different losses, so equal
  # lists are not an artifact of a constant.
  assert len(set(losses)) == NUM_STEPS and np.all(np.isfinite(losses))
  assert multi["restore_diff"] == 0.0
  # The checkpoint written by both processes restores onto this mesh and
  # holds the params this process computed, up to reduction order (which
  # Adam's normalization amplifies for near-zero gradients): far closer than
  # the distance the 3 updates moved the params.
  restored = checkpoints.restore_params(workdir, None, abstract.params,
                                        model=MODEL_ID)
  _, _, init_state, _, _ = build()
  moved = max_abs_diff(init_state.params, state.params)
  assert max_abs_diff(restored, state.params) < 2e-3 * moved
  (info,) = checkpoints.list_checkpoints(workdir)
  assert (info.step, info.epoch, info.complete) == (NUM_STEPS, 1, True)


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4],
         sys.argv[5])
