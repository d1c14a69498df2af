"""Held-out language-model loss and perplexity.

Each document is tokenized as BOS + text + EOS and cut into non-overlapping
windows of `max_len` predicted tokens (each window's input starts with the
previous window's last token), so every token after BOS is predicted exactly
once, with up to `max_len` tokens of context. The loss is the token-weighted
mean negative log-likelihood over all documents (the training loss's
per-token term, `loss.token_log_likelihood`) and perplexity is its
exponential.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import math

from flax import nnx
import numpy as np

from optconsist_jax.model import generate as gen
from optconsist_jax.evaluate import multiple_choice as mc
from optconsist_jax.model.generate import Tokenizer


@dataclasses.dataclass(frozen=True)
class LMLoss:
  """Mean NLL per predicted token (nats), its exp, and the token count."""

  loss: float
  perplexity: float
  tokens: int


def windows(ids: Sequence[int], max_len: int
            ) -> list[tuple[list[int], list[int]]]:
  """(context, continuation) windows scoring ids[1:] once, `max_len` each.

  Each window's context is its first token (the previous window's last), so
  the scorer's input is at most `max_len` tokens.
  """
  return [([ids[start]], list(ids[start + 1:start + max_len + 1]))
          for start in range(0, len(ids) - 1, max_len)]


def evaluate(model: nnx.Module, tokenizer: Tokenizer,
             documents: Sequence[str], *, max_len: int = 1024,
             batch_size: int = 16, length_bucket: int = 64) -> LMLoss:
  """Token-weighted mean NLL of `documents` under `model`.

  Windows are at most `max_len` tokens and never longer than the model's
  context (`generate.context_length`). Each window is scored as a
  continuation of its first token by the multiple-choice scorer
  (`multiple_choice.score_requests`: the same compiled programs, padded
  lengths `length_bucket * 2**k`).
  """
  max_len = gen.fit_to_context(max_len, model)
  requests = []
  for doc in documents:
    requests += windows(tokenizer.encode(doc, bos=True, eos=True), max_len)
  if not requests:
    raise ValueError("lm_loss.evaluate: no tokens to score (empty documents)")
  sums = mc.score_continuations(model, requests, batch_size=batch_size,
                                max_len=max_len, length_bucket=length_bucket)
  count = sum(len(t) for _, t in requests)
  mean = float(-np.sum(sums) / count)
  return LMLoss(loss=mean, perplexity=math.exp(mean), tokens=count)
