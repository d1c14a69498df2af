"""GPT-2 byte-level BPE tokenizer (the tokenizer of the authors' small bases).

Reads the standard files: `vocab.json` + `merges.txt` (Hugging Face names) or
`encoder.json` + `vocab.bpe` (OpenAI's names for the same content). The
algorithm is OpenAI's gpt-2 `src/encoder.py` (Radford et al. 2019):

1. Split the text with GPT-2's pre-tokenizer pattern
   `'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+`.
   The stdlib `re` has no `\\p{..}`, so the letter/number/space classes are
   built once from `unicodedata` (Python's Unicode version). `\\s` follows the
   `regex` module GPT-2 uses: Python's whitespace minus U+001C..U+001F.
2. Map each piece's UTF-8 bytes to printable characters (`bytes_to_unicode`)
   and apply the merges greedily by rank.
3. Look the resulting symbols up in the vocabulary.

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
default, Hugging Face's GPT2Tokenizer option of the same name) this class does
the same: `encode(x)` is GPT-2's encoding of `" " + x`, and `decode` removes one
leading space, so `decode(encode(x)) == x`. `add_prefix_space=False` gives
GPT-2's (and tiktoken's) exact encoding of `x`.
"""

from __future__ import annotations

import functools
import json
import os
import re
import sys
import unicodedata
from collections.abc import Sequence

EOT_TOKEN = "<|endoftext|>"
_FILE_PAIRS = (("vocab.json", "merges.txt"), ("encoder.json", "vocab.bpe"))
# The `regex` module's \s excludes these four (Python's str.isspace has them).
_NOT_REGEX_SPACE = "\x1c\x1d\x1e\x1f"
_CACHE_LIMIT = 200_000


@functools.cache
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's table: each byte -> a printable character (encoder.py)."""
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


def _ranges(code_points: list[int]) -> str:
  """A `re` character-class body matching the sorted `code_points`."""
  parts = []
  start = prev = code_points[0]
  for cp in code_points[1:] + [-1]:
    if cp != prev + 1:
      parts.append(f"\\U{start:08x}-\\U{prev:08x}" if prev > start
                   else f"\\U{start:08x}")
      start = cp
    prev = cp
  return "".join(parts)


@functools.cache
def pretokenize_pattern() -> re.Pattern[str]:
  """GPT-2's pre-tokenizer as a stdlib regex (classes from unicodedata)."""
  classes = {"L": [], "N": [], "S": []}
  for cp in range(sys.maxunicode + 1):
    c = chr(cp)
    if c.isspace() and c not in _NOT_REGEX_SPACE:
      classes["S"].append(cp)
    else:
      kind = unicodedata.category(c)[0]
      if kind in "LN":
        classes[kind].append(cp)
  letters, numbers, spaces = (_ranges(classes[k]) for k in "LNS")
  return re.compile(
      rf"""'s|'t|'re|'ve|'m|'ll|'d| ?[{letters}]+| ?[{numbers}]+"""
      rf"""| ?[^{spaces}{letters}{numbers}]+|[{spaces}]+(?![^{spaces}])"""
      rf"""|[{spaces}]+""")


def pretokenize(text: str) -> list[str]:
  """GPT-2's pre-tokenization of `text` (pieces that concatenate to it)."""
  return pretokenize_pattern().findall(text)


