r"""Our planner next to MaxText's ahead-of-time compile, for the same 7B step.

Both compile Llama-2-7B's train step for a TPU topology on this CPU (libtpu),
one after the other in one run (A B A B when --repeats > 1), and report the
compiler's per-chip memory analysis and the compile time:

  .venv/bin/python bench/maxtext_peer.py --maxtext_python /path/to/venv/bin/python

MaxText (github.com/AI-Hypercomputer/maxtext, PyPI `maxtext==0.2.5`) is a peer,
never a dependency: install it in its own venv on Python >= 3.12 with the same
jax/libtpu as ours (`pip install maxtext==0.2.5 jax==0.12.0.1 jaxlib==0.12.0.1
libtpu==0.0.52`). Its command, per setting:

  python -m maxtext.trainers.pre_train.train_compile <maxtext>/configs/base.yml \
      compile_topology=v5p-8 compile_topology_num_slices=1 model_name=llama2-7b \
      per_device_batch_size=2 max_target_length=1024 remat_policy=full \
      weight_dtype=float32 dtype=bfloat16 ici_fsdp_parallelism=-1 \
      opt_type=adamw attention=dot_product gradient_accumulation_steps=8

Ours: `python -m optconsist_jax.tools.plan --model llama2_7b --mesh fsdp --optimizer
adamw --topology v5p-8 --seq_len 1024 --global_batch 64 --per_chip_batch 2`
(8 micro-batches; `--global_batch 8` for none). Peak = arguments + outputs -
donated aliases + temporaries, the same formula on both sides, from
`compiled.memory_analysis()`. The floor is the fp32 params + two Adam moments
+ the fp32 gradient per chip (16 bytes/param / chips), plus a second fp32
gradient (the accumulator next to a micro-batch's gradient) with accumulation.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
GIB = 1024**3
PARAMS_7B = 6_738_415_616


def _maxtext_cmd(python: str, topology: str, accum: int, per_chip: int,
                 seq_len: int) -> list[str]:
  base = subprocess.run(
      [python, "-c", "import maxtext, os; print(os.path.join("
       "os.path.dirname(maxtext.__file__), 'configs', 'base.yml'))"],
      check=True, capture_output=True, text=True).stdout.strip()
  return [python, "-m", "maxtext.trainers.pre_train.train_compile", base,
          f"compile_topology={topology}", "compile_topology_num_slices=1",
          "model_name=llama2-7b", f"per_device_batch_size={per_chip}",
          f"max_target_length={seq_len}", "remat_policy=full",
          "weight_dtype=float32", "dtype=bfloat16", "ici_fsdp_parallelism=-1",
          "opt_type=adamw", "attention=dot_product",
          f"gradient_accumulation_steps={accum}", "skip_jax_distributed_system=true",
          "run_name=maxtext_peer", "base_output_directory=/tmp/maxtext_peer",
          "enable_checkpointing=false"]


_FIELDS = {"argument": "argument_size_in_bytes", "output": "output_size_in_bytes",
           "alias": "alias_size_in_bytes", "temp": "temp_size_in_bytes"}


def run_maxtext(python: str, topology: str, accum: int, per_chip: int,
                seq_len: int) -> dict:
  cmd = _maxtext_cmd(python, topology, accum, per_chip, seq_len)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  t0 = time.time()
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env,
                        check=False)
  seconds = time.time() - t0
  text = proc.stdout + proc.stderr
  line = next((l for l in text.splitlines() if "Memory analysis" in l), None)
  if proc.returncode or line is None:
    raise RuntimeError(f"MaxText train_compile failed (rc {proc.returncode}):"
                       f" {text[-2000:]}")
  sizes = {k: int(re.search(rf"{v}=(\d+)", line).group(1))
           for k, v in _FIELDS.items()}
  peak = sizes["argument"] + sizes["output"] - sizes["alias"] + sizes["temp"]
  return {"peak_gib": peak / GIB, "temp_gib": sizes["temp"] / GIB,
          "args_gib": sizes["argument"] / GIB, "wall_s": seconds,
          "command": " ".join(cmd[1:])}


def run_ours(topology: str, accum: int, per_chip: int, seq_len: int) -> dict:
  from optconsist_jax.tools.plan import aot as planner  # pylint: disable=g-import-not-at-top
  chips = planner.topology_devices(topology)[0]
  spec = planner.PlanSpec(
      model="llama2_7b", mesh="fsdp", topology=topology, seq_len=seq_len,
      global_batch=per_chip * len(chips) * accum, per_chip_batch=per_chip,
      optimizer="adamw", param_dtype="float32", dtype="bfloat16",
      remat_policy="full")
  t0 = time.time()
  r = planner.plan(spec)
  row = r.row()
  return {"peak_gib": row["peak_gib"], "temp_gib": row["temp_gib"],
          "args_gib": row["args_gib"], "collective_gib": row["collective_gib"],
          "compile_s": row["compile_s"], "wall_s": time.time() - t0,
          "chips": len(chips),
          "command": ("python -m optconsist_jax.tools.plan --model llama2_7b --mesh"
                      f" fsdp --optimizer adamw --topology {topology} --seq_len"
                      f" {seq_len} --global_batch {spec.global_batch}"
                      f" --per_chip_batch {per_chip}")}


def main() -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--maxtext_python", required=True,
                 help="python of a venv with maxtext installed")
  p.add_argument("--topology", default="v5p-8")
  p.add_argument("--accum", default="1,8", help="micro-batch counts to run")
  p.add_argument("--per_chip_batch", type=int, default=2)
  p.add_argument("--seq_len", type=int, default=1024)
  p.add_argument("--repeats", type=int, default=1)
  p.add_argument("--out", default=os.path.join(RESULTS, "maxtext_peer.json"))
  args = p.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  rows = []
  for accum in [int(a) for a in args.accum.split(",")]:
    for rep in range(args.repeats):
      for side in ("maxtext", "ours"):
        print(f"[{time.strftime('%H:%M:%S')}] {side}: {args.topology},"
              f" {accum} micro-batch(es), repeat {rep}", flush=True)
        fn = run_maxtext if side == "maxtext" else run_ours
        extra = (args.maxtext_python,) if side == "maxtext" else ()
        r = fn(*extra, args.topology, accum, args.per_chip_batch, args.seq_len)
        r.update(side=side, accum=accum, repeat=rep,
                 loadavg=os.getloadavg())
        print(f"  peak {r['peak_gib']:.2f} GiB/chip, {r['wall_s']:.0f} s",
              flush=True)
        rows.append(r)
  chips = next(r["chips"] for r in rows if r["side"] == "ours")
  floor = {a: (16 if a == 1 else 20) * PARAMS_7B / chips / GIB
           for a in sorted({r["accum"] for r in rows})}
  out = {"topology": args.topology, "per_chip_batch": args.per_chip_batch,
         "seq_len": args.seq_len, "floor_gib_per_chip": floor,
         "rows": rows, "python": sys.version.split()[0]}
  import jax  # pylint: disable=g-import-not-at-top
  out["jax"] = jax.__version__
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(out, f, indent=1)
  for accum in sorted({r["accum"] for r in rows}):
    m = min(r["peak_gib"] for r in rows if r["side"] == "maxtext"
            and r["accum"] == accum)
    o = min(r["peak_gib"] for r in rows if r["side"] == "ours"
            and r["accum"] == accum)
    print(f"{accum} micro-batch(es): MaxText {m:.2f}, ours {o:.2f} GiB/chip"
          f" ({o / m:.3f}x), floor {floor[accum]:.2f}")
  print(f"wrote {os.path.abspath(args.out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
