"""Batched greedy decoding with the model's KV cache.

Prompts of different lengths are left-padded to a common length P so that
every row writes its next key/value into the same cache slot (the cache index
is one scalar). Pads carry segment id 0, real tokens segment id 1, so no real
token ever attends to a pad; positions count from 0 at each row's first real
token, so a padded row computes exactly what the unpadded prompt would.

Decoding runs as a jitted `jax.lax.while_loop` that exits early once every row
has finished (EOS or `max_new_tokens`). Stop strings are a property of decoded
text, not of token ids (a string can be split across tokens many ways), so the
loop runs in chunks of `chunk_size` steps; between chunks the host decodes the
unfinished rows and marks those that contain a stop string as finished. The
completion is cut at the first EOS and then at the earliest stop string, as
lm-evaluation-harness and the MetaMath eval script do.

Nothing is generated past the model's context (`context_length`: its
`max_position_embeddings`, the positions it was built and trained for; a
learned position table has no row beyond it): prompts keep at most their last
`C - min(max_new_tokens, C // 2)` tokens, and a batch whose padded prompt
length is P generates at most `C - P` tokens.

`use_cache=False` recomputes the full sequence at every step (the same loop,
no cache): the reference for tests and the baseline of bench/generation.py.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
import functools
import time
from typing import Any, NamedTuple, Protocol

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np


class Tokenizer(Protocol):
  """What generation and the evals need from a tokenizer."""

  bos_id: int
  eos_id: int
  pad_id: int
  vocab_size: int

  def encode(self, text: str, bos: bool = False,
             eos: bool = False) -> list[int]:
    ...

  def decode(self, ids: Sequence[int]) -> str:
    ...


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
  """How to decode.

  Attributes:
    max_new_tokens: generated tokens per prompt at most (EOS included; fewer
      where the model's context ends first, see the module docstring).
    stop_strings: a completion ends before the first of these it contains.
    batch_size: rows decoded together (the last batch is padded with dummy
      rows, so every batch has the same shape).
    max_prompt_len: longer prompts keep their last `max_prompt_len` tokens
      (fewer in a short-context model).
    prompt_bucket: the padded prompt length is rounded up to a multiple of
      this, so batches of similar length share one compiled program.
    chunk_size: decode steps between host-side stop-string checks.
    use_cache: decode with the KV cache (False: full forward every step).
    add_bos: prepend the tokenizer's BOS to each prompt.
  """

  max_new_tokens: int = 512
  stop_strings: tuple[str, ...] = ()
  batch_size: int = 8
  max_prompt_len: int = 1024
  prompt_bucket: int = 64
  chunk_size: int = 64
  use_cache: bool = True
  add_bos: bool = True

  def __post_init__(self):
    for key in ("max_new_tokens", "batch_size", "max_prompt_len",
                "prompt_bucket", "chunk_size"):
      if getattr(self, key) < 1:
        raise ValueError(
            f"GenerationConfig.{key}={getattr(self, key)} must be >= 1")
    if isinstance(self.stop_strings, str):
      raise ValueError("GenerationConfig.stop_strings must be a sequence of"
                       f" strings, got the string {self.stop_strings!r}")
    if any(not s for s in self.stop_strings):
      raise ValueError("GenerationConfig.stop_strings: empty stop string")


@dataclasses.dataclass
class GenerationResult:
  """Completions in prompt order and decoding speed.

  Attributes:
    completions: generated text, cut at EOS and at the first stop string.
    num_tokens: tokens the model generated per prompt (up to and including
      EOS; before the stop-string cut).
    seconds: wall time of decoding (prefill included, tokenization excluded,
      compilation included on first use).
  """

  completions: list[str]
  num_tokens: list[int]
  seconds: float

  @property
  def tokens_per_second(self) -> float:
    return sum(self.num_tokens) / max(self.seconds, 1e-9)


def context_length(model: nnx.Module) -> int | None:
  """Positions the model is built for (None: a model that does not say)."""
  return getattr(getattr(model, "config", None), "max_position_embeddings",
                 None)


def fit_to_context(max_len: int, model: nnx.Module) -> int:
  """`max_len` capped at the model's context (scorers' input length)."""
  ctx = context_length(model)
  return min(max_len, ctx) if ctx else max_len


class _DecodeState(NamedTuple):
  # KVCache when decoding with the cache, else the token buffer [B, P + N].
  memory: Any
  token_B: jax.Array       # the next token to emit (already chosen)
  step: jax.Array          # tokens emitted so far (scalar)
  done_B: jax.Array
  out_BN: jax.Array
  lengths_B: jax.Array     # tokens emitted per row


def _prompt_layout(prompt_lens_B, p):
  """Segment ids (0 on left pads) and positions (0 at first real token)."""
  pad_B = p - prompt_lens_B
  j_P = jnp.arange(p)
  segment_BP = (j_P[None, :] >= pad_B[:, None]).astype(jnp.int32)
  positions_BP = jnp.maximum(j_P[None, :] - pad_B[:, None], 0)
  return segment_BP, positions_BP.astype(jnp.int32)


def _full_layout(prompt_lens_B, p, total):
  """Layout of the no-cache buffer: prompt slots then generated slots."""
  pad_B = p - prompt_lens_B
  j_T = jnp.arange(total)
  segment_BT = (j_T[None, :] >= pad_B[:, None]).astype(jnp.int32)
  positions_BT = jnp.maximum(j_T[None, :] - pad_B[:, None], 0)
  return segment_BT, positions_BT.astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens",
                                             "use_cache"))
def _prefill(graphdef, params, tokens_BP, prompt_lens_B, done_B, *,
             max_new_tokens: int, use_cache: bool) -> _DecodeState:
  model = nnx.merge(graphdef, params)
  b, p = tokens_BP.shape
  n = max_new_tokens
  if use_cache:
    segment_BP, positions_BP = _prompt_layout(prompt_lens_B, p)
    cache = model.init_cache(b, p + n)
    out = model.forward(tokens_BP, positions_BP, segment_BP, cache=cache)
    memory, last_logits_BV = out.cache, out.logits_BTV[:, -1]
  else:
    memory = jnp.zeros((b, p + n), tokens_BP.dtype).at[:, :p].set(tokens_BP)
    segment_BT, positions_BT = _full_layout(prompt_lens_B, p, p + n)
    logits_BTV = model.forward(memory, positions_BT, segment_BT).logits_BTV
    last_logits_BV = logits_BTV[:, p - 1]
  return _DecodeState(
      memory=memory,
      token_B=jnp.argmax(last_logits_BV, axis=-1).astype(jnp.int32),
      step=jnp.zeros((), jnp.int32),
      done_B=done_B,
      out_BN=jnp.zeros((b, n), jnp.int32),
      lengths_B=jnp.zeros((b,), jnp.int32))


@functools.partial(jax.jit, static_argnames=("graphdef", "use_cache"),
                   donate_argnames=("state",))
def _decode_chunk(graphdef, params, state: _DecodeState, prompt_lens_B,
                  stop_step, eos_id, pad_id, *, use_cache: bool
                  ) -> _DecodeState:
  """Emits tokens until `stop_step` steps are done or every row finished."""
  model = nnx.merge(graphdef, params)
  b, n = state.out_BN.shape

  def cond(s: _DecodeState):
    return (s.step < stop_step) & ~jnp.all(s.done_B)

  def body(s: _DecodeState):
    emit_B = ~s.done_B
    token_B = jnp.where(emit_B, s.token_B, pad_id)
    out_BN = jax.lax.dynamic_update_slice(s.out_BN, token_B[:, None],
                                          (0, s.step))
    lengths_B = s.lengths_B + emit_B.astype(jnp.int32)
    done_B = s.done_B | (s.token_B == eos_id) | (s.step + 1 >= n)
    if use_cache:
      positions_B1 = (prompt_lens_B + s.step)[:, None]
      out = model.forward(token_B[:, None], positions_B1,
                          jnp.ones((b, 1), jnp.int32), cache=s.memory)
      memory, logits_BV = out.cache, out.logits_BTV[:, 0]
    else:
      total = s.memory.shape[1]
      p = total - n
      memory = jax.lax.dynamic_update_slice(s.memory, token_B[:, None],
                                            (0, p + s.step))
      segment_BT, positions_BT = _full_layout(prompt_lens_B, p, total)
      logits_BTV = model.forward(memory, positions_BT, segment_BT).logits_BTV
      logits_BV = jax.lax.dynamic_index_in_dim(logits_BTV, p + s.step, 1,
                                               keepdims=False)
    return _DecodeState(memory, jnp.argmax(logits_BV, -1).astype(jnp.int32),
                        s.step + 1, done_B, out_BN, lengths_B)

  return jax.lax.while_loop(cond, body, state)


def greedy_decode(model: nnx.Module, tokens_BP: np.ndarray,
                  prompt_lens_B: np.ndarray, max_new_tokens: int, *,
                  eos_id: int | None, pad_id: int = 0,
                  done_B: np.ndarray | None = None, use_cache: bool = True,
                  chunk_size: int = 64,
                  should_stop: Callable[[int, np.ndarray], bool] | None = None
                  ) -> tuple[np.ndarray, np.ndarray]:
  """Greedy decoding of a left-padded batch.

  Args:
    model: a `Llama` (anything with its `forward`/`init_cache`).
    tokens_BP: int prompt tokens, each row right-aligned (left pads).
    prompt_lens_B: real tokens per row (>= 1).
    max_new_tokens: N, decode steps at most.
    eos_id: a row finishes after emitting it (None: never).
    pad_id: written to finished rows' remaining slots.
    done_B: rows that are finished before starting (batch padding).
    use_cache: KV cache (True) or full forward every step.
    chunk_size: steps between calls of `should_stop`.
    should_stop: `(row, tokens_so_far) -> bool`, checked between chunks for
      unfinished rows (stop strings).

  Returns:
    (tokens_BN, lengths_B): generated tokens (EOS included) and per-row count.
  """
  tokens_BP = np.asarray(tokens_BP, np.int32)
  prompt_lens_B = np.asarray(prompt_lens_B, np.int32)
  b, p = tokens_BP.shape
  if prompt_lens_B.shape != (b,):
    raise ValueError(f"prompt_lens_B has shape {prompt_lens_B.shape}, expected"
                     f" ({b},)")
  if np.any(prompt_lens_B < 1) or np.any(prompt_lens_B > p):
    raise ValueError(f"prompt lengths must be in [1, {p}]: {prompt_lens_B}")
  if done_B is None:
    done_B = np.zeros((b,), bool)
  graphdef, params = nnx.split(model)
  eos = jnp.int32(-1 if eos_id is None else eos_id)
  state = _prefill(graphdef, params, tokens_BP, prompt_lens_B,
                   jnp.asarray(done_B, bool), max_new_tokens=max_new_tokens,
                   use_cache=use_cache)
  stop_step = 0
  while True:
    stop_step = min(stop_step + chunk_size, max_new_tokens)
    state = _decode_chunk(graphdef, params, state, prompt_lens_B,
                          jnp.int32(stop_step), eos, jnp.int32(pad_id),
                          use_cache=use_cache)
    done = np.array(state.done_B)
    if done.all() or stop_step >= max_new_tokens:
      break
    if should_stop is not None:
      out_BN, lengths_B = np.asarray(state.out_BN), np.asarray(state.lengths_B)
      changed = False
      for row in np.flatnonzero(~done):
        if should_stop(int(row), out_BN[row, :lengths_B[row]]):
          done[row] = changed = True
      if done.all():
        break
      if changed:
        state = state._replace(done_B=jnp.asarray(done))
  return np.asarray(state.out_BN), np.asarray(state.lengths_B)


def truncate_at_stop(text: str, stop_strings: Sequence[str]) -> str:
  """Cuts `text` before the earliest occurrence of any stop string."""
  cut = len(text)
  for s in stop_strings:
    i = text.find(s)
    if i != -1:
      cut = min(cut, i)
  return text[:cut]


def _round_up(x: int, m: int) -> int:
  return -(-x // m) * m


def generate(model: nnx.Module, tokenizer: Tokenizer, prompts: Sequence[str],
             config: GenerationConfig = GenerationConfig()
             ) -> GenerationResult:
  """Greedy completions of `prompts` (returned in prompt order)."""
  encoded = [tokenizer.encode(t, bos=config.add_bos) for t in prompts]
  for i, ids in enumerate(encoded):
    if not ids:
      raise ValueError(f"generate: prompt {i} encodes to no tokens (set"
                       " add_bos=True or give a non-empty prompt)")
  ctx = context_length(model) or config.max_prompt_len + config.max_new_tokens
  max_prompt_len = min(config.max_prompt_len,
                       ctx - min(config.max_new_tokens, ctx // 2))
  encoded = [ids[-max_prompt_len:] for ids in encoded]
  # Longest first: rows of similar length share a batch (less padding).
  order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
  completions: list[str] = [""] * len(prompts)
  num_tokens = [0] * len(prompts)
  eos_id = tokenizer.eos_id
  stops = tuple(config.stop_strings)

  def cut_eos(ids: np.ndarray) -> list[int]:
    ids = [int(t) for t in ids]
    if eos_id is not None and eos_id in ids:
      ids = ids[:ids.index(eos_id)]
    return ids

  def should_stop(row: int, ids: np.ndarray) -> bool:
    del row
    text = tokenizer.decode(cut_eos(ids))
    return any(s in text for s in stops)

  start = time.perf_counter()
  bs = config.batch_size
  for lo in range(0, len(order), bs):
    rows = order[lo:lo + bs]
    p = min(_round_up(max(len(encoded[i]) for i in rows),
                      config.prompt_bucket), max_prompt_len)
    p = max(p, max(len(encoded[i]) for i in rows))
    max_new_tokens = min(config.max_new_tokens, ctx - p)
    tokens_BP = np.full((bs, p), tokenizer.pad_id, np.int32)
    lens_B = np.ones((bs,), np.int32)
    done_B = np.ones((bs,), bool)
    tokens_BP[:, -1] = tokenizer.bos_id  # dummy rows: one BOS token
    for r, i in enumerate(rows):
      ids = encoded[i]
      tokens_BP[r, p - len(ids):] = ids
      lens_B[r] = len(ids)
      done_B[r] = False
    out_BN, lengths_B = greedy_decode(
        model, tokens_BP, lens_B, max_new_tokens, eos_id=eos_id,
        pad_id=tokenizer.pad_id, done_B=done_B, use_cache=config.use_cache,
        chunk_size=config.chunk_size,
        should_stop=should_stop if stops else None)
    for r, i in enumerate(rows):
      ids = out_BN[r, :lengths_B[r]]
      num_tokens[i] = int(lengths_B[r])
      completions[i] = truncate_at_stop(tokenizer.decode(cut_eos(ids)), stops)
  return GenerationResult(completions, num_tokens,
                          time.perf_counter() - start)
