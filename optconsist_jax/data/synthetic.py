"""Seeded synthetic data in the real formats: math word problems and retention sets.

Math problems come from templates at three difficulty levels (1: one step with
numbers up to 20; 2: two steps up to 50; 3: three or four steps up to 100,
with exact division). Every solution is a list of arithmetic steps; the
response text is rendered from them and re-verified by `verify_response`, which
parses every "a op b = c" in the text and recomputes it. Output formats:

* MetaMathQA (`metamathqa_records`): GSM-style word problems with type
  "GSM_AnsAug" whose response ends "#### N\\nThe answer is: N", and MATH-style
  expressions with type "MATH_AnsAug" ending "The answer is: N".
* GSM8K (`gsm8k_records`): question/answer with "<<a+b=c>>" calculator
  annotations and a final "#### N" line.

Retention sets (`hellaswag_records`, `arc_records`, `winogrande_records`) are
small, templated, in each benchmark's published jsonl fields; they exercise the
readers and scorers, not world knowledge.

Run `python -m optconsist_jax.data.synthetic OUT_DIR` to write all files.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import json
import os
import re

import numpy as np

from optconsist_jax import errors
from optconsist_jax import paths as paths_lib

_NAMES = ("Ava", "Ben", "Chloe", "Dan", "Ella", "Finn", "Grace", "Hugo", "Iris",
          "Jack", "Kara", "Leo", "Maya", "Noah", "Olga", "Paul", "Rosa", "Sam",
          "Tara", "Umar", "Vera", "Will", "Yara", "Zoe")
_PRONOUNS = {n: ("She" if n in ("Ava", "Chloe", "Ella", "Grace", "Iris", "Kara",
                                "Maya", "Olga", "Rosa", "Tara", "Vera", "Yara",
                                "Zoe") else "He") for n in _NAMES}
_ITEMS = ("apples", "pencils", "stickers", "marbles", "cookies", "books",
          "shells", "cards", "stamps", "balloons", "candles", "buttons")
_LEVEL_MAX = {1: 20, 2: 50, 3: 100}
_OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b,
        "*": lambda a, b: a * b, "/": lambda a, b: a // b}


@dataclasses.dataclass(frozen=True)
class Step:
  """One arithmetic step `a op b = result` with a short description."""
  text: str
  a: int
  op: str
  b: int

  @property
  def result(self) -> int:
    if self.op == "/" and self.a % self.b:
      raise ValueError(f"inexact division {self.a}/{self.b}")
    return _OPS[self.op](self.a, self.b)


@dataclasses.dataclass(frozen=True)
class Problem:
  question: str
  steps: tuple[Step, ...]
  level: int
  template: str

  @property
  def answer(self) -> int:
    return self.steps[-1].result


def _word_problem(rng: np.random.Generator, level: int) -> Problem:
  hi = _LEVEL_MAX[level]
  name = str(rng.choice(_NAMES))
  friend = str(rng.choice([n for n in _NAMES if n != name]))
  pron = _PRONOUNS[name]
  item = str(rng.choice(_ITEMS))
  r = lambda lo, h=hi: int(rng.integers(lo, h + 1))  # noqa: E731
  if level == 1:
    t = int(rng.integers(3))
    if t == 0:
      a, b = r(1), r(1)
      return Problem(
          f"{name} has {a} {item}. {pron} buys {b} more {item}. How many"
          f" {item} does {name} have now?",
          (Step(f"{name} has", a, "+", b),), 1, "add")
    if t == 1:
      a = r(2)
      b = int(rng.integers(1, a))
      return Problem(
          f"{name} had {a} {item} and gave {b} of them to {friend}. How many"
          f" {item} does {name} have left?",
          (Step(f"{name} has left", a, "-", b),), 1, "sub")
    a, b = r(2, 10), r(2, 10)
    return Problem(
        f"{name} buys {a} boxes of {item}. Each box holds {b} {item}. How"
        f" many {item} does {name} buy in total?",
        (Step("In total", a, "*", b),), 1, "mul")
  if level == 2:
    t = int(rng.integers(3))
    if t == 0:
      a, b, c = r(5, 25), r(2, 8), r(2, 7)
      return Problem(
          f"{name} earns ${a} per hour and works {b} hours a day. How many"
          f" dollars does {name} earn in {c} days?",
          (Step("Per day", a, "*", b), Step(f"In {c} days", a * b, "*", c)),
          2, "wage")
    if t == 1:
      a = r(10)
      b = int(rng.integers(1, a))
      c = r(1)
      return Problem(
          f"{name} has {a} {item}. {pron} gives {b} to {friend} and then buys"
          f" {c} more. How many {item} does {name} have now?",
          (Step("After giving", a, "-", b), Step("After buying", a - b, "+", c)),
          2, "give_buy")
    a, b = r(2, 12), r(2, 9)
    c = int(rng.integers(1, a))
    return Problem(
        f"A box holds {a} {item}. {name} fills {b} boxes and has {c} {item}"
        f" left over. How many {item} did {name} have?",
        (Step("In the boxes", a, "*", b), Step("With the rest", a * b, "+", c)),
        2, "boxes")
  t = int(rng.integers(2))
  if t == 0:
    a, b, d = r(2, 6), r(3, 12), r(2, 6)
    total = a * b
    c = total % d or d  # Eat enough that the rest shares out exactly.
    return Problem(
        f"{name} bakes {a} trays of cookies with {b} cookies on each tray."
        f" {pron} eats {c} and shares the rest equally among {d} friends. How"
        " many cookies does each friend get?",
        (Step("Cookies baked", a, "*", b), Step("After eating", total, "-", c),
         Step("Each friend gets", total - c, "/", d)), 3, "share")
  a, b, c, d = r(2, 15), r(2, 8), r(2, 15), r(2, 8)
  spent = a * b + c * d
  e = (spent // 10 + 1 + int(rng.integers(0, 5))) * 10
  return Problem(
      f"{name} buys {b} {item} at ${a} each and {d} notebooks at ${c} each,"
      f" and pays with ${e}. How many dollars of change does {name} get?",
      (Step(f"The {item} cost", a, "*", b), Step("The notebooks cost", c, "*", d),
       Step("Together", a * b, "+", c * d), Step("The change is", e, "-", spent)),
      3, "change")


def _math_expression(rng: np.random.Generator, level: int) -> Problem:
  hi = _LEVEL_MAX[level]
  x = int(rng.integers(1, hi + 1))
  steps = []
  expr = str(x)
  for _ in range(level):
    op = str(rng.choice(["+", "-", "*"]))
    y = int(rng.integers(2, 10 if op == "*" else hi + 1))
    if op == "-" and y > x:
      op = "+"
    steps.append(Step("Then" if steps else "First", x, op, y))
    x = _OPS[op](x, y)
    expr = f"({expr} {op} {y})" if len(steps) < level else f"{expr} {op} {y}"
  latex = expr.replace("*", r"\times")
  return Problem(f"What is the value of ${latex}$?", tuple(steps), level,
                 "expression")


def generate_problems(n: int, seed: int, levels: Sequence[int] = (1, 2, 3),
                      kinds: Sequence[str] = ("word",)) -> list[Problem]:
  """`n` problems from `seed`, levels and kinds ("word", "expression") mixed."""
  if n <= 0:
    raise ValueError(f"generate_problems: n={n} must be positive")
  for lv in levels:
    if lv not in _LEVEL_MAX:
      raise ValueError(f"generate_problems: level {lv} not in {sorted(_LEVEL_MAX)}")
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    level = int(rng.choice(levels))
    kind = str(rng.choice(kinds))
    make = _word_problem if kind == "word" else _math_expression
    out.append(make(rng, level))
  return out


def _step_line(step: Step, annotate: bool) -> str:
  calc = f"<<{step.a}{step.op}{step.b}={step.result}>>" if annotate else ""
  return f"{step.text}: {step.a} {step.op} {step.b} = {calc}{step.result}."


def render_metamath(p: Problem) -> dict[str, str]:
  """A MetaMathQA record for `p` (GSM-style for word problems, MATH-style else)."""
  if p.template == "expression":
    op = lambda o: r"\times" if o == "*" else o  # noqa: E731
    response = " ".join(f"{s.text}, ${s.a} {op(s.op)} {s.b} = {s.result}$."
                        for s in p.steps)
    response += f"\nThe answer is: {p.answer}"
    rtype = "MATH_AnsAug"
  else:
    response = "\n".join(_step_line(s, False) for s in p.steps)
    response += f"\n#### {p.answer}\nThe answer is: {p.answer}"
    rtype = "GSM_AnsAug"
  verify_response(response, p.answer)
  return {"type": rtype, "query": p.question, "original_question": p.question,
          "response": response, "level": p.level, "template": p.template}


def render_gsm8k(p: Problem) -> dict[str, str]:
  """A GSM8K record for `p` (calculator annotations, final "#### N")."""
  answer = "\n".join(_step_line(s, True) for s in p.steps)
  answer += f"\n#### {p.answer}"
  verify_response(answer, p.answer)
  return {"question": p.question, "answer": answer}


_STEP_RE = re.compile(
    r"(-?\d+) (\+|-|\*|/|\\times) (-?\d+) = (?:<<[^>]*>>)?(-?\d+)")


def verify_response(text: str, answer: int) -> None:
  """Checks every "a op b = c" in `text` and that the final answer is `answer`."""
  found = _STEP_RE.findall(text)
  if not found:
    raise ValueError(f"no arithmetic step in response: {text!r}")
  for a, op, b, c in found:
    a, b, c = int(a), int(b), int(c)
    op = "*" if op == r"\times" else op
    if op == "/" and (b == 0 or a % b):
      raise ValueError(f"inexact division {a} / {b} in {text!r}")
    if _OPS[op](a, b) != c:
      raise ValueError(f"wrong step {a} {op} {b} = {c} in {text!r}")
  final = re.findall(r"(?:#### |The answer is: )(-?\d+)", text)
  if not final or any(int(f) != answer for f in final):
    raise ValueError(f"final answer {final} != {answer} in {text!r}")


def make_splits(n_train: int, n_test: int, seed: int,
                levels: Sequence[int] = (1, 2, 3)
                ) -> tuple[list[Problem], list[Problem]]:
  """Train and test problems with disjoint questions (test: word problems)."""
  train = generate_problems(n_train, seed, levels, kinds=("word", "expression"))
  seen = {p.question for p in train}
  test = []
  s = seed + 1_000_003
  while len(test) < n_test:
    for p in generate_problems(max(n_test, 16), s, levels):
      if p.question not in seen and len(test) < n_test:
        seen.add(p.question)
        test.append(p)
    s += 1
  return train, test


def metamathqa_records(n: int, seed: int, levels=(1, 2, 3)) -> list[dict]:
  return [render_metamath(p) for p in
          generate_problems(n, seed, levels, kinds=("word", "expression"))]


def gsm8k_records(n: int, seed: int, levels=(1, 2, 3)) -> list[dict]:
  return [render_gsm8k(p) for p in generate_problems(n, seed, levels)]


# ---------------------------------------------------------------- retention

_SEQUENCES = {
    "Days of the week": ("monday", "tuesday", "wednesday", "thursday", "friday",
                         "saturday", "sunday"),
    "Months": ("january", "february", "march", "april", "may", "june", "july",
               "august", "september", "october", "november", "december"),
    "Counting": ("one", "two", "three", "four", "five", "six", "seven", "eight",
                 "nine", "ten", "eleven", "twelve"),
}
_WINO_PAIRS = (("trophy", "suitcase"), ("piano", "van"), ("sofa", "doorway"),
               ("cake", "box"), ("painting", "frame"), ("bottle", "bag"),
               ("tree", "pot"), ("statue", "crate"), ("table", "elevator"))


def hellaswag_records(n: int, seed: int) -> list[dict]:
  """HellaSwag-format items: continue a well-known sequence."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    label_name = str(rng.choice(list(_SEQUENCES)))
    seq = _SEQUENCES[label_name]
    start = int(rng.integers(0, len(seq) - 4))
    ctx_b = ", ".join(seq[start:start + 3]) + ","
    right = f"{seq[start + 3]}, {seq[start + 4]}."
    wrong = set()
    while len(wrong) < 3:
      j, k = rng.choice(len(seq), 2, replace=False)
      cand = f"{seq[j]}, {seq[k]}."
      if cand != right:
        wrong.add(cand)
    endings = sorted(wrong)
    label = int(rng.integers(0, 4))
    endings.insert(label, right)
    out.append({"ind": i, "activity_label": label_name,
                "ctx_a": f"A teacher writes the {label_name.lower()} in order"
                         " on the board.",
                "ctx_b": "she writes " + ctx_b, "endings": endings,
                "label": label, "split": "val"})
  return out


