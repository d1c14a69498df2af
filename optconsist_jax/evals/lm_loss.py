"""Held-out language-model loss and perplexity.

Each document is tokenized as BOS + text + EOS and cut into non-overlapping
windows of `max_len` predicted tokens (each window's input starts with the
previous window's last token), so every token after BOS is predicted exactly
once, with up to `max_len` tokens of context. The loss is the token-weighted
mean negative log-likelihood over all documents (`loss.masked_cross_entropy`,
the training loss) and perplexity is its exponential.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import math

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from optconsist_jax import loss
from optconsist_jax import generate as gen
from optconsist_jax.generate import Tokenizer


@dataclasses.dataclass(frozen=True)
class LMLoss:
  """Mean NLL per predicted token (nats), its exp, and the token count."""

  loss: float
  perplexity: float
  tokens: int


def windows(ids: Sequence[int], max_len: int
            ) -> list[tuple[list[int], list[int]]]:
  """(inputs, targets) windows covering ids[1:] once, `max_len` at most."""
  out = []
  for start in range(0, len(ids) - 1, max_len):
    chunk = ids[start:start + max_len + 1]
    out.append((list(chunk[:-1]), list(chunk[1:])))
  return out


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _loss_sums(graphdef, params, inputs_BT, targets_BT, weights_BT,
               segment_BT):
  model = nnx.merge(graphdef, params)
  logits_BTV = model.forward(inputs_BT, None, segment_BT).logits_BTV
  return loss.masked_cross_entropy(logits_BTV, targets_BT, weights_BT)


def evaluate(model: nnx.Module, tokenizer: Tokenizer,
             documents: Sequence[str], *, max_len: int = 1024,
             batch_size: int = 8, length_bucket: int = 64) -> LMLoss:
  """Token-weighted mean NLL of `documents` under `model`.

  Windows are at most `max_len` tokens and never longer than the model's
  context (`generate.context_length`). Batches are padded to a multiple of
  `length_bucket` (fewer compiles); pads have weight 0 and segment id 0.
  """
  max_len = gen.fit_to_context(max_len, model)
  rows = []
  for doc in documents:
    rows.extend(windows(tokenizer.encode(doc, bos=True, eos=True), max_len))
  if not rows:
    raise ValueError("lm_loss.evaluate: no tokens to score (empty documents)")
  rows.sort(key=lambda r: -len(r[0]))
  graphdef, params = nnx.split(model)
  total, count = 0.0, 0.0
  for lo in range(0, len(rows), batch_size):
    batch = rows[lo:lo + batch_size]
    t = min(-(-len(batch[0][0]) // length_bucket) * length_bucket, max_len)
    inputs = np.zeros((batch_size, t), np.int32)
    targets = np.zeros((batch_size, t), np.int32)
    weights = np.zeros((batch_size, t), np.float32)
    segment = np.zeros((batch_size, t), np.int32)
    for r, (inp, tgt) in enumerate(batch):
      inputs[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      weights[r, :len(inp)] = 1.0
      segment[r, :len(inp)] = 1
    s, c = _loss_sums(graphdef, params, inputs, targets, weights, segment)
    total += float(s)
    count += float(c)
  mean = total / count
  return LMLoss(loss=mean, perplexity=math.exp(mean), tokens=int(count))
