"""Scores of the memorization experiment (experiments/memorization.py).

Greedy accuracy on the training facts and held-out rule items, the gold
responses' per-token log-probability, the fact number's log-probability,
and the contrastive memorization score (own number vs other facts' numbers
under the same question; chance 0).
"""

from __future__ import annotations

from collections.abc import Sequence

from flax import nnx
import numpy as np

from optconsist_jax.data import prompts
from optconsist_jax.data.records import MathExample
from optconsist_jax.evaluate import math as math_eval
from optconsist_jax.evaluate import multiple_choice
from optconsist_jax.model import generate as gen



def gold_logprobs(model: nnx.Module, tokenizer: gen.Tokenizer,
                  examples: Sequence[MathExample], *, batch_size: int = 32
                  ) -> np.ndarray:
  """Mean per-token log p(response + EOS | BOS + training prompt), per item.

  The tokens are exactly the training sequence's (data/supervised.py).
  """
  requests, lengths = [], []
  for e in examples:
    ctx = [tokenizer.bos_id, *tokenizer.encode(prompts.alpaca_prompt(e.query))]
    cont = [*tokenizer.encode(e.response), tokenizer.eos_id]
    requests.append((ctx, cont))
    lengths.append(len(cont))
  sums = multiple_choice.score_continuations(model, requests,
                                             batch_size=batch_size)
  return sums / np.asarray(lengths, np.float64)


def answer_logprobs(model: nnx.Module, tokenizer: gen.Tokenizer,
                    examples: Sequence[MathExample], *, batch_size: int = 32
                    ) -> np.ndarray:
  """Summed log p(final answer tokens + EOS | prompt, response before them).

  The response is split at its last "The answer is:" the way
  lm-evaluation-harness splits context and continuation (tokenized jointly,
  cut at the prefix's own token length; evaluate/multiple_choice.py). For a fact
  item ("The answer is: N") this isolates the memorized number.
  """
  requests = [_split_at_answer(tokenizer, e, f"answer_logprobs: item {i}")
              for i, e in enumerate(examples)]
  return multiple_choice.score_continuations(model, requests,
                                             batch_size=batch_size)


def _split_at_answer(tokenizer: gen.Tokenizer, e: MathExample, where: str
                     ) -> tuple[list[int], list[int]]:
  """(BOS + prompt + response up to its last answer phrase, the rest + EOS),
  tokenized jointly and cut at the prefix's own token length."""
  cut = e.response.rfind(math_eval.ANSWER_PHRASE.rstrip())
  if cut < 0:
    raise ValueError(f"{where} has no {math_eval.ANSWER_PHRASE!r}:"
                     f" {e.response!r}")
  prefix = e.response[:cut + len(math_eval.ANSWER_PHRASE.rstrip())]
  whole = tokenizer.encode(e.response)
  n = len(tokenizer.encode(prefix))
  ctx = [tokenizer.bos_id, *tokenizer.encode(prompts.alpaca_prompt(e.query)),
         *whole[:n]]
  return ctx, [*whole[n:], tokenizer.eos_id]


def contrastive_requests(tokenizer: gen.Tokenizer,
                         facts: Sequence[MathExample], n_others: int
                         ) -> list[tuple[list[int], list[int]]]:
  """For each fact i, its own number and those of `n_others` other facts
  (i + 1, ..., i + n_others mod n) as continuations of i's question and
  response prefix (`answer_logprobs`' split): (n_others + 1) per fact, own
  first."""
  n = len(facts)
  if n < 2 or not 1 <= n_others < n:
    raise ValueError(f"contrastive_requests: {n} facts, n_others={n_others};"
                     " need 1 <= n_others < facts")
  ctxs, answers = zip(*(
      _split_at_answer(tokenizer, e, f"contrastive_requests: fact {i}")
      for i, e in enumerate(facts)))
  return [(ctxs[i], answers[(i + j) % n])
          for i in range(n) for j in range(n_others + 1)]


