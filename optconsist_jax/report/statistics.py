"""Intervals over seeds, and the verdict they support.

The unit of replication is the seed: one number per seed (e.g. a method's
retention at a learning level, or the gap between two methods on the same
seed). Three intervals for a mean, all deterministic:

- "t" (the default, `DEFAULT_METHOD`): Student's t interval, mean +- t_(n-1)
  * sd / sqrt(n).
- "percentile" bootstrap (Efron & Tibshirani 1993, "An Introduction to the
  Bootstrap", ch. 13): quantiles of the resampled mean.
- "studentized" bootstrap (bootstrap-t, ibid. ch. 12): quantiles of
  t* = (mean* - mean) / se* give [mean - t*_hi se, mean - t*_lo se].

Resamples come from `np.random.default_rng(rng_seed)`, or, up to 6 seeds,
from the exact enumeration of all n**n resamples. Why "t" is the default:
at the 3-5 seeds this project can afford the bootstraps are miscalibrated.
The percentile interval cannot be wider than the range of the seeds, so it
resolves a null effect far too often: on normal samples (300-400 trials
each) 33% of the time with 3 seeds, 16-18% with 4-6, 9-10% with 8-10,
against 5-7% for "t". The studentized one is unbounded with 3 seeds (a
ninth of the resamples repeat one seed, se* = 0) and erratic with 4
(resamples of three copies of one seed make t* huge): it missed an effect
25 times its noise on 4 seeds. The bootstraps stay for descriptive bands,
other statistics than the mean, and larger seed counts.

Sign convention (the one place it is stated): a gap is
`retention(matched) - retention(other)` at equal learning, retention being
higher-is-better, so a gap > 0 means matched finetuning forgot less. A
verdict is resolved only when the whole interval is on one side of zero and
at least `MIN_SEEDS` seeds entered it.

A table that tests several comparisons resolves them by p-values instead:
the two-sided one-sample t test of the per-seed differences (`t_test_p`,
the t distribution of the "t" interval), adjusted by Holm's step-down
procedure over the table's family of comparisons (`holm`; Holm 1979, "A
Simple Sequentially Rejective Multiple Test Procedure", Scand. J. Statist.
6:65-70), which controls the family-wise error rate at 1 - level. The
intervals shown stay the unadjusted ones.

With per-item eval scores (documents for retention, problems for learning;
report/resample.py) the eval sets' own sampling error enters too
(`hierarchical_ci`): the same items score every run, so their error is
shared by all seeds and the spread over seeds cannot show it. The item
resamples (crossed with the seeds: one resample of the documents and of
the problems rescoring every run) give its variance v_items; the seeds give
s^2 / n as before; the interval is mean +- t_df sqrt(s^2 / n + v_items),
df by Welch-Satterthwaite (Satterthwaite 1946, "An Approximate Distribution
of Estimates of Variance Components", Biometrics Bulletin 2:110-114), so it
is the seed-only t interval when items add nothing and close to a normal
one when they dominate. (The seed spread already holds the seed x item
noise, which v_items counts again divided by n: slightly conservative.)
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
import dataclasses
import itertools
import math

import numpy as np

LEVEL = 0.95
N_BOOT = 10_000
METHODS = ("t", "percentile", "studentized")
DEFAULT_METHOD = "t"
# Fewer seeds never resolve a verdict.
MIN_SEEDS = 3
# Resample sets up to this size are enumerated exactly (n**n <= this).
MAX_EXACT = 100_000
# |t*| at or above this is an unbounded end.
_T_INF = 1e300
# Standard errors and differences below this fraction of the sample's SE
# (or, for the SE itself, of the statistic) are rounding, i.e. zero.
_REL_EPS = 1e-9

MATCHED_LESS = "matched forgets less"
MATCHED_MORE = "matched forgets more"
UNRESOLVED = "no difference resolved"


@dataclasses.dataclass(frozen=True)
class Interval:
  """A statistic of a sample with an interval around it.

  The interval is the one `mean_ci` (or the bootstrap functions) computed:
  Student's t by default (`DEFAULT_METHOD`), else a bootstrap.

  Attributes:
    mean: the statistic on the sample itself (the mean by default).
    lo, hi: the interval's ends.
    n: how many samples (seeds) entered it.
    level: its coverage (0.95: a 95% interval).
  """

  mean: float
  lo: float
  hi: float
  n: int
  level: float = LEVEL

  def sign(self, min_n: int = MIN_SEEDS) -> int:
    """+1 / -1 when the interval lies above / below zero, else 0."""
    if self.n < min_n:
      return 0
    return 1 if self.lo > 0 else -1 if self.hi < 0 else 0  # False for NaN

  def format(self, digits: int = 3, signed: bool = False) -> str:
    """E.g. "+0.120 [+0.050, +0.190]"; "n/a" for an empty interval."""
    if self.n == 0 or not math.isfinite(self.mean):
      return "n/a"
    f = f"{{:{'+' if signed else ''}.{digits}f}}"
    return (f"{f.format(self.mean)} [{f.format(self.lo)},"
            f" {f.format(self.hi)}]")

  def to_dict(self) -> dict[str, float]:
    return dataclasses.asdict(self)


EMPTY = Interval(math.nan, math.nan, math.nan, 0)


def resample_indices(n: int, *, n_boot: int = N_BOOT, rng_seed: int = 0,
                     exact: bool | None = None) -> np.ndarray:
  """Indices of the bootstrap resamples, shape (resamples, n).

  Args:
    n: sample size (> 0).
    n_boot: random resamples when not exact.
    rng_seed: seed of `np.random.default_rng`.
    exact: enumerate all n**n resamples (each once, equally likely under
      the bootstrap); None: exactly when n**n <= MAX_EXACT (n <= 6).
  """
  if n < 1:
    raise ValueError("bootstrap: empty sample")
  if exact is None:
    exact = n ** n <= MAX_EXACT
  if exact:
    if n ** n > 10 * MAX_EXACT:
      raise ValueError(f"bootstrap: {n}**{n} resamples are too many to"
                       " enumerate; use exact=False")
    return np.array(list(itertools.product(range(n), repeat=n)),
                    dtype=np.int64).reshape(-1, n)
  if n_boot < 1:
    raise ValueError(f"bootstrap: n_boot={n_boot} must be >= 1")
  return np.random.default_rng(rng_seed).integers(0, n, size=(n_boot, n))


def percentile_interval(point: float, stats: np.ndarray, n: int,
                        level: float = LEVEL) -> Interval:
  """Interval(point, q_(1-level)/2, q_(1+level)/2) of the resampled stats."""
  _check_level(level)
  lo, hi = np.quantile(np.asarray(stats, np.float64),
                       [(1 - level) / 2, (1 + level) / 2])
  return Interval(float(point), float(lo), float(hi), n, level)


def studentized_interval(point: float, se: float, stats: np.ndarray,
                         ses: np.ndarray, n: int,
                         level: float = LEVEL) -> Interval:
  """Bootstrap-t interval from the resampled statistics and their SEs.

  Args:
    point, se: the statistic on the sample and its standard error.
    stats, ses: the same on each resample.
    n: sample size.
    level: coverage.
  """
  _check_level(level)
  if n < 2:
    return Interval(float(point), -math.inf, math.inf, n, level)
  if se <= _REL_EPS * abs(point):  # every seed gave the same number
    return Interval(float(point), float(point), float(point), n, level)
  diff = np.asarray(stats, np.float64) - point
  # A resample of one repeated seed has se* = 0 up to rounding.
  ses = np.where(np.asarray(ses, np.float64) > _REL_EPS * se, ses, 0.0)
  diff = np.where(np.abs(diff) > _REL_EPS * se, diff, 0.0)
  with np.errstate(divide="ignore", invalid="ignore"):
    t = np.where(ses > 0, diff / np.where(ses > 0, ses, 1.0),
                 np.where(diff == 0, 0.0, np.sign(diff) * np.inf))
  t = np.sort(np.clip(t, -_T_INF, _T_INF))
  p_lo, p_hi = (1 - level) / 2, (1 + level) / 2
  q_lo, q_hi = np.quantile(t, [p_lo, p_hi])
  # An end is unbounded when its quantile touches an infinite t*.
  last = len(t) - 1
  lo = (-math.inf if t[math.ceil(p_hi * last)] >= _T_INF
        else point - q_hi * se)
  hi = (math.inf if t[math.floor(p_lo * last)] <= -_T_INF
        else point - q_lo * se)
  return Interval(float(point), float(lo), float(hi), n, level)


def _check_level(level: float) -> None:
  if not 0 < level < 1:
    raise ValueError(f"bootstrap: level={level} must be in (0, 1)")


def _se(x: np.ndarray, axis: int = -1) -> np.ndarray:
  """Standard error of the mean along `axis` (NaN for one sample)."""
  n = x.shape[axis]
  if n < 2:
    return np.full(np.delete(x.shape, axis), np.nan)
  return np.std(x, axis=axis, ddof=1) / math.sqrt(n)


def _finite(samples: Sequence[float] | np.ndarray, what: str) -> np.ndarray:
  x = np.asarray(samples, dtype=np.float64)
  if x.ndim < 1 or x.shape[0] == 0:
    raise ValueError(f"bootstrap: {what} is empty")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"bootstrap: {what} has non-finite values: {x.tolist()}")
  return x


def t_quantile(p: float, df: float) -> float:
  """Quantile p of Student's t with df degrees of freedom (`scipy.stats.t`)."""
  if not df >= 1 or not 0 < p < 1:
    raise ValueError(f"t_quantile: p={p}, df={df}")
  # deferred: scipy.stats takes ~0.5 s to import; only t intervals need it.
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  return float(scipy_stats.t.ppf(p, df))


