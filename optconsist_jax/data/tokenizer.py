"""SentencePiece tokenizer wrapper (Llama-2's `tokenizer.model`, or ours).

Encoding behaviour, stated once because scoring depends on it:

* `encode(text)` encodes `text` as ONE piece of text. Like Llama-2's tokenizer
  (and Hugging Face's `LlamaTokenizer`), SentencePiece prepends the dummy
  prefix "▁" (a space) to the start of the text when the model's normalizer
  has `add_dummy_prefix` (Llama-2's and our tiny model do). Hence
  `encode(a) + encode(b)` is in general NOT `encode(a + b)`: `encode(b)` starts
  with a word-initial piece as if `b` were preceded by a space.
* BOS/EOS are added only when asked (`bos=True`, `eos=True`); never inside
  the text. Special-token strings such as "</s>" in the text are encoded as
  ordinary text, not as control ids.
* lm-evaluation-harness-style scoring must therefore tokenize context and
  continuation jointly: `whole = encode(context + continuation)`,
  `n = len(encode(context))`, continuation tokens = `whole[n:]` (the harness's
  rule, `TemplateLM._encode_pair` in lm_eval/api/model.py). Do not concatenate separately encoded pieces there.
* Supervised examples (supervised.py) concatenate `encode(prompt)` and
  `encode(response)`; since SentencePiece splits at whitespace and the
  response's dummy prefix stands for a space, this equals encoding
  `prompt + " " + response` jointly for prompts ending in a non-space
  character (the Alpaca prompt ends in "Response:"), and keeps the
  prompt/target boundary exact for the loss mask.
"""

from __future__ import annotations

from collections.abc import Sequence
import os

import sentencepiece as spm

from optconsist_jax import storage
from optconsist_jax.data import tiny_tokenizer


class Tokenizer:
  """A loaded SentencePiece model with Llama-style BOS/EOS handling.

  Attributes:
    add_bos_default: Hugging Face's `LlamaTokenizer` for this model adds BOS
      when encoding (`add_bos_token=True`); lm-evaluation-harness >= 0.4.9.2
      follows the tokenizer, so its default for Llama models is BOS first.
  """

  add_bos_default = True

  def __init__(self, processor: spm.SentencePieceProcessor, path: str = ""):
    self._sp = processor
    self.path = path

  @classmethod
  def load(cls, path: str | os.PathLike) -> Tokenizer:
    """Loads a SentencePiece `tokenizer.model` file."""
    path = os.fspath(path)
    if not storage.is_file(path):
      raise FileNotFoundError(f"tokenizer model not found: {path}")
    sp = spm.SentencePieceProcessor()
    try:
      # From its bytes: the file may be in a bucket (gs://).
      sp.LoadFromSerializedProto(storage.read_bytes(path))
    except Exception as e:  # sentencepiece raises OSError/RuntimeError.
      raise ValueError(f"{path}: not a SentencePiece model: {e}") from e
    return cls(sp, path)

  @classmethod
  def tiny(cls) -> Tokenizer:
    """The tiny tokenizer shipped in the package (see tiny_tokenizer.py)."""
    return cls.load(tiny_tokenizer.TINY_MODEL_PATH)

  @property
  def bos_id(self) -> int:
    return self._sp.bos_id()

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def pad_id(self) -> int:
    """The model's pad id, or 0 when it has none (Llama-2 has none; 0 = unk)."""
    pad = self._sp.pad_id()
    return pad if pad >= 0 else 0

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  @property
  def vocab_size(self) -> int:
    return self._sp.GetPieceSize()

  def encode(self, text: str, *, bos: bool = False,
             eos: bool = False) -> list[int]:
    """Token ids of `text` (one piece of text; see the module docstring)."""
    if not isinstance(text, str):
      raise TypeError(f"Tokenizer.encode expects str, got {type(text).__name__}")
    ids = self._sp.EncodeAsIds(text)
    if bos:
      ids = [self.bos_id] + ids
    if eos:
      ids = ids + [self.eos_id]
    return ids

  def encode_batch(self, texts: Sequence[str], *,
                   num_threads: int = -1) -> list[list[int]]:
    """`encode` on many texts at once (SentencePiece's threaded encoder)."""
    return self._sp.Encode(list(texts), out_type=int, num_threads=num_threads)

  def decode(self, ids: Sequence[int]) -> str:
    """Text of `ids`; BOS/EOS/pad (control ids) decode to nothing."""
    return self._sp.DecodeIds([int(i) for i in ids])

  def id_to_piece(self, i: int) -> str:
    return self._sp.IdToPiece(int(i))

  def __repr__(self) -> str:
    return (f"Tokenizer({self.path!r}, vocab_size={self.vocab_size},"
            f" bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")
