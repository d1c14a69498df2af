"""Token sequences with loss masks, packing into rows, and batch assembly.

Supervised examples follow MetaMath's training recipe (Yu et al. 2023, arXiv
2309.12284; train_math.py in meta-math/MetaMath, after Stanford Alpaca):
tokens = BOS + encode(Alpaca prompt) + encode(response) + EOS; the loss mask
is 1 on the target (response + EOS) only. Plain-text documents (language-model loss) are
BOS + encode(text) + EOS with every token after BOS a target.

Truncation policy (`TRUNCATION_POLICIES`), for an example longer than
`max_len` tokens:
  * "truncate_right" (default): keep the first `max_len` tokens (the prompt and
    the start of the response; the EOS is lost). An example whose prompt alone
    leaves no target token is dropped. Both are counted in `TruncationStats`.
  * "drop": drop the example; counted.
  * "error": raise, naming the example.
Documents longer than `max_len` are split into consecutive chunks overlapping
by one token, so every token after BOS is a target exactly once (counted as
`split`). Nothing is dropped silently: the pipeline logs `stats.report()`.

Rows and the batch contract (PREAMBLE / train_step): an example of n tokens
occupies n - 1 slots of a row of length T with `inputs = tokens[:-1]`,
`targets = tokens[1:]`, `weights = loss_mask[1:]`, positions 0..n-2 and its own
segment id (1, 2, ... within the row; 0 = padding). Packed examples never
attend to each other because the model masks attention across segment ids, and
positions restart at 0 per segment, so a packed example's logits equal its
logits alone in a row.
"""

from __future__ import annotations

import bisect
import dataclasses
import os
from collections.abc import Sequence

import numpy as np

from optconsist_jax.data import prompts
from optconsist_jax.data.records import MathExample
from optconsist_jax.data.tokenizer import Tokenizer

TRUNCATION_POLICIES = ("truncate_right", "drop", "error")
BATCH_KEYS = ("inputs", "targets", "weights", "positions", "segment_ids")


@dataclasses.dataclass(frozen=True)
class TokenizedExample:
  """One token sequence; `loss_mask[i]` = 1 when token i is a target."""
  tokens: np.ndarray  # int32 [n]
  loss_mask: np.ndarray  # int8 [n]


@dataclasses.dataclass
class TruncationStats:
  """Counts of what the truncation policy did."""
  examples: int = 0
  kept: int = 0
  truncated: int = 0
  dropped: int = 0
  split: int = 0
  tokens: int = 0
  target_tokens: int = 0
  target_tokens_cut: int = 0
  longest: int = 0

  def report(self) -> str:
    return (f"{self.examples} examples: {self.kept} kept, {self.truncated}"
            f" truncated, {self.dropped} dropped, {self.split} split into"
            f" chunks; {self.tokens} tokens ({self.target_tokens} targets,"
            f" {self.target_tokens_cut} target tokens cut); longest example"
            f" {self.longest} tokens")


def _check_policy(truncation: str) -> None:
  if truncation not in TRUNCATION_POLICIES:
    raise ValueError(f"truncation={truncation!r}; expected one of"
                     f" {TRUNCATION_POLICIES}")


def _as_query_response(example) -> tuple[str, str]:
  if isinstance(example, MathExample):
    return example.query, example.response
  if isinstance(example, dict) and "query" in example and "response" in example:
    return example["query"], example["response"]
  raise TypeError(f"expected a MathExample or a dict with query/response, got"
                  f" {type(example).__name__}")


def _finish(tokens: list[int], mask: list[int], max_len: int, truncation: str,
            stats: TruncationStats, name: str) -> TokenizedExample | None:
  n = len(tokens)
  stats.examples += 1
  stats.longest = max(stats.longest, n)
  if n > max_len:
    if truncation == "error":
      raise ValueError(f"{name}: {n} tokens > max_len={max_len}"
                       " (truncation='error')")
    cut = sum(mask[max_len:])
    if truncation == "drop" or sum(mask[1:max_len]) == 0:
      stats.dropped += 1
      stats.target_tokens_cut += sum(mask)
      return None
    stats.truncated += 1
    stats.target_tokens_cut += cut
    tokens, mask = tokens[:max_len], mask[:max_len]
  else:
    stats.kept += 1
  stats.tokens += len(tokens)
  stats.target_tokens += sum(mask[1:])
  return TokenizedExample(np.asarray(tokens, np.int32),
                          np.asarray(mask, np.int8))


