"""Math word-problem accuracy: answer extraction and the two GSM8K protocols.

Protocols (MetaMath, Yu et al. 2023, arXiv 2309.12284; lm-evaluation-harness):

* "metamath" (the MetaMath project's eval_gsm8k.py): the Alpaca prompt ending
  "### Response: Let's think step by step.", greedy decoding up to 512 new
  tokens, stopped at "Instruction:", "Response:", "Question:" and the like; the
  prediction is the first number after the LAST "The answer is: " (commas
  removed, fractions evaluated), compared numerically with the gold answer; no
  phrase = wrong.
* "gsm8k_fewshot" (lm-evaluation-harness `gsm8k`, as used by "LoRA Learns Less
  and Forgets Less"): k shots "Question: {q}\\nAnswer: {a}" from the train
  split joined by blank lines, then "Question: {q}\\nAnswer:"; greedy up to
  256 new tokens, stopped at "Question:"; strict match on the first
  "#### N" (the harness's regex `#### (\\-?[0-9\\.\\,]+)`, commas and a
  trailing period ignored).

Deviations from the original scripts, chosen on purpose:

* MetaMath's script rounds its prediction to an integer (`round(float(x))`)
  and its number regex `[\\-+]?\\d*[\\.,/]?\\d+` reads "1,000,000" as 1000. We
  return the number as written (a float: 3.5 stays 3.5, 1,000,000 is 1e6)
  and also read LaTeX `\\frac{a}{b}`; for GSM8K's integer answers this only
  differs when a model writes a non-integer.
* The harness compares the "#### N" string exactly after removing commas, "$"
  and a trailing period; we compare numerically ("18.0" counts as 18).
* The harness samples fresh shots per question (seed 1234); we sample one fixed
  set of k shots with `seed` so every checkpoint sees the same prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math
import random
import re
from typing import Any

from flax import nnx
import numpy as np

from optconsist_jax.data import prompts
from optconsist_jax.data.records import MathExample
from optconsist_jax.data import supervised
from optconsist_jax.evaluate import multiple_choice
from optconsist_jax.model import generate as gen

ANSWER_PHRASE = "The answer is: "

PROTOCOLS = ("metamath", "gsm8k_fewshot")

# lm-evaluation-harness gsm8k.yaml `until`.
GSM8K_FEWSHOT_STOP_STRINGS = ("Question:", "</s>", "<|im_end|>")

_NUM = r"(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+"
_SIGNED = rf"[-+\u2212]?(?:{_NUM})"
_NUMBER_RE = re.compile(
    rf"(?P<tex_sign>[-+\u2212])?\\[dt]?frac\{{\s*(?P<tex_num>{_SIGNED})\s*\}}"
    rf"\{{\s*(?P<tex_den>{_SIGNED})\s*\}}"
    rf"|(?P<slash_num>{_SIGNED})\s*/\s*(?P<slash_den>{_NUM})"
    rf"|(?P<num>{_SIGNED})")
_HASH_RE = re.compile(r"#### (\-?[0-9\.\,]+)")


def _to_float(text: str) -> float:
  return float(text.replace(",", "").replace("\u2212", "-"))


def parse_number(text: str) -> float | None:
  """The first number in `text` as a float, or None.

  Reads integers and decimals with optional sign and thousands commas
  ("-1,234.5"), "a/b" fractions and LaTeX `\\frac{a}{b}` (also \\dfrac,
  \\tfrac). A zero denominator gives None.
  """
  m = _NUMBER_RE.search(text)
  if m is None:
    return None
  if m.group("num") is not None:
    value = _to_float(m.group("num"))
  else:
    if m.group("tex_num") is not None:
      num, den = _to_float(m.group("tex_num")), _to_float(m.group("tex_den"))
      if m.group("tex_sign") in ("-", "\u2212"):
        num = -num
    else:
      num = _to_float(m.group("slash_num"))
      den = _to_float(m.group("slash_den"))
    if den == 0:
      return None
    value = num / den
  return value if math.isfinite(value) else None


def extract_answer(completion: str) -> float | None:
  """The MetaMath answer: first number after the last "The answer is: ".

  Returns None when the phrase is absent or no number follows it.
  """
  if ANSWER_PHRASE not in completion:
    return None
  return parse_number(completion.rsplit(ANSWER_PHRASE, 1)[1])


def extract_gsm8k_hash_answer(text: str) -> float | None:
  """Strict match: the number of the first "#### N", or None."""
  m = _HASH_RE.search(text)
  if m is None:
    return None
  value = m.group(1).replace(",", "")
  if value.endswith("."):
    value = value[:-1]
  try:
    number = float(value)
  except ValueError:  # "1.2.3", "-", "."
    return None
  return number if math.isfinite(number) else None


def is_correct(pred: float | None, gold: float | None) -> bool:
  """Numeric equality (up to float round-off); None is never correct."""
  if pred is None or gold is None:
    return False
  return math.isclose(pred, gold, rel_tol=1e-9, abs_tol=1e-6)


def metamath_prompt(query: str) -> str:
  """MetaMath's eval prompt (ends "### Response: Let's think step by step.")."""
  return prompts.metamath_eval_prompt(query)


