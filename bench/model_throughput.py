"""Forward+backward throughput of `llama_100m`: JAX vs transformers+torch, interleaved.

What is timed: our Flax NNX Llama under `jax.jit(jax.value_and_grad(loss))`
and `transformers.LlamaForCausalLM` (sdpa attention) with `loss.backward()`,
same shapes, fp32, random weights and tokens, mean next-token cross-entropy,
no optimizer update.

How (so that the two frameworks see the same machine):
* Each framework lives in a long-lived worker process (JAX in this
  interpreter, torch in `--torch-python`: a venv with torch + transformers,
  see tests/make_hf_fixtures.py), driven in lockstep by this parent: samples
  alternate A B A B ... in one run.
* Around every sample the parent reads /proc/stat; the CPU time the machine
  spent outside the measured worker (total busy time minus the worker's own
  user+system time from getrusage) is that sample's `other_load` (fraction of
  all cores). Samples with other_load > --max-other-load are rejected as
  noisy; medians use the accepted ones. os.getloadavg() is recorded too.
* Each framework's fp32 matmul peak (2048^3, best of --matmul-reps) is
  measured in the same run, interleaved the same way. The JAX matmul floor of
  a step is its flops (LlamaConfig.flops_per_token: 6 x matmul params +
  attention) over the JAX peak; figures are reported as ratios and as a
  fraction of that floor.
* Per step, each worker reports minor/major page faults and system CPU
  seconds (getrusage). The `jax` row is what every command does on a fresh
  machine: glibc malloc tuned at start-up
  (optconsist_jax.platforms.allocator.tune); --compare-allocator adds
  `jax_glibc_default` (OPTCONSIST_CPU_ALLOCATOR=glibc-default) and, when
  libtcmalloc_minimal is installed, `jax_tcmalloc` (preloaded) to the
  rotation. torch runs as its users run it (glibc defaults).
* Printed beside the measured JAX/torch ratio: the ratio this machine allows,
  JAX matmul peak / torch matmul peak (a step that is all matmul at each
  framework's peak), and each row's median and spread (min-max) of the
  accepted per-round times.
* One attention layer (fwd+bwd, the model's shapes) is timed the same way:
  our `attention_impl='xla'` path with segment masks, JAX's
  `jax.nn.dot_product_attention`, and torch's scaled_dot_product_attention
  (causal), which transformers uses.

Run: .venv/bin/python bench/model_throughput.py [--preset llama_100m --batch 4
  --seq 256 --rounds 8] [--torch-python .venv-fixtures/bin/python]
Writes bench/results/model_throughput.json and prints a summary. Small check:
  --preset tiny_gqa --batch 2 --seq 64 --rounds 2 --out /tmp/mt.json
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

from machine_load import cpu_busy_seconds
from machine_load import MATMUL_N
from machine_load import usage

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULT = os.path.join(ROOT, "bench", "results", "model_throughput.json")


def _timed(fn) -> dict:
  """Runs fn() once; wall seconds and this process's resource deltas."""
  u0 = usage()
  t0 = time.perf_counter()
  out = fn()
  wall = time.perf_counter() - t0
  u1 = usage()
  return {"seconds": wall, "cpu_s": (u1["utime"] + u1["stime"]
                                     - u0["utime"] - u0["stime"]),
          "system_s": u1["stime"] - u0["stime"],
          "minor_faults": u1["minflt"] - u0["minflt"],
          "major_faults": u1["majflt"] - u0["majflt"], "value": out}


# --------------------------------------------------------------------------
# Workers: each answers one JSON line per JSON command line.