def t_ci(samples: Sequence[float] | np.ndarray, *,
         level: float = LEVEL) -> Interval:
  """Student's t interval of the mean (unbounded for one sample)."""
  x = _finite(samples, "sample")
  _check_level(level)
  n, mean = len(x), float(np.mean(x))
  se = float(_se(x))
  if n < 2:
    return Interval(mean, -math.inf, math.inf, n, level)
  half = t_quantile((1 + level) / 2, n - 1) * se
  return Interval(mean, mean - half, mean + half, n, level)


def t_test_p(samples: Sequence[float] | np.ndarray) -> float:
  """Two-sided p of the one-sample t test of mean 0 (NaN below 2 samples).

  t = mean / (sd / sqrt(n)) against Student's t with n - 1 degrees of
  freedom (`scipy.stats.t`); a sample with no spread gives 1 at mean 0,
  else 0.
  """
  x = _finite(samples, "sample")
  n, mean = len(x), float(np.mean(x))
  if n < 2:
    return math.nan
  se = float(_se(x))
  if se <= _REL_EPS * abs(mean) or se == 0.0:
    return 1.0 if mean == 0.0 else 0.0
  # deferred: as in t_quantile.
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  return float(2.0 * scipy_stats.t.sf(abs(mean) / se, n - 1))


