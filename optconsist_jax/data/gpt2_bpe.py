"""GPT-2 byte-level BPE tokenizer (the tokenizer of the authors' small bases).

A thin adapter over Hugging Face's `tokenizers` (Rust): a BPE model with
GPT-2's byte-level pre-tokenizer and decoder, built from the standard files,
`vocab.json` + `merges.txt` (Hugging Face names) or `encoder.json` +
`vocab.bpe` (OpenAI's names for the same content). The ids are those of
OpenAI's gpt-2 `src/encoder.py` (Radford et al. 2019) and of transformers'
GPT2Tokenizer (tests/test_gpt2_bpe.py pins them).

Interface as `optconsist_jax.data.tokenizer.Tokenizer`: `encode(text, bos=,
eos=)`, `decode(ids)`, `bos_id`, `eos_id`, `pad_id`, `vocab_size`. GPT-2 has one
special token, `<|endoftext|>` (id 50256), which serves as BOS, EOS and pad
(pad positions carry zero loss weight). As in `Tokenizer`, special-token
strings inside the text are encoded as ordinary text, and `decode` drops the
special id and ids beyond the vocabulary (the model's vocab is padded from
50257 to 50304 rows; those rows never appear in data).

Leading space. `Tokenizer` (SentencePiece, Llama-2) prepends a dummy-prefix
space to every text, and the data code relies on it: `encode(prompt) +
encode(response)` equals encoding `prompt + " " + response` jointly, and
`decode` drops that one leading space. With `add_prefix_space=True` (the
default) this class does the same: `encode(x)` is GPT-2's encoding of
`" " + x`, and `decode` removes one leading space, so `decode(encode(x)) == x`.
(Unlike the option of the same name in `tokenizers`' ByteLevel, which adds no
space to a text that starts with one.) `add_prefix_space=False` gives GPT-2's
(and tiktoken's) exact encoding of `x`.
"""

from __future__ import annotations

from collections.abc import Sequence
import json
import os

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from optconsist_jax import storage

EOT_TOKEN = "<|endoftext|>"
_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))


def _byte_level() -> pre_tokenizers.ByteLevel:
  """GPT-2's pre-tokenizer: its regex split, bytes mapped to symbols."""
  return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def pretokenize(text: str) -> list[str]:
  """GPT-2's pre-tokenization of `text` (pieces that concatenate to it)."""
  return [text[a:b] for _, (a, b) in _byte_level().pre_tokenize_str(text)]


def is_gpt2_bpe_dir(path: str | os.PathLike) -> bool:
  """True when `path` is a folder holding GPT-2 BPE files (for dispatch)."""
  path = os.fspath(path)
  if not storage.is_dir(path):
    return False
  names = set(storage.listdir(path))
  return any(v in names and m in names for v, m in _FILE_PAIRS)


