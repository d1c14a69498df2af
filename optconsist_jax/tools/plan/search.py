r"""`plan --search`: rank layouts by estimated step time.

Enumerates mesh factorizations data x fsdp x tensor of the slice's chips
(rules of the `fsdp_tp` preset, which give FSDP at tensor=1 and pure data
parallelism at fsdp=tensor=1), rows per batch shard per micro-batch (the
gradient-accumulation count follows from the global batch) and remat
policies; compiles each candidate's real train step for the TPU topology
(optconsist_jax.tools.plan.aot), drops those that do not fit in HBM, and ranks
the rest by the roofline step time of optconsist_jax.tools.plan.step_time. Each row carries
the `--config.*` overrides that run it with optconsist_jax.train.

  python -m optconsist_jax.tools.plan --search --model llama2_7b --topology v5p-8 \
      --micro_batches 2,4,8 --remat full,dots --max_tensor 2 --workers 1

Compiles run in separate processes (`--workers`, default 1: a 7B compile
takes 1-5 minutes and a few GiB of host memory); every result is cached as
JSON under `--cache_dir`, keyed by the candidate's PlanSpec and the jax and
libtpu versions, so a repeated or widened search compiles only what is new.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import hashlib
import importlib.metadata
import json
import multiprocessing
import os
import sys
import time
from typing import Any

from optconsist_jax.tools.plan import hlo_stats
from optconsist_jax.tools.plan import aot as planner
from optconsist_jax.tools.plan import step_time
from optconsist_jax.platforms import tpu as tpu_facts

DEFAULT_CACHE = os.path.join(".cache", "plan_search")


@dataclasses.dataclass(frozen=True)
class Candidate:
  """One point of the search space."""

  data: int  # per slice
  fsdp: int
  tensor: int
  micro_batch: int  # rows per batch shard per micro-batch
  remat: str
  accum: int
  dcn: int = 1  # slices; the data axis spans them (MeshConfig.dcn_data)

  def label(self) -> str:
    dcn = f"{self.dcn}x" if self.dcn > 1 else ""
    return f"{dcn}{self.data}x{self.fsdp}x{self.tensor}"

  def overrides(self) -> str:
    """The train.py `--config.*` flags that run this layout."""
    dcn = f" --config.mesh.dcn_data={self.dcn}" if self.dcn > 1 else ""
    return (f"--config.mesh.preset=fsdp_tp --config.mesh.data={self.data}"
            f" --config.mesh.fsdp={self.fsdp}"
            f" --config.mesh.tensor={self.tensor}{dcn}"
            f" --config.train.grad_accum_steps={self.accum}"
            f" --config.model.remat_policy={self.remat}")


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def candidates(chips: int, global_batch: int, model_config,
               micro_batches: list[int], remats: list[str],
               max_tensor: int = 8, slices: int = 1) -> list[Candidate]:
  """Every layout x micro-batch x remat that divides evenly.

  `chips` per slice; with `slices` > 1 the data axis also spans the slices
  (only data-parallel gradient reductions cross the DCN). tensor must divide
  the heads, kv heads, MLP width and vocabulary (the `fsdp_tp` rules shard
  them over it) and fsdp the hidden size.
  """
  c = model_config
  out = []
  for tensor in _divisors(chips):
    if tensor > max_tensor or any(
        x % tensor for x in (c.num_heads, c.num_kv_heads,
                             c.intermediate_size, c.vocab_size)):
      continue
    for fsdp in _divisors(chips // tensor):
      if c.hidden_size % fsdp:
        continue
      data = chips // (tensor * fsdp)
      for micro in micro_batches:
        rows = micro * data * fsdp * slices
        if global_batch % rows:
          continue
        for remat in remats:
          out.append(Candidate(data, fsdp, tensor, micro, remat,
                               global_batch // rows, slices))
  return out


def spec_for(base, cand: Candidate):
  """The PlanSpec of a candidate (base: the searched PlanSpec)."""
  return dataclasses.replace(
      base, mesh={"preset": "fsdp_tp", "data": cand.data, "fsdp": cand.fsdp,
                  "tensor": cand.tensor, "dcn_data": cand.dcn},
      grad_accum_steps=cand.accum, remat_policy=cand.remat)


# ----------------------------------------------------------------------------
# Results as JSON (cache and worker processes).


def result_to_json(r) -> dict[str, Any]:
  d = dataclasses.asdict(r)
  if r.collectives is not None:
    d["collectives"]["groups"] = [
        [k, list(g), v[0], v[1]] for (k, g), v in r.collectives.groups.items()]
  return d


def result_from_json(d: dict[str, Any]):
  d = dict(d)
  d["spec"] = planner.PlanSpec(**d["spec"])
  c = d.get("collectives")
  if c is not None:
    d["collectives"] = hlo_stats.CollectiveStats(
        c["count"], c["bytes"], c["loops_without_trip_count"],
        {(k, tuple(g)): [n, b] for k, g, n, b in c["groups"]},
        c.get("dcn", {}))
  if d.get("device_coords") is not None:
    d["device_coords"] = [tuple(x) for x in d["device_coords"]]
  w = d.get("optimizer_work")
  if w is not None:
    d["optimizer_work"] = step_time.OptimizerWork(**{
        **w, "all_to_all": tuple(tuple(x) for x in w["all_to_all"])})
  return planner.PlanResult(**d)


def cache_key(spec) -> str:
  versions = {}
  for pkg in ("jax", "jaxlib", "libtpu"):
    try:
      versions[pkg] = importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
      versions[pkg] = None
  blob = json.dumps({"spec": dataclasses.asdict(spec), **versions},
                    sort_keys=True, default=str)
  return hashlib.sha256(blob.encode()).hexdigest()[:24]


def _compile(spec_json: str) -> dict[str, Any]:
  """Worker: plan one spec; errors come back as a record."""
  spec = planner.PlanSpec(**json.loads(spec_json))
  try:
    return {"result": result_to_json(planner.plan(spec))}
  except Exception as e:  # pylint: disable=broad-except
    return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}


# ----------------------------------------------------------------------------
# The search.


@dataclasses.dataclass
class Row:
  cand: Candidate
  result: Any  # PlanResult or None
  estimate: Any  # StepEstimate or None
  error: str | None
  cached: bool

  @property
  def fits(self) -> bool:
    return self.result is not None and bool(self.result.fits)


def run_search(base, cands: list[Candidate], *, workers: int = 1,
               cache_dir: str | None = DEFAULT_CACHE,
               assumptions: step_time.Assumptions = step_time.Assumptions(),
               log=None) -> list[Row]:
  """Compiles (or reads from the cache) every candidate; ranked rows."""
  log = log or sys.stdout
  specs = [spec_for(base, c) for c in cands]
  rows: list[Row | None] = [None] * len(cands)
  todo = []
  for i, spec in enumerate(specs):
    path = (os.path.join(cache_dir, cache_key(spec) + ".json")
            if cache_dir else None)
    if path and os.path.exists(path):
      with open(path) as f:
        rows[i] = _row(cands[i], json.load(f), assumptions, cached=True)
    else:
      todo.append((i, path))
  n = len(cands)
  done = n - len(todo)
  print(f"search: {n} candidates, {done} cached, {len(todo)} to compile with"
        f" {workers} worker(s)", file=log, flush=True)
  for i, row in enumerate(rows):
    if row is not None:
      print(f"  cached  {_progress_line(row)}", file=log, flush=True)
  if todo:
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(
        max_workers=max(1, workers), mp_context=ctx,
        max_tasks_per_child=1) as pool:
      started = time.perf_counter()
      futures = {pool.submit(_compile, json.dumps(
          dataclasses.asdict(specs[i]), default=str)): (i, path)
                 for i, path in todo}
      for fut in concurrent.futures.as_completed(futures):
        i, path = futures[fut]
        record = fut.result()
        if path and "result" in record:
          os.makedirs(os.path.dirname(path), exist_ok=True)
          with open(path, "w") as f:
            json.dump(record, f)
        rows[i] = _row(cands[i], record, assumptions, cached=False)
        done += 1
        print(f"  [{done}/{n}, {time.perf_counter() - started:.0f} s]"
              f" {_progress_line(rows[i])}", file=log, flush=True)
  return rank(rows)


def _row(cand, record, assumptions, cached) -> Row:
  if "result" not in record:
    return Row(cand, None, None, record.get("error", "?"), cached)
  r = result_from_json(record["result"])
  est = planner.step_estimate(r, assumptions) if r.fits is not False else None
  return Row(cand, r, est, r.error, cached)


def _progress_line(row: Row) -> str:
  c = row.cand
  what = f"{c.label()} rows/shard {c.micro_batch} x {c.accum} remat {c.remat}"
  if row.result is None:
    return f"{what}: failed: {row.error}"
  peak = row.result.peak_bytes / 2**30
  if not row.fits:
    return f"{what}: peak {peak:.1f} GiB does not fit"
  s = ("" if row.estimate is None
       else f", est. step {row.estimate.step_s:.3g} s")
  return f"{what}: peak {peak:.1f} GiB{s}"


def rank(rows: list[Row]) -> list[Row]:
  """Fitting rows by estimated step time, then the rest."""
  def key(r: Row):
    if r.fits and r.estimate is not None:
      return (0, r.estimate.step_s)
    return (1, 0.0)
  return sorted(rows, key=key)


def markdown(rows: list[Row], base, assumptions: step_time.Assumptions) -> str:
  """The ranked table, its settings and the model's assumptions."""
  lines = [
      f"Search: {base.model if isinstance(base.model, str) else 'model'} on"
      f" {base.topology}, sequence {base.seq_len}, global batch"
      f" {base.global_batch}, optimizer {base.optimizer}, params"
      f" {base.param_dtype}, compute {base.dtype}.",
      step_time.Assumptions.describe(assumptions) + ".", "",
      "| rank | mesh [slices x] data x fsdp x tensor | rows/shard x accum | remat |"
      " peak GiB/chip | est. step s | compute s | comm. s | bound |"
      " MFU bound | h/epoch | train.py overrides |",
      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  rank_no = 0
  dropped = []
  for r in rows:
    if not (r.fits and r.estimate is not None):
      dropped.append(r)
      continue
    rank_no += 1
    e, c = r.estimate, r.cand
    lines.append(
        f"| {rank_no} | {c.label()} | {c.micro_batch} x {c.accum} | {c.remat}"
        f" | {r.result.peak_bytes / 2**30:.1f} | {e.step_s:.3g} |"
        f" {e.compute_s:.3g} | {e.comm_total_s:.3g} | {e.bound} |"
        f" {e.mfu:.1%} | {e.hours_per_epoch:.3g} | `{c.overrides()}` |")
  if dropped:
    lines += ["", "Discarded:"]
    for r in dropped:
      lines.append(f"- {_progress_line(r)}")
  return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
  """The `plan --search` flags (the others are the planner's own)."""
  g = p.add_argument_group("search (--search)")
  g.add_argument("--search", action="store_true",
                 help="rank mesh x micro-batch x remat layouts by estimated"
                 " step time")
  g.add_argument("--micro_batches", default="1,2,4,8",
                 help="rows per batch shard per micro-batch to try")
  g.add_argument("--remats", default="full,dots",
                 help="remat policies to try (LlamaConfig.remat_policy)")
  g.add_argument("--max_tensor", type=int, default=4,
                 help="largest tensor-parallel size to try")
  g.add_argument("--meshes", default=None,
                 help="only these data x fsdp x tensor shapes, e.g."
                 " 1x4x1,1x2x2 (default: every factorization)")
  g.add_argument("--workers", type=int, default=1,
                 help="parallel compile processes (a 7B compile needs a few"
                 " GiB of host memory)")
  g.add_argument("--cache_dir", default=DEFAULT_CACHE,
                 help="compiled results cached here as JSON ('' = none)")
  g.add_argument("--mxu_efficiency", type=float,
                 default=step_time.MXU_EFFICIENCY)
  g.add_argument("--ici_efficiency", type=float,
                 default=step_time.ICI_EFFICIENCY)
  g.add_argument("--overlap", type=float, default=step_time.OVERLAP)
  g.add_argument("--epoch_tokens", type=float, default=step_time.EPOCH_TOKENS)


def main(args: argparse.Namespace) -> int:
  """Runs `plan --search` from the planner's parsed flags."""
  topology = args.topology
  parsed = tpu_facts.parse_topology(topology)
  if "," in topology or parsed is None:
    raise SystemExit(f"--search takes one TPU topology (NxTOPOLOGY for N"
                     f" slices), got {topology!r}; known:"
                     f" {sorted(tpu_facts.SLICES)}")
  base = planner.PlanSpec(
      model=args.model, topology=topology, seq_len=args.seq_len,
      global_batch=args.global_batch, optimizer=args.optimizer,
      lora_rank=args.lora_rank, param_dtype=args.param_dtype,
      dtype=args.dtype)
  model_config = planner.model_config(base)
  ints = lambda s: [int(x) for x in s.split(",") if x.strip()]  # pylint: disable=unnecessary-lambda-assignment
  cands = candidates(
      parsed[1].chips, args.global_batch, model_config,
      ints(args.micro_batches), [x.strip() for x in args.remats.split(",")],
      args.max_tensor, slices=parsed[0])
  if args.meshes:
    keep = {m.strip() for m in args.meshes.split(",")}
    cands = [c for c in cands if c.label() in keep]
  if not cands:
    raise SystemExit("--search: no candidate divides the global batch;"
                     " check --micro_batches and --global_batch")
  assumptions = step_time.Assumptions(
      args.mxu_efficiency, args.ici_efficiency, args.overlap,
      args.epoch_tokens)
  rows = run_search(base, cands, workers=args.workers,
                    cache_dir=args.cache_dir or None, assumptions=assumptions)
  table = markdown(rows, base, assumptions)
  print(table)
  outputs = []
  if args.markdown:
    with open(args.markdown, "w") as f:
      f.write(table + "\n")
    outputs.append(args.markdown)
  if args.json:
    with open(args.json, "w") as f:
      for r in rows:
        f.write(json.dumps({
            "mesh": r.cand.label(), "micro_batch": r.cand.micro_batch,
            "accum": r.cand.accum, "remat": r.cand.remat,
            "fits": r.fits, "error": r.error,
            "peak_gib": None if r.result is None
            else r.result.peak_bytes / 2**30,
            **({} if r.estimate is None else r.estimate.row()),
            "overrides": r.cand.overrides()}) + "\n")
    outputs.append(args.json)
  if args.cache_dir:
    outputs.append(f"cache {args.cache_dir}")
  print("outputs: " + (", ".join(outputs) or "stdout only"))
  return 0 if any(r.fits for r in rows) else 1
