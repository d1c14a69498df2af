"""Typed records every reader produces and every consumer (pipelines, evals) takes.

Readers for the published file formats live beside this module; they convert raw
JSON fields to these records at the boundary and name the file and record on bad
input.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class MathExample:
  """A MetaMathQA or GSM8K item.

  Attributes:
    query: the question shown to the model (MetaMathQA `query`, GSM8K
      `question`).
    response: the reference solution text (MetaMathQA `response`, GSM8K
      `answer`); for GSM8K it ends with "#### N".
    answer: the final answer as written in the source ("18", "1,000", "\\frac{1}{2}").
    type: MetaMathQA `type` (GSM_AnsAug, MATH_AnsAug, ...) or "gsm8k".
    original_question: MetaMathQA `original_question` where present.
  """

  query: str
  response: str
  answer: str
  type: str = ""
  original_question: str = ""


@dataclasses.dataclass(frozen=True)
class MultipleChoice:
  """A log-likelihood multiple-choice item (lm-evaluation-harness style).

  Choice i is scored by the summed log-probability of `continuations[i]` given
  `contexts[i]`. Ordinary items (HellaSwag, ARC) share one context and differ in
  continuation (" " + choice); WinoGrande's partial scoring differs in context
  (the option filled into the blank) and shares the continuation (the text
  after the blank).

  Attributes:
    contexts: one context per choice.
    continuations: one continuation per choice.
    label: index of the correct choice.
    benchmark: "hellaswag", "arc_challenge", "winogrande", ...
    id: the item's id in its source file, for per-item outputs.
    choices: the answer strings as the harness's `doc_to_choice` returns
      them, one per choice: HellaSwag/ARC the choice text without the " "
      target delimiter, WinoGrande the two filled-in contexts. acc_norm
      divides choice i's log-likelihood by `len(choices[i])` (characters),
      acc_bytes by its UTF-8 bytes (`process_results` in lm_eval/api/task.py).
  """

  contexts: tuple[str, ...]
  continuations: tuple[str, ...]
  label: int
  benchmark: str
  id: str = ""
  choices: tuple[str, ...] = dataclasses.field(kw_only=True)

  def __post_init__(self):
    if len(self.choices) != len(self.contexts):
      raise ValueError(
          f"MultipleChoice {self.benchmark}/{self.id}: {len(self.choices)}"
          f" choices but {len(self.contexts)} contexts")
    if len(self.contexts) != len(self.continuations):
      raise ValueError(
          f"MultipleChoice {self.benchmark}/{self.id}: {len(self.contexts)}"
          f" contexts but {len(self.continuations)} continuations")
    if not 0 <= self.label < len(self.contexts):
      raise ValueError(
          f"MultipleChoice {self.benchmark}/{self.id}: label {self.label} out"
          f" of range for {len(self.contexts)} choices")
