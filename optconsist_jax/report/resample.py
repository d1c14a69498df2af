"""The eval items resampled, and what a table's intervals cover.

A results row's learning and retention are means over eval items (problems,
held-out documents, multiple-choice questions of our scorer or of an
lm-evaluation-harness task); `EvalRecord.items` keeps each item's score
(evaluate/results.py). One resample draws the items with replacement
(Efron & Tibshirani 1993, "An Introduction to the Bootstrap", ch. 6) and
rescores every row with the same draw: every run of a study is scored on
the same eval sets, so the draw is crossed with the seeds, not nested in
them. The report recomputes its frontiers and estimands on each of
`N_REPLICATES` draws; the spread of an estimand's mean over seeds across
draws is the item part of its variance (`statistics.hierarchical_ci`).

A row's score is sum(w_k s_k) / sum(w_k c_k) over items k drawn w_k times
(s = the item's sum, c its count: tokens for a loss, 1 for an accuracy),
so a resampled LM loss stays token-weighted as the full one is, and mc/mean
(the mean of benchmark accuracies; item k of benchmark b counts L / n_b,
evaluate/suite.py `mc_mean_items`) keeps each benchmark's weight. Its
questions are drawn from all benchmarks together, not within each, which
adds the spread between the benchmarks' accuracies to its variance
(sum_b [v_b + (p_b - mean)^2] / (B^2 n_b) instead of sum_b v_b / (B^2 n_b)):
wider, never narrower.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses

import numpy as np

from optconsist_jax.evaluate import results

N_REPLICATES = 200
# Fewer valid replicates than this (an estimand undefined on most draws):
# the interval falls back to the seeds alone.
MIN_REPLICATES = 20
_ROLE_WORDS = {"learning": "learning items", "retention": "retention items"}


@dataclasses.dataclass(frozen=True)
class ItemResamples:
  """Every row's (learning, retention) on each resample of the eval items.

  Attributes:
    points_BN2: per replicate b and row n (in `records` order), its
      (learning, retention); a role without per-item scores keeps the row's
      headline value on every replicate.
    items: role ("learning", "retention") -> (its metric, items resampled);
      roles that are not resampled are absent.
    missing: role -> why it is not resampled (no per-item scores, ...).
    cache: what the report derives from the resamples once for all its
      tables (report/consistency.py `item_frontiers`); valid for the
      records these resamples were drawn from.
  """

  points_BN2: np.ndarray
  items: dict[str, tuple[str, int]]
  missing: dict[str, str]
  cache: dict = dataclasses.field(default_factory=dict, compare=False,
                                  repr=False)


def role_items(records: Sequence[results.EvalRecord], role: str
               ) -> tuple[np.ndarray, np.ndarray, float, str, int] | str:
  """(sums_KN, counts_KN, sign, metric, K) of a role, or why not.

  Item k's sum and count in row n (`EvalRecord.items` of the role's
  metric, "count" 1 when absent), the metric's sign in the role ("-" in
  front: -1) and its name without it, and the number of items.
  """
  names = {getattr(r, f"{role}_metric") for r in records}
  if len(names) != 1:
    return f"rows disagree on the {role} metric ({sorted(names)})"
  name = names.pop()
  sign, metric = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
  sums, counts = [], []
  for r in records:
    item = r.items.get(metric)
    if item is None:
      return (f"no per-item {metric} scores in some rows (e.g. run {r.run}"
              f" step {r.step}; results written before they were kept)")
    sums.append(item["sum"])
    counts.append(item.get("count") or [1.0] * len(item["sum"]))
  sizes = {len(s) for s in sums}
  if len(sizes) != 1:
    return (f"rows scored {metric} on different numbers of items"
            f" ({sorted(sizes)}): not one eval set")
  k = sizes.pop()
  if k < 2:
    return f"{k} {metric} item"
  return (np.asarray(sums, np.float64).T, np.asarray(counts, np.float64).T,
          sign, metric, k)


def rescore(draws_BK: np.ndarray, sums_KN: np.ndarray,
            counts_KN: np.ndarray) -> np.ndarray:
  """[B, N] every row's sum(w s) / sum(w c) with item k drawn w_bk times."""
  return (draws_BK @ sums_KN) / (draws_BK @ counts_KN)