def contrastive_scores(model: nnx.Module | None, tokenizer: gen.Tokenizer,
                       facts: Sequence[MathExample], *, n_others: int = 8,
                       batch_size: int = 32, score=None) -> np.ndarray:
  """Per fact: log p(own number) - mean log p(other facts' numbers).

  Both under the fact's own question (`contrastive_requests`), so a model
  that knows only the answer format (any number alike) scores 0 and one that
  memorized the fact scores > 0. `score(requests) -> summed log-probs`
  (default: `multiple_choice.score_continuations` of `model`).
  """
  requests = contrastive_requests(tokenizer, facts, n_others)
  if score is None:
    sums = multiple_choice.score_continuations(model, requests,
                                               batch_size=batch_size)
  else:
    sums = score(requests)
  lp_NK = np.asarray(sums, np.float64).reshape(len(facts), n_others + 1)
  return lp_NK[:, 0] - lp_NK[:, 1:].mean(axis=1)


def _accuracy(model, tokenizer, examples, generation) -> tuple[float, list]:
  texts = [prompts.alpaca_prompt(e.query) for e in examples]
  result = gen.generate(model, tokenizer, texts, generation)
  correct = []
  for e, completion in zip(examples, result.completions):
    correct.append(math_eval.is_correct(math_eval.extract_answer(completion),
                                        math_eval.parse_number(e.answer)))
  return float(np.mean(correct)), result.completions


def evaluate(model: nnx.Module, tokenizer: gen.Tokenizer,
             facts: Sequence[MathExample],
             heldout_rule: Sequence[MathExample], *,
             max_new_tokens: int = 48, batch_size: int = 32,
             train: Sequence[MathExample] = ()) -> dict[str, float]:
  """Memorization and rule scores of `model`.

  Generation uses the training prompt (Alpaca, ending "### Response:"): the
  finetuned models never saw MetaMath's "Let's think step by step." suffix.
  Greedy decoding, stopped at MetaMath's stop strings; the answer is read by
  `evaluate.math.extract_answer` and compared numerically.

  Returns:
    memorization_acc / rule_acc: greedy accuracy on the training fact items /
    the held-out rule items; memorization_logprob / rule_logprob: mean over
    items of the per-token gold-response log-probability (`gold_logprobs`);
    memorization_answer_logprob: mean over fact items of the summed
    log-probability of the number (`answer_logprobs`);
    memorization_contrastive: mean over fact items of `contrastive_scores`
    (chance 0), the memorization signal the summary reads; train_loss
    (given `train`): the mean per-token NLL of the training items'
    responses, the axis at which optimizers are compared; n_fact, n_rule:
    item counts.
  """
  if not facts or not heldout_rule:
    raise ValueError("memorization.evaluate: empty fact or rule probe")
  generation = gen.GenerationConfig(
      max_new_tokens=max_new_tokens, batch_size=batch_size,
      stop_strings=prompts.METAMATH_STOP_STRINGS, prompt_bucket=32,
      chunk_size=max_new_tokens)
  mem_acc, _ = _accuracy(model, tokenizer, facts, generation)
  rule_acc, _ = _accuracy(model, tokenizer, heldout_rule, generation)
  return {
      "memorization_acc": mem_acc,
      "rule_acc": rule_acc,
      "memorization_logprob": float(np.mean(gold_logprobs(
          model, tokenizer, facts, batch_size=batch_size))),
      "rule_logprob": float(np.mean(gold_logprobs(
          model, tokenizer, heldout_rule, batch_size=batch_size))),
      "memorization_answer_logprob": float(np.mean(answer_logprobs(
          model, tokenizer, facts, batch_size=batch_size))),
      "memorization_contrastive": float(np.mean(contrastive_scores(
          model, tokenizer, facts, n_others=min(8, len(facts) - 1),
          batch_size=batch_size))),
      **({"train_loss": -float(np.mean(gold_logprobs(
          model, tokenizer, train, batch_size=batch_size)))} if train else {}),
      "n_fact": len(facts),
      "n_rule": len(heldout_rule),
  }
