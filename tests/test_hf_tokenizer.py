"""tokenizer.json tokenizers against the ids transformers gave.

The fixtures under tests/fixtures/hf_tokenizers/ were written by
tests/make_hf_tokenizer_fixtures.py: tiny tokenizers laid out as Llama-3's,
Qwen2.5's, OLMo-2's (byte-level BPE) and Mistral's (BPE with byte fallback),
and what transformers' PreTrainedTokenizerFast did with a text sample
(expected.json). These tests need only our code and `tokenizers`.
"""

import json
import os

from fake_hub import FakeHub, Repo
import pytest

from optconsist_jax.data import hf_tokenizer
from optconsist_jax.data import pipeline

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures",
                        "hf_tokenizers")
FAMILIES = ("llama3", "qwen2", "olmo2", "mistral")
BYTE_LEVEL = ("llama3", "qwen2", "olmo2")
# What each family's files say, read off the published tokenizer configs
# (see the fixture script): BOS added by transformers' tokenizer, and
# whether a BOS token exists at all.
ADDS_BOS = {"llama3": True, "qwen2": False, "olmo2": False, "mistral": True}


def _load(name, **kw):
  folder = os.path.join(FIXTURES, name)
  with open(os.path.join(folder, "expected.json")) as f:
    return hf_tokenizer.HFTokenizer.load(folder, **kw), json.load(f)


@pytest.mark.parametrize("name", FAMILIES)
def test_ids_match_transformers(name):
  exact, want = _load(name, add_prefix_space=False)
  for text, ids, split, with_specials in zip(
      want["samples"], want["ids"], want["ids_split_specials"],
      want["ids_with_specials"]):
    # Special-token strings in the text: our default keeps them text (as
    # transformers with split_special_tokens=True); special=True parses them.
    assert exact.encode(text) == split, (name, text)
    assert exact.encode(text, special=True) == ids, (name, text)
    assert exact.encode(text, bos=exact.add_bos_default,
                        eos=exact.add_eos_default,
                        special=True) == with_specials, (name, text)
  assert exact.encode_batch(want["samples"]) == want["ids_split_specials"]


@pytest.mark.parametrize("name", FAMILIES)
def test_special_ids_and_bos_eos_rules(name):
  tok, want = _load(name)
  assert tok.add_bos_default == ADDS_BOS[name]
  assert not tok.add_eos_default
  assert tok.eos_id == want["eos_token_id"]
  # No BOS token (Qwen): EOS stands in, as Qwen's config.json bos_token_id.
  assert tok.bos_id == (want["bos_token_id"] if want["bos_token_id"]
                        is not None else want["eos_token_id"])
  assert tok.pad_id == (want["pad_token_id"] if want["pad_token_id"]
                        is not None else want["eos_token_id"])
  assert tok.vocab_size == want["len"]
  assert tok.id_to_piece(tok.eos_id) in tok.special_ids


@pytest.mark.parametrize("name", FAMILIES)
def test_prefix_space_and_decode(name):
  tok, want = _load(name)
  for text, ids, prefixed, decoded in zip(
      want["samples"], want["ids"], want["ids_prefixed"], want["decoded"]):
    if "<" in text:  # special strings: compared in test_ids_match
      continue
    if name in BYTE_LEVEL:
      # SentencePiece-like: as if a word boundary preceded the text.
      assert tok.add_prefix_space
      assert tok.encode(text) == prefixed, (name, text)
    else:
      # The Metaspace/Prepend tokenizer adds its own dummy prefix.
      assert not tok.add_prefix_space
      assert tok.encode(text) == ids, (name, text)
    assert tok.decode(tok.encode(text)) == decoded == text, (name, text)


@pytest.mark.parametrize("name", ("llama3", "qwen2"))
def test_chat_markup_ids(name):
  tok, want = _load(name, add_prefix_space=False)
  assert tok.chat_template
  assert tok.encode(want["chat_text"], special=True) == want["chat_ids"]
  # As data (special=False) the markers are split into ordinary pieces.
  plain = tok.encode(want["chat_text"])
  assert not set(plain) & set(tok.special_ids.values())
  marker = "<|im_end|>" if name == "qwen2" else "<|eot_id|>"
  assert tok.token_id(marker) in want["chat_ids"]


def test_decode_drops_specials_and_padded_rows():
  tok, _ = _load("qwen2")
  ids = tok.encode("2 + 3")
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.vocab_size + 5]) == (
      "2 + 3")


def test_pipeline_tokenizes_with_a_tokenizer_json_folder():
  folder = os.path.join(FIXTURES, "qwen2")
  config = pipeline.DataConfig(format="synthetic", synthetic_examples=3,
                               tokenizer_path=folder)
  tok = pipeline.load_tokenizer(config)
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  # The file itself works too.
  tok2 = hf_tokenizer.HFTokenizer.load(os.path.join(folder, "tokenizer.json"))
  assert tok2.encode("x y") == tok.encode("x y")
  records = pipeline.load_records(config)
  store, _ = pipeline.tokenize_records(records, tok, max_len=4096)
  r = records[0]
  seq = store.tokens[store.offsets[0]:store.offsets[1]].tolist()
  # Qwen has no BOS token: EOS opens and closes the example.
  want = [tok.eos_id, *tok.encode(pipeline.prompts.alpaca_prompt(r.query)),
          *tok.encode(r.response), tok.eos_id]
  assert seq == want
  assert tok.decode(seq) == (pipeline.prompts.alpaca_prompt(r.query) + " "
                             + r.response)


def test_bad_files_are_named(tmp_path):
  with pytest.raises(FileNotFoundError, match="tokenizer.json"):
    hf_tokenizer.HFTokenizer.load(tmp_path)
  (tmp_path / "tokenizer.json").write_text("{not json")
  with pytest.raises(ValueError, match="tokenizer.json"):
    hf_tokenizer.HFTokenizer.load(tmp_path)
  src = os.path.join(FIXTURES, "qwen2")
  (tmp_path / "tokenizer.json").write_text(
      open(os.path.join(src, "tokenizer.json")).read())
  (tmp_path / "tokenizer_config.json").write_text(
      json.dumps({"eos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=r"eos_token='<\|nope\|>'"):
    hf_tokenizer.HFTokenizer.load(tmp_path)


def test_hub_repo_without_tokenizer_model_gives_its_tokenizer_json(
    tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  monkeypatch.chdir(tmp_path)
  folder = os.path.join(FIXTURES, "llama3")
  files = {name: open(os.path.join(folder, name), "rb").read()
           for name in ("tokenizer.json", "tokenizer_config.json")}
  files["README.md"] = b"# tiny llama-3 style repo\n"
  with FakeHub({("model", "tiny-org/tiny-llama3"): Repo(files=files)}) as hub:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    tok = pipeline.load_tokenizer(pipeline.DataConfig(
        format="synthetic", tokenizer_path="tiny-org/tiny-llama3"))
  local, want = _load("llama3")
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  assert tok.encode(want["samples"][0]) == local.encode(want["samples"][0])
  assert tok.add_bos_default and tok.bos_id == want["bos_token_id"]