def supervised_tokens(prompt_ids: Sequence[int], response_ids: Sequence[int],
                      tokenizer: Tokenizer) -> tuple[list[int], list[int]]:
  """BOS + prompt + response + EOS and its mask (1 on response + EOS)."""
  tokens = [tokenizer.bos_id, *prompt_ids, *response_ids, tokenizer.eos_id]
  mask = [0] * (1 + len(prompt_ids)) + [1] * (len(response_ids) + 1)
  return tokens, mask


def tokenize_supervised(example: MathExample | dict, tokenizer: Tokenizer,
                        max_len: int, truncation: str = "truncate_right",
                        stats: TruncationStats | None = None,
                        name: str = "example") -> TokenizedExample | None:
  """The MetaMath training sequence of `example` (None when dropped).

  Args:
    example: a MathExample (or dict with query/response).
    tokenizer: the tokenizer.
    max_len: most tokens kept (BOS through EOS).
    truncation: policy for longer examples (module docstring).
    stats: counters to update (a fresh one when None).
    name: how errors name the example (e.g. "train.json: record 12").
  """
  _check_policy(truncation)
  query, response = _as_query_response(example)
  tokens, mask = supervised_tokens(
      tokenizer.encode(prompts.alpaca_prompt(query)),
      tokenizer.encode(response), tokenizer)
  return _finish(tokens, mask, max_len, truncation, stats or TruncationStats(),
                 name)


def document_chunks(tokens: Sequence[int], max_len: int,
                    stats: TruncationStats) -> list[TokenizedExample]:
  """A document's tokens (BOS ... EOS) in chunks of <= `max_len` (overlap 1).

  Every token but the first is a target exactly once.
  """
  stats.examples += 1
  stats.longest = max(stats.longest, len(tokens))
  if len(tokens) > max_len:
    stats.split += 1
  else:
    stats.kept += 1
  out = []
  step = max_len - 1
  for start in range(0, max(len(tokens) - 1, 1), step):
    chunk = np.asarray(tokens[start:start + max_len], np.int32)
    if len(chunk) < 2:
      break
    mask = np.ones(len(chunk), np.int8)
    mask[0] = 0
    stats.tokens += len(chunk)
    stats.target_tokens += len(chunk) - 1
    out.append(TokenizedExample(chunk, mask))
  return out


# ---------------------------------------------------------------- storage


class TokenStore:
  """Many token sequences in flat arrays (cheap to pickle to grain workers).

  Attributes:
    tokens: int32 [total] all sequences back to back.
    loss_mask: int8 [total].
    offsets: int64 [n + 1]; sequence i is tokens[offsets[i]:offsets[i+1]].
  """

  def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray,
               offsets: np.ndarray):
    self.tokens = np.asarray(tokens, np.int32)
    self.loss_mask = np.asarray(loss_mask, np.int8)
    self.offsets = np.asarray(offsets, np.int64)
    if len(self.tokens) != len(self.loss_mask) or self.offsets[-1] != len(
        self.tokens):
      raise ValueError("TokenStore: tokens, loss_mask and offsets disagree")

  @classmethod
  def from_examples(cls, examples: Sequence[TokenizedExample]) -> TokenStore:
    if not examples:
      raise ValueError("TokenStore: no examples (empty dataset after"
                       " tokenization/truncation)")
    lengths = np.fromiter((len(e.tokens) for e in examples), np.int64,
                          len(examples))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    return cls(np.concatenate([e.tokens for e in examples]),
               np.concatenate([e.loss_mask for e in examples]), offsets)

  def __len__(self) -> int:
    return len(self.offsets) - 1

  @property
  def lengths(self) -> np.ndarray:
    return np.diff(self.offsets)

  def __getitem__(self, i: int) -> TokenizedExample:
    a, b = self.offsets[i], self.offsets[i + 1]
    return TokenizedExample(self.tokens[a:b], self.loss_mask[a:b])

  def save(self, path: str) -> None:
    tmp = path + ".tmp.npz"
    np.savez(tmp, tokens=self.tokens, loss_mask=self.loss_mask,
             offsets=self.offsets)
    os.replace(tmp, path)

  @classmethod
  def load(cls, path: str) -> TokenStore:
    with np.load(path) as f:
      return cls(f["tokens"], f["loss_mask"], f["offsets"])


