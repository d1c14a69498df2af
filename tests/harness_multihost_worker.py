"""One process of tests/test_harness.py's two-process run (not a test module).

python tests/harness_multihost_worker.py PORT NUM_PROCESSES PROCESS_ID OUT_JSON
"""

import json
import sys


def shard_model(model, mesh, rules):
  """The model's params as global arrays on `mesh` (same values everywhere)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  shardings = sharding.state_shardings(state, mesh, rules)
  host = jax.tree.map(np.asarray, state)
  state = jax.tree.map(
      lambda x, s: jax.make_array_from_callback(x.shape, s,
                                                lambda idx: x[idx]),
      host, shardings)
  return nnx.merge(graphdef, state)


def run(mesh=None, rules=None):
  """The adapter's three request types on fixed inputs."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from optconsist_jax.data.tokenizer import Tokenizer  # pylint: disable=g-import-not-at-top
  from optconsist_jax.evaluate import harness  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import Llama, preset  # pylint: disable=g-import-not-at-top
  model = Llama(preset("tiny_gqa").replace(vocab_size=2048,
                                           initializer_range=0.2),
                rngs=nnx.Rngs(0))
  if mesh is not None:
    model = shard_model(model, mesh, rules)
  lm = harness.HarnessLM(model, Tokenizer.tiny(), batch_size=8, max_len=64,
                         length_bucket=16, gen_batch_size=8, mesh=mesh,
                         rules=rules)
  requests = [(f"Question: What is {a} plus {b}?\nAnswer:", f" {a + b + d}")
              for a, b, d in ((2, 3, 0), (10, 7, 1), (4, 4, -2), (9, 1, 3),
                              (12, 30, 0), (5, 6, 5), (1, 1, 0), (8, 8, 8),
                              (3, 3, 1))]
  ll = lm.loglikelihood(requests)
  rolling = lm.loglikelihood_rolling(
      [("Return the number of items in a container, a sequence or a"
        " collection, counted once. " * 3,)])
  gen = lm.generate_until([
      (f"Question: What is {a} plus {b}?\nAnswer:",
       {"until": ["Question:"], "do_sample": False, "max_gen_toks": 6})
      for a, b in ((2, 3), (10, 7), (4, 4))])
  return {"loglikelihood": ll, "rolling": rolling, "generate": gen}


def worker(port: int, num_processes: int, process_id: int, out_json: str):
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator_address=f"localhost:{port}",
                             num_processes=num_processes,
                             process_id=process_id)
  assert jax.process_count() == num_processes and jax.device_count() == 8
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  mesh_config = sharding.MeshConfig.preset("fsdp")
  out = run(sharding.make_mesh(mesh_config), mesh_config.rules)
  if process_id == 0:
    with open(out_json, "w") as f:
      json.dump(out, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