class JaxWorker:
  """Our model under jax.jit; attention variants; XLA matmul."""

  def __init__(self, preset_name: str, batch: int, seq: int):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

    from optconsist_jax.io import hf_layout  # pylint: disable=g-import-not-at-top
    from optconsist_jax.model.loss import masked_cross_entropy  # pylint: disable=g-import-not-at-top
    from optconsist_jax.model import attention  # pylint: disable=g-import-not-at-top
    from optconsist_jax.model import Llama, preset  # pylint: disable=g-import-not-at-top
    from optconsist_jax.model.llama import parameter_count  # pylint: disable=g-import-not-at-top

    from optconsist_jax.platforms import allocator  # pylint: disable=g-import-not-at-top

    self.allocator = allocator.tune().to_json()
    self.jax = jax
    config = preset(preset_name)
    self.config = config
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

    self.step_fn = lambda: jax.block_until_ready(loss_and_grad(params))
    t0 = time.perf_counter()
    self.loss = float(self.step_fn()[0])
    self.info = {
        "framework": "jax", "version": jax.__version__,
        "params": parameter_count(model),
        "devices": [str(d) for d in jax.devices()],
        "attention_impl": config.attention_impl,
        "scan_layers": config.scan_layers,
        "remat_policy": config.remat_policy,
        "first_step_incl_compile_s": time.perf_counter() - t0,
        "loss": self.loss,
        "flops_per_step": config.flops_per_token(seq) * batch * seq,
        "hf_config": {k: v for k, v in hf_layout.config_to_hf(config).items()
                      if k != "architectures"},
        "ld_preload": os.environ.get("LD_PRELOAD", ""),
        "allocator": self.allocator,
    }

    a = jax.random.normal(jax.random.key(2), (MATMUL_N, MATMUL_N), jnp.float32)
    bm = jax.random.normal(jax.random.key(3), (MATMUL_N, MATMUL_N),
                           jnp.float32)
    matmul = jax.jit(jnp.dot)
    self.matmul_fn = lambda: jax.block_until_ready(matmul(a, bm))
    self.matmul_fn()

    n, k, h = config.num_heads, config.num_kv_heads, config.head_dim
    keys = jax.random.split(jax.random.key(4), 3)
    q = jax.random.normal(keys[0], (batch, seq, n, h), jnp.float32)
    kk = jax.random.normal(keys[1], (batch, seq, k, h), jnp.float32)
    v = jax.random.normal(keys[2], (batch, seq, k, h), jnp.float32)
    segment = jnp.ones((batch, seq), jnp.int32)

    def grad_of(attn):
      f = jax.jit(jax.value_and_grad(
          lambda q, kk, v: jnp.sum(attn(q, kk, v) ** 2), argnums=(0, 1, 2)))
      f(q, kk, v)
      return lambda: jax.block_until_ready(f(q, kk, v))

    self.attention_fns = {
        "jax_xla_segment_mask": grad_of(lambda q, kk, v: attention.attend(
            "xla", q, kk, v, segment_BT=segment)),
        "jax_dot_product_attention_causal": grad_of(
            lambda q, kk, v: jax.nn.dot_product_attention(
                q, kk, v, is_causal=True, implementation="xla")),
    }

  def run(self, op: str, variant: str | None = None) -> dict:
    if op == "step":
      r = _timed(self.step_fn)
      r["value"] = float(r["value"][0])
      return r
    if op == "matmul":
      r = _timed(self.matmul_fn)
      r["value"] = None
      return r
    if op == "attention":
      r = _timed(self.attention_fns[variant])
      r["value"] = None
      return r
    raise ValueError(op)


