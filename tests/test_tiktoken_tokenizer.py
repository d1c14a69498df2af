"""Moonlight-style tiktoken.model folders against tiktoken's own ids.

tests/make_tiktoken_fixtures.py wrote tests/fixtures/tiktoken/moonlight/: a
small tiktoken.model (byte-level BPE trained across pre-tokenizer
boundaries, shuffled byte ranks, tokens no merge reaches), a
tokenizer_config.json laid out as Moonlight's, and in expected.json what
`tiktoken.Encoding`, built as Moonlight's tokenization_moonshot.py builds it,
did with a multilingual / math / code / whitespace / special-token sample.
These tests need only our code and `tokenizers`.
"""

import base64
import json
import os
import shutil

from fake_hub import FakeHub, Repo
import pytest

from optconsist_jax.data import hf_tokenizer
from optconsist_jax.data import pipeline
from optconsist_jax.data import tiktoken_bpe
from optconsist_jax.experiments import external_bases

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "tiktoken",
                      "moonlight")


@pytest.fixture(scope="module")
def want():
  with open(os.path.join(FOLDER, "expected.json"), encoding="utf-8") as f:
    return json.load(f)


def _copy(tmp_path):
  folder = tmp_path / "moonlight"
  shutil.copytree(FOLDER, folder)
  return folder


def test_ids_match_tiktoken(want):
  tok = hf_tokenizer.HFTokenizer.load(FOLDER, add_prefix_space=False)
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  for text, plain, special in zip(want["samples"], want["ids_plain"],
                                  want["ids_special"]):
    # Special-token strings stay text by default (the wrapper's
    # allow_special_tokens=False); special=True is its default encode.
    assert tok.encode(text) == plain, text
    assert tok.encode(text, special=True) == special, text
  assert tok.encode_batch(want["samples"]) == want["ids_plain"]
  assert tok.encode(want["chat_text"], special=True) == want["chat_ids"]
  # The sample exercises what could differ: special ids parsed, a token no
  # merge reaches ("qzj", tiktoken's whole-piece rule), Han next to Latin.
  assert want["ids_special"] != want["ids_plain"]
  assert [656] == tok.encode("qzj") and tok.id_to_piece(656) == "qzj"


def test_prefix_space_and_decode(want):
  tok = hf_tokenizer.HFTokenizer.load(FOLDER)
  # A Split pre-tokenizer adds no word boundary: as Llama-3's byte-level BPE,
  # encode(x) is tiktoken's encoding of " " + x and decode drops that space.
  assert tok.add_prefix_space
  for text, prefixed, decoded in zip(want["samples"], want["ids_prefixed"],
                                     want["decoded"]):
    assert tok.encode(text) == prefixed, text
    assert tok.decode(tok.encode(text)) == decoded == text
  # Special ids and padded embedding rows decode to nothing.
  exact = hf_tokenizer.HFTokenizer.load(FOLDER, add_prefix_space=False)
  ids = exact.encode("2 + 3 = 5")
  assert exact.decode([want["bos_token_id"], *ids, want["eos_token_id"],
                       exact.vocab_size + 3]) == "2 + 3 = 5"


def test_special_tokens_and_bos_eos_follow_the_config(want, tmp_path):
  tok = hf_tokenizer.HFTokenizer.load(FOLDER)
  assert tok.bos_id == want["bos_token_id"] == want["n_base"]
  assert tok.eos_id == want["eos_token_id"] == want["n_base"] + 1
  assert tok.pad_id == want["pad_token_id"]
  assert tok.unk_id == want["unk_token_id"]
  # The base tokens and the reserved ids (named or <|reserved_token_ID|>).
  assert tok.vocab_size == want["n_vocab"] == want["n_base"] + 256
  assert tok.special_ids == want["special_tokens"]
  assert tok.token_id("<|im_end|>") == want["special_tokens"]["<|im_end|>"]
  assert tok.chat_template and "<|im_middle|>" in tok.chat_template
  # Moonlight's config has no add_bos_token and its TikTokenTokenizer adds
  # nothing with add_special_tokens=True (the base build_inputs_...).
  assert not tok.add_bos_default and not tok.add_eos_default
  ids = tok.encode("x")
  assert tok.encode("x", bos=True, eos=True) == [tok.bos_id, *ids, tok.eos_id]
  # A config that asks for BOS gets it, as for tokenizer.json folders.
  folder = _copy(tmp_path)
  config = json.loads((folder / "tokenizer_config.json").read_text())
  (folder / "tokenizer_config.json").write_text(json.dumps(
      {**config, "add_bos_token": True}))
  assert hf_tokenizer.HFTokenizer.load(folder).add_bos_default


