"""Greedy decoding with the KV cache against repeated full forwards."""

import dataclasses
import functools

from flax import nnx
import jax
import numpy as np
import pytest

from optconsist_jax.model import generate as gen
from optconsist_jax.model import Llama, preset


class ByteTokenizer:
  """ASCII characters as token ids; 0 pad, 1 BOS, 2 EOS."""

  pad_id, bos_id, eos_id, vocab_size = 0, 1, 2, 128

  def encode(self, text, bos=False, eos=False):
    ids = [ord(c) for c in text]
    assert all(3 <= i < 128 for i in ids), text
    return [self.bos_id] * bos + ids + [self.eos_id] * eos

  def decode(self, ids):
    return "".join(chr(i) for i in ids if i >= 3)


@pytest.fixture(scope="module")
def model():
  # A wide initializer makes random logits well separated (no argmax ties)
  # and the greedy path varied.
  config = preset("tiny_gqa").replace(initializer_range=0.3)
  return Llama(config, rngs=nnx.Rngs(0))


_REF_LEN = 48


@functools.partial(jax.jit, static_argnums=0)
def _full_logits(graphdef, state, tokens_1T):
  return nnx.merge(graphdef, state)(tokens_1T)


def reference_greedy(model, ids, n, eos_id=None):
  """Argmax of a plain causal forward over the unpadded sequence, n times.

  The sequence is right-padded to a fixed length so one compiled forward
  serves every step; causal attention makes the pads invisible to the
  positions read.
  """
  graphdef, state = nnx.split(model)
  ids, out = list(ids), []
  for _ in range(n):
    assert len(ids) <= _REF_LEN
    tokens = np.zeros((1, _REF_LEN), np.int32)
    tokens[0, :len(ids)] = ids
    logits = np.asarray(_full_logits(graphdef, state, tokens))
    nxt = int(np.argmax(logits[0, len(ids) - 1]))
    out.append(nxt)
    ids.append(nxt)
    if nxt == eos_id:
      break
  return out


PROMPTS = [[1, 40, 41, 42, 43, 44, 45], [1, 70], [1, 90, 91, 92]]


def left_pad(prompts, p):
  tokens = np.zeros((len(prompts), p), np.int32)
  for r, ids in enumerate(prompts):
    tokens[r, p - len(ids):] = ids
  return tokens, np.array([len(x) for x in prompts], np.int32)


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_repeated_full_forward(model, use_cache):
  n = 10
  tokens, lens = left_pad(PROMPTS, 9)  # extra pads beyond the longest row
  out, lengths = gen.greedy_decode(model, tokens, lens, n, eos_id=None,
                                   use_cache=use_cache, chunk_size=4)
  np.testing.assert_array_equal(lengths, [n] * len(PROMPTS))
  for r, ids in enumerate(PROMPTS):
    want = reference_greedy(model, ids, n)
    assert out[r].tolist() == want, r
  # The test is only meaningful if the rows generate different things.
  assert len({tuple(row) for row in out.tolist()}) == len(PROMPTS)


def test_eos_stops_one_row_only(model):
  n = 8
  free = reference_greedy(model, PROMPTS[0], n)
  eos = free[3]  # row 0 emits this token at step 3 (first time or earlier)
  k = free.index(eos)
  tokens, lens = left_pad(PROMPTS, 7)
  out, lengths = gen.greedy_decode(model, tokens, lens, n, eos_id=eos,
                                   pad_id=0, chunk_size=3)
  assert lengths[0] == k + 1
  assert out[0, :k + 1].tolist() == free[:k + 1]
  assert (out[0, k + 1:] == 0).all()
  for r in (1, 2):
    want = reference_greedy(model, PROMPTS[r], n, eos_id=eos)
    assert lengths[r] == len(want)
    assert out[r, :lengths[r]].tolist() == want


def test_generate_stop_strings_and_order(model):
  tok = ByteTokenizer()
  prompts = ["Question: 12+3?", "Hi", "abc def"]
  n = 24
  free = gen.generate(model, tok, prompts, gen.GenerationConfig(
      max_new_tokens=n, batch_size=2, prompt_bucket=4, chunk_size=5))
  # Results come back in prompt order and equal the unpadded reference.
  for prompt, text in zip(prompts, free.completions):
    want = reference_greedy(model, tok.encode(prompt, bos=True), n,
                            eos_id=tok.eos_id)
    want_ids = [t for t in want if t != tok.eos_id]
    assert text == tok.decode(want_ids)
  text0 = free.completions[0]
  stop = next(text0[i:i + 2] for i in range(3, len(text0) - 1)
              if text0[i:i + 2] not in text0[:i + 1])
  cut = gen.generate(model, tok, prompts, gen.GenerationConfig(
      max_new_tokens=n, batch_size=2, prompt_bucket=4, chunk_size=2,
      stop_strings=(stop, "\u0000never")))
  assert cut.completions[0] == text0[:text0.index(stop)]
  assert not cut.completions[0].count(stop)
  # The host-side check ended the row before max_new_tokens.
  assert cut.num_tokens[0] < n or text0.index(stop) > n - 4
  assert cut.tokens_per_second > 0


def test_truncate_at_stop_takes_earliest():
  assert gen.truncate_at_stop("a Question: b Response: c",
                              ["Response:", "Question:"]) == "a "
  assert gen.truncate_at_stop("abc", ["x"]) == "abc"


def test_bad_config_is_named():
  with pytest.raises(ValueError, match="max_new_tokens"):
    gen.GenerationConfig(max_new_tokens=0)
  with pytest.raises(ValueError, match="stop_strings"):
    gen.GenerationConfig(stop_strings="Question:")


class _NoEos(ByteTokenizer):
  eos_id = None


def test_generation_stops_at_the_model_context(model):
  """A 24-position model: prompts and completions fit in 24 positions.

  RoPE has no parameters per position, so the same weights with a longer
  context give the reference: the short model's completion is its prefix.
  """
  short = nnx.merge(*nnx.split(model))
  short.config = model.config.replace(max_position_embeddings=24)
  tok = _NoEos()
  config = gen.GenerationConfig(max_new_tokens=100, batch_size=1,
                                prompt_bucket=8)
  # 5 prompt tokens -> padded to 8 -> 24 - 8 = 16 new tokens.
  prompt = "abcd"
  got = gen.generate(short, tok, [prompt], config)
  assert got.num_tokens == [16]
  want = reference_greedy(model, tok.encode(prompt, bos=True), 16)
  assert got.completions == [tok.decode(want)]
  # 31 prompt tokens: the last 24 - min(100, 24 // 2) = 12 are kept (the
  # padded length is capped there too), then 12 new tokens.
  long_prompt = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcd"
  got = gen.generate(short, tok, [long_prompt], config)
  assert got.num_tokens == [12]
  kept = tok.encode(long_prompt, bos=True)[-12:]
  assert got.completions == [tok.decode(reference_greedy(model, kept, 12))]
  # Without a short context, the full 100 (the reference buffer holds 48).
  got = gen.generate(model, tok, ["ab"], dataclasses.replace(
      config, max_new_tokens=40))
  assert got.num_tokens == [40]