class TorchWorker:
  """transformers' LlamaForCausalLM with loss.backward(); torch matmul/sdpa."""

  def __init__(self, hf_config: dict, batch: int, seq: int):
    import torch  # pylint: disable=g-import-not-at-top
    import transformers  # pylint: disable=g-import-not-at-top

    torch.manual_seed(0)
    config = transformers.LlamaConfig(**hf_config)
    model = transformers.LlamaForCausalLM(config).float().train()
    tokens = torch.randint(0, config.vocab_size, (batch, seq + 1))
    inputs, targets = tokens[:, :-1], tokens[:, 1:]

    def step():
      model.zero_grad(set_to_none=True)
      logits = model(input_ids=inputs).logits
      loss = torch.nn.functional.cross_entropy(
          logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1))
      loss.backward()
      return loss.item()

    self.step_fn = step
    t0 = time.perf_counter()
    loss = step()
    self.info = {
        "framework": "torch", "version": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "attn_implementation": model.config._attn_implementation,  # pylint: disable=protected-access
        "params": sum(p.numel() for p in model.parameters()),
        "first_step_s": time.perf_counter() - t0, "loss": loss,
    }
    a = torch.randn(MATMUL_N, MATMUL_N)
    bm = torch.randn(MATMUL_N, MATMUL_N)
    self.matmul_fn = lambda: torch.mm(a, bm)
    self.matmul_fn()

    n, k, h = (config.num_attention_heads, config.num_key_value_heads,
               hf_config["head_dim"])
    q = torch.randn(batch, n, seq, h, requires_grad=True)
    kk = torch.randn(batch, k, seq, h, requires_grad=True)
    v = torch.randn(batch, k, seq, h, requires_grad=True)

    def sdpa():
      out = torch.nn.functional.scaled_dot_product_attention(
          q, kk, v, is_causal=True, enable_gqa=k != n)
      (out ** 2).sum().backward()
      q.grad = kk.grad = v.grad = None

    sdpa()
    self.attention_fns = {"torch_sdpa_causal": sdpa}

  def run(self, op: str, variant: str | None = None) -> dict:
    fn = {"step": self.step_fn, "matmul": self.matmul_fn}.get(op)
    if op == "attention":
      fn = self.attention_fns[variant]
    r = _timed(fn)
    if op != "step":
      r["value"] = None
    return r


def worker_main(framework: str) -> None:
  """Serves commands on stdin; protocol replies go to the original stdout."""
  reply = os.fdopen(os.dup(1), "w", buffering=1)
  os.dup2(2, 1)  # library chatter on fd 1 goes to stderr
  worker = None
  for line in sys.stdin:
    cmd = json.loads(line)
    try:
      if cmd["op"] == "setup":
        if framework == "jax":
          worker = JaxWorker(cmd["preset"], cmd["batch"], cmd["seq"])
        else:
          worker = TorchWorker(cmd["hf_config"], cmd["batch"], cmd["seq"])
        out = {"info": worker.info,
               "attention_variants": sorted(worker.attention_fns)}
      elif cmd["op"] == "quit":
        return
      else:
        out = worker.run(cmd["op"], cmd.get("variant"))
    except Exception as e:  # pylint: disable=broad-except
      out = {"error": f"{type(e).__name__}: {e}"}
    reply.write(json.dumps(out) + "\n")


# --------------------------------------------------------------------------
# Parent: lockstep rotation, load accounting.


class Worker:
  """A worker process and its lockstep channel."""

  def __init__(self, name: str, framework: str, python: str, env: dict):
    self.name = name
    self.proc = subprocess.Popen(
        [python, os.path.abspath(__file__), "--worker", framework],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
        cwd=ROOT)

  def call(self, **cmd) -> dict:
    self.proc.stdin.write(json.dumps(cmd) + "\n")
    self.proc.stdin.flush()
    line = self.proc.stdout.readline()
    if not line:
      raise SystemExit(f"worker {self.name} exited ({self.proc.wait()}); see"
                       " its stderr above")
    out = json.loads(line)
    if "error" in out:
      raise SystemExit(f"worker {self.name}: {out['error']}")
    return out

  def close(self):
    try:
      self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
      self.proc.stdin.flush()
    except BrokenPipeError:
      pass
    self.proc.wait(timeout=60)


def sample(worker: Worker, op: str, variant: str | None = None) -> dict:
  """One timed call with the machine's load outside the worker."""
  busy0 = cpu_busy_seconds()
  r = worker.call(op=op, variant=variant)
  busy1 = cpu_busy_seconds()
  other_s = max(busy1 - busy0 - r["cpu_s"], 0.0)
  r["other_load"] = other_s / (r["seconds"] * os.cpu_count())
  r["loadavg_1m"] = os.getloadavg()[0]
  return r


