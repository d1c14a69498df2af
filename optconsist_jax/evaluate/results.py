"""The eval job's results: one `EvalRecord` per evaluated checkpoint.

optconsist_jax.evaluate writes each record as its own object,
W/eval/results/<name>.json (`step_<N>` for a checkpoint, `base_<hash>` for a
base model), in one write; `read_workdir` merges them on read. Object stores
(gs://) have neither an atomic append nor a rename, so one shared file
appended by line could tear a row, or lose one when two eval jobs append at
once; one object per checkpoint cannot tear (a write is all or nothing), and
two jobs that evaluate the same checkpoint write the same name, so a row is
never duplicated. Workdirs written before this layout keep their
W/eval/results.jsonl (one record per line), which is still read.

The report and the consistency statistics read these records. Also the
Pareto frontier of (retention, learning) points, which both use.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
import math
import os
from typing import Any

from absl import logging
import numpy as np

from optconsist_jax import storage

# One object per evaluated checkpoint (`object_name`), under the workdir.
RESULTS_DIR = os.path.join("eval", "results")
# The layout before it: one record per line (still read, never written).
LEGACY_RESULTS_FILE = os.path.join("eval", "results.jsonl")


@dataclasses.dataclass(frozen=True)
class EvalRecord:
  """One evaluated checkpoint: W/eval/results/<name>.json.

  Attributes:
    step: training step of the checkpoint (0 for a base model).
    epoch: epochs completed at that step (fractional between epoch ends).
    method: finetuning method: "adamw", "muon", "lora", ... ("base" for an
      untouched base model).
    base: the base model's pretraining optimizer ("adamw", "muon", ...).
    lr: peak learning rate of the run (0 for a base model).
    learning: headline learning score, higher is better (e.g. GSM8K acc).
    retention: headline retention score, higher is better (e.g. the mean
      multiple-choice accuracy, or minus the held-out LM loss).
    learning_metric: the name of the headline learning metric.
    retention_metric: the name of the headline retention metric.
    metrics: every metric of this evaluation, name -> value.
    run: run name (default: the workdir's name).
    checkpoint: the checkpoint (or Hugging Face folder) evaluated.
    is_base: this is the starting point of the runs, not a finetuned model.
    settings: how the scores were made (e.g. whether contexts started with
      BOS, the lm-evaluation-harness version and tasks).
    seed: the run's seed (`train.seed`); runs that differ only in seed are
      the replicates the report's intervals are over.
    items: per-item scores of the evals, metric name -> {"sum": [...],
      "count": [...]} in eval-set order, the metric being sum(sum) /
      sum(count) ("count" absent: 1 per item), e.g. "lm_loss/loss": summed
      NLL and tokens per held-out document, "math/metamath/acc": 1 / 0 per
      problem (`item_scores`). The report resamples them (report/resample.py).
      Empty in records written before they were kept.
    base_id: which base the run started from (`base_identity`): its
      checkpoint, pretraining seed and peak learning rates; empty in older
      records.
  """

  step: int
  epoch: float
  method: str
  base: str
  lr: float
  learning: float
  retention: float
  learning_metric: str = "learning"
  retention_metric: str = "retention"
  metrics: dict[str, float] = dataclasses.field(default_factory=dict)
  run: str = ""
  checkpoint: str = ""
  is_base: bool = False
  settings: dict[str, Any] = dataclasses.field(default_factory=dict)
  seed: int = 0
  items: dict[str, dict[str, list[float]]] = dataclasses.field(
      default_factory=dict)
  base_id: dict[str, Any] = dataclasses.field(default_factory=dict)

  def to_json(self) -> str:
    return json.dumps(dataclasses.asdict(self), sort_keys=True)


_FIELD_TYPES = {
    "step": (int,), "epoch": (int, float), "method": (str,), "base": (str,),
    "lr": (int, float), "learning": (int, float), "retention": (int, float),
    "learning_metric": (str,), "retention_metric": (str,), "metrics": (dict,),
    "run": (str,), "checkpoint": (str,), "is_base": (bool,),
    "settings": (dict,), "seed": (int,), "items": (dict,), "base_id": (dict,),
}
REQUIRED_FIELDS = tuple(
    f.name for f in dataclasses.fields(EvalRecord)
    if f.default is dataclasses.MISSING
    and f.default_factory is dataclasses.MISSING)


class EvalFileError(ValueError):
  """A results file (or one of its lines) does not follow the schema."""


def parse_record(d: Any, where: str) -> EvalRecord:
  """Validates one decoded JSON line; `where` is "file:line" for errors."""
  if not isinstance(d, dict):
    raise EvalFileError(f"{where}: expected a JSON object, got"
                        f" {type(d).__name__}")
  missing = [k for k in REQUIRED_FIELDS if k not in d]
  if missing:
    raise EvalFileError(f"{where}: missing fields {missing} (required:"
                        f" {list(REQUIRED_FIELDS)})")
  unknown = sorted(set(d) - set(_FIELD_TYPES))
  if unknown:
    raise EvalFileError(f"{where}: unknown fields {unknown}; known:"
                        f" {sorted(_FIELD_TYPES)}")
  for key, value in d.items():
    types = _FIELD_TYPES[key]
    # bool is an int in Python; only is_base may be one.
    if not isinstance(value, types) or (isinstance(value, bool)
                                        and bool not in types):
      raise EvalFileError(
          f"{where}: field {key!r} must be"
          f" {' or '.join(t.__name__ for t in types)}, got {value!r}")
  bad = sorted(k for k, v in d.get("metrics", {}).items()
               if v is not None and (isinstance(v, bool)
                                     or not isinstance(v, (int, float))))
  if bad:
    raise EvalFileError(f"{where}: metrics {bad} are not numbers")
  for key in ("learning", "retention", "epoch", "lr"):
    if not math.isfinite(d[key]):
      raise EvalFileError(f"{where}: field {key!r} is {d[key]!r}")
  for metric, item in d.get("items", {}).items():
    _check_items(item, f"{where}: items[{metric!r}]")
  return EvalRecord(**d)


def _check_items(item: Any, where: str) -> None:
  if not isinstance(item, dict) or "sum" not in item or set(item) - {
      "sum", "count"}:
    raise EvalFileError(f"{where}: expected {{'sum': [...], 'count': [...]}}"
                        f" ('count' optional), got {str(item)[:80]}")
  for key, values in item.items():
    if not isinstance(values, list) or not all(
        isinstance(v, (int, float)) and not isinstance(v, bool)
        and math.isfinite(v) for v in values):
      raise EvalFileError(f"{where}[{key!r}]: not a list of finite numbers")
  if "count" in item and (len(item["count"]) != len(item["sum"])
                          or any(c <= 0 for c in item["count"])):
    raise EvalFileError(f"{where}: 'count' must be {len(item['sum'])}"
                        " positive numbers, one per item")


# Per-item entries of the eval job's predictions (evaluate/suite.py) ->
# results metric: per problem or per document, its summed NLL and tokens.
_ITEM_LOSSES = {"math/response_loss": "math/response_loss",
                "lm_loss": "lm_loss/loss"}
# Multiple choice: the prediction each score checks against the label
# (evaluate/multiple_choice.py `predict`).
MC_PREDICTIONS = {"acc": "pred", "acc_norm": "pred_norm",
                  "acc_bytes": "pred_bytes"}


def item_scores(predictions: Sequence[dict[str, Any]]
                ) -> dict[str, dict[str, list[float]]]:
  """`EvalRecord.items` from the eval job's per-item predictions.

  Math generations give "math/<protocol>/acc" (1 / 0 per problem), multiple
  choice "mc/<benchmark>/acc", "acc_norm" and "acc_bytes", the per-item NLL
  entries (eval "math/response_loss", "lm_loss": "nll" summed over
  "tokens") the loss metrics. A prediction may also state its own scores,
  "items": {metric: score or {"sum": s, "count": c}} (mc/mean's weighted
  items, evaluate/suite.py; harness tasks' mean metrics,
  evaluate/harness.py). Items keep their order in the eval set ("index",
  or the harness's "doc_id").
  """
  out: dict[str, dict[str, list[float]]] = {}

  def add(metric: str, value: float, count: float | None = None) -> None:
    item = out.setdefault(metric, {"sum": []})
    item["sum"].append(round(float(value), 4))
    if count is not None:
      item.setdefault("count", []).append(int(count))

  ordered = sorted(enumerate(predictions),
                   key=lambda ip: (str(ip[1].get("eval", "")),
                                   ip[1].get("index",
                                             ip[1].get("doc_id", ip[0]))))
  for _, p in ordered:
    name = str(p.get("eval", ""))
    if name in _ITEM_LOSSES and "nll" in p:
      add(_ITEM_LOSSES[name], p["nll"], p["tokens"])
    elif name.startswith("math/") and "correct" in p:
      add(f"{name}/acc", bool(p["correct"]))
    elif name.startswith("mc/") and "pred" in p and "label" in p:
      for score, pred in MC_PREDICTIONS.items():
        if pred in p:
          add(f"{name}/{score}", p[pred] == p["label"])
    for metric, score in (p.get("items") or {}).items():
      if isinstance(score, dict):
        add(metric, score["sum"], score.get("count"))
      else:
        add(metric, score)
  return out


def base_identity(checkpoint: str) -> dict[str, Any]:
  """The base a run started from: {"checkpoint", "seed", "lrs"}.

  `checkpoint` is the run's init_from path (or the base model evaluated);
  when it is a training run of ours (a folder with the config.json that
  train.py writes), its pretraining seed (`train.seed`) and each optimizer
  group's peak learning rate come from there; otherwise only the path.
  """
  out: dict[str, Any] = {"checkpoint": str(checkpoint)}
  if not checkpoint:
    return out
  config_file = storage.join(checkpoint, "config.json")
  try:
    if not storage.is_file(config_file):
      return out
    config = json.loads(storage.read_text(config_file))
  except (OSError, ValueError):
    return out
  seed = (config.get("train") or {}).get("seed")
  if isinstance(seed, int):
    out["seed"] = seed
  groups = (config.get("optim") or {}).get("groups") or {}
  lrs = {name: g["schedule"]["peak"] for name, g in groups.items()
         if isinstance(g, dict) and isinstance(g.get("schedule"), dict)
         and isinstance(g["schedule"].get("peak"), (int, float))}
  if lrs:
    out["lrs"] = lrs
  return out


def object_name(step: int, is_base: bool, checkpoint: str) -> str:
  """The name of a record's object (and of its predictions file).

  `step_<N>` for a checkpoint; `base_<hash of its path>` for a base model,
  so evaluating another base model adds a record instead of replacing one.
  """
  if is_base:
    return "base_" + hashlib.sha256(checkpoint.encode()).hexdigest()[:12]
  return f"step_{step:08d}"


def write_record(workdir: str | os.PathLike, record: EvalRecord) -> str:
  """Writes `record` as its own object in one write; returns its path."""
  path = storage.join(workdir, RESULTS_DIR, object_name(
      record.step, record.is_base, record.checkpoint) + ".json")
  storage.write_text(path, record.to_json() + "\n")
  return path


def read_record(path: str) -> EvalRecord:
  """One results object."""
  try:
    d = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise EvalFileError(f"{path}: not JSON: {e}") from None
  return parse_record(d, path)


def read_results(path: str) -> list[EvalRecord]:
  """Every record of one results.jsonl (the layout before one object each).

  Blank lines are skipped; a last line that is cut short (no newline, not
  JSON: a crash during the append that wrote it) is dropped with a warning.
  """
  if not storage.is_file(path):
    raise FileNotFoundError(f"{path}: no eval results (run"
                            " `python -m optconsist_jax.evaluate` first)")
  lines = storage.read_text(path).split("\n")
  out = []
  for n, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      d = json.loads(line)
    except json.JSONDecodeError as e:
      if n == len(lines):
        logging.warning("%s:%d: dropping a half-written last line (a crash"
                        " during a write)", path, n)
        break
      raise EvalFileError(f"{path}:{n}: not JSON: {e}") from None
    out.append(parse_record(d, f"{path}:{n}"))
  return out


def read_eval_dir(workdir: str | os.PathLike) -> list[tuple[EvalRecord, str]]:
  """(record, where it was read) of every record of W, in write order.

  The old W/eval/results.jsonl first (its lines in order), then the objects
  of W/eval/results/ by name. [] when there are none.
  """
  out = []
  legacy = storage.join(workdir, LEGACY_RESULTS_FILE)
  if storage.is_file(legacy):
    out += [(r, legacy) for r in read_results(legacy)]
  folder = storage.join(workdir, RESULTS_DIR)
  for name in storage.listdir(folder):
    if name.endswith(".json") and not name.startswith("."):
      path = storage.join(folder, name)
      out.append((read_record(path), path))
  return out


def read_workdir(workdir: str) -> list[EvalRecord]:
  """The records of W (objects and an old results.jsonl), merged.

  The run name is filled in from W's name when a record has none. A
  checkpoint recorded twice (an old results.jsonl re-evaluated, or a rerun
  after a crash): the one read last wins (objects after the old file), and a
  warning names both places.
  """
  found = read_eval_dir(workdir)
  if not found:
    raise FileNotFoundError(
        f"{storage.join(workdir, RESULTS_DIR)}: no eval results (run"
        " `python -m optconsist_jax.evaluate` first)")
  name = storage.path(workdir).name
  latest: dict[tuple[str, int, bool, str], tuple[EvalRecord, str]] = {}
  for r, where in found:
    if not r.run:
      r = dataclasses.replace(r, run=name)
    key = (r.run, r.step, r.is_base, r.checkpoint)
    if key in latest and latest[key][1] != where:
      logging.warning("step %d of %s is recorded in %s and in %s; using %s",
                      r.step, r.run, latest[key][1], where, where)
    latest[key] = (r, where)
  return sorted((r for r, _ in latest.values()),
                key=lambda r: (r.run, not r.is_base, r.step))


def dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
  """a is at least as good as b in both coordinates and better in one."""
  return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])


def pareto_frontier(points: Sequence[tuple[float, float]],
                    maximize: tuple[bool, bool] = (True, True)) -> list[int]:
  """Indices of the non-dominated points, sorted by x.

  Args:
    points: (x, y) pairs.
    maximize: per coordinate, whether larger is better.

  Returns:
    The indices of points no other point dominates (equal points are all
    kept), ordered by increasing x (then y).
  """
  if not len(points):
    return []
  sign = np.array([1.0 if m else -1.0 for m in maximize])
  pts_P2 = np.asarray(points, np.float64).reshape(-1, 2) * sign
  # dominated[i, j]: point j dominates point i (`dominates`, vectorized;
  # the report computes hundreds of frontiers per item resample).
  ge = pts_P2[None, :, :] >= pts_P2[:, None, :]
  gt = pts_P2[None, :, :] > pts_P2[:, None, :]
  dominated = ge.all(axis=2) & gt.any(axis=2)
  keep = np.flatnonzero(~dominated.any(axis=1))
  raw_P2 = np.asarray(points, np.float64).reshape(-1, 2)[keep]
  order = np.lexsort((raw_P2[:, 1], raw_P2[:, 0]))  # by x, then y
  return keep[order].tolist()


def lower_is_better(metric: str) -> bool:
  """Loss-like metrics (loss, perplexity, nll) are better when smaller."""
  name = metric.lower()
  return any(k in name for k in ("loss", "perplexity", "ppl", "nll"))


_METRIC_WORDS = {
    "lm_loss/loss": ("held-out LM loss", "nats/token"),
    "lm_loss/perplexity": ("held-out LM perplexity", ""),
    "math/response_loss": ("held-out finetuning loss", "nats/token"),
    "mc/mean": ("mean multiple-choice accuracy", "fraction correct"),
}


def metric_words(metric: str) -> tuple[str, str]:
  """(words, unit) of a metric name such as "-lm_loss/loss" ("" = no unit)."""
  neg = metric.startswith("-")
  name = metric[1:] if neg else metric
  parts = name.split("/")
  if name in _METRIC_WORDS:
    words, unit = _METRIC_WORDS[name]
  elif len(parts) == 3 and parts[0] == "math" and parts[2] == "acc":
    words, unit = f"math exact-match accuracy ({parts[1]})", "fraction correct"
  elif len(parts) == 3 and parts[0] == "mc" and parts[2] in ("acc",
                                                              "acc_norm"):
    words = f"{parts[1]} accuracy" + (
        " (length-normalized)" if parts[2] == "acc_norm" else "")
    unit = "fraction correct"
  else:
    words, unit = name, ""
  return ("minus " if neg else "") + words, unit


def axis_title(role: str, metric: str, higher_is_better: bool) -> str:
  """E.g. "Retention: minus held-out LM loss (nats/token; higher is better)"."""
  words, unit = metric_words(metric)
  direction = ("higher is better" if higher_is_better
               else "lower is better; axis reversed")
  return f"{role}: {words} ({unit + '; ' if unit else ''}{direction})"
