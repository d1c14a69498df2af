"""tiktoken vocabularies (`tiktoken.model`) as a `tokenizers` byte-level BPE.

Moonlight-16B-A3B (moonshotai/Moonlight-16B-A3B, and the Kimi models after
it) ships no tokenizer.json: its tokenizer is `tiktoken.model` (tiktoken's
format, one `base64(token bytes) rank` line per token, the rank being the
token id) read by the repo's remote code `tokenization_moonshot.py`, whose
`TikTokenTokenizer` builds

  tiktoken.Encoding(name, pat_str=PAT_STR, mergeable_ranks=ranks,
                    special_tokens={name: id for the reserved ids})

with the special ids right after the base vocabulary, named from
tokenizer_config.json's `added_tokens_decoder` and `<|reserved_token_{id}|>`
otherwise; `bos_token`/`eos_token`/`pad_token`/`unk_token` name its [BOS],
[EOS], [PAD], [UNK]. `tokenizer_json(folder)` converts these files into the
text of an equivalent tokenizer.json, so that data/hf_tokenizer.py's
`HFTokenizer` serves them through the one tokenizer interface (it reads the
same tokenizer_config.json for BOS/EOS/pad and `add_bos_token`); no tiktoken
at run time. Sources: tokenization_moonshot.py / tokenization_kimi.py in the
moonshotai Hub repos (the pattern below is theirs, identical across the line,
e.g. Kimi-Linear-48B-A3B-Instruct tokenization_kimi.py); tiktoken's merge
rule, openai/tiktoken src/lib.rs `byte_pair_merge`; the conversion follows
transformers' `TikTokenConverter` (src/transformers/convert_slow_tokenizer.py).

The conversion, and why its ids are tiktoken's (tests/test_tiktoken_tokenizer.py
pins them against tiktoken.Encoding built as tokenization_moonshot.py does):

* Vocabulary: token bytes -> id, each byte spelled with GPT-2's byte-to-symbol
  map (Radford et al. 2019, gpt-2 src/encoder.py `bytes_to_unicode`), which
  `tokenizers`' ByteLevel pre-tokenizer and decoder use.
* Merges: tiktoken merges, in a piece, the adjacent pair of parts whose
  concatenation has the lowest rank (leftmost on ties), until no
  concatenation is a token. Listing, for every token, each split into two
  tokens, ordered by the token's rank, gives `tokenizers`' BPE the same
  choices (two different pairs that make the same token never overlap, so
  their order among themselves does not matter). `ignore_merges=True` is
  tiktoken's shortcut: a piece that is itself a token is that token.
* Pre-tokenization: a Split on PAT_STR (isolated), then ByteLevel without
  its own regex. PAT_STR's class intersections `[...&&[^\\p{Han}]]` are
  Oniguruma syntax too (tokenizers' regex engine; same meaning as in
  tiktoken's fancy-regex), and every character matches some alternative, so
  Split's pieces are tiktoken's matches.
* Special tokens: added tokens (special) at their ids. `HFTokenizer.encode`
  keeps their strings text unless `special=True`, which maps them to their
  ids as `TikTokenTokenizer.encode` does (`allowed_special="all"`).

Not reproduced: the wrapper's chunking of texts longer than 400,000
characters and of whitespace / non-whitespace runs longer than 25,000 (its
guard against tiktoken failing on such inputs, openai/tiktoken issue 195),
which can move a token boundary at those cut points only.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from tokenizers import AddedToken
from tokenizers import Regex
from tokenizers import Tokenizer
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers

from optconsist_jax import storage

TIKTOKEN_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"

# `TikTokenTokenizer.pat_str` of tokenization_moonshot.py (module docstring).
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"""
     r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""),
    (r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"""
     r"""[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"""),
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# `TikTokenTokenizer.num_reserved_special_tokens`: the ids after the base
# vocabulary kept for special tokens (163584 + 256 = Moonlight's 163840
# embedding rows). Kimi-Linear's copy of the class reserves 2 more, unnamed
# ids past the embedding, left out here; named ids beyond 256 extend the
# range.
NUM_RESERVED_SPECIAL_TOKENS = 256


def bytes_to_unicode() -> dict[int, str]:
  """GPT-2's byte -> symbol map (printable bytes stand for themselves)."""
  kept = (list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
          + list(range(0xAE, 0x100)))
  out = {b: chr(b) for b in kept}
  n = 0
  for b in range(256):
    if b not in out:
      out[b] = chr(256 + n)
      n += 1
  return out


def is_tiktoken_dir(path: str | os.PathLike) -> bool:
  """True for a folder with tiktoken.model and no tokenizer.json."""
  path = os.fspath(path)
  if not storage.is_dir(path):
    return False
  names = set(storage.listdir(path))
  return TIKTOKEN_FILE in names and "tokenizer.json" not in names


def read_ranks(path: str) -> list[bytes]:
  """The tokens of a tiktoken.model file, in rank (= id) order.

  Raises:
    ValueError: a line is not `base64 rank`, a token repeats, the ranks are
      not 0..n-1, or a single byte is missing; the message names the file
      and line.
  """
  text = storage.read_text(path)
  by_rank: dict[int, bytes] = {}
  seen: dict[bytes, int] = {}  # token -> its line
  for lineno, line in enumerate(text.splitlines(), 1):
    if not line.strip():
      continue
    fields = line.split()
    where = f"{path}:{lineno}"
    if len(fields) != 2:
      raise ValueError(f"{where}: expected 'BASE64 RANK', got {line[:80]!r}")
    try:
      token = base64.b64decode(fields[0], validate=True)
    except (binascii.Error, ValueError) as e:
      raise ValueError(f"{where}: {fields[0][:40]!r} is not base64: {e}"
                       ) from None
    try:
      rank = int(fields[1])
    except ValueError:
      raise ValueError(f"{where}: rank {fields[1][:40]!r} is not an integer"
                       ) from None
    if not token:
      raise ValueError(f"{where}: empty token")
    if token in seen:
      raise ValueError(f"{where}: token {token!r} is also on line"
                       f" {seen[token]}")
    if rank in by_rank:
      raise ValueError(f"{where}: rank {rank} given twice")
    seen[token] = lineno
    by_rank[rank] = token
  n = len(by_rank)
  if n == 0:
    raise ValueError(f"{path}: no tokens")
  if sorted(by_rank) != list(range(n)):
    gap = next(i for i in range(n) if i not in by_rank)
    raise ValueError(f"{path}: ranks are not 0..{n - 1} (rank {gap} is"
                     " missing); tiktoken ranks are the token ids")
  missing = [b for b in range(256) if bytes([b]) not in seen]
  if missing:
    raise ValueError(f"{path}: the single byte(s) {missing[:8]} are not"
                     " tokens; a byte-level BPE needs all 256")
  return [by_rank[i] for i in range(n)]


def merges_of(tokens: list[bytes]) -> list[tuple[int, int]]:
  """Every split of every token into two tokens (as id pairs), by the
  token's rank, then by the ranks of the halves."""
  ranks = {t: i for i, t in enumerate(tokens)}
  out = []
  for token in tokens:
    if len(token) < 2:
      continue
    pairs = []
    for k in range(1, len(token)):
      a, b = ranks.get(token[:k]), ranks.get(token[k:])
      if a is not None and b is not None:
        pairs.append((a, b))
    out.extend(sorted(pairs) if len(pairs) > 1 else pairs)
  return out


def special_tokens(config: dict[str, Any], n_base: int,
                   where: str) -> list[str]:
  """Special-token strings for the ids n_base, n_base + 1, ... (in order)."""
  named: dict[int, str] = {}
  added = config.get("added_tokens_decoder") or {}
  if not isinstance(added, dict):
    raise ValueError(f"{where}: added_tokens_decoder is not an object")
  for key, entry in added.items():
    content = entry.get("content") if isinstance(entry, dict) else entry
    try:
      i = int(key)
    except ValueError:
      raise ValueError(f"{where}: added_tokens_decoder key {key!r} is not a"
                       " token id") from None
    if not isinstance(content, str) or not content:
      raise ValueError(f"{where}: added_tokens_decoder[{key!r}] has no"
                       " content")
    if i < n_base:
      raise ValueError(f"{where}: added token {content!r} has id {i}, inside"
                       f" the {n_base} tokens of {TIKTOKEN_FILE}")
    named[i] = content
  end = max([n_base + NUM_RESERVED_SPECIAL_TOKENS, *(i + 1 for i in named)])
  return [named.get(i, f"<|reserved_token_{i}|>") for i in range(n_base, end)]


def _layout() -> dict[str, Any]:
  """tokenizer.json of the pipeline (module docstring), as `tokenizers`
  writes it, around a one-merge vocabulary and one special token."""
  tok = Tokenizer(models.BPE(vocab={"a": 0, "b": 1, "ab": 2},
                             merges=[("a", "b")], fuse_unk=False,
                             byte_fallback=False, ignore_merges=True))
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(PAT_STR), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  tok.decoder = decoders.ByteLevel()
  tok.add_special_tokens([AddedToken("[S]", special=True, normalized=False)])
  return json.loads(tok.to_str())


def tokenizer_json(folder: str, config: dict[str, Any]) -> str:
  """tokenizer.json text equivalent to `folder`'s tiktoken.model.

  The layout is what `tokenizers` itself writes for the pipeline (so it
  follows the installed version); the vocabulary, merges and special tokens
  are filled in as JSON, faster than building them through its Python API.
  A vocabulary of Moonlight's size (163,584 tokens) takes ~10 s to load on
  two busy CPU cores, most of it here and in parsing the result.

  Args:
    folder: holds tiktoken.model.
    config: its tokenizer_config.json (for added_tokens_decoder).

  Raises:
    ValueError: a malformed tiktoken.model or added_tokens_decoder (the
      message names the file).
  """
  tokens = read_ranks(storage.join(folder, TIKTOKEN_FILE))
  specials = special_tokens(config, len(tokens),
                            storage.join(folder, CONFIG_FILE))
  sym = bytes_to_unicode()

  spelled = ["".join(sym[b] for b in t) for t in tokens]
  clash = sorted(set(specials) & set(spelled))
  if clash:  # tokenizers would give the special token the base token's id
    raise ValueError(f"{storage.join(folder, CONFIG_FILE)}: special token(s)"
                     f" {clash[:4]} are also tokens of {TIKTOKEN_FILE}")
  out = _layout()
  (merge,) = out["model"]["merges"]  # ["a", "b"], or "a b" (tokenizers<0.20)
  out["model"]["vocab"] = {t: i for i, t in enumerate(spelled)}
  out["model"]["merges"] = [
      [spelled[a], spelled[b]] if isinstance(merge, list)
      else f"{spelled[a]} {spelled[b]}" for a, b in merges_of(tokens)]
  (added,) = out["added_tokens"]
  out["added_tokens"] = [{**added, "id": len(tokens) + k, "content": s}
                         for k, s in enumerate(specials)]
  return json.dumps(out, ensure_ascii=False)
