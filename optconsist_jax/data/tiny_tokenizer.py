"""The tiny SentencePiece tokenizer shipped in `assets/tiny.model`.

Trained with Llama-2's SentencePiece settings (BPE, byte fallback so any text
encodes, digits split, identity normalization, dummy prefix, unk=0, bos=1,
eos=2, no pad) on text the package generates or finds offline: synthetic
MetaMathQA/GSM8K problems in the Alpaca prompt (synthetic.py), the synthetic
retention sets, and Python standard-library docstrings (corpus.py).

Regenerate with `python -m optconsist_jax.data.tiny_tokenizer [OUT_PATH]`.
"""

from __future__ import annotations

from collections.abc import Iterator
import os
import sys

import sentencepiece as spm

from optconsist_jax.data import corpus, prompts, synthetic

TINY_MODEL_PATH = os.path.join(os.path.dirname(__file__), "assets", "tiny.model")
TINY_VOCAB_SIZE = 2048


def training_text(seed: int = 0) -> Iterator[str]:
  """Lines of the tokenizer's training text (deterministic)."""
  for r in synthetic.metamathqa_records(4000, seed):
    yield from (prompts.alpaca_prompt(r["query"]) + " " + r["response"]).split("\n")
  for r in synthetic.gsm8k_records(1000, seed + 1):
    yield from (r["question"] + "\n" + r["answer"]).split("\n")
  for r in synthetic.hellaswag_records(50, seed):
    yield " ".join([r["activity_label"], r["ctx_a"], r["ctx_b"]] + r["endings"])
  for r in synthetic.winogrande_records(50, seed):
    yield r["sentence"]
  for doc in corpus.python_stdlib_text("train", kind="docstrings"):
    yield from (ln for ln in doc.split("\n") if ln.strip())


def train(out_path: str = TINY_MODEL_PATH, vocab_size: int = TINY_VOCAB_SIZE,
          seed: int = 0) -> str:
  """Trains the tiny tokenizer and writes `out_path`."""
  prefix = out_path[:-len(".model")] if out_path.endswith(".model") else out_path
  os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=training_text(seed),
      model_prefix=prefix,
      model_type="bpe",
      vocab_size=vocab_size,
      byte_fallback=True,
      split_digits=True,
      normalization_rule_name="identity",
      add_dummy_prefix=True,
      remove_extra_whitespaces=False,
      allow_whitespace_only_pieces=True,
      character_coverage=0.9995,
      unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
      num_threads=1,
      minloglevel=2,
  )
  os.remove(prefix + ".vocab")
  return prefix + ".model"


if __name__ == "__main__":
  print(train(*sys.argv[1:2]))
