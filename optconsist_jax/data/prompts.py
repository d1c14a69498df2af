"""The MetaMath prompt templates (Yu et al. 2023, arXiv 2309.12284).

Training uses the Alpaca template without input; the target is the response
plus EOS and only the target carries loss. MetaMath's GSM8K evaluation uses the
same template with "Let's think step by step." after "### Response:".
"""

from __future__ import annotations

ALPACA_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that"
    " appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response:")

METAMATH_EVAL_PROMPT_TEMPLATE = (
    "Below is an instruction that describes a task. Write a response that"
    " appropriately completes the request.\n\n"
    "### Instruction:\n{query}\n\n### Response: Let's think step by step.")

# Where MetaMath's evaluation stops a generation (any of these strings).
METAMATH_STOP_STRINGS = ("Instruction:", "Instruction", "Response:", "Response",
                         "Question:", "### Instruction")


def alpaca_prompt(query: str) -> str:
  """The MetaMath training prompt for `query` (ends with "### Response:")."""
  return ALPACA_PROMPT_TEMPLATE.format(query=query)


def metamath_eval_prompt(query: str) -> str:
  """MetaMath's GSM8K eval prompt (ends "### Response: Let's think step by step.")."""
  return METAMATH_EVAL_PROMPT_TEMPLATE.format(query=query)