def is_gpt2_bpe_dir(path: str | os.PathLike) -> bool:
  """True when `path` is a folder holding GPT-2 BPE files (for dispatch)."""
  path = os.fspath(path)
  return os.path.isdir(path) and any(
      os.path.isfile(os.path.join(path, v)) and
      os.path.isfile(os.path.join(path, m)) for v, m in _FILE_PAIRS)


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
    missing = [b for b, s in bytes_to_unicode().items()
               if s not in self._encoder]
    if missing:
      raise ValueError(f"{where}: byte symbols missing from the vocabulary"
                       f" (bytes {missing[:8]}); not a byte-level BPE")
    if EOT_TOKEN not in self._encoder:
      raise ValueError(f"{where}: no {EOT_TOKEN!r} in the vocabulary")
    for rank, (a, b) in enumerate(merges):
      if a + b not in self._encoder:
        raise ValueError(f"{where}: merge {rank} ({a!r}, {b!r}) produces"
                         f" {a + b!r}, which is not in the vocabulary")
    self._ranks = {pair: rank for rank, pair in enumerate(merges)}
    self._byte_encoder = bytes_to_unicode()
    self._byte_decoder = {s: b for b, s in self._byte_encoder.items()}
    self._eot = self._encoder[EOT_TOKEN]
    self._cache: dict[str, tuple[int, ...]] = {}
    self.add_prefix_space = add_prefix_space

  @classmethod
  def load(cls, path: str | os.PathLike,
           merges_path: str | os.PathLike | None = None, *,
           add_prefix_space: bool = True) -> GPT2BPETokenizer:
    """Loads from a folder (vocab.json + merges.txt, or encoder.json +
    vocab.bpe) or from explicit vocabulary and merges files."""
    path = os.fspath(path)
    if merges_path is None:
      if not os.path.isdir(path):
        raise FileNotFoundError(f"GPT-2 tokenizer folder not found: {path}")
      for vocab_name, merges_name in _FILE_PAIRS:
        vocab_file = os.path.join(path, vocab_name)
        merges_file = os.path.join(path, merges_name)
        if os.path.isfile(vocab_file) and os.path.isfile(merges_file):
          break
      else:
        raise FileNotFoundError(
            f"{path}: expected vocab.json + merges.txt or encoder.json +"
            f" vocab.bpe; found {sorted(os.listdir(path))}")
    else:
      vocab_file, merges_file = path, os.fspath(merges_path)
    for f in (vocab_file, merges_file):
      if not os.path.isfile(f):
        raise FileNotFoundError(f"GPT-2 tokenizer file not found: {f}")
    with open(vocab_file, encoding="utf-8") as f:
      try:
        encoder = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{vocab_file}: not JSON: {e}") from e
    if not isinstance(encoder, dict) or not all(
        isinstance(v, int) for v in encoder.values()):
      raise ValueError(f"{vocab_file}: expected a JSON object of token -> id")
    merges = []
    with open(merges_file, encoding="utf-8") as f:
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

  def _bpe(self, piece: str) -> tuple[int, ...]:
    """Ids of one pre-tokenized piece (encoder.py's `bpe`, then lookup)."""
    cached = self._cache.get(piece)
    if cached is not None:
      return cached
    word = [self._byte_encoder[b] for b in piece.encode("utf-8")]
    while len(word) > 1:
      ranked = [(self._ranks.get(pair, sys.maxsize), i)
                for i, pair in enumerate(zip(word, word[1:]))]
      best_rank, best_i = min(ranked)
      if best_rank == sys.maxsize:
        break
      first, second = word[best_i], word[best_i + 1]
      merged = []
      i = 0
      while i < len(word):
        if i + 1 < len(word) and word[i] == first and word[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(word[i])
          i += 1
      word = merged
    ids = tuple(self._encoder[s] for s in word)
    if len(self._cache) >= _CACHE_LIMIT:
      self._cache.clear()
    self._cache[piece] = ids
    return ids

  def encode(self, text: str, *, bos: bool = False,
             eos: bool = False) -> list[int]:
    """Token ids of `text`, optionally with `<|endoftext|>` around it."""
    if not isinstance(text, str):
      raise TypeError(
          f"GPT2BPETokenizer.encode expects str, got {type(text).__name__}")
    ids = [self._eot] if bos else []
    if self.add_prefix_space:
      text = " " + text
    for piece in pretokenize(text):
      ids.extend(self._bpe(piece))
    if eos:
      ids.append(self._eot)
    return ids

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [self.encode(t) for t in texts]

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; `<|endoftext|>` and padded-vocab ids decode to nothing.

    With `add_prefix_space`, one leading space is dropped (as SentencePiece
    drops its dummy prefix).

    Byte sequences that are not valid UTF-8 (a cut multi-byte character)
    decode to U+FFFD, as encoder.py's errors="replace".
    """
    out = bytearray()
    for i in ids:
      i = int(i)
      if i < 0:
        raise ValueError(f"negative token id {i}")
      if i == self._eot or i not in self._decoder:
        continue
      out.extend(self._byte_decoder[c] for c in self._decoder[i])
    text = out.decode("utf-8", errors="replace")
    if self.add_prefix_space and text.startswith(" "):
      text = text[1:]
    return text

  def id_to_piece(self, i: int) -> str:
    return self._decoder[int(i)]

  def __repr__(self) -> str:
    return (f"GPT2BPETokenizer({self.path!r}, vocab_size={self.vocab_size},"
            f" eos={self.eos_id}, add_prefix_space={self.add_prefix_space})")