def item_resamples(records: Sequence[results.EvalRecord], *,
                   n_replicates: int = N_REPLICATES,
                   rng_seed: int = 0) -> ItemResamples:
  """The rows rescored on `n_replicates` resamples of their eval items.

  Each role (learning, retention) is resampled when every row has per-item
  scores of its metric on one eval set (the same item count); the draws of
  the two roles are independent (different item sets).
  """
  rng = np.random.default_rng(rng_seed)
  points_BN2 = np.empty((n_replicates, len(records), 2), np.float64)
  for col, role in enumerate(("learning", "retention")):
    points_BN2[:, :, col] = [getattr(r, role) for r in records]
  # Base rows are no frontier's points: they keep their headline values.
  tuned = [n for n, r in enumerate(records) if not r.is_base]
  items, missing = {}, {}
  for col, role in enumerate(("learning", "retention")):
    found = (role_items([records[n] for n in tuned], role) if tuned
             else "no finetuned rows")
    if isinstance(found, str):
      missing[role] = found
      continue
    sums_KN, counts_KN, sign, metric, k = found
    draws_BK = rng.multinomial(k, np.full(k, 1.0 / k), size=n_replicates)
    points_BN2[:, tuned, col] = sign * rescore(draws_BK, sums_KN, counts_KN)
    items[role] = (metric, k)
  return ItemResamples(points_BN2, items, missing)


def covers_note(records: Sequence[results.EvalRecord],
                resampled: ItemResamples | None, method: str) -> str:
  """The line under a table that says which sources its intervals cover.

  E.g. "Intervals cover: pretraining + finetuning seeds (n = 3; finetuning
  seed s started from pretraining seed s), retention items (200 documents
  of lm_loss/loss, resampled), learning items (256 of math/response_loss,
  resampled)."
  """
  rows = [r for r in records if not r.is_base]
  seeds = sorted({r.seed for r in rows})
  # Which base checkpoint (and pretraining seed) each (base optimizer,
  # finetuning seed) started from (EvalRecord.base_id; older rows do not
  # say).
  starts: dict[tuple[str, int], set] = {}
  for r in rows:
    starts.setdefault((r.base, r.seed), set()).add(
        (r.base_id.get("checkpoint"), r.base_id.get("seed"))
        if r.base_id.get("checkpoint") else None)
  per_base: dict[str, set] = {}
  for (base, _), c in starts.items():
    per_base.setdefault(base, set()).update(c)
  counts = [len(c) for c in per_base.values()]
  if any(None in c for c in starts.values()):
    pretraining = (f"finetuning seeds (n = {len(seeds)}); the pretraining"
                   " seed only if each finetuning seed started from its own"
                   " base (these rows do not record which base they started"
                   " from)")
  elif all(n == len(seeds) for n in counts):
    pretraining = (f"pretraining + finetuning seeds (n = {len(seeds)};"
                   " finetuning seed s started from its own pretraining"
                   " checkpoint)")
  elif all(n >= 2 for n in counts):
    units = len({frozenset((b, c) for (b, s2), cs in starts.items()
                           if s2 == s for c in cs) for s in seeds})
    pretraining = (f"pretraining seeds (n = {units} units: the"
                   f" {len(seeds)} finetuning seeds averaged per pretraining"
                   " checkpoint they started from)")
  else:
    pretraining = (f"finetuning seeds (n = {len(seeds)}); not the"
                   " pretraining seed (base checkpoints per pretraining"
                   " optimizer: " + ", ".join(
                       f"{b}: {len(c)}" for b, c in sorted(per_base.items()))
                   + ")")
  parts = [pretraining]
  hierarchical = method == "t" and resampled is not None
  for role in ("retention", "learning"):
    if hierarchical and role in resampled.items:
      metric, k = resampled.items[role]
      parts.append(f"{_ROLE_WORDS[role]} ({k} of {metric}, resampled)")
    else:
      why = ("the interval method is not t" if not hierarchical else
             resampled.missing.get(role, "not resampled"))
      parts.append(f"not the {_ROLE_WORDS[role]}' sampling error ({why})")
  return ("Intervals cover: " + "; ".join(parts) + ". Cells other than gaps,"
          " areas and interactions cover the seeds only.")