def arc_records(n: int, seed: int) -> list[dict]:
  """ARC-format items (AI2 layout): small arithmetic and ordering questions."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    a, b = int(rng.integers(2, 50)), int(rng.integers(2, 50))
    if i % 2:
      stem = f"What is {a} plus {b}?"
      right = a + b
    else:
      stem = f"What is {a} times {min(b, 12)}?"
      right = a * min(b, 12)
    options = {right}
    while len(options) < 4:
      options.add(right + int(rng.integers(-9, 10)))
    opts = sorted(options)
    labels = ["A", "B", "C", "D"]
    out.append({"id": f"SYN_ARC_{i}",
                "question": {"stem": stem,
                             "choices": [{"text": str(o), "label": lab}
                                         for o, lab in zip(opts, labels)]},
                "answerKey": labels[opts.index(right)]})
  return out


def winogrande_records(n: int, seed: int) -> list[dict]:
  """WinoGrande-format items: "the X did not fit in the Y because the _ ..."."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    big, small = _WINO_PAIRS[int(rng.integers(len(_WINO_PAIRS)))]
    too_big = bool(rng.integers(2))
    adjective = "big" if too_big else "small"
    sentence = (f"The {big} did not fit in the {small} because the _ was too"
                f" {adjective}.")
    options = [big, small] if rng.integers(2) else [small, big]
    correct = big if too_big else small
    out.append({"qID": f"SYN_WG_{i}", "sentence": sentence,
                "option1": options[0], "option2": options[1],
                "answer": str(options.index(correct) + 1)})
  return out


