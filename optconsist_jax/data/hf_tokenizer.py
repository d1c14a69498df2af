"""Hugging Face `tokenizer.json` tokenizers (Llama-3, Qwen, OLMo-2, Mistral).

Also Moonlight's `tiktoken.model` (no tokenizer.json in its repo), converted
to the equivalent tokenizer.json on load by data/tiktoken_bpe.py.

A thin adapter over Hugging Face's `tokenizers` (Rust), which reads the whole
pipeline from `tokenizer.json` (normalizer, pre-tokenizer, BPE model with byte
fallback or byte-level BPE, decoder, added/special tokens), plus the special
tokens and BOS/EOS rules of `tokenizer_config.json` (and, for older repos,
`special_tokens_map.json`), as transformers' `PreTrainedTokenizerFast` does.
tests/test_hf_tokenizer.py pins the ids against transformers on fixtures that
tests/make_hf_fixtures.py wrote.

Interface as `optconsist_jax.data.tokenizer.Tokenizer`: `encode(text, bos=,
eos=)`, `encode_batch`, `decode(ids)`, `bos_id`, `eos_id`, `pad_id`,
`vocab_size`, `id_to_piece`, `add_bos_default`.

Rules, per family, from the files rather than from the family's name:

* BOS/EOS/pad: the tokens `tokenizer_config.json` names (`bos_token`,
  `eos_token`, `pad_token`, as strings or AddedToken dicts). A family with no
  BOS token (Qwen2.5/3: `bos_token: null`) uses its EOS token wherever the
  data code puts a BOS (Qwen's config.json does the same: `bos_token_id` is
  `<|endoftext|>`), as lm-evaluation-harness's `prefix_token_id`; without a
  pad token, EOS pads (pad positions carry zero loss weight).
* `add_bos_default` / `add_eos_default`: what transformers' tokenizer adds
  with `add_special_tokens=True`: `add_bos_token` / `add_eos_token` from
  tokenizer_config.json when present, else what the post-processor of
  tokenizer.json adds (Llama-3's TemplateProcessing prepends
  `<|begin_of_text|>`; Qwen's and OLMo-2's add nothing).
* Special-token strings inside the text (`<|im_start|>`, `<|endoftext|>`) are
  encoded as ordinary text by `encode`, as in `Tokenizer` (data cannot inject
  control tokens); `encode(text, special=True)` maps them to their ids, for
  text laid out in a chat format (`special_ids` lists them, `chat_template`
  holds the tokenizer's Jinja template unrendered).
* Leading space, as `GPT2BPETokenizer`: the data code relies on
  SentencePiece's dummy prefix (`encode(prompt) + encode(response)` equals
  encoding `prompt + " " + response`). Tokenizers whose normalizer or
  pre-tokenizer already prepends a word boundary (Llama/Mistral-style
  Metaspace / Prepend("▁")) are left alone. For byte-level BPE
  (Llama-3, Qwen, OLMo-2), `add_prefix_space=True` (the default) encodes
  `" " + text` and `decode` drops one leading space; `add_prefix_space=False`
  gives transformers' exact ids of `text`.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os
from typing import Any

import tokenizers

from optconsist_jax import storage
from optconsist_jax.data import tiktoken_bpe

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"


def is_hf_tokenizer_path(path: str | os.PathLike) -> bool:
  """True for a tokenizer.json or tiktoken.model file or a folder holding
  one (for dispatch)."""
  path = os.fspath(path)
  if os.path.basename(path) in (TOKENIZER_FILE, tiktoken_bpe.TIKTOKEN_FILE):
    return storage.is_file(path)
  return (storage.is_dir(path) and bool(
      {TOKENIZER_FILE, tiktoken_bpe.TIKTOKEN_FILE}
      & set(storage.listdir(path))))


def _read_json(path: str, required: bool) -> dict[str, Any]:
  if not storage.is_file(path):
    if required:
      raise FileNotFoundError(f"tokenizer file not found: {path}")
    return {}
  try:
    out = json.loads(storage.read_text(path))
  except json.JSONDecodeError as e:
    raise ValueError(f"{path}: not JSON: {e}") from e
  if not isinstance(out, dict):
    raise ValueError(f"{path}: expected a JSON object")
  return out


def _token_text(value: Any) -> str | None:
  """A special token as tokenizer_config.json writes it (str or AddedToken)."""
  if isinstance(value, dict):
    return value.get("content")
  return value


def _has_dummy_prefix(spec: Any) -> bool:
  """True when tokenizer.json's pipeline prepends a word boundary itself."""
  if isinstance(spec, dict):
    kind = spec.get("type")
    if kind == "Prepend":
      return True
    if kind == "Metaspace":
      scheme = spec.get("prepend_scheme")
      if scheme is None:  # tokenizers < 0.19 wrote add_prefix_space
        return bool(spec.get("add_prefix_space", True))
      return scheme != "never"
    if kind == "ByteLevel" and spec.get("add_prefix_space"):
      return True
    return any(_has_dummy_prefix(v) for v in spec.values())
  if isinstance(spec, list):
    return any(_has_dummy_prefix(v) for v in spec)
  return False


