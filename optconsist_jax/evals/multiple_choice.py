"""Multiple-choice accuracy by log-likelihood (lm-evaluation-harness rules).

Each choice i of a `MultipleChoice` item is scored by the summed
log-probability of `continuations[i]` given `contexts[i]`
(lm-evaluation-harness `loglikelihood` requests, `lm_eval/api/model.py`
`_encode_pair` and `lm_eval/models/huggingface.py` `_loglikelihood_tokens`):

* trailing spaces of the context move to the front of the continuation;
* context and continuation are tokenized JOINTLY, `whole = encode(ctx +
  cont)`, and split at the context's own token length `n = len(encode(ctx))`:
  continuation tokens are `whole[n:]` (subword merges across the boundary
  stay as the model would see them);
* an empty context is replaced by the BOS token; with `add_bos` every context
  starts with BOS (the harness default for Llama is without);
* sequences longer than `max_len + 1` lose tokens from the left.

acc = argmax of the sums; acc_norm = argmax of the sums divided by the
continuation's length in characters. WinoGrande's partial scoring is already in
its records (two contexts, one shared continuation): only acc is meaningful
there. Requests are sorted by length and scored in padded batches; the padding
(segment id 0, weight 0) does not change any score.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from optconsist_jax import loss
from optconsist_jax.data.records import MultipleChoice
from optconsist_jax.generate import Tokenizer


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, *,
                add_bos: bool = False) -> tuple[list[int], list[int]]:
  """(context tokens, continuation tokens), split as the harness does."""
  n_spaces = len(context) - len(context.rstrip())
  if n_spaces:
    continuation = context[-n_spaces:] + continuation
    context = context[:-n_spaces]
  prefix = [tokenizer.bos_id] if add_bos or not context else []
  whole = tokenizer.encode(context + continuation)
  n = len(tokenizer.encode(context)) if context else 0
  return prefix + whole[:n], whole[n:]


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_log_likelihood(graphdef, params, inputs_BT, targets_BT, weights_BT,
                        segment_BT):
  model = nnx.merge(graphdef, params)
  logits_BTV = model.forward(inputs_BT, None, segment_BT).logits_BTV
  ll_BT = loss.token_log_likelihood(logits_BTV, targets_BT)
  return jnp.sum(jnp.where(weights_BT > 0, ll_BT, 0.0), axis=-1)


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def score_continuations(model: nnx.Module,
                        requests: Sequence[tuple[list[int], list[int]]], *,
                        batch_size: int = 16, max_len: int = 2048,
                        length_bucket: int = 64) -> np.ndarray:
  """Summed log p(continuation | context) of each (context, cont) token pair.

  Args:
    model: the language model.
    requests: (context tokens, continuation tokens), context non-empty.
    batch_size: rows per forward pass.
    max_len: model input length at most (longer inputs lose their left end).
    length_bucket: padded lengths are multiples of this (fewer compiles).

  Returns:
    float64 [len(requests)].
  """
  rows = []
  for i, (ctx, cont) in enumerate(requests):
    if not ctx:
      raise ValueError(f"request {i}: empty context (give BOS at least)")
    if not cont:
      rows.append(None)  # log p(empty) = 0
      continue
    full = (list(ctx) + list(cont))[-(max_len + 1):]
    rows.append((full[:-1], full[1:], len(cont)))
  scores = np.zeros(len(requests), np.float64)
  order = sorted((i for i, r in enumerate(rows) if r is not None),
                 key=lambda i: -len(rows[i][0]))
  graphdef, params = nnx.split(model)
  for lo in range(0, len(order), batch_size):
    idx = order[lo:lo + batch_size]
    t = min(_round_up(len(rows[idx[0]][0]), length_bucket), max_len)
    inputs = np.zeros((batch_size, t), np.int32)
    targets = np.zeros((batch_size, t), np.int32)
    weights = np.zeros((batch_size, t), np.float32)
    segment = np.zeros((batch_size, t), np.int32)
    for r, i in enumerate(idx):
      inp, tgt, n_cont = rows[i]
      inputs[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      segment[r, :len(inp)] = 1
      weights[r, len(inp) - n_cont:len(inp)] = 1.0
    sums = np.asarray(_row_log_likelihood(graphdef, params, inputs, targets,
                                          weights, segment), np.float64)
    scores[idx] = sums[:len(idx)]
  return scores


@dataclasses.dataclass
class MultipleChoiceResult:
  """Per-benchmark scores and per-item predictions.

  Attributes:
    scores: benchmark -> {"acc", "acc_norm", "n"}.
    predictions: one dict per item (benchmark, id, label, logprobs, pred,
      pred_norm), in input order.
  """

  scores: dict[str, dict[str, float]]
  predictions: list[dict[str, Any]]


def evaluate(model: nnx.Module, tokenizer: Tokenizer,
             items: Sequence[MultipleChoice], *, add_bos: bool = False,
             batch_size: int = 16, max_len: int = 2048
             ) -> MultipleChoiceResult:
  """acc and acc_norm of `items`, grouped by their `benchmark`."""
  requests = [encode_pair(tokenizer, ctx, cont, add_bos=add_bos)
              for item in items
              for ctx, cont in zip(item.contexts, item.continuations)]
  logprobs = score_continuations(model, requests, batch_size=batch_size,
                                 max_len=max_len)
  predictions, per_bench = [], {}
  start = 0
  for item in items:
    lp = logprobs[start:start + len(item.continuations)]
    start += len(item.continuations)
    chars = np.array([max(len(c), 1) for c in item.continuations], np.float64)
    pred, pred_norm = int(np.argmax(lp)), int(np.argmax(lp / chars))
    predictions.append({"benchmark": item.benchmark, "id": item.id,
                        "label": item.label, "logprobs": lp.tolist(),
                        "pred": pred, "pred_norm": pred_norm})
    b = per_bench.setdefault(item.benchmark, [0, 0, 0])
    b[0] += pred == item.label
    b[1] += pred_norm == item.label
    b[2] += 1
  scores = {name: {"acc": acc / n, "acc_norm": acc_norm / n, "n": n}
            for name, (acc, acc_norm, n) in per_bench.items()}
  return MultipleChoiceResult(scores, predictions)
