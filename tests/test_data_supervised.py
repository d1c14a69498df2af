"""Tokenizer, supervised sequences/masks, truncation counts and packing."""

import numpy as np
import pytest

from optconsist_jax.data import prompts, supervised
from optconsist_jax.data.records import MathExample
from optconsist_jax.data.tokenizer import Tokenizer

EX = MathExample(query="Ben has 3 apples and buys 4 more. How many?",
                 response="3 + 4 = 7.\n#### 7\nThe answer is: 7", answer="7")


@pytest.fixture(scope="module")
def tok():
  return Tokenizer.tiny()


def test_tiny_tokenizer_is_llama_like(tok):
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 0, 0)
  assert 1000 <= tok.vocab_size <= 4000
  text = "Zürich: 12,345 × π ≈ 🙂\n\ttabs"
  ids = tok.encode(text, bos=True, eos=True)
  assert ids[0] == 1 and ids[-1] == 2 and 0 not in ids  # byte fallback: no unk
  assert tok.decode(ids) == text
  # Digits are split one per piece, like Llama.
  assert [tok.id_to_piece(i) for i in tok.encode("2024")][-4:] == list("2024")


def test_dummy_prefix_behaviour_is_as_documented(tok):
  ctx, cont = "Question: What is 2+2?\nAnswer:", " 4"
  whole = tok.encode(ctx + cont)
  n = len(tok.encode(ctx))
  assert whole[:n] == tok.encode(ctx)
  assert tok.decode(whole[n:]) == "4"
  # encode(b) begins with a word-initial piece: separately encoded pieces are
  # not the joint encoding when b has no leading space.
  assert tok.id_to_piece(tok.encode("abc")[0]).startswith("▁")
  # The supervised concatenation equals joint encoding with one space.
  p = prompts.alpaca_prompt(EX.query)
  assert tok.encode(p) + tok.encode(EX.response) == tok.encode(
      p + " " + EX.response)


def test_prompts():
  p = prompts.alpaca_prompt("Q?")
  assert p.startswith("Below is an instruction that describes a task.")
  assert p.endswith("### Instruction:\nQ?\n\n### Response:")
  assert prompts.metamath_eval_prompt("Q?") == p + " Let's think step by step."


def test_mask_covers_exactly_the_target(tok):
  ex = supervised.tokenize_supervised(EX, tok, max_len=512)
  toks, mask = ex.tokens, ex.loss_mask.astype(bool)
  assert toks[0] == tok.bos_id and toks[-1] == tok.eos_id and mask[-1]
  target = list(toks[mask])
  assert target == tok.encode(EX.response) + [tok.eos_id]
  prompt_part = list(toks[~mask])
  assert prompt_part == [tok.bos_id] + tok.encode(prompts.alpaca_prompt(EX.query))
  # In the batch contract, weights mark targets that are response/EOS tokens.
  store = supervised.TokenStore.from_examples([ex])
  b = supervised.assemble_rows(store, [[0]], seq_len=len(toks) + 3)
  w = b["weights"][0].astype(bool)
  assert list(b["targets"][0][w]) == target
  assert w.sum() == len(target)
  np.testing.assert_array_equal(b["inputs"][0][:len(toks) - 1], toks[:-1])


def test_truncation_policies_are_counted(tok):
  n = len(supervised.tokenize_supervised(EX, tok, 512).tokens)
  n_prompt = 1 + len(tok.encode(prompts.alpaca_prompt(EX.query)))
  stats = supervised.TruncationStats()
  cut = supervised.tokenize_supervised(EX, tok, n - 3, stats=stats)
  assert len(cut.tokens) == n - 3 and cut.tokens[-1] != tok.eos_id
  assert (stats.truncated, stats.target_tokens_cut) == (1, 3)
  assert supervised.tokenize_supervised(EX, tok, n_prompt, stats=stats) is None
  assert stats.dropped == 1  # No target left: dropped, counted.
  assert supervised.tokenize_supervised(EX, tok, n - 1, "drop", stats) is None
  assert stats.dropped == 2 and stats.examples == 3
  assert "1 truncated, 2 dropped" in stats.report()
  with pytest.raises(ValueError, match=r"record 9: \d+ tokens > max_len"):
    supervised.tokenize_supervised(EX, tok, n - 1, "error", name="record 9")
  with pytest.raises(ValueError, match="truncation="):
    supervised.tokenize_supervised(EX, tok, n, "middle")


def test_documents_split_every_token_a_target_once(tok):
  stats = supervised.TruncationStats()
  text = "The quick brown fox jumps over the lazy dog. " * 5
  full = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
  chunks = supervised.document_chunks(full, 16, stats)
  targets = np.concatenate([c.tokens[1:] for c in chunks])
  np.testing.assert_array_equal(targets, full[1:])
  assert all(c.loss_mask[0] == 0 and c.loss_mask[1:].all() for c in chunks)
  assert stats.split == 1 and stats.target_tokens == len(full) - 1


@pytest.mark.parametrize("pack", [True, False])
def test_pack_rows_places_every_sequence_once(pack):
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 34, size=500)
  rows = supervised.pack_rows(lengths, 32, pack=pack, seed=1)
  placed = np.concatenate(rows)
  assert sorted(placed.tolist()) == list(range(500))
  assert all((lengths[r] - 1).sum() <= 32 for r in rows)
  if pack:  # Best fit fills rows well.
    assert (lengths - 1).sum() / (32 * len(rows)) > 0.9
  with pytest.raises(ValueError, match="sequence 0 needs 40 slots"):
    supervised.pack_rows([41], 32)


def test_assemble_rows_segments_and_positions():
  store = supervised.TokenStore.from_examples([
      supervised.TokenizedExample(np.array([1, 5, 6, 2], np.int32),
                                  np.array([0, 0, 1, 1], np.int8)),
      supervised.TokenizedExample(np.array([1, 7, 2], np.int32),
                                  np.array([0, 1, 1], np.int8))])
  b = supervised.assemble_rows(store, [[1, 0], []], seq_len=7)
  np.testing.assert_array_equal(b["inputs"][0], [1, 7, 1, 5, 6, 0, 0])
  np.testing.assert_array_equal(b["targets"][0], [7, 2, 5, 6, 2, 0, 0])
  np.testing.assert_array_equal(b["weights"][0], [1, 1, 0, 1, 1, 0, 0])
  np.testing.assert_array_equal(b["positions"][0], [0, 1, 0, 1, 2, 0, 0])
  np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 2, 2, 2, 0, 0])
  assert not b["segment_ids"][1].any() and not b["weights"][1].any()