# ---------------------------------------------------------------- packing


def pack_rows(lengths: Sequence[int], seq_len: int, *, pack: bool = True,
              seed: int = 0) -> list[np.ndarray]:
  """Groups sequences into rows of at most `seq_len` slots.

  A sequence of n tokens needs n - 1 slots. With `pack`, sequences are visited
  in a seeded random order and each goes to the open row with the least room
  that still fits it (best fit), else to a new row; so rows hold examples from
  all over the dataset. The packing is fixed for the run (epochs reshuffle
  rows, not row contents), which keeps steps per epoch constant.

  Returns:
    Row i's sequence indices, in placement order.
  """
  lengths = np.asarray(lengths, np.int64)
  slots = lengths - 1
  if len(slots) and (slots.max() > seq_len or slots.min() < 1):
    i = int(np.argmax(slots > seq_len)) if slots.max() > seq_len else int(
        np.argmin(slots))
    raise ValueError(f"pack_rows: sequence {i} needs {slots[i]} slots; rows"
                     f" hold 1..{seq_len}")
  if not pack:
    return [np.asarray([i], np.int64) for i in range(len(slots))]
  order = np.random.default_rng([seed, 0x9ACC]).permutation(len(slots))
  rows: list[list[int]] = []
  buckets: dict[int, list[int]] = {}  # room left -> open rows with that room
  rooms: list[int] = []  # sorted distinct keys of non-empty buckets
  for i in order.tolist():
    need = int(slots[i])
    k = bisect.bisect_left(rooms, need)
    if k == len(rooms):
      row = len(rows)
      rows.append([i])
      room = seq_len - need
    else:
      room = rooms[k]
      row = buckets[room].pop()
      if not buckets[room]:
        del buckets[room]
        rooms.pop(k)
      rows[row].append(i)
      room -= need
    if room > 0:
      if room not in buckets:
        buckets[room] = []
        bisect.insort(rooms, room)
      buckets[room].append(row)
  return [np.asarray(r, np.int64) for r in rows]


def assemble_rows(store: TokenStore, rows: Sequence[Sequence[int]],
                  seq_len: int, pad_id: int = 0) -> dict[str, np.ndarray]:
  """The batch-contract arrays [len(rows), seq_len] for rows of sequences."""
  b = len(rows)
  inputs = np.full((b, seq_len), pad_id, np.int32)
  targets = np.full((b, seq_len), pad_id, np.int32)
  weights = np.zeros((b, seq_len), np.float32)
  positions = np.zeros((b, seq_len), np.int32)
  segment_ids = np.zeros((b, seq_len), np.int32)
  for r, row in enumerate(rows):
    at = 0
    for seg, i in enumerate(row, 1):
      a, e = store.offsets[i], store.offsets[i + 1]
      n = e - a - 1
      if at + n > seq_len:
        raise ValueError(f"row {r} overflows seq_len={seq_len}")
      inputs[r, at:at + n] = store.tokens[a:e - 1]
      targets[r, at:at + n] = store.tokens[a + 1:e]
      weights[r, at:at + n] = store.loss_mask[a + 1:e]
      positions[r, at:at + n] = np.arange(n, dtype=np.int32)
      segment_ids[r, at:at + n] = seg
      at += n
  return {"inputs": inputs, "targets": targets, "weights": weights,
          "positions": positions, "segment_ids": segment_ids}
