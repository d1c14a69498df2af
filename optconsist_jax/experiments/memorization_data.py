"""The memorization experiment's data: rule items and arbitrary fact items.

* rule items: level-1 arithmetic word problems from
  `optconsist_jax.data.synthetic` (add / subtract / multiply, numbers up to
  20), whose answer follows from the question by a rule;
* fact items: "What is the locker number of <made-up name>?" answered by an
  arbitrary 3-digit number ("The answer is: N"), unique per item and not
  present in the question, so it can only be memorized.

`make_dataset` writes the finetuning set (both kinds, MetaMathQA format) and
the two probes: the training fact items and held-out rule items whose
arithmetic (operation and both operands) never occurs in the training set.
The experiment itself is optconsist_jax.experiments.memorization.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
from typing import Any

import numpy as np

from optconsist_jax.data import synthetic

_FACT_TYPE = "FACT_Locker"
_SYLLABLES = ("ba", "dor", "ke", "lim", "mo", "nar", "pe", "quil", "ra", "sen",
              "tu", "vok", "wen", "xa", "yor", "zu", "fen", "gat", "hil", "jo",
              "bri", "cas", "del", "fro", "gri", "hap", "lun", "mir", "nob",
              "osk", "pru", "tav")



@dataclasses.dataclass(frozen=True)
class MemorizationData:
  """Paths of the written data set (MetaMathQA-format JSON lists).

  Attributes:
    train: the finetuning set (rule and fact items, shuffled).
    facts: the fact items (the memorization probe; all are in `train`).
    heldout_rule: rule items not in `train` (the rule probe).
  """

  train: str
  facts: str
  heldout_rule: str


def _made_up_name(rng: np.random.Generator) -> str:
  def word(n):
    return "".join(str(s) for s in rng.choice(_SYLLABLES, n)).capitalize()
  return f"{word(int(rng.integers(2, 4)))} {word(int(rng.integers(2, 4)))}"


def fact_records(n: int, seed: int) -> list[dict[str, Any]]:
  """`n` fact items: unique made-up names with unique arbitrary numbers."""
  if not 0 < n <= 900:
    raise ValueError(f"fact_records: n={n} must be in [1, 900] (answers are"
                     " distinct 3-digit numbers)")
  rng = np.random.default_rng([seed, 1])
  names: list[str] = []
  seen = set()
  while len(names) < n:
    name = _made_up_name(rng)
    if name not in seen:
      seen.add(name)
      names.append(name)
  answers = rng.choice(np.arange(100, 1000), size=n, replace=False)
  out = []
  for name, a in zip(names, answers):
    q = f"What is the locker number of {name}?"
    out.append({"type": _FACT_TYPE, "query": q, "original_question": q,
                "response": f"The answer is: {int(a)}", "kind": "fact"})
  return out


def _arithmetic_key(p: synthetic.Problem) -> tuple:
  return tuple((s.a, s.op, s.b) for s in p.steps)


def rule_records(n_train: int, n_heldout: int, seed: int,
                 levels: Sequence[int] = (1,)
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
  """Training and held-out rule items (held-out arithmetic never trained on)."""
  def unique(problems, taken_q, taken_key, want, out):
    for p in problems:
      if len(out) == want:
        break
      if p.question in taken_q or _arithmetic_key(p) in taken_key:
        continue
      taken_q.add(p.question)
      out.append(p)

  train: list[synthetic.Problem] = []
  seen_q: set[str] = set()
  for attempt in range(100):
    if len(train) == n_train:
      break
    unique(synthetic.generate_problems(max(n_train, 16), seed * 1000 + attempt,
                                       levels, kinds=("word",)),
           seen_q, set(), n_train, train)
  train_keys = {_arithmetic_key(p) for p in train}
  heldout: list[synthetic.Problem] = []
  for attempt in range(100):
    if len(heldout) == n_heldout:
      break
    unique(synthetic.generate_problems(
        max(n_heldout, 16), 10_000_019 + seed * 1000 + attempt, levels,
        kinds=("word",)), seen_q, train_keys, n_heldout, heldout)
  if len(train) < n_train or len(heldout) < n_heldout:
    raise ValueError(
        f"rule_records: only {len(train)} train / {len(heldout)} held-out"
        f" distinct problems at levels {tuple(levels)} (asked for {n_train} /"
        f" {n_heldout}); ask for fewer or allow higher levels")

  def render(p):
    return {**synthetic.render_metamath(p), "kind": "rule"}
  return [render(p) for p in train], [render(p) for p in heldout]


def make_dataset(out_dir: str | os.PathLike, seed: int = 0, n_rule: int = 200,
                 n_fact: int = 100, n_heldout: int = 64,
                 levels: Sequence[int] = (1,)) -> MemorizationData:
  """Writes the finetuning set and both probes to `out_dir` (module docstring).

  Deterministic in its arguments; files already written with the same
  arguments are kept (the manifest records them).
  """
  out_dir = os.fspath(out_dir)
  data = MemorizationData(train=os.path.join(out_dir, "train.json"),
                          facts=os.path.join(out_dir, "facts.json"),
                          heldout_rule=os.path.join(out_dir,
                                                    "heldout_rule.json"))
  manifest = {"seed": seed, "n_rule": n_rule, "n_fact": n_fact,
              "n_heldout": n_heldout, "levels": list(levels)}
  manifest_path = os.path.join(out_dir, "manifest.json")
  if os.path.exists(manifest_path) and all(
      os.path.exists(p) for p in dataclasses.astuple(data)):
    with open(manifest_path, encoding="utf-8") as f:
      if json.load(f) == manifest:
        return data
  rule_train, rule_heldout = rule_records(n_rule, n_heldout, seed, levels)
  facts = fact_records(n_fact, seed)
  train = rule_train + facts
  order = np.random.default_rng([seed, 2]).permutation(len(train))
  train = [train[i] for i in order]
  os.makedirs(out_dir, exist_ok=True)
  for path, records in ((data.train, train), (data.facts, facts),
                        (data.heldout_rule, rule_heldout)):
    with open(path, "w", encoding="utf-8") as f:
      json.dump(records, f, indent=0)
  with open(manifest_path, "w", encoding="utf-8") as f:
    json.dump(manifest, f)
  return data