def holm(p_values: Sequence[float]) -> list[float]:
  """Holm's (1979) step-down adjusted p-values, in the input order.

  With the m finite p-values sorted, p_(1) <= ... <= p_(m), the adjusted
  p_(k) is max over i <= k of min(1, (m - i + 1) p_(i)); rejecting where it
  is below alpha is Holm's procedure at family-wise level alpha. NaN entries
  (no test) are not in the family and stay NaN.
  """
  p = np.asarray(p_values, np.float64)
  out = np.full(p.shape, np.nan)
  idx = np.flatnonzero(np.isfinite(p))
  order = idx[np.argsort(p[idx], kind="stable")]
  m, running = len(order), 0.0
  for k, i in enumerate(order):
    running = max(running, min(1.0, (m - k) * p[i]))
    out[i] = running
  return out.tolist()


def family_size(p_values: Sequence[float]) -> int:
  """How many comparisons `holm` adjusts over (the finite p-values)."""
  return int(np.isfinite(np.asarray(p_values, np.float64)).sum())


def mean_ci(samples: Sequence[float] | np.ndarray, *,
            method: str = DEFAULT_METHOD, **kw) -> Interval:
  """Interval of the mean by `method` (module docstring).

  Keyword args: `level`, and for the bootstraps `bootstrap_ci`'s.
  """
  if method == "t":
    return t_ci(samples, level=kw.get("level", LEVEL))
  return bootstrap_ci(samples, method=method, **kw)


