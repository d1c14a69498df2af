"""Do the report's intervals mean what they say? Coverage on simulated studies.

Simulates whole studies (bases x finetuning methods x seeds, every run a set
of LR x epoch checkpoints), writes each as EvalRecords, and runs the report's
own functions on them (`consistency.consistency_summary`,
`consistency.interactions`, `matrix.consistency_matrix`, as
`python -m optconsist_jax.report` does). Against the known truth it counts
how often a nominal 95% interval contains it (coverage), how often a null
comparison is resolved after Holm's correction (false verdicts), and how
often a planted interaction is resolved (power), each with its Monte Carlo
standard error.

The model of a study (retention and learning in accuracy units):

- Truth: method m finetuned from a base pretrained with b traces
  R(l) = R0_b + c_m + delta [m == b] - k_m l^2 over its learning range. At
  LR j of the method's grid (rates r_j = 0.35, 0.7, 1.4) and epoch
  e = 1..4 it learns l = 0.25 + (hi_m - 0.25) (1 - exp(-r_j e)) /
  (1 - exp(-4 r_3)), so each method reaches its own learning range (up to
  hi_m); the largest LR loses `overshoot` retention (dominated
  checkpoints). `delta` is the planted consistency bonus (0: null).
  Without `column`, every method has the same c, k and hi (every per-base
  gap is 0 too).
- Pretraining seed p: a retention and a learning shift shared by every
  method on that base (`sd_pretrain`, `sd_pretrain_learning`), and a
  retention shift per method (`sd_pretrain_method`, the pretraining seed x
  method effect). Finetuning seed s starts from pretraining seed s
  (`pretrain="per_seed"`), from one pretraining seed (`"one"`), or two
  finetuning seeds per pretraining seed (`"nested2"`); with `record_base`
  the records say which (`EvalRecord.base_id`), so the report averages the
  finetuning seeds of one pretraining seed into one unit.
- Finetuning seed: a retention and a learning shift per run (`sd_run`,
  `sd_run_learning`).
- Evaluation items: learning and retention are each the fraction of the
  eval items a checkpoint gets right. Item k has a difficulty z_k ~ U(0, 1)
  and an affinity g_(cell, k) ~ U(+- `item_cell`) to the (base, method)
  cell; a checkpoint of mean score mu gets it right when
  z_k < mu + g_(cell, k) + e (e ~ U(+- `item_check`), fresh per checkpoint
  and item), so a checkpoint's correctness on an item is a fixed property
  of the item, the cell and the checkpoint, as with greedy decoding, and
  the expected fraction over the item population is mu. Each seed is scored
  on its own item sample (`items="per_seed"`) or all on one set
  (`"shared"`, as a real study is: one eval set scores every run). With
  `resample_items` the records keep each item's score
  (`EvalRecord.items`), so the report resamples the items inside its
  intervals (report/resample.py, `statistics.hierarchical_ci`); the
  "seeds_only" interval is the same report with that turned off.

The truth of an estimand is the report's own function on the noiseless
frontiers (one noiseless seed): the population value, over pretraining
seeds, finetuning seeds and items. The conditional truth is the same on
the frontiers as every seed of a study shares them (shifted by its one
pretraining seed, scored in expectation on its one item set): what a study
with those fixed can estimate at best.

Run: .venv/bin/python bench/coverage.py --studies 200
Writes bench/results/coverage.json and coverage.md (`--out`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import sys
import time

import numpy as np

from optconsist_jax.evaluate import results
from optconsist_jax.report import consistency
from optconsist_jax.report import matrix as matrix_lib
from optconsist_jax.report import resample
from optconsist_jax.report import statistics as stats

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
# pylint: disable-next=g-import-not-at-top,wrong-import-position
from coverage_tables import DEFAULT, SEEDS_ONLY, Tally, markdown  # noqa: E402
from machine_load import cpu_model  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parent.parent
BASES = ("adamw", "muon", "lion")
# Method -> (retention offset c, curvature k, highest learning hi).
SHAPES = {"adamw": (0.0, 0.40, 0.60), "muon": (0.015, 0.45, 0.65),
          "lion": (-0.01, 0.35, 0.55), "lora": (0.02, 0.30, 0.45)}
# Without `column`: every method the same (c, k, hi).
FLAT_SHAPE = (0.0, 0.40, 0.60)
BASE_RETENTION = {"adamw": 0.62, "muon": 0.60, "lion": 0.63}
RATES = (0.35, 0.7, 1.4)
EPOCHS = 4
FLOOR = 0.25
TOL = 1e-9
# The report's own interval (`statistics.DEFAULT_METHOD`), as it is called.
# DEFAULT (the report's own interval, as it is called) and SEEDS_ONLY (the
# same with its item resampling off, `items="off"`): coverage_tables.
# Item resamples per study (the report's default is resample.N_REPLICATES;
# fewer keep the benchmark's minutes down: the variance they estimate has
# a relative SE of sqrt(2 / 100) = 14%).
N_REPLICATES = 100


@dataclasses.dataclass(frozen=True)
class Design:
  """One kind of simulated study (module docstring)."""

  seeds: int = 3
  bases: tuple[str, ...] = BASES
  lora: bool = True
  delta: float = 0.0
  column: bool = True
  pretrain: str = "per_seed"
  items: str = "per_seed"
  learn_items: int = 400
  retain_items: int = 1000
  sd_pretrain: float = 0.02
  sd_pretrain_learning: float = 0.01
  sd_pretrain_method: float = 0.006
  sd_run: float = 0.008
  sd_run_learning: float = 0.01
  item_cell: float = 0.05
  item_check: float = 0.15
  overshoot: float = 0.015
  resample_items: bool = False
  record_base: bool = False

  def methods(self) -> tuple[str, ...]:
    return self.bases + (("lora",) if self.lora else ())

  def pretraining_seed(self, s: int) -> int:
    return {"per_seed": s, "one": 0, "nested2": s // 2}[self.pretrain]


def true_points(design: Design, base: str, method: str) -> np.ndarray:
  """Noiseless (learning, retention) of every checkpoint, shape (C, 2)."""
  c, k, hi = SHAPES[method]
  if not design.column:
    c, k, hi = FLAT_SHAPE
  top = 1 - math.exp(-RATES[-1] * EPOCHS)
  out = []
  for j, rate in enumerate(RATES):
    for e in range(1, EPOCHS + 1):
      l = FLOOR + (hi - FLOOR) * (1 - math.exp(-rate * e)) / top
      r = (BASE_RETENTION[base] + c + design.delta * (method == base)
           - k * l * l - design.overshoot * (j == len(RATES) - 1))
      out.append((l, r))
  return np.array(out, np.float64)


def records_of(points: dict[tuple[str, str, int], np.ndarray],
               checkpoints: dict[str, int], item_scores=None,
               pretraining_seed=None) -> list[results.EvalRecord]:
  """EvalRecords of {(base, method, seed): (C, 2) points}, plus base rows.

  item_scores: {(base, method, seed): (learning (C, K), retention (C, K'))
  0 / 1 per item}, kept in the records' `items` (None: none kept).
  pretraining_seed: finetuning seed -> the pretraining seed it started
  from, recorded in `base_id` (None: not recorded, as in older results).
  """
  out = []
  for (base, method, seed), pts in points.items():
    for i, (learning, retention) in enumerate(pts):
      j, e = divmod(i, EPOCHS)
      items = {}
      if item_scores is not None:
        learn_CK, keep_CK = item_scores[(base, method, seed)]
        items = {"learning": {"sum": learn_CK[i].astype(float).tolist()},
                 "retention": {"sum": keep_CK[i].astype(float).tolist()}}
      out.append(results.EvalRecord(
          step=100 * (e + 1), epoch=float(e + 1), method=method, base=base,
          lr=1e-5 * 2 ** j, learning=float(learning),
          retention=float(retention), run=f"{base}_{method}_lr{j}_s{seed}",
          seed=seed, items=items,
          base_id={} if pretraining_seed is None else {
              "checkpoint": f"bases/{base}_p{pretraining_seed(seed)}",
              "seed": pretraining_seed(seed)}))
  for base, n in checkpoints.items():
    for p in range(n):
      out.append(results.EvalRecord(
          step=0, epoch=0.0, method="base", base=base, lr=0.0, learning=0.0,
          retention=BASE_RETENTION[base], is_base=True, run=f"{base}_base",
          checkpoint=f"bases/{base}_p{p}"))
  return out


@dataclasses.dataclass(frozen=True)
class Truth:
  """An estimand's values without noise (module docstring)."""

  gap_area: dict[tuple[str, str], float]
  gap_level: dict[tuple[str, str], float]
  interaction: dict[tuple[str, str], float]
  interaction_level: dict[tuple[str, str], float]


def truth_of(design: Design, transform=None) -> Truth:
  """The report's estimands on one noiseless seed; `transform(cell, (C, 2)
  points)` maps each cell's noiseless points first (None: the population
  truth)."""
  pts = {}
  for b in design.bases:
    for m in design.methods():
      pts[(b, m, 0)] = true_points(design, b, m)
      if transform is not None:
        pts[(b, m, 0)] = transform((b, m), pts[(b, m, 0)])
  records = records_of(pts, {})
  summary = consistency.consistency_summary(records)
  inter = consistency.interactions(records)
  gaps = [s for s in summary if s.role != "matched"]
  return Truth({(s.base, s.method): s.gap_area.mean for s in gaps},
               {(s.base, s.method): s.gap_vs_matched.mean for s in gaps},
               {(r.i, r.j): r.by_area.mean for r in inter},
               {(r.i, r.j): r.at_level.mean for r in inter})


def item_set(design: Design, rng: np.random.Generator, n: int) -> dict:
  """One sample of n items: difficulty z, affinity g per (base, method)."""
  cells = [(b, m) for b in design.bases for m in design.methods()]
  return {"z": rng.uniform(0, 1, n),
          "g": {c: rng.uniform(-design.item_cell, design.item_cell, n)
                for c in cells}}


def scores(design: Design, mean_C: np.ndarray, items: dict, cell,
           rng: np.random.Generator) -> np.ndarray:
  """Fraction of the items each checkpoint gets right (module docstring)."""
  return item_correct(design, mean_C, items, cell, rng).mean(axis=1)


def item_correct(design: Design, mean_C: np.ndarray, items: dict, cell,
                 rng: np.random.Generator) -> np.ndarray:
  """Whether each checkpoint gets each item right, (C, K) bool."""
  h = design.item_check
  t_CK = (mean_C[:, None] + items["g"][cell][None, :]
          + rng.uniform(-h, h, (len(mean_C), len(items["z"]))))
  if t_CK.min() < 0 or t_CK.max() > 1:
    raise ValueError(f"coverage: an item threshold is out of [0, 1] in"
                     f" {cell} ({t_CK.min():.3f}..{t_CK.max():.3f}): the"
                     " expected score would not be the mean")
  return items["z"][None, :] < t_CK


def expected_on(design: Design, mean_C: np.ndarray, items: dict,
                cell) -> np.ndarray:
  """Expected fraction right on this item set (over e only), per mean."""
  h = design.item_check
  t_CK = mean_C[:, None] + items["g"][cell][None, :] - items["z"][None, :]
  if h == 0:
    return (t_CK > 0).mean(axis=1)
  return np.clip((t_CK + h) / (2 * h), 0, 1).mean(axis=1)


def simulate(design: Design, rng: np.random.Generator
             ) -> tuple[list[results.EvalRecord], Truth, Truth]:
  """One study: (records, population truth, conditional truth)."""
  n_pre = 1 + max(design.pretraining_seed(s) for s in range(design.seeds))
  methods = design.methods()
  pre = {(b, p): (rng.normal(0, design.sd_pretrain_learning),
                  rng.normal(0, design.sd_pretrain),
                  {m: rng.normal(0, design.sd_pretrain_method)
                   for m in methods})
         for b in design.bases for p in range(n_pre)}
  shared = design.items == "shared"
  if design.items not in ("per_seed", "shared"):
    raise ValueError(f"coverage: items={design.items!r}")
  item_sets = {}
  for s in range(1 if shared else design.seeds):
    item_sets[s] = (item_set(design, rng, design.learn_items),
                    item_set(design, rng, design.retain_items))
  points, per_item = {}, {}
  for b in design.bases:
    for m in methods:
      true_C2 = true_points(design, b, m)
      for s in range(design.seeds):
        p = design.pretraining_seed(s)
        dl = pre[(b, p)][0] + rng.normal(0, design.sd_run_learning)
        dr = (pre[(b, p)][1] + pre[(b, p)][2][m]
              + rng.normal(0, design.sd_run))
        learn_items, retain_items = item_sets[0 if shared else s]
        per_item[(b, m, s)] = (
            item_correct(design, true_C2[:, 0] + dl, learn_items, (b, m),
                         rng),
            item_correct(design, true_C2[:, 1] + dr, retain_items, (b, m),
                         rng))
        points[(b, m, s)] = np.stack([x.mean(axis=1)
                                      for x in per_item[(b, m, s)]], axis=1)
  records = records_of(points, {b: n_pre for b in design.bases},
                       per_item if design.resample_items else None,
                       design.pretraining_seed if design.record_base
                       else None)

  def conditional(cell, pts_C2):
    """What every seed shares: the one pretraining seed, the one item set."""
    b, m = cell
    if n_pre == 1 and design.seeds > 1:
      pts_C2 = pts_C2 + np.array([pre[(b, 0)][0],
                                  pre[(b, 0)][1] + pre[(b, 0)][2][m]])
    if shared:
      li, ri = item_sets[0]
      pts_C2 = np.stack([expected_on(design, pts_C2[:, 0], li, cell),
                         expected_on(design, pts_C2[:, 1], ri, cell)], axis=1)
    return pts_C2

  return records, truth_of(design), truth_of(design, conditional)


def covers(iv: stats.Interval, truth: float) -> bool:
  return iv.n > 0 and iv.lo - TOL <= truth <= iv.hi + TOL


def is_zero(x: float) -> bool:
  return abs(x) < TOL


def resolved(verdict: str) -> bool:
  return verdict in (stats.MATCHED_LESS, stats.MATCHED_MORE)


def tally_study(records, truth: Truth, cond: Truth, tally: Tally,
                method: str = "default", matrix: bool = True) -> None:
  """Adds one study's hits to `tally`; `method` "default" is the report's
  (no `method=` argument; items resampled when the records keep them),
  SEEDS_ONLY the same without the items, else the `statistics.mean_ci`
  method."""
  ci = {} if method in (DEFAULT, SEEDS_ONLY) else {"method": method}
  items = "off"
  if method == DEFAULT and any(r.items for r in records):
    # One set of resamples for the three tables, as report/tables.py does.
    items = resample.item_resamples(records, n_replicates=N_REPLICATES)
  ci["items"] = items
  summary = {(s.base, s.method): s
             for s in consistency.consistency_summary(records, **ci)}
  inter = {(r.i, r.j): r for r in consistency.interactions(records, **ci)}
  for name, rows, area, level, t_area, t_level, c_area in (
      ("gap", summary, "gap_area", "gap_vs_matched", truth.gap_area,
       truth.gap_level, cond.gap_area),
      ("interaction", inter, "by_area", "at_level", truth.interaction,
       truth.interaction_level, cond.interaction)):
    keys = sorted(t_area)
    ivs = [getattr(rows[k], area) for k in keys]
    tally.add(f"{name}_area_covered", sum(covers(iv, t_area[k])
                                          for iv, k in zip(ivs, keys)),
              len(keys))
    tally.add(f"{name}_area_covered_conditional",
              sum(covers(iv, c_area[k]) for iv, k in zip(ivs, keys)),
              len(keys))
    tally.add(f"{name}_level_covered",
              sum(covers(getattr(rows[k], level), t_level[k]) for k in keys),
              len(keys))
    null = [k for k in keys if is_zero(t_area[k])]
    if null:
      tally.add(f"{name}_null_resolved_holm_any",
                any(resolved(rows[k].verdict) for k in null), 1)
      tally.add(f"{name}_null_resolved_holm",
                sum(resolved(rows[k].verdict) for k in null), len(null))
      tally.add(f"{name}_null_p_below_0.05",
                sum(rows[k].p_value < 0.05 for k in null), len(null))
      tally.add(f"{name}_null_interval_excludes_0",
                sum(getattr(rows[k], area).sign() != 0 for k in null),
                len(null))
    real = [k for k in keys if not is_zero(t_area[k])]
    if real:
      right = {1: stats.MATCHED_LESS, -1: stats.MATCHED_MORE}
      tally.add(f"{name}_nonzero_resolved_right_sign",
                sum(rows[k].verdict == right[int(np.sign(t_area[k]))]
                    for k in real), len(real))
      tally.add(f"{name}_nonzero_resolved_wrong_sign",
                sum(rows[k].verdict == right[-int(np.sign(t_area[k]))]
                    for k in real), len(real))
  if matrix:
    wrong = 0
    for row in matrix_lib.consistency_matrix(records, **ci):
      t = [truth.gap_area[(row.base, m)] for m in row.gaps_area]
      wrong += ((row.diagonal_best == "yes" and not all(x > TOL for x in t))
                or (row.diagonal_best == "no"
                    and not any(x < -TOL for x in t)))
    tally.add("matrix_diagonal_best_wrong_any", wrong > 0, 1)


# Scenario -> (design, interval methods, what it shows).
SCENARIOS = {
    "null": (Design(column=False), (DEFAULT,),
             "every per-base gap and interaction is 0"),
    "column": (Design(), (DEFAULT, "percentile"),
               "methods differ on every base alike (per-base gaps != 0),"
               " no interaction"),
    "planted": (Design(delta=0.05), (DEFAULT,),
                "matched bonus 0.05 on every base: each I_ij = 0.10"),
    "items_shared": (Design(items="shared", item_cell=0.15,
                            item_check=0.05), (DEFAULT,),
                     "one item set for every seed, strong item x cell"
                     " affinity"),
    "items_per_seed": (Design(item_cell=0.15, item_check=0.05),
                       (DEFAULT,),
                       "the same affinity, each seed its own item sample"),
    "items_shared_mild": (Design(items="shared"), (DEFAULT,),
                          "one item set for every seed, the default (mild)"
                          " affinity"),
    "items_shared_resampled": (
        Design(items="shared", item_cell=0.15, item_check=0.05,
               resample_items=True), (DEFAULT, SEEDS_ONLY),
        "items_shared with per-item scores in the records: the report"
        " resamples the items (default) or not (seeds_only)"),
    "one_pretraining_seed": (Design(pretrain="one"), (DEFAULT,),
                             "every finetuning seed from one pretraining"
                             " seed"),
    "nested2": (Design(seeds=6, pretrain="nested2"), (DEFAULT,),
                "6 finetuning seeds, 2 per pretraining seed, analysed as 6"),
    "nested2_recorded": (
        Design(seeds=6, pretrain="nested2", record_base=True), (DEFAULT,),
        "nested2 with each row's base recorded (EvalRecord.base_id): the"
        " report averages per pretraining seed (3 units)"),
}


def run_scenario(design: Design, methods, studies: int, rng_seed: int,
                 progress=None) -> dict[str, dict]:
  """Tallies of `studies` simulated studies, per interval method."""
  tallies = {m: Tally() for m in methods}
  for i in range(studies):
    rng = np.random.default_rng([rng_seed, i])
    records, truth, cond = simulate(design, rng)
    for m in methods:
      tally_study(records, truth, cond, tallies[m], method=m,
                  matrix=m == DEFAULT)
    if progress:
      progress(i + 1)
  return {m: t.table() for m, t in tallies.items()}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--studies", type=int, default=200)
  parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                      help=f"comma-separated, of {list(SCENARIOS)}")
  parser.add_argument("--rng_seed", type=int, default=0)
  parser.add_argument("--out", default=str(REPO / "bench" / "results"))
  args = parser.parse_args(argv)
  names = [n for n in args.scenarios.split(",") if n]
  unknown = [n for n in names if n not in SCENARIOS]
  if unknown or args.studies < 1:
    sys.exit(f"coverage: unknown scenarios {unknown} (known:"
             f" {list(SCENARIOS)}) or --studies {args.studies} < 1")
  command = ("python bench/coverage.py " + " ".join(
      argv if argv is not None else sys.argv[1:])).strip()
  out = {"command": command, "studies": args.studies,
         "default_method": stats.DEFAULT_METHOD,
         "rng_seed": args.rng_seed,
         "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(),
                     "loadavg_1m_start": os.getloadavg()[0]},
         "scenarios": {}}
  t0 = time.perf_counter()
  for name in names:
    design, methods, about = SCENARIOS[name]
    t1 = time.perf_counter()

    def progress(i, name=name):
      if i % max(1, args.studies // 10) == 0 or i == args.studies:
        print(f"\r{name}: {i}/{args.studies} studies", end="", flush=True)

    metrics = run_scenario(design, methods, args.studies, args.rng_seed,
                           progress)
    print(f" ({time.perf_counter() - t1:.1f} s)")
    out["scenarios"][name] = {"about": about,
                              "design": dataclasses.asdict(design),
                              "seconds": time.perf_counter() - t1,
                              "metrics": metrics}
  out["seconds"] = time.perf_counter() - t0
  out["machine"]["loadavg_1m_end"] = os.getloadavg()[0]
  os.makedirs(args.out, exist_ok=True)
  path = os.path.join(args.out, "coverage.json")
  md_path = os.path.join(args.out, "coverage.md")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
  with open(md_path, "w") as f:
    f.write(markdown(out))
  print(markdown(out))
  print(f"wrote {path} and {md_path} ({out['seconds']:.0f} s)")


if __name__ == "__main__":
  main()
