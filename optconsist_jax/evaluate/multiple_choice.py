"""Multiple-choice accuracy by log-likelihood (lm-evaluation-harness rules).

Each choice i of a `MultipleChoice` item is scored by the summed
log-probability of `continuations[i]` given `contexts[i]`
(lm-evaluation-harness 0.4.13 `loglikelihood` requests, `lm_eval/api/model.py`
`TemplateLM._encode_pair` and `lm_eval/models/huggingface.py`
`_loglikelihood_tokens`):

* trailing spaces of the context move to the front of the continuation;
* context and continuation are tokenized JOINTLY, `whole = encode(ctx +
  cont)`, and split at the context's own token length `n = len(encode(ctx))`:
  continuation tokens are `whole[n:]` (subword merges across the boundary
  stay as the model would see them);
* an empty context is replaced by the BOS token; with `add_bos` every context
  starts with BOS. The harness's default (since v0.4.9.2) is the Hugging Face
  tokenizer's own: Llama's adds BOS, GPT-2's does not
  (`harness_add_bos(tokenizer)`);
* sequences longer than `max_len + 1` lose tokens from the left.

Per item (`process_results` in `lm_eval/api/task.py`): acc = argmax of the
sums; acc_norm = argmax of the sums divided by `len(choice)` in characters,
acc_bytes by its UTF-8 bytes, where `choice` is the item's `choices[i]`
(`doc_to_choice`: the answer WITHOUT the " " target delimiter; WinoGrande's
filled-in contexts). Requests are sorted by length and scored in padded
batches whose lengths come from a short ladder (`length_bucket` x 2^k), so a
whole eval compiles a handful of shapes; the padding (segment id 0, weight 0)
does not change any score.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
from typing import Any

from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from optconsist_jax.data.records import MultipleChoice
from optconsist_jax.model import generate as gen
from optconsist_jax.model.generate import Tokenizer
from optconsist_jax.model import loss
from optconsist_jax import sharding


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


def harness_add_bos(tokenizer: Tokenizer) -> bool:
  """lm-evaluation-harness's BOS default for `tokenizer`.

  Since v0.4.9.2 the harness leaves BOS to the Hugging Face tokenizer
  (`add_bos_token=None`): `LlamaTokenizer` adds it, `GPT2Tokenizer` does not.
  The project's tokenizers say which they mirror in `add_bos_default`.
  """
  try:
    return bool(tokenizer.add_bos_default)
  except AttributeError:
    raise TypeError(
        f"{type(tokenizer).__name__} has no add_bos_default: pass add_bos"
        " explicitly") from None


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _row_log_likelihood(graphdef, params, inputs_BT, targets_BT, weights_BT,
                        segment_BT):
  """(sum of log p over weighted tokens, all weighted tokens greedy) per row."""
  model = nnx.merge(graphdef, params)
  logits_BTV = model.forward(inputs_BT, None, segment_BT).logits_BTV
  ll_BT = loss.token_log_likelihood(logits_BTV, targets_BT)
  scored_BT = weights_BT > 0
  greedy_BT = jnp.argmax(logits_BTV, axis=-1) == targets_BT
  return (jnp.sum(jnp.where(scored_BT, ll_BT, 0.0), axis=-1),
          jnp.all(greedy_BT | ~scored_BT, axis=-1))


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def bucket_length(t: int, length_bucket: int, max_len: int) -> int:
  """Smallest `length_bucket * 2**k` >= t, at most `max_len` (few shapes)."""
  b = length_bucket
  while b < t:
    b *= 2
  return min(b, max_len)


def _to_device(x: np.ndarray, mesh: jax.sharding.Mesh | None,
               rules: Any) -> Any:
  """A host batch as a global array sharded over the mesh's batch axes.

  Every process holds the same host batch; each places only the rows of its
  own devices, so each process's devices score their slice of the batch.
  """
  if mesh is None:
    return x
  sh = sharding.batch_sharding(mesh, sharding.as_rules(rules))
  shards = sharding.axes_size(mesh, sh.spec[0]) if sh.spec else 1
  if x.shape[0] % shards:
    raise ValueError(f"batch_size={x.shape[0]} is not a multiple of the"
                     f" mesh's batch axes ({shards} devices)")
  return jax.make_array_from_callback(x.shape, sh, lambda idx: x[idx])


def _to_host(x: jax.Array) -> np.ndarray:
  """A (possibly multi-process) global array, whole, on every process."""
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def score_requests(model: nnx.Module,
                   requests: Sequence[tuple[list[int], list[int]]], *,
                   batch_size: int = 16, max_len: int = 2048,
                   length_bucket: int = 64,
                   mesh: jax.sharding.Mesh | None = None, rules: Any = None
                   ) -> tuple[np.ndarray, np.ndarray]:
  """log p(continuation | context) and is-greedy of (context, cont) tokens.

  Args:
    model: the language model.
    requests: (context tokens, continuation tokens), context non-empty.
    batch_size: rows per forward pass (a multiple of the mesh's batch axes).
    max_len: model input length at most (longer inputs lose their left end);
      never more than the model's context (`generate.context_length`).
    length_bucket: padded lengths are `length_bucket * 2**k` (fewer compiles).
    mesh, rules: shard each batch's rows over the mesh's batch axes (and
      gather the scores back on every process); None: let jit place them.

  Returns:
    (float64 [n] summed log-probabilities, bool [n] whether greedy decoding
    produces the continuation: the harness's `is_greedy`).
  """
  max_len = gen.fit_to_context(max_len, model)
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
  greedy = np.ones(len(requests), bool)
  order = sorted((i for i, r in enumerate(rows) if r is not None),
                 key=lambda i: -len(rows[i][0]))
  graphdef, params = nnx.split(model)
  for lo in range(0, len(order), batch_size):
    idx = order[lo:lo + batch_size]
    t = bucket_length(len(rows[idx[0]][0]), length_bucket, max_len)
    inputs = np.zeros((batch_size, t), np.int32)
    targets = np.zeros((batch_size, t), np.int32)
    weights = np.zeros((batch_size, t), np.float32)
    segment = np.zeros((batch_size, t), np.int32)
    for r, i in enumerate(idx):
      inp, tgt, n_cont = rows[i]
      inputs[r, :len(inp)], targets[r, :len(tgt)] = inp, tgt
      segment[r, :len(inp)] = 1
      weights[r, len(inp) - n_cont:len(inp)] = 1.0
    sums, is_greedy = _row_log_likelihood(
        graphdef, params, *(_to_device(a, mesh, rules)
                            for a in (inputs, targets, weights, segment)))
    scores[idx] = _to_host(sums).astype(np.float64)[:len(idx)]
    greedy[idx] = _to_host(is_greedy)[:len(idx)]
  return scores, greedy


def score_continuations(model: nnx.Module,
                        requests: Sequence[tuple[list[int], list[int]]], *,
                        batch_size: int = 16, max_len: int = 2048,
                        length_bucket: int = 64) -> np.ndarray:
  """Summed log p(continuation | context): `score_requests`' first output."""
  return score_requests(model, requests, batch_size=batch_size,
                        max_len=max_len, length_bucket=length_bucket)[0]


def predict(logprobs: np.ndarray, choices: Sequence[str]
            ) -> tuple[int, int, int]:
  """(pred, pred_norm, pred_bytes) of one item, as `process_results`.

  Division by a zero-length choice follows numpy (the harness divides the
  same way).
  """
  lls = np.asarray(logprobs, np.float64)
  chars = np.array([float(len(c)) for c in choices])
  nbytes = np.array([float(len(c.encode("utf-8"))) for c in choices])
  with np.errstate(divide="ignore", invalid="ignore"):
    return (int(np.argmax(lls)), int(np.argmax(lls / chars)),
            int(np.argmax(lls / nbytes)))


@dataclasses.dataclass
class MultipleChoiceResult:
  """Per-benchmark scores and per-item predictions.

  Attributes:
    scores: benchmark -> {"acc", "acc_norm", "acc_bytes", "n"}.
    predictions: one dict per item (benchmark, id, label, logprobs, pred,
      pred_norm, pred_bytes), in input order.
    add_bos: whether every context started with BOS.
  """

  scores: dict[str, dict[str, float]]
  predictions: list[dict[str, Any]]
  add_bos: bool


def evaluate(model: nnx.Module, tokenizer: Tokenizer,
             items: Sequence[MultipleChoice], *, add_bos: bool | None = None,
             batch_size: int = 16, max_len: int = 2048
             ) -> MultipleChoiceResult:
  """acc, acc_norm and acc_bytes of `items`, grouped by their `benchmark`.

  `add_bos=None` takes the harness's default for the tokenizer
  (`harness_add_bos`).
  """
  if add_bos is None:
    add_bos = harness_add_bos(tokenizer)
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
    pred, pred_norm, pred_bytes = predict(lp, item.choices)
    predictions.append({"benchmark": item.benchmark, "id": item.id,
                        "label": item.label, "logprobs": lp.tolist(),
                        "pred": pred, "pred_norm": pred_norm,
                        "pred_bytes": pred_bytes})
    b = per_bench.setdefault(item.benchmark, [0, 0, 0, 0])
    b[0] += pred == item.label
    b[1] += pred_norm == item.label
    b[2] += pred_bytes == item.label
    b[3] += 1
  scores = {name: {"acc": acc / n, "acc_norm": acc_norm / n,
                   "acc_bytes": acc_bytes / n, "n": n}
            for name, (acc, acc_norm, acc_bytes, n) in per_bench.items()}
  return MultipleChoiceResult(scores, predictions, add_bos)