class GPT2BPETokenizer:
  """GPT-2's byte-level BPE with Llama-style `encode(..., bos=, eos=)`.

  Attributes:
    add_bos_default: Hugging Face's `GPT2Tokenizer` adds no BOS when encoding;
      lm-evaluation-harness >= 0.4.9.2 follows the tokenizer (no BOS).
  """

  add_bos_default = False

  def __init__(self, encoder: dict[str, int], merges: Sequence[tuple[str, str]],
               path: str = "", *, add_prefix_space: bool = True):
    """Builds a tokenizer from a vocabulary and ranked merges.

    Args:
      encoder: symbol string -> id (GPT-2's encoder.json / vocab.json).
      merges: (left, right) symbol pairs, highest priority first.
      path: where they came from, for messages.
      add_prefix_space: encode `" " + text` and drop one leading space when
        decoding (SentencePiece-like; module docstring).

    Raises:
      ValueError: a byte symbol, a merge result or `<|endoftext|>` is missing
        from the vocabulary, or ids repeat.
    """
    where = path or "GPT-2 vocabulary"
    self.path = path
    self._encoder = dict(encoder)
    self._decoder = {i: s for s, i in self._encoder.items()}
    if len(self._decoder) != len(self._encoder):
      raise ValueError(f"{where}: ids are not unique")
    missing = sorted(set(pre_tokenizers.ByteLevel.alphabet())
                     - set(self._encoder))
    if missing:
      raise ValueError(f"{where}: byte symbols missing from the vocabulary"
                       f" ({missing[:8]}); not a byte-level BPE")
    if EOT_TOKEN not in self._encoder:
      raise ValueError(f"{where}: no {EOT_TOKEN!r} in the vocabulary")
    merges = [tuple(m) for m in merges]
    for rank, (a, b) in enumerate(merges):
      if a + b not in self._encoder:
        raise ValueError(f"{where}: merge {rank} ({a!r}, {b!r}) produces"
                         f" {a + b!r}, which is not in the vocabulary")
    # No special tokens are registered: "<|endoftext|>" in text stays text.
    self._tok = tokenizers.Tokenizer(
        models.BPE(vocab=self._encoder, merges=merges))
    self._tok.pre_tokenizer = _byte_level()
    self._tok.decoder = decoders.ByteLevel()
    self._eot = self._encoder[EOT_TOKEN]
    self.add_prefix_space = add_prefix_space

  @classmethod
  def load(cls, path: str | os.PathLike,
           merges_path: str | os.PathLike | None = None, *,
           add_prefix_space: bool = True) -> GPT2BPETokenizer:
    """Loads from a folder (vocab.json + merges.txt, or encoder.json +
    vocab.bpe) or from explicit vocabulary and merges files."""
    path = os.fspath(path)
    if merges_path is None:
      if not storage.is_dir(path):
        raise FileNotFoundError(f"GPT-2 tokenizer folder not found: {path}")
      names = storage.listdir(path)
      for vocab_name, merges_name in _FILE_PAIRS:
        vocab_file = storage.join(path, vocab_name)
        merges_file = storage.join(path, merges_name)
        if vocab_name in names and merges_name in names:
          break
      else:
        raise FileNotFoundError(
            f"{path}: expected vocab.json + merges.txt or encoder.json +"
            f" vocab.bpe; found {names}")
    else:
      vocab_file, merges_file = path, os.fspath(merges_path)
    for f in (vocab_file, merges_file):
      if not storage.is_file(f):
        raise FileNotFoundError(f"GPT-2 tokenizer file not found: {f}")
    try:
      encoder = json.loads(storage.read_text(vocab_file))
    except json.JSONDecodeError as e:
      raise ValueError(f"{vocab_file}: not JSON: {e}") from e
    if not isinstance(encoder, dict) or not all(
        isinstance(v, int) for v in encoder.values()):
      raise ValueError(f"{vocab_file}: expected a JSON object of token -> id")
    merges = []
    with storage.open_file(merges_file) as f:
      for lineno, line in enumerate(f, 1):
        line = line.rstrip("\r\n")
        if (lineno == 1 and line.startswith("#version")) or not line:
          continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
          raise ValueError(f"{merges_file}:{lineno}: expected two symbols"
                           f" separated by one space, got {line!r}")
        merges.append((parts[0], parts[1]))
    return cls(encoder, merges, path=os.path.dirname(vocab_file) or path,
               add_prefix_space=add_prefix_space)

  @property
  def bos_id(self) -> int:
    return self._eot

  @property
  def eos_id(self) -> int:
    return self._eot

  @property
  def pad_id(self) -> int:
    """GPT-2 has no pad token; `<|endoftext|>` (masked out by weights)."""
    return self._eot

  @property
  def vocab_size(self) -> int:
    """Entries in the vocabulary (50257 for GPT-2), not the padded 50304."""
    return len(self._encoder)

  def encode(self, text: str, *, bos: bool = False,
             eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with `<|endoftext|>` around it."""
    if not isinstance(text, str):
      raise TypeError(
          f"GPT2BPETokenizer.encode expects str, got {type(text).__name__}")
    if self.add_prefix_space:
      text = " " + text
    ids = self._tok.encode(text, add_special_tokens=False).ids
    return [self._eot] * bos + ids + [self._eot] * eos

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; `<|endoftext|>` and padded-vocab ids decode to nothing.

    With `add_prefix_space`, one leading space is dropped (as SentencePiece
    drops its dummy prefix).

    Byte sequences that are not valid UTF-8 (a cut multi-byte character)
    decode to U+FFFD, as encoder.py's errors="replace".
    """
    kept = []
    for i in ids:
      i = int(i)
      if i < 0:
        raise ValueError(f"negative token id {i}")
      if i != self._eot and i in self._decoder:
        kept.append(i)
    text = self._tok.decode(kept, skip_special_tokens=False)
    if self.add_prefix_space and text.startswith(" "):
      text = text[1:]
    return text

  def id_to_piece(self, i: int) -> str:
    return self._decoder[int(i)]

  def __repr__(self) -> str:
    return (f"GPT2BPETokenizer({self.path!r}, vocab_size={self.vocab_size},"
            f" eos={self.eos_id}, add_prefix_space={self.add_prefix_space})")
