"""Builds a tiny Moonlight-style tiktoken tokenizer under tests/fixtures/.

Run by hand (never by the tests) in the fixtures venv, with tiktoken
installed there (`.venv-fixtures/bin/pip install tiktoken`):

  .venv-fixtures/bin/python tests/make_tiktoken_fixtures.py

No Hub access is needed. The script trains a small byte-level BPE (a few
hundred merges) on raw bytes of a multilingual text, with no pre-splitting,
so that merges cross the pre-tokenizer's piece boundaries and any split that
differs from tiktoken's changes the ids; the 256 single bytes get shuffled
ranks (ranks need not follow byte values), and a few tokens no merge reaches
are appended (tiktoken encodes a piece that is itself a token as that token).
It writes them as moonshotai/Moonlight-16B-A3B ships its tokenizer:

* tiktoken.model: `base64(token bytes) rank` per line;
* tokenizer_config.json laid out as Moonlight's: the special tokens in
  `added_tokens_decoder` at the ids after the base vocabulary ([BOS] first
  and [EOS] second, as Moonlight's config.json bos/eos_token_id 163584 and
  163585 follow its 163584 base tokens; chat markers after them; [UNK] and
  [PAD] the last two of the 256 reserved ids), bos/eos/pad/unk_token, the
  remote-code auto_map, and no add_bos_token.

The reference is `tiktoken.Encoding` built as tokenization_moonshot.py's
`TikTokenTokenizer.__init__` builds it (the same pat_str, the ranks, the
reserved special ids named from added_tokens_decoder or
`<|reserved_token_{id}|>`); expected.json records its ids for a text sample
with special tokens allowed (the wrapper's `encode(text)`) and as plain text
(`allow_special_tokens=False`), of " " + text, and its decoding.
tests/test_tiktoken_tokenizer.py compares optconsist_jax.data.tiktoken_bpe
(through hf_tokenizer.HFTokenizer) against them.
"""

from __future__ import annotations

import base64
import collections
import itertools
import json
import os
import random
import shutil
import sys

import tiktoken
from tiktoken.load import load_tiktoken_bpe

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "fixtures", "tiktoken", "moonlight")
NUM_MERGES = 400
NUM_RESERVED = 256  # TikTokenTokenizer.num_reserved_special_tokens
# Tokens no merge of the trained vocabulary reaches (see the docstring).
UNREACHABLE = [b"qzj", b"\xe4\xb8\xadqzj"]

# tokenization_moonshot.py's TikTokenTokenizer.pat_str, written out here
# independently of optconsist_jax.data.tiktoken_bpe.
PAT_STR = "|".join([
    r"""[\p{Han}]+""",
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # pylint: disable=line-too-long
    r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # pylint: disable=line-too-long
    r"""\p{N}{1,3}""",
    r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
    r"""\s*[\r\n]+""",
    r"""\s+(?!\S)""",
    r"""\s+""",
])

# Offset after the base vocabulary -> name (module docstring).
SPECIALS = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>",
            4: "<|im_assistant|>", 6: "<|start_header_id|>",
            7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
            17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
ADDITIONAL = ["<|im_end|>", "<|im_user|>", "<|im_assistant|>",
              "<|start_header_id|>", "<|end_header_id|>", "[EOT]",
              "<|im_system|>", "<|im_middle|>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}<|im_system|>"
    "{%- elif message['role'] == 'user' -%}<|im_user|>"
    "{%- else -%}<|im_assistant|>{%- endif -%}"
    "{{ message['role'] }}<|im_middle|>{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>"
    "{%- endif -%}")

SAMPLES = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold"
     " half as many clips in May. How many clips did she sell altogether?"),
    "I'll say we've done what they'd want, it's John's turn, WE'VE SHOUTED",
    "  Leading spaces,\ttabs\nand new lines\n\n  end.\r\n\r\nCRLF   \n",
    "人工智能正在改变世界。月之暗面发布了Kimi大模型，支持超长上下文。",
    "日本語のテキスト。漢字とひらがなカタカナ。한국어 텍스트입니다.",
    "Math: ∑x² = 12345678, 3.14159, 1/2 + 2/3 = 7/6; e^{iπ} + 1 = 0.",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\n\nprint(f(12))\n",
    "café résumé naïve Ñoño Zürich İstanbul ﬁnancial\u00a0nbsp\u3000wide",
    "emoji: 🚀🌍🎉 mixed 中English文 abc中文def A中B 中's 中qzj",
    ("Specials in text: [BOS] hello [EOS]<|im_end|> <|im_user|>x[PAD]"
     " <|reserved_token_{reserved}|> [UNK]"),
    "qzj",
    "a" + " " * 40 + "b\n\n\n\n",
    "",
]
# Training text: the samples' languages, with Python docstrings for bulk.
CORPUS = "\n".join(SAMPLES[:9] + [
    ("The quick brown fox jumps over the lazy dog. She sold 48 clips in April"
     " and 24 clips in May, so she sold 48 + 24 = 72 clips altogether."),
    "for i in range(10):\n    total += i * i\n    print(total)\n",
    ("数学是研究数量、结构以及空间等概念的一门学科。模型的参数量是一百六十亿。"
     "我们在数学题上微调模型，然后比较优化器。月之暗面的模型用Muon预训练。"),
    "Muon is scalable for LLM training: the model was pretrained with Muon.",
    json.__doc__, collections.__doc__, random.__doc__, base64.__doc__,
])