def _stats(samples: list[dict], max_other: float) -> dict:
  ok = [s for s in samples if s["other_load"] <= max_other]
  used = ok or samples
  secs = [s["seconds"] for s in used]
  return {
      "samples": len(samples), "accepted": len(ok),
      "all_noisy": not ok,
      "median_s": statistics.median(secs), "min_s": min(secs),
      "max_s": max(secs),
      "seconds": [round(s["seconds"], 4) for s in samples],
      "other_load": [round(s["other_load"], 3) for s in samples],
      "loadavg_1m": [round(s["loadavg_1m"], 2) for s in samples],
      "median_minor_faults": statistics.median(s["minor_faults"]
                                               for s in used),
      "median_system_s": statistics.median(s["system_s"] for s in used),
  }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--worker", choices=("jax", "torch"),
                      help=argparse.SUPPRESS)
  parser.add_argument("--preset", default="llama_100m")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--rounds", type=int, default=8,
                      help="timed train steps per framework (A B A B ...)")
  parser.add_argument("--matmul-reps", type=int, default=6)
  parser.add_argument("--attention-reps", type=int, default=10)
  parser.add_argument("--max-other-load", type=float, default=0.10,
                      help="reject samples where other processes used more"
                      " than this fraction of all cores")
  parser.add_argument("--torch-python",
                      default=os.path.join(ROOT, ".venv-fixtures", "bin",
                                           "python"))
  parser.add_argument("--no-torch", action="store_true",
                      help="JAX only (figures vs the JAX matmul floor)")
  parser.add_argument("--compare-allocator", action="store_true",
                      help="also run JAX with glibc's default allocator and"
                      " (when installed) tcmalloc in the rotation")
  parser.add_argument("--out", default=RESULT)
  args = parser.parse_args()
  if args.worker:
    worker_main(args.worker)
    return
  if min(args.rounds, args.matmul_reps, args.attention_reps) < 1:
    parser.error("--rounds, --matmul-reps, --attention-reps must be >= 1")

  sys.path.insert(0, ROOT)
  from optconsist_jax.platforms import allocator  # pylint: disable=g-import-not-at-top
  tcmalloc = allocator.tcmalloc_path()
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
             PYTHONPATH=os.pathsep.join(
                 [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
  plain_env = {k: v for k, v in env.items()
               if k != "LD_PRELOAD" and k != allocator.ENV}
  specs = [("jax", "jax", sys.executable, plain_env)]
  if args.compare_allocator:
    specs.append(("jax_glibc_default", "jax", sys.executable,
                  {**plain_env, allocator.ENV: "glibc-default"}))
    if tcmalloc:
      specs.append(("jax_tcmalloc", "jax", sys.executable,
                    allocator.preload_env(plain_env, tcmalloc)))
  if not args.no_torch:
    if not os.path.exists(args.torch_python):
      raise SystemExit(f"--torch-python {args.torch_python} not found (a venv"
                       " with torch and transformers; or pass --no-torch)")
    specs.append(("torch", "torch", args.torch_python, plain_env))

  load_before = os.getloadavg()
  workers = [Worker(*s) for s in specs]
  try:
    print(f"setting up {[w.name for w in workers]} ...", flush=True)
    info, variants = {}, {}
    for w in workers:
      hf_config = info.get("jax", {}).get("hf_config")
      out = w.call(op="setup", preset=args.preset, batch=args.batch,
                   seq=args.seq, hf_config=hf_config)
      info[w.name], variants[w.name] = out["info"], out["attention_variants"]
    samples = {w.name: {"matmul": [], "step": []} for w in workers}
    attn = {(w.name, v): [] for w in workers for v in variants[w.name]}
    for _ in range(args.matmul_reps):
      for w in workers:
        samples[w.name]["matmul"].append(sample(w, "matmul"))
    for _ in range(args.attention_reps):
      for (name, v), lst in attn.items():
        lst.append(sample(next(w for w in workers if w.name == name),
                          "attention", v))
    for i in range(args.rounds):
      for w in workers:
        s = sample(w, "step")
        samples[w.name]["step"].append(s)
        print(f"round {i + 1}/{args.rounds} {w.name}: {s['seconds']:.3f} s"
              f" (other load {s['other_load']:.2f})", flush=True)
  finally:
    for w in workers:
      w.close()

  flops = info["jax"]["flops_per_step"]
  tokens = args.batch * args.seq
  per = {}
  for name, sm in samples.items():
    mm = _stats(sm["matmul"], args.max_other_load)
    st = _stats(sm["step"], args.max_other_load)
    per[name] = {
        "info": {k: v for k, v in info[name].items() if k != "hf_config"},
        "matmul_peak_gflops": 2 * MATMUL_N**3 / mm["min_s"] / 1e9,
        "matmul": mm, "step": st,
        "tokens_per_s": tokens / st["median_s"],
        "achieved_gflops": flops / st["median_s"] / 1e9,
    }
  jax_peak = per["jax"]["matmul_peak_gflops"] * 1e9
  floor_s = flops / jax_peak
  for r in per.values():
    r["fraction_of_jax_matmul_floor"] = floor_s / r["step"]["median_s"]
  attention = {f"{name}/{v}": _stats(lst, args.max_other_load)
               for (name, v), lst in attn.items()}
  out = {
      "command": "python bench/model_throughput.py " + " ".join(
          f"--{k.replace('_', '-')} {v}" for k, v in (
              ("preset", args.preset), ("batch", args.batch),
              ("seq", args.seq), ("rounds", args.rounds))) + (
                  " --compare-allocator" if args.compare_allocator else "") + (
                      " --no-torch" if args.no_torch else ""),
      "model": args.preset, "dtype": "float32", "batch": args.batch,
      "seq": args.seq, "tokens_per_step": tokens,
      "what": "forward + backward (loss and grads, no optimizer update)",
      "flops_per_step": flops,
      "jax_matmul_floor_s": floor_s,
      "tcmalloc": tcmalloc,
      "machine": {
          "cpus": os.cpu_count(), "platform": platform.platform(),
          "python": platform.python_version(),
          "load_average_before": load_before,
          "load_average_after": os.getloadavg(),
          "max_other_load": args.max_other_load,
          "note": ("samples alternate between frameworks in one run; a sample"
                   " is rejected when other processes used more than"
                   " max_other_load of the cores (all_noisy: none passed,"
                   " medians then use every sample)"),
      },
      "frameworks": per,
      "attention_one_layer_fwd_bwd": attention,
  }
  if "torch" in per:
    out["jax_over_torch_tokens_per_s"] = (per["jax"]["tokens_per_s"]
                                          / per["torch"]["tokens_per_s"])
    out["jax_over_torch_matmul_peak"] = (per["jax"]["matmul_peak_gflops"]
                                         / per["torch"]["matmul_peak_gflops"])
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=2)
  print(f"\n{args.preset} fp32 fwd+bwd {args.batch}x{args.seq}; JAX matmul"
        f" floor {floor_s:.3f} s/step")
  for name, r in per.items():
    print(f"  {name:20s} {r['step']['median_s']:.3f} s/step"
          f" ({r['step']['min_s']:.2f}-{r['step']['max_s']:.2f})"
          f" {r['tokens_per_s']:8.1f} tok/s  matmul peak"
          f" {r['matmul_peak_gflops']:.0f} GFLOP/s  floor fraction"
          f" {r['fraction_of_jax_matmul_floor']:.2f}  faults/step"
          f" {r['step']['median_minor_faults']:.0f} sys"
          f" {r['step']['median_system_s']:.2f} s  accepted"
          f" {r['step']['accepted']}/{r['step']['samples']}")
  for name, st in attention.items():
    print(f"  attention {name:45s} {st['median_s'] * 1e3:7.1f} ms")
  if "jax_over_torch_tokens_per_s" in out:
    print(f"  JAX / torch tokens/s: {out['jax_over_torch_tokens_per_s']:.2f}"
          f" (this machine allows {out['jax_over_torch_matmul_peak']:.2f}:"
          " JAX matmul peak / torch matmul peak)")
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