def _write_jsonl(path: str, records: Sequence[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for r in records:
      f.write(json.dumps(r) + "\n")


def write_all(out_dir: str, *, n_train: int = 20000, n_test: int = 500,
              n_retention: int = 100, seed: int = 0) -> dict[str, str]:
  """Writes MetaMathQA-format train, GSM8K-format test and retention files."""
  os.makedirs(out_dir, exist_ok=True)
  train, test = make_splits(n_train, n_test, seed)
  paths = {
      "metamathqa": os.path.join(out_dir, "MetaMathQA-synthetic.json"),
      "gsm8k": os.path.join(out_dir, "gsm8k_test.jsonl"),
      "hellaswag": os.path.join(out_dir, "hellaswag_val.jsonl"),
      "arc": os.path.join(out_dir, "arc_challenge_test.jsonl"),
      "winogrande": os.path.join(out_dir, "winogrande_val.jsonl"),
  }
  with open(paths["metamathqa"], "w", encoding="utf-8") as f:
    json.dump([render_metamath(p) for p in train], f, indent=0)
  _write_jsonl(paths["gsm8k"], [render_gsm8k(p) for p in test])
  _write_jsonl(paths["hellaswag"], hellaswag_records(n_retention, seed + 1))
  _write_jsonl(paths["arc"], arc_records(n_retention, seed + 2))
  _write_jsonl(paths["winogrande"], winogrande_records(n_retention, seed + 3))
  return paths


def main(argv: list[str]) -> int:
  if len(argv) != 1:
    raise errors.UserError(
        "usage: python -m optconsist_jax.data.synthetic OUT_DIR")
  out = paths_lib.resolve(argv[0])
  for k, v in write_all(out).items():
    print(k, v)
  print(f"wrote {out} (a manual directory for"
        " optconsist_jax.data.tfds_builders)")
  return 0


if __name__ == "__main__":
  from optconsist_jax import errors  # pylint: disable=g-import-not-at-top
  errors.run(main, absl=False)