def train_bpe(text: bytes, num_merges: int) -> list[bytes]:
  """Byte-pair merges learned on `text` as one sequence (no pre-splitting);
  the most frequent adjacent pair first, ties broken by the pair's bytes;
  stops early when no pair occurs twice."""
  seq = [bytes([b]) for b in text]
  learned: list[bytes] = []
  for _ in range(num_merges):
    counts = collections.Counter(itertools.pairwise(seq))
    if not counts:
      break
    (a, b), count = min(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    if count < 2:
      break
    merged = a + b
    if merged not in learned:  # else: another split of a token we have
      learned.append(merged)
    out, i = [], 0
    while i < len(seq):
      if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
        out.append(merged)
        i += 2
      else:
        out.append(seq[i])
        i += 1
    seq = out
  return learned


def main() -> None:
  singles = [bytes([b]) for b in range(256)]
  random.Random(0).shuffle(singles)
  tokens = singles + train_bpe(CORPUS.encode("utf-8"), NUM_MERGES)
  tokens += [t for t in UNREACHABLE if t not in tokens]
  n = len(tokens)
  if os.path.exists(OUT):
    shutil.rmtree(OUT)
  os.makedirs(OUT)
  model_path = os.path.join(OUT, "tiktoken.model")
  with open(model_path, "w", encoding="ascii") as f:
    f.writelines(f"{base64.b64encode(token).decode('ascii')} {rank}\n"
                 for rank, token in enumerate(tokens))

  added = {str(n + k): {"content": name, "lstrip": False, "normalized": False,
                        "rstrip": False, "single_word": False, "special": True}
           for k, name in SPECIALS.items()}
  config = {
      "added_tokens_decoder": added,
      "additional_special_tokens": ADDITIONAL,
      "auto_map": {"AutoTokenizer": ["tokenization_moonshot.TikTokenTokenizer",
                                     None]},
      "bos_token": "[BOS]",
      "chat_template": CHAT_TEMPLATE,
      "clean_up_tokenization_spaces": False,
      "eos_token": "[EOS]",
      "extra_special_tokens": {},
      "model_max_length": 8192,
      "pad_token": "[PAD]",
      "tokenizer_class": "TikTokenTokenizer",
      "unk_token": "[UNK]",
  }
  with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
    json.dump(config, f, indent=2, ensure_ascii=False)

  # The reference, as TikTokenTokenizer.__init__ builds it. tiktoken caches
  # what load_tiktoken_bpe reads by path (a rerun would read the old file):
  # "" turns its cache off.
  os.environ["TIKTOKEN_CACHE_DIR"] = ""
  mergeable_ranks = load_tiktoken_bpe(model_path)
  mapping = {int(i): e["content"] for i, e in added.items()}
  special_tokens = {mapping.get(i, f"<|reserved_token_{i}|>"): i
                    for i in range(n, n + NUM_RESERVED)}
  enc = tiktoken.Encoding(name="tiktoken.model", pat_str=PAT_STR,
                          mergeable_ranks=mergeable_ranks,
                          special_tokens=special_tokens)
  samples = [s.replace("{reserved}", str(n + 5)) for s in SAMPLES]
  chat = ("<|im_system|>system<|im_middle|>You are a helpful assistant"
          "<|im_end|><|im_user|>user<|im_middle|>What is 2 + 3?<|im_end|>"
          "<|im_assistant|>assistant<|im_middle|>")
  plain = [enc.encode(s, disallowed_special=()) for s in samples]
  expected = {
      "samples": samples,
      "ids_special": [enc.encode(s, allowed_special="all") for s in samples],
      "ids_plain": plain,
      "ids_prefixed": [enc.encode(" " + s, disallowed_special=())
                       for s in samples],
      "decoded": [enc.decode(ids) for ids in plain],
      "chat_text": chat,
      "chat_ids": enc.encode(chat, allowed_special="all"),
      "n_base": n,
      "n_vocab": enc.n_vocab,
      "special_tokens": special_tokens,
      "bos_token_id": special_tokens["[BOS]"],
      "eos_token_id": special_tokens["[EOS]"],
      "pad_token_id": special_tokens["[PAD]"],
      "unk_token_id": special_tokens["[UNK]"],
      "versions": {"tiktoken": tiktoken.__version__,
                   "python": sys.version.split()[0],
                   "generator": "tests/make_tiktoken_fixtures.py"},
  }
  with open(os.path.join(OUT, "expected.json"), "w") as f:
    json.dump(expected, f, indent=1, ensure_ascii=False)
  crossing = sum(len(ids) for ids in plain)
  print(f"{n} base tokens ({len(tokens) - 256} merged), {enc.n_vocab} with"
        f" specials; {crossing} sample ids; wrote {OUT}")


if __name__ == "__main__":
  main()