def bootstrap_ci(samples: Sequence[float] | np.ndarray,
                 statistic: Callable[..., np.ndarray] = np.mean, *,
                 method: str = "percentile", level: float = LEVEL,
                 n_boot: int = N_BOOT, rng_seed: int = 0,
                 exact: bool | None = None) -> Interval:
  """Bootstrap interval of `statistic` over 1-D `samples`.

  Args:
    samples: one finite number per seed.
    statistic: reduces an array along `axis=` (np.mean, np.median, ...);
      the studentized interval is for np.mean only.
    method: "percentile" or "studentized" (module docstring).
    level: coverage of the interval.
    n_boot, rng_seed, exact: the resamples (`resample_indices`).

  Returns:
    Interval(statistic(samples), lo, hi, len(samples), level).
  """
  x = _finite(samples, "sample")
  if x.ndim != 1:
    raise ValueError(f"bootstrap_ci: samples must be 1-D, got {x.shape}")
  if method not in METHODS[1:]:
    raise ValueError(f"bootstrap_ci: method={method!r}; expected one of"
                     f" {METHODS[1:]}")
  if method == "studentized" and statistic is not np.mean:
    raise ValueError("bootstrap_ci: the studentized interval is for the"
                     " mean; use method='percentile'")
  idx = resample_indices(len(x), n_boot=n_boot, rng_seed=rng_seed,
                         exact=exact)
  if method == "percentile":
    return percentile_interval(statistic(x), statistic(x[idx], axis=1),
                               len(x), level)
  resampled = x[idx]
  return studentized_interval(np.mean(x), float(_se(x)),
                              resampled.mean(axis=1), _se(resampled),
                              len(x), level)


def paired_gap_ci(a_by_seed: Mapping[int, float],
                  b_by_seed: Mapping[int, float], **kw) -> Interval:
  """Interval of mean(a - b) over the seeds both have (paired bootstrap).

  Seeds present in only one of the two are left out (`Interval.n` counts
  the pairs); no common seed gives `EMPTY`. Keyword args: `mean_ci`'s.
  """
  seeds = sorted(set(a_by_seed) & set(b_by_seed))
  if not seeds:
    return EMPTY
  return mean_ci([a_by_seed[s] - b_by_seed[s] for s in seeds], **kw)


def resolved_sign(gap: Interval, min_n: int = MIN_SEEDS,
                  p_adjusted: float | None = None) -> int:
  """+1 / -1 for a gap resolved above / below 0, else 0.

  Without `p_adjusted` by the interval (`Interval.sign`); with it (e.g.
  from `holm`), by p_adjusted < 1 - gap.level, the sign being the mean's.
  Either way at least `min_n` seeds.
  """
  if p_adjusted is None:
    return gap.sign(min_n)
  if gap.n < min_n or not p_adjusted < 1 - gap.level:  # False for NaN
    return 0
  return 1 if gap.mean > 0 else -1 if gap.mean < 0 else 0


def describe(gap: Interval, above: str, below: str,
             min_n: int = MIN_SEEDS, p_adjusted: float | None = None) -> str:
  """`above` / `below` for a gap resolved above / below 0 (`resolved_sign`),
  else UNRESOLVED."""
  return {1: above, -1: below, 0: UNRESOLVED}[
      resolved_sign(gap, min_n, p_adjusted)]


def verdict(gap: Interval, min_n: int = MIN_SEEDS,
            p_adjusted: float | None = None) -> str:
  """The words for a matched-minus-other retention gap (module docstring)."""
  return describe(gap, MATCHED_LESS, MATCHED_MORE, min_n, p_adjusted)