def test_dispatch_data_pipeline_and_external_bases(want, tmp_path):
  assert hf_tokenizer.is_hf_tokenizer_path(FOLDER)
  path = os.path.join(FOLDER, "tiktoken.model")
  assert hf_tokenizer.is_hf_tokenizer_path(path)
  config = pipeline.DataConfig(format="synthetic", synthetic_examples=3,
                               tokenizer_path=FOLDER)
  tok = pipeline.load_tokenizer(config)
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  text = want["samples"][3]
  assert pipeline.load_tokenizer(config.replace(tokenizer_path=path)).encode(
      text) == tok.encode(text) == want["ids_prefixed"][3]
  records = pipeline.load_records(config)
  store, _ = pipeline.tokenize_records(records, tok, max_len=4096)
  r = records[0]
  seq = store.tokens[store.offsets[0]:store.offsets[1]].tolist()
  assert seq == [want["bos_token_id"],
                 *tok.encode(pipeline.prompts.alpaca_prompt(r.query)),
                 *tok.encode(r.response), want["eos_token_id"]]
  # A Moonlight model folder (weights, config.json, tiktoken files) brings
  # its tokenizer as an external base of the study.
  folder = _copy(tmp_path)
  (folder / "config.json").write_text(json.dumps(
      {"model_type": "deepseek_v3",
       "_name_or_path": "moonshotai/Moonlight-16B-A3B"}))
  assert external_bases.tokenizer_of(str(folder), "hf", "") == str(folder)
  # A tokenizer.json beside it wins (the converted file, saved).
  assert tiktoken_bpe.is_tiktoken_dir(folder)
  (folder / "tokenizer.json").write_text(
      tiktoken_bpe.tokenizer_json(str(folder), json.loads(
          (folder / "tokenizer_config.json").read_text())))
  assert not tiktoken_bpe.is_tiktoken_dir(folder)
  assert hf_tokenizer.HFTokenizer.load(folder).encode(text) == tok.encode(text)


def test_hub_repo_with_tiktoken_model(want, tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  monkeypatch.chdir(tmp_path)
  files = {}
  for name in ("tiktoken.model", "tokenizer_config.json"):
    with open(os.path.join(FOLDER, name), "rb") as f:
      files[name] = f.read()
  files["tokenization_moonshot.py"] = b"# remote code: never run here\n"
  with FakeHub({("model", "tiny-org/tiny-moonlight"): Repo(files=files)}
               ) as hub:
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
    tok = pipeline.load_tokenizer(pipeline.DataConfig(
        format="synthetic", tokenizer_path="tiny-org/tiny-moonlight"))
  assert isinstance(tok, hf_tokenizer.HFTokenizer)
  assert tok.encode(want["samples"][0]) == want["ids_prefixed"][0]


@pytest.mark.parametrize("line, error", [
    ("not-a-line", r"tiktoken.model:3: expected 'BASE64 RANK'"),
    ("@@@@ 2", r"tiktoken.model:3: '@@@@' is not base64"),
    ("QQ== two", r"tiktoken.model:3: rank 'two' is not an integer"),
    ("QQ== 2", r"tiktoken.model:\d+: token b'A' is also on line 3"),
    ("QUJD 0", r"tiktoken.model:3: rank 0 given twice"),
])
def test_malformed_tiktoken_model_names_file_and_line(tmp_path, line, error):
  folder = _copy(tmp_path)
  lines = (folder / "tiktoken.model").read_text().splitlines()
  lines[2] = line
  (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
  with pytest.raises(ValueError, match=error):
    hf_tokenizer.HFTokenizer.load(folder)


def test_incomplete_files_are_named(tmp_path):
  folder = _copy(tmp_path)
  lines = (folder / "tiktoken.model").read_text().splitlines()
  # A rank gap, then a single byte missing (rank order kept).
  (folder / "tiktoken.model").write_text("\n".join(lines[:300] + lines[301:]))
  with pytest.raises(ValueError, match=r"rank 300 is missing"):
    hf_tokenizer.HFTokenizer.load(folder)
  rest = [f"{b64} {int(rank) - 1}" for b64, rank in
          (x.split() for x in lines[1:])]
  (folder / "tiktoken.model").write_text("\n".join(rest))
  with pytest.raises(ValueError, match=r"single byte\(s\) \[1\]"):
    hf_tokenizer.HFTokenizer.load(folder)
  (folder / "tiktoken.model").write_text("\n".join(lines))
  config_file = folder / "tokenizer_config.json"
  config = json.loads(config_file.read_text())
  config_file.write_text(json.dumps({**config, "eos_token": "<|nope|>"}))
  with pytest.raises(ValueError, match=r"eos_token='<\|nope\|>'"):
    hf_tokenizer.HFTokenizer.load(folder)
  config_file.write_text(json.dumps(
      {**config, "added_tokens_decoder": {"5": {"content": "[BOS]"}}}))
  with pytest.raises(ValueError, match=r"tokenizer_config.json: added token"
                     r" '\[BOS\]' has id 5"):
    hf_tokenizer.HFTokenizer.load(folder)
  config_file.unlink()
  with pytest.raises(FileNotFoundError, match="tokenizer_config.json"):
    hf_tokenizer.HFTokenizer.load(folder)


def test_special_token_that_is_also_a_base_token_is_refused(tmp_path):
  # tokenizers would give the added token the base token's id (a wrong BOS).
  folder = _copy(tmp_path)
  lines = (folder / "tiktoken.model").read_text().splitlines()
  n = len(lines)
  lines.append(f"{base64.b64encode(b'[BOS]').decode()} {n}")
  (folder / "tiktoken.model").write_text("\n".join(lines) + "\n")
  config_file = folder / "tokenizer_config.json"
  config = json.loads(config_file.read_text())
  config["added_tokens_decoder"] = {
      str(int(i) + 1): e for i, e in config["added_tokens_decoder"].items()}
  config_file.write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"tokenizer_config.json: special"
                     r" token\(s\) \['\[BOS\]'\] are also tokens"):
    hf_tokenizer.HFTokenizer.load(folder)
