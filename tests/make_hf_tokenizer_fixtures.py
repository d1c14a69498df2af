"""Builds tiny tokenizer.json fixtures under tests/fixtures/hf_tokenizers/.

Run by hand (never by the tests) in the fixtures venv (see
tests/make_hf_fixtures.py), which has transformers and tokenizers:

  .venv-fixtures/bin/python tests/make_hf_tokenizer_fixtures.py

No Hub access is needed: each family's tokenizer is trained here with the
`tokenizers` library on a few KB of text (Python standard-library
docstrings), laid out as that family's published tokenizer.json and
tokenizer_config.json are (pre-tokenizer regex, normalizer, decoder,
post-processor, special tokens, BOS/EOS settings; sources cited per family).
Then transformers' `PreTrainedTokenizerFast` loads each folder and records,
in expected.json, its ids for a text sample (with and without special tokens,
with special-token strings split as text, and of a chat-formatted text), its
decoding and its BOS/EOS/pad ids; tests/test_hf_tokenizer.py compares
optconsist_jax.data.hf_tokenizer against them.
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import shutil
import string
import sys
import textwrap

import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import normalizers
from tokenizers import pre_tokenizers
from tokenizers import processors
from tokenizers import trainers
import transformers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "hf_tokenizers")

# Llama-3's split pattern (meta-llama/Meta-Llama-3-8B tokenizer.json;
# tiktoken's cl100k pattern, also OLMo-2's). Qwen2's differs in splitting
# digits one by one (Qwen/Qwen2.5-7B tokenizer.json).
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+"
                  r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
                  r"|\s+(?!\S)|\s+")
QWEN_PATTERN = LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")

SAMPLES = [
    "Natalia sold clips to 48 of her friends in April, and then she sold"
    " half as many clips in May. How many clips did she sell altogether?",
    "  Leading spaces,\ttabs\nand new lines\n\n  end.",
    "Unicode: café, naïve, 数学, Ελληνικά, emoji 🙂 and ∑x² = 12345678.",
    "Special strings <|endoftext|> and <s> </s> <|im_start|> in the text.",
    "",
]
CHAT = [{"role": "user", "content": "What is 2 + 3?"},
        {"role": "assistant", "content": "2 + 3 = 5."}]
# Minimal ChatML (Qwen) and Llama-3 templates, rendered by transformers here.
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>"
    "assistant\n{% endif %}")
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}"
    "<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant"
    "<|end_header_id|>\n\n{% endif %}")


def training_text() -> list[str]:
  """A few KB of English prose and code-like text (deterministic for one
  Python version; the fixtures record which)."""
  text = "\n".join(m.__doc__ for m in (argparse, json, textwrap, string,
                                        heapq)) + "\n" + "\n".join(
                                            SAMPLES[:3]) * 3
  return text.split("\n")


def byte_level(pattern: str, specials: list[str], *, nfc: bool,
               ignore_merges: bool, bos: str | None,
               vocab_size: int = 600) -> tokenizers.Tokenizer:
  """A byte-level BPE as Llama-3 / Qwen2.5 / OLMo-2 lay theirs out."""
  tok = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
  if nfc:
    tok.normalizer = normalizers.NFC()
  tok.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(tokenizers.Regex(pattern), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tok.decoder = decoders.ByteLevel()
  tok.train_from_iterator(training_text(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=specials, show_progress=False,
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  steps = [processors.ByteLevel(trim_offsets=False)]
  if bos is not None:  # Llama-3 prepends <|begin_of_text|>.
    steps.append(processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
        special_tokens=[(bos, tok.token_to_id(bos))]))
  tok.post_processor = processors.Sequence(steps)
  return tok


def byte_fallback(vocab_size: int = 600) -> tokenizers.Tokenizer:
  """A BPE with byte fallback as Llama-2 / Mistral lay theirs out
  (mistralai/Mistral-7B-v0.1 tokenizer.json): "▁" for spaces, a dummy prefix,
  <0xNN> byte pieces for anything outside the vocabulary, <s> prepended."""
  tok = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True,
                                        fuse_unk=True))
  tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                         normalizers.Replace(" ", "▁")])
  tok.decoder = decoders.Sequence([
      decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
      decoders.Strip(" ", 1, 0)])
  byte_pieces = [f"<0x{b:02X}>" for b in range(256)]
  tok.train_from_iterator(training_text(), trainers.BpeTrainer(
      vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]
      + byte_pieces, show_progress=False))
  spec = json.loads(tok.to_str())
  # Byte pieces are vocabulary entries, not added tokens (as in Llama's).
  spec["added_tokens"] = [t for t in spec["added_tokens"]
                          if t["content"] not in byte_pieces]
  tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
  tok.post_processor = processors.TemplateProcessing(
      single="<s> $A", pair="<s> $A <s> $B",
      special_tokens=[("<s>", tok.token_to_id("<s>"))])
  return tok


def families() -> dict[str, tuple[tokenizers.Tokenizer, dict]]:
  """family -> (tokenizer, tokenizer_config.json)."""
  llama3_specials = ["<|begin_of_text|>", "<|end_of_text|>",
                     "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
  qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
  return {
      # meta-llama/Llama-3.1-8B: BOS from the post-processor, no
      # add_bos_token key.
      "llama3": (byte_level(LLAMA3_PATTERN, llama3_specials, nfc=False,
                            ignore_merges=True, bos="<|begin_of_text|>"),
                 {"bos_token": "<|begin_of_text|>",
                  "eos_token": "<|end_of_text|>",
                  "chat_template": LLAMA3_TEMPLATE,
                  "tokenizer_class": "PreTrainedTokenizerFast"}),
      # Qwen/Qwen2.5-7B: NFC, no BOS token at all, EOS pads.
      "qwen2": (byte_level(QWEN_PATTERN, qwen_specials, nfc=True,
                           ignore_merges=False, bos=None),
                {"bos_token": None, "eos_token": "<|endoftext|>",
                 "pad_token": "<|endoftext|>", "add_prefix_space": False,
                 "chat_template": CHATML_TEMPLATE,
                 "tokenizer_class": "PreTrainedTokenizerFast"}),
      # allenai/OLMo-2-1124-7B: <|endoftext|> is BOS and EOS, a pad token,
      # explicit add_bos_token / add_eos_token false.
      "olmo2": (byte_level(LLAMA3_PATTERN, ["<|endoftext|>", "<|pad|>"],
                           nfc=False, ignore_merges=False, bos=None),
                {"bos_token": {"__type": "AddedToken",
                               "content": "<|endoftext|>", "lstrip": False,
                               "normalized": False, "rstrip": False,
                               "single_word": False, "special": True},
                 "eos_token": "<|endoftext|>", "pad_token": "<|pad|>",
                 "add_bos_token": False, "add_eos_token": False,
                 "tokenizer_class": "PreTrainedTokenizerFast"}),
      # mistralai/Mistral-7B-v0.1 (and Llama-2's tokenizer.json).
      "mistral": (byte_fallback(),
                  {"bos_token": "<s>", "eos_token": "</s>",
                   "unk_token": "<unk>", "add_bos_token": True,
                   "add_eos_token": False,
                   "tokenizer_class": "PreTrainedTokenizerFast"}),
  }


def expected(folder: str, chat: bool) -> dict:
  """What transformers' tokenizer does with the samples."""
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(folder)
  split = transformers.PreTrainedTokenizerFast.from_pretrained(
      folder, split_special_tokens=True)
  out = {
      "samples": SAMPLES,
      "ids": [tok(t, add_special_tokens=False)["input_ids"] for t in SAMPLES],
      "ids_prefixed": [tok(" " + t, add_special_tokens=False)["input_ids"]
                       for t in SAMPLES],
      "ids_with_specials": [tok(t)["input_ids"] for t in SAMPLES],
      "ids_split_specials": [split(t, add_special_tokens=False)["input_ids"]
                             for t in SAMPLES],
      "decoded": [tok.decode(tok(t, add_special_tokens=False)["input_ids"],
                             skip_special_tokens=True) for t in SAMPLES],
      "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
      "pad_token_id": tok.pad_token_id, "len": len(tok),
  }
  if chat:
    text = tok.apply_chat_template(CHAT, tokenize=False,
                                   add_generation_prompt=True)
    out["chat_text"] = text
    out["chat_ids"] = tok(text, add_special_tokens=False)["input_ids"]
  return out


def main() -> None:
  argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()
  shutil.rmtree(OUT, ignore_errors=True)
  for name, (tok, config) in families().items():
    folder = os.path.join(OUT, name)
    os.makedirs(folder)
    tok.save(os.path.join(folder, "tokenizer.json"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump(config, f, indent=2)
    exp = expected(folder, chat="chat_template" in config)
    with open(os.path.join(folder, "expected.json"), "w") as f:
      json.dump(exp, f, indent=1, ensure_ascii=False)
    print(f"{name}: vocab {exp['len']}, bos {exp['bos_token_id']}, eos"
          f" {exp['eos_token_id']}, pad {exp['pad_token_id']},"
          f" {sum(map(len, exp['ids']))} sample ids")
  with open(os.path.join(OUT, "VERSIONS.json"), "w") as f:
    json.dump({"transformers": transformers.__version__,
               "tokenizers": tokenizers.__version__,
               "python": sys.version.split()[0],
               "generator": "tests/make_hf_tokenizer_fixtures.py"}, f,
              indent=2)


if __name__ == "__main__":
  main()