class HFTokenizer:
  """A `tokenizer.json` tokenizer with Llama-style `encode(..., bos=, eos=)`.

  Attributes:
    path: where it was loaded from (for messages).
    add_bos_default: transformers' tokenizer adds BOS with
      add_special_tokens=True (lm-evaluation-harness >= 0.4.9.2 follows it).
    add_eos_default: likewise for EOS.
    add_prefix_space: see the module docstring.
    chat_template: the tokenizer's chat template (Jinja source) or None.
    special_ids: special/added token text -> id.
  """

  def __init__(self, tokenizer_json: str, config: dict[str, Any],
               path: str = "", *, add_prefix_space: bool = True):
    """Builds a tokenizer from tokenizer.json's text and its config.

    Args:
      tokenizer_json: the content of tokenizer.json.
      config: tokenizer_config.json (special_tokens_map.json merged under it).
      path: where they came from, for messages.
      add_prefix_space: module docstring.

    Raises:
      ValueError: tokenizer.json does not parse, or a named special token is
        not in the vocabulary.
    """
    where = path or TOKENIZER_FILE
    self.path = path
    try:
      self._tok = tokenizers.Tokenizer.from_str(tokenizer_json)
      spec = json.loads(tokenizer_json)
    except Exception as e:  # tokenizers raises a bare Exception.
      raise ValueError(f"{where}: not a tokenizers tokenizer.json: {e}") from e
    self._plain = tokenizers.Tokenizer.from_str(tokenizer_json)
    self._plain.encode_special_tokens = True  # specials in text stay text
    self.special_ids = {t.content: i for i, t in
                        self._tok.get_added_tokens_decoder().items()
                        if t.special}

    def special(key: str) -> int | None:
      text = _token_text(config.get(key))
      if text is None:
        return None
      i = self._tok.token_to_id(text)
      if i is None:
        raise ValueError(f"{where}: {key}={text!r} (tokenizer_config.json)"
                         " is not in the vocabulary")
      return i

    self._eos = special("eos_token")
    if self._eos is None:
      raise ValueError(f"{where}: tokenizer_config.json names no eos_token;"
                       " training examples end with EOS")
    bos, pad = special("bos_token"), special("pad_token")
    self._bos = self._eos if bos is None else bos
    self._pad = self._eos if pad is None else pad
    self._unk = special("unk_token")
    prefix, suffix = self._post_processor_additions()
    self.add_bos_default = bool(config.get(
        "add_bos_token", bos is not None and prefix[:1] == [bos]))
    self.add_eos_default = bool(config.get(
        "add_eos_token", suffix[-1:] == [self._eos]))
    self.add_prefix_space = add_prefix_space and not _has_dummy_prefix(
        [spec.get("normalizer"), spec.get("pre_tokenizer")])
    self.chat_template = config.get("chat_template")

  def _post_processor_additions(self) -> tuple[list[int], list[int]]:
    """Ids tokenizer.json's post-processor puts before and after a text."""
    full = self._tok.encode("a", add_special_tokens=True).ids
    bare = self._tok.encode("a", add_special_tokens=False).ids
    for k in range(len(full) - len(bare) + 1):
      if full[k:k + len(bare)] == bare:
        return full[:k], full[k + len(bare):]
    return [], []

  @classmethod
  def load(cls, path: str | os.PathLike, *,
           add_prefix_space: bool = True) -> HFTokenizer:
    """Loads a folder with tokenizer.json (+ tokenizer_config.json), or the
    tokenizer.json file itself (its config read from the same folder).

    A folder with tiktoken.model and no tokenizer.json (Moonlight/Kimi) is
    converted to its tokenizer.json first (data/tiktoken_bpe.py); its
    tokenizer_config.json must name the special tokens.
    """
    path = os.fspath(path)
    folder = (os.path.dirname(path) if os.path.basename(path) in (
        TOKENIZER_FILE, tiktoken_bpe.TIKTOKEN_FILE) else path)
    tok_path = storage.join(folder, TOKENIZER_FILE)
    tiktoken = tiktoken_bpe.is_tiktoken_dir(folder)
    if not tiktoken and not storage.is_file(tok_path):
      raise FileNotFoundError(f"tokenizer file not found: {tok_path}")
    config = {**_read_json(storage.join(folder, SPECIAL_TOKENS_FILE), False),
              **_read_json(storage.join(folder, CONFIG_FILE), tiktoken)}
    text = (tiktoken_bpe.tokenizer_json(folder, config) if tiktoken
            else storage.read_text(tok_path))
    return cls(text, config, path=folder, add_prefix_space=add_prefix_space)

  @property
  def bos_id(self) -> int:
    """BOS, or EOS for a family without one (module docstring)."""
    return self._bos

  @property
  def eos_id(self) -> int:
    return self._eos

  @property
  def pad_id(self) -> int:
    return self._pad

  @property
  def unk_id(self) -> int | None:
    return self._unk

  @property
  def vocab_size(self) -> int:
    """Entries with the added tokens (transformers' len(tokenizer)); the
    model's embedding may have more rows."""
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str, *, bos: bool = False, eos: bool = False,
             special: bool = False) -> list[int]:
    """Token ids of `text`, optionally with BOS / EOS around it.

    Args:
      text: one piece of text.
      bos, eos: add the BOS / EOS id.
      special: map special-token strings in `text` to their ids (chat
        markup); False encodes them as ordinary text.
    """
    if not isinstance(text, str):
      raise TypeError(
          f"HFTokenizer.encode expects str, got {type(text).__name__}")
    if self.add_prefix_space:
      text = " " + text
    tok = self._tok if special else self._plain
    ids = tok.encode(text, add_special_tokens=False).ids
    return [self._bos] * bos + ids + [self._eos] * eos

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    if self.add_prefix_space:
      texts = [" " + t for t in texts]
    return [e.ids for e in self._plain.encode_batch(
        list(texts), add_special_tokens=False)]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; special tokens and ids beyond the vocabulary (padded
    embedding rows) decode to nothing."""
    kept = []
    for i in ids:
      i = int(i)
      if i < 0:
        raise ValueError(f"negative token id {i}")
      if i < self.vocab_size:
        kept.append(i)
    text = self._tok.decode(kept, skip_special_tokens=True)
    if self.add_prefix_space and text.startswith(" "):
      text = text[1:]
    return text

  def id_to_piece(self, i: int) -> str:
    return self._tok.id_to_token(int(i))

  def token_id(self, text: str) -> int:
    """The id of one token (e.g. a chat marker such as "<|im_end|>")."""
    i = self._tok.token_to_id(text)
    if i is None:
      raise KeyError(f"{self.path or TOKENIZER_FILE}: no token {text!r}")
    return i

  def __repr__(self) -> str:
    return (f"HFTokenizer({self.path!r}, vocab_size={self.vocab_size},"
            f" bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id},"
            f" add_bos_default={self.add_bos_default},"
            f" add_prefix_space={self.add_prefix_space})")