def intervals_by(rows: Sequence[Mapping[str, object]], keys: Sequence[str],
                 value: str, *, seed_key: str = "seed",
                 **kw) -> dict[tuple, Interval]:
  """Interval of `value` over seeds for each group of rows sharing `keys`.

  E.g. memorization rows at their last epoch, keys=("optimizer",),
  value="memorization_answer_logprob". A row without `seed_key` counts as
  seed 0; two rows of one group with the same seed are an error (the unit
  of the interval is the seed). Keyword args: `mean_ci`'s.
  """
  groups: dict[tuple, dict[int, float]] = {}
  for r in rows:
    key = tuple(r[k] for k in keys)
    seed = int(r.get(seed_key, 0))
    by_seed = groups.setdefault(key, {})
    if seed in by_seed:
      raise ValueError(f"intervals_by: two rows for {dict(zip(keys, key))}"
                       f" with {seed_key}={seed}")
    by_seed[seed] = float(r[value])
  return {k: mean_ci([v[s] for s in sorted(v)], **kw)
          for k, v in sorted(groups.items())}


def compare_groups(rows: Sequence[Mapping[str, object]], key: str, value: str,
                   a: str, b: str, *, seed_key: str = "seed",
                   **kw) -> tuple[Interval, Interval, Interval]:
  """(a's interval, b's interval, interval of a - b paired by seed).

  E.g. the memorization experiment at its last epoch: key="optimizer",
  value="memorization_answer_logprob", a="muon", b="adamw"; then
  `describe(gap, "muon memorizes more", "muon memorizes less")`.
  Keyword args: `mean_ci`'s.
  """
  by = {g: {} for g in (a, b)}
  for r in rows:
    if r[key] in by:
      seed = int(r.get(seed_key, 0))
      if seed in by[r[key]]:
        raise ValueError(f"compare_groups: two rows for {key}={r[key]!r}"
                         f" with {seed_key}={seed}")
      by[r[key]][seed] = float(r[value])
  for g in (a, b):
    if not by[g]:
      raise ValueError(f"compare_groups: no rows with {key}={g!r}")
  ivs = [mean_ci([by[g][s] for s in sorted(by[g])], **kw) for g in (a, b)]
  return ivs[0], ivs[1], paired_gap_ci(by[a], by[b], **kw)


def hierarchical_ci(samples: Sequence[float] | np.ndarray,
                    replicate_means: Sequence[float] | np.ndarray, *,
                    level: float = LEVEL) -> tuple[Interval, float]:
  """(interval, two-sided p) of the mean over seeds, item error included.

  Args:
    samples: one value per seed (each scored on the full eval sets).
    replicate_means: the mean over the same seeds recomputed on each
      resample of the eval items (report/resample.py), >= 2 of them.
    level: coverage.

  Returns:
    The interval mean +- t_df sqrt(s^2 / n + v_items) and the p of
    mean / that SE against t_df (module docstring); n = the seeds.
  """
  x = _finite(samples, "sample")
  reps = _finite(replicate_means, "item replicates")
  _check_level(level)
  if len(reps) < 2:
    raise ValueError("hierarchical_ci: need >= 2 item replicates")
  n, mean = len(x), float(np.mean(x))
  if n < 2:
    return Interval(mean, -math.inf, math.inf, n, level), math.nan
  a = float(np.var(x, ddof=1)) / n
  b = float(np.var(reps, ddof=1))
  if a + b == 0.0 or math.sqrt(a + b) <= _REL_EPS * abs(mean):
    return (Interval(mean, mean, mean, n, level),
            1.0 if mean == 0.0 else 0.0)
  df = (a + b) ** 2 / (a * a / (n - 1) + b * b / (len(reps) - 1))
  se = math.sqrt(a + b)
  half = t_quantile((1 + level) / 2, df) * se
  # deferred: as in t_quantile.
  from scipy import stats as scipy_stats  # pylint: disable=g-import-not-at-top
  p = float(2.0 * scipy_stats.t.sf(abs(mean) / se, df))
  return Interval(mean, mean - half, mean + half, n, level), p
