"""GPT-2 byte-level BPE against Hugging Face's GPT2Tokenizer on a tiny vocab.

The expected ids and pre-tokenizer pieces in tests/fixtures/nanogpt/
bpe_cases.json were written by tests/make_nanogpt_fixture.py with
transformers' (regex-based, slow) GPT2Tokenizer and the `regex` module.
"""

import json
import os
import random
import shutil

import pytest

from optconsist_jax.data import gpt2_bpe

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "nanogpt")


@pytest.fixture(scope="module")
def tok():
  """GPT-2's exact encoding (no added leading space)."""
  return gpt2_bpe.GPT2BPETokenizer.load(FIXTURES, add_prefix_space=False)


@pytest.fixture(scope="module")
def spm_like():
  """The default: a leading space added and removed, as SentencePiece."""
  return gpt2_bpe.GPT2BPETokenizer.load(FIXTURES)


@pytest.fixture(scope="module")
def cases():
  with open(os.path.join(FIXTURES, "bpe_cases.json"), encoding="utf-8") as f:
    return json.load(f)


@pytest.fixture(scope="module")
def vocab():
  with open(os.path.join(FIXTURES, "vocab.json"), encoding="utf-8") as f:
    return json.load(f)


def _gpt2_byte_table():
  """OpenAI gpt-2 encoder.py's bytes_to_unicode, written out here."""
  bs = (list(range(ord("!"), ord("~") + 1))
        + list(range(ord("\xa1"), ord("\xac") + 1))
        + list(range(ord("\xae"), ord("\xff") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, (chr(c) for c in cs)))


def test_bytes_map_to_gpt2_byte_symbols(tok, vocab):
  table = _gpt2_byte_table()
  # GPT-2's well-known symbols: space -> 'Ġ' (U+0120), newline -> 'Ċ'.
  assert table[ord(" ")] == "\u0120" and table[ord("\n")] == "\u010a"
  # One-byte texts (nothing to merge) are the byte's symbol in the vocab.
  for b in range(128):
    assert tok.encode(chr(b)) == [vocab[table[b]]], b
  # A two-byte character no merge joins: one symbol per UTF-8 byte.
  assert tok.encode("\u00fc") == [vocab[table[0xc3]], vocab[table[0xbc]]]


def test_pretokenize_matches_regex_module(cases):
  for case in cases["cases"]:
    assert gpt2_bpe.pretokenize(case["text"]) == case["pieces"], case["text"]


def test_encode_matches_hf_gpt2_tokenizer(tok, cases):
  assert len(cases["cases"]) > 300
  for case in cases["cases"]:
    assert tok.encode(case["text"]) == case["ids"], case["text"]


def test_merges_apply_by_rank(tok, vocab):
  # Worked by hand from merges.txt: "l l" (rank 19) before "H e" (31), then
  # "He ll", "Hell o"; " cat": "a t" (9), "Ġ c" (13), "Ġc at" (26).
  assert tok.encode("Hello") == [vocab["Hello"]]
  assert tok.encode(" cat") == [vocab["\u0120cat"]]
  assert tok.encode(" the") == [vocab["\u0120the"]]
  # No merge joins 'c' and 'a' without the space: bytes stay apart.
  assert tok.encode("ca") == [vocab["c"], vocab["a"]]


def test_round_trip_unicode(tok, spm_like):
  texts = ["naïve café 日本語 🙂 ∑x\n\n  tabs\tand \u00a0 nbsp \r\n",
           "e\u0301 \U0001f468\u200d\U0001f469\u200d\U0001f467 ʕ•ᴥ•ʔ",
           "<|endoftext|> is ordinary text here", ""]
  rng = random.Random(0)
  planes = [(0x20, 0x7f), (0xa0, 0x3000), (0x3000, 0xa000), (0xe000, 0xffff),
            (0x10000, 0x1fa00)]
  for _ in range(200):
    chars = []
    for _ in range(rng.randint(1, 30)):
      lo, hi = rng.choice(planes)
      chars.append(chr(rng.randrange(lo, hi)) if rng.random() < 0.7
                   else rng.choice(" \n\t'sl"))
    texts.append("".join(chars))
  for text in texts:
    assert tok.decode(tok.encode(text)) == text
    assert spm_like.decode(spm_like.encode(text)) == text


def test_prefix_space_is_sentencepiece_like(tok, spm_like, cases, vocab):
  for case in cases["cases"]:
    assert spm_like.encode(case["text"]) == tok.encode(" " + case["text"])
  # The data code's rule: separately encoded prompt and response equal the
  # joint encoding with a space between (prompt ends in a non-space).
  prompt, response = "### Response:", "Hello world, the cat 123"
  assert (spm_like.encode(prompt) + spm_like.encode(response)
          == spm_like.encode(prompt + " " + response))
  assert spm_like.encode("Hello") == [vocab["\u0120"], vocab["Hello"]]
  assert spm_like.decode(spm_like.encode(" two  spaces")) == " two  spaces"


def test_special_ids(tok, vocab):
  eot = vocab["<|endoftext|>"]
  assert tok.bos_id == tok.eos_id == tok.pad_id == eot
  assert tok.vocab_size == len(vocab) == eot + 1
  ids = tok.encode("Hello", bos=True, eos=True)
  assert ids == [eot, vocab["Hello"], eot]
  # The special id and padded-vocab ids (>= vocab_size) decode to nothing.
  assert tok.decode(ids + [tok.vocab_size, tok.vocab_size + 40]) == "Hello"
  # The special string in text is ordinary text, not the special id.
  assert eot not in tok.encode("<|endoftext|>")
  with pytest.raises(ValueError, match="negative"):
    tok.decode([-1])


def test_decode_cut_multibyte_char_is_replacement(tok):
  ids = tok.encode("ü")  # two bytes, no merge joins them.
  assert len(ids) == 2
  assert tok.decode(ids[:1]) == "\ufffd"


def test_openai_file_names(tmp_path, tok):
  shutil.copy(os.path.join(FIXTURES, "vocab.json"), tmp_path / "encoder.json")
  shutil.copy(os.path.join(FIXTURES, "merges.txt"), tmp_path / "vocab.bpe")
  assert gpt2_bpe.is_gpt2_bpe_dir(tmp_path)
  assert not gpt2_bpe.is_gpt2_bpe_dir(tmp_path / "encoder.json")
  other = gpt2_bpe.GPT2BPETokenizer.load(tmp_path, add_prefix_space=False)
  text = "Hello world, the cat's in the hat 123"
  assert other.encode(text) == tok.encode(text)
  explicit = gpt2_bpe.GPT2BPETokenizer.load(tmp_path / "encoder.json",
                                            tmp_path / "vocab.bpe",
                                            add_prefix_space=False)
  assert explicit.encode(text) == tok.encode(text)


def test_bad_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="vocab.json"):
    gpt2_bpe.GPT2BPETokenizer.load(tmp_path)
  shutil.copy(os.path.join(FIXTURES, "vocab.json"), tmp_path / "vocab.json")
  (tmp_path / "merges.txt").write_text("#version: 0.2\nH e\nbad line here\n",
                                       encoding="utf-8")
  with pytest.raises(ValueError, match=r"merges.txt:3"):
    gpt2_bpe.GPT2BPETokenizer.load(tmp_path)
  (tmp_path / "merges.txt").write_text("#version: 0.2\nx y\n", encoding="utf-8")
  with pytest.raises(ValueError, match="'xy', which is not in the vocab"):
    gpt2_bpe.GPT2BPETokenizer.load(tmp_path)
  with open(os.path.join(FIXTURES, "vocab.json"), encoding="utf-8") as f:
    vocab = json.load(f)
  del vocab["<|endoftext|>"]
  (tmp_path / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (tmp_path / "merges.txt").write_text("", encoding="utf-8")
  with pytest.raises(ValueError, match="endoftext"):
    gpt2_bpe.GPT2BPETokenizer.load(tmp_path)
