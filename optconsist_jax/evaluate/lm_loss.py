"""Held-out language-model loss and perplexity.

Each document is tokenized as BOS + text + EOS and cut into non-overlapping
windows of `max_len` predicted tokens (each window's input starts with the
previous window's last token), so every token after BOS is predicted exactly
once, with up to `max_len` tokens of context. The loss is the token-weighted
mean negative log-likelihood over all documents (the training loss's
per-token term, `loss.token_log_likelihood`) and perplexity is its
exponential. Per document, the summed NLL and the token count are kept
(`LMLoss.doc_nll`, `doc_tokens`): the report resamples documents to put the
eval set's sampling error into its intervals (report/resample.py).
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
  """Mean NLL per predicted token (nats), its exp, and the token count.

  doc_nll, doc_tokens: per document, its summed NLL (nats) and its predicted
    tokens; loss = sum(doc_nll) / sum(doc_tokens).
  """

  loss: float
  perplexity: float
  tokens: int
  doc_nll: tuple[float, ...] = ()
  doc_tokens: tuple[int, ...] = ()


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
  requests, doc_of = [], []
  for k, doc in enumerate(documents):
    w = windows(tokenizer.encode(doc, bos=True, eos=True), max_len)
    requests += w
    doc_of += [k] * len(w)
  if not requests:
    raise ValueError("lm_loss.evaluate: no tokens to score (empty documents)")
  sums = mc.score_continuations(model, requests, batch_size=batch_size,
                                max_len=max_len, length_bucket=length_bucket)
  doc_of = np.asarray(doc_of, np.int64)
  doc_nll = np.zeros(len(documents), np.float64)
  np.add.at(doc_nll, doc_of, -np.asarray(sums, np.float64))
  doc_tokens = np.zeros(len(documents), np.int64)
  np.add.at(doc_tokens, doc_of, [len(t) for _, t in requests])
  count = int(doc_tokens.sum())
  mean = float(doc_nll.sum() / count)
  return LMLoss(loss=mean, perplexity=math.exp(mean), tokens=count,
                doc_nll=tuple(doc_nll.tolist()),
                doc_tokens=tuple(int(t) for t in doc_tokens))
