"""Forward+backward tokens/s of the ~100M `llama_100m` model: JAX vs PyTorch.

Same shapes, fp32, same machine, one run each: our Flax NNX Llama under
`jax.jit(jax.value_and_grad(loss))`, and `transformers.LlamaForCausalLM`
(default attention, sdpa) with `loss.backward()`. No optimizer update in
either; the loss is the mean next-token cross-entropy in both. Warm-up steps
(compilation for JAX) are excluded; then `--iters` timed steps.

Each framework runs in its own process: JAX with this interpreter, PyTorch
with `--torch-python` (a venv holding torch + transformers, see
tests/make_hf_fixtures.py), so the project venv needs no torch.

Run: .venv/bin/python bench/model_throughput.py [--batch 4 --seq 256
  --warmup 1 --iters 3]
Writes bench/results/model_throughput.json and prints it. The script also runs
under either interpreter alone with `--framework jax|torch` (prints one JSON
line).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "model_throughput.json")
PRESET = "llama_100m"
# llama_100m in Hugging Face terms (kept in sync with optconsist_jax's
# preset; checked against it when the JAX side runs).
HF_CONFIG = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                 num_hidden_layers=8, num_attention_heads=12,
                 num_key_value_heads=12, max_position_embeddings=1024,
                 rms_norm_eps=1e-5, rope_theta=10000.0,
                 tie_word_embeddings=False)


def _summary(step_s: list[float], tokens_per_step: int) -> dict:
  total = sum(step_s)
  return {"step_s": step_s, "median_step_s": statistics.median(step_s),
          "tokens_per_s": tokens_per_step * len(step_s) / total}


def run_jax(batch: int, seq: int, warmup: int, iters: int) -> dict:
  """Times jitted loss+grad of our model."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from optconsist_jax import hf  # pylint: disable=g-import-not-at-top
  from optconsist_jax.loss import masked_cross_entropy  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model import Llama, preset  # pylint: disable=g-import-not-at-top
  from optconsist_jax.model.llama import parameter_count  # pylint: disable=g-import-not-at-top

  config = preset(PRESET)
  ours = hf.config_to_hf(config)
  mismatched = {k: (v, ours[k]) for k, v in HF_CONFIG.items() if ours[k] != v}
  if mismatched:
    raise SystemExit(f"HF_CONFIG out of sync with preset {PRESET}: "
                     f"{mismatched}")
  model = Llama(config, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tokens = jax.random.randint(jax.random.key(1), (batch, seq + 1), 0,
                              config.vocab_size, jnp.int32)
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  weights = jnp.ones((batch, seq), jnp.float32)

  @jax.jit
  def loss_and_grad(params):
    def loss_fn(params):
      logits = nnx.merge(graphdef, params)(inputs)
      total, count = masked_cross_entropy(logits, targets, weights)
      return total / count
    return jax.value_and_grad(loss_fn)(params)

  t0 = time.perf_counter()
  jax.block_until_ready(loss_and_grad(params))
  first_s = time.perf_counter() - t0  # compile + one step
  for _ in range(warmup - 1):
    jax.block_until_ready(loss_and_grad(params))
  step_s = []
  for _ in range(iters):
    t0 = time.perf_counter()
    loss, _ = jax.block_until_ready(loss_and_grad(params))
    step_s.append(time.perf_counter() - t0)
  return {"framework": "jax", "version": jax.__version__,
          "params": parameter_count(model),
          "devices": [str(d) for d in jax.devices()],
          "scan_layers": config.scan_layers,
          "remat_policy": config.remat_policy,
          "first_step_incl_compile_s": first_s, "loss": float(loss),
          **_summary(step_s, batch * seq)}


def run_torch(batch: int, seq: int, warmup: int, iters: int) -> dict:
  """Times loss.backward() of transformers' LlamaForCausalLM."""
  import torch  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top

  torch.manual_seed(0)
  config = transformers.LlamaConfig(**HF_CONFIG)
  model = transformers.LlamaForCausalLM(config).float().train()
  tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
  inputs, targets = tokens[:, :-1], tokens[:, 1:]

  def step():
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=inputs).logits
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
    loss.backward()
    return float(loss)

  t0 = time.perf_counter()
  step()
  first_s = time.perf_counter() - t0
  for _ in range(warmup - 1):
    step()
  step_s = []
  for _ in range(iters):
    t0 = time.perf_counter()
    loss = step()
    step_s.append(time.perf_counter() - t0)
  return {"framework": "torch", "version": torch.__version__,
          "transformers": transformers.__version__,
          "threads": torch.get_num_threads(),
          "attn_implementation": model.config._attn_implementation,  # pylint: disable=protected-access
          "params": sum(p.numel() for p in model.parameters()),
          "first_step_s": first_s, "loss": loss,
          **_summary(step_s, batch * seq)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--framework", choices=("jax", "torch"),
                      help="run only this framework in this interpreter and"
                      " print one JSON line")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--iters", type=int, default=3)
  parser.add_argument("--torch-python",
                      default=os.path.join(ROOT, ".venv-fixtures", "bin",
                                           "python"))
  parser.add_argument("--out", default=RESULT)
  args = parser.parse_args()
  if args.warmup < 1 or args.iters < 1:
    parser.error("--warmup and --iters must be >= 1")
  shape = (args.batch, args.seq, args.warmup, args.iters)
  if args.framework == "jax":
    print(json.dumps(run_jax(*shape)))
    return
  if args.framework == "torch":
    print(json.dumps(run_torch(*shape)))
    return

  common = ["--batch", str(args.batch), "--seq", str(args.seq),
            "--warmup", str(args.warmup), "--iters", str(args.iters)]
  load_before = os.getloadavg()
  results = {}
  for framework, python in (("jax", sys.executable),
                            ("torch", args.torch_python)):
    if not os.path.exists(python):
      raise SystemExit(f"{framework}: interpreter {python} not found (see"
                       " --torch-python)")
    env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
    proc = subprocess.run(
        [python, os.path.abspath(__file__), "--framework", framework,
         *common], env=env, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode:
      sys.stderr.write(proc.stderr[-4000:])
      raise SystemExit(f"{framework} run failed ({proc.returncode})")
    results[framework] = json.loads(proc.stdout.strip().splitlines()[-1])
  out = {
      "command": ("bench/model_throughput.py " + " ".join(common)),
      "model": PRESET, "params": results["jax"]["params"], "dtype": "float32",
      "batch": args.batch, "seq": args.seq, "tokens_per_step":
          args.batch * args.seq,
      "what": "forward + backward (loss and grads, no optimizer update)",
      "machine": {
          "cpus": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(),
          "load_average_before": load_before,
          "load_average_after": os.getloadavg(),
          "note": ("the CPU cores are shared with other jobs; figures are"
                   " noisy lower bounds, compare the two frameworks only"
                   " within one run"),
      },
      "jax": results["jax"], "torch": results["torch"],
      "jax_over_torch": (results["jax"]["tokens_per_s"]
                         / results["torch"]["tokens_per_s"]),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(json.dumps(out, indent=2))


if __name__ == "__main__":
  main()