def gsm8k_fewshot_prompt(question: str, shots: Sequence[MathExample]) -> str:
  """lm-evaluation-harness gsm8k prompt with the given shots."""
  parts = [f"Question: {s.query}\nAnswer: {s.response}" for s in shots]
  parts.append(f"Question: {question}\nAnswer:")
  return "\n\n".join(parts)


def sample_shots(train: Sequence[MathExample], k: int,
                 seed: int = 1234) -> list[MathExample]:
  """k distinct train items, the same for a given seed."""
  if k > len(train):
    raise ValueError(f"asked for {k} few-shot examples but the train split has"
                     f" {len(train)}")
  return random.Random(seed).sample(list(train), k)


def default_generation(protocol: str) -> gen.GenerationConfig:
  """The decoding settings each protocol was published with."""
  if protocol == "metamath":
    return gen.GenerationConfig(max_new_tokens=512,
                                stop_strings=prompts.METAMATH_STOP_STRINGS)
  if protocol == "gsm8k_fewshot":
    return gen.GenerationConfig(max_new_tokens=256,
                                stop_strings=GSM8K_FEWSHOT_STOP_STRINGS,
                                max_prompt_len=2048)
  raise ValueError(f"unknown math protocol {protocol!r}; valid: {PROTOCOLS}")


@dataclasses.dataclass
class MathAccuracy:
  """Score and per-item predictions of one protocol.

  Attributes:
    protocol: "metamath" or "gsm8k_fewshot".
    accuracy: correct / total.
    correct: items answered correctly.
    total: items evaluated.
    predictions: one dict per item (index, query, gold, completion, pred,
      correct), in input order.
    tokens_per_second: generation speed.
  """

  protocol: str
  accuracy: float
  correct: int
  total: int
  predictions: list[dict[str, Any]]
  tokens_per_second: float


def accuracy(model: nnx.Module, tokenizer: gen.Tokenizer,
             examples: Sequence[MathExample], protocol: str = "metamath", *,
             shots: Sequence[MathExample] = (),
             generation: gen.GenerationConfig | None = None) -> MathAccuracy:
  """Greedy-decodes every example under `protocol` and scores it.

  Args:
    model: the language model.
    tokenizer: see `generate.Tokenizer`.
    examples: items with `query` and gold `answer` (MathExample).
    protocol: "metamath" or "gsm8k_fewshot".
    shots: the few-shot examples (gsm8k_fewshot only; see `sample_shots`).
    generation: decoding settings; default `default_generation(protocol)`.

  Returns:
    MathAccuracy with per-item predictions.
  """
  generation = generation or default_generation(protocol)
  if protocol == "metamath":
    texts = [metamath_prompt(e.query) for e in examples]
    extract = extract_answer
  elif protocol == "gsm8k_fewshot":
    texts = [gsm8k_fewshot_prompt(e.query, shots) for e in examples]
    extract = extract_gsm8k_hash_answer
  else:
    raise ValueError(f"unknown math protocol {protocol!r}; valid: {PROTOCOLS}")
  result = gen.generate(model, tokenizer, texts, generation)
  predictions, correct = [], 0
  for i, (e, completion) in enumerate(zip(examples, result.completions)):
    gold, pred = parse_number(e.answer), extract(completion)
    ok = is_correct(pred, gold)
    correct += ok
    predictions.append({"index": i, "query": e.query, "gold": e.answer,
                        "gold_value": gold, "completion": completion,
                        "pred": pred, "correct": ok})
  total = len(examples)
  return MathAccuracy(protocol, correct / total if total else 0.0, correct,
                      total, predictions, result.tokens_per_second)


@dataclasses.dataclass(frozen=True)
class ResponseLoss:
  """Teacher-forced NLL of the gold responses (nats per target token).

  item_nll, item_tokens: per example, its summed NLL (nats) and its target
    tokens; loss = sum(item_nll) / sum(item_tokens).
  """

  loss: float
  tokens: int
  item_nll: tuple[float, ...] = ()
  item_tokens: tuple[int, ...] = ()


def response_loss(model: nnx.Module, tokenizer: gen.Tokenizer,
                  examples: Sequence[MathExample], *, batch_size: int = 16,
                  max_len: int = 1024) -> ResponseLoss:
  """Held-out finetuning loss: -log p(response + EOS | training prompt).

  The sequences are exactly the training ones (data.supervised: BOS, the
  MetaMath Alpaca prompt, response, EOS; loss on response + EOS), so this is
  the finetuning objective on held-out items: a smooth learning measure that
  still moves when a small model's exact-match accuracy does not.
  """
  requests = []
  for i, e in enumerate(examples):
    ex = supervised.tokenize_supervised(e, tokenizer, max_len,
                                        name=f"math example {i}")
    first = int(np.argmax(np.asarray(ex.loss_mask) > 0))
    requests.append((list(ex.tokens[:first]), list(ex.tokens[first:])))
  if not requests:
    raise ValueError("response_loss: no examples")
  sums = multiple_choice.score_continuations(
      model, requests, batch_size=batch_size, max_len=max_len)
  tokens = sum(len(c) for _, c in requests)
  return ResponseLoss(loss=float(-np.sum(sums) / tokens), tokens=tokens,
                      item_nll=tuple(float(-x) for x in sums),
                      item_tokens=tuple(len(c) for _, c in requests))
