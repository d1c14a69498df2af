"""Writes tests/fixtures/nanogpt/: tiny nanoGPT-style checkpoints and BPE files.

Run with the fixtures venv (it has torch, transformers and regex; the test
suite itself never imports torch):

  python3 -m venv /work/main/.venv-fixtures
  /work/main/.venv-fixtures/bin/pip install torch==2.13.0 numpy regex transformers
  /work/main/.venv-fixtures/bin/python tests/make_nanogpt_fixture.py

What it writes, and why each file is independent of optconsist_jax:

* `ckpt.pt`: a 2-layer, width-64, 4-head, vocab-96, block-32 GPT written
  below in PyTorch the way nanoGPT's model.py writes it (karpathy/nanoGPT,
  bias=False, tied wte/lm_head, learned absolute positions), with the GELU MLP
  replaced by SwiGLU as in the authors' bases. It is trained for a few AdamW
  steps and saved exactly as nanoGPT's train.py saves (`model` from a
  torch.compile'd module, hence the `_orig_mod.` prefix; `optimizer`,
  `model_args`, `iter_num`, `best_val_loss` as a 0-d tensor, `config`).
* `tokens.npy` / `logits.npy`: fixed tokens [2, 32] and the model's logits
  computed by PyTorch in float64.
* `ckpt_bf16.pt`: the same weights cast to bfloat16 (model + model_args only,
  no prefix) to exercise BFloat16Storage.
* `ckpt_rms.pt` / `tokens_rms.npy` / `logits_rms.npy`: a 1-layer RMSNorm
  variant whose `config` says so (`norm_type: "rmsnorm"`).
* `vocab.json` / `merges.txt`: a tiny hand-made GPT-2 byte-level BPE (the 256
  byte symbols of GPT-2's encoder.py, a few merges, `<|endoftext|>`), and
  `bpe_cases.json`: texts with the ids that Hugging Face's (slow, regex-based)
  GPT2Tokenizer gives them, plus GPT-2's pre-tokenizer pieces from `regex`.

SwiGLU layout of the fixture (one of the layouts optconsist_jax.io.nanogpt
documents): mlp.c_fc = gate [F, D], mlp.c_fc2 = up [F, D], mlp.c_proj = down
[D, F]; out = c_proj(silu(c_fc(x)) * c_fc2(x)).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random

import numpy as np
import regex
import torch
from torch import nn
from torch.nn import functional as F

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures",
                   "nanogpt")


@dataclasses.dataclass
class GPTConfig:
  block_size: int = 32
  vocab_size: int = 96
  n_layer: int = 2
  n_head: int = 4
  n_embd: int = 64
  n_hidden: int = 176  # SwiGLU width F; not part of nanoGPT's model_args.
  dropout: float = 0.0
  bias: bool = False
  norm: str = "layer"


class LayerNorm(nn.Module):
  """nanoGPT's LayerNorm with an optional bias (here always without)."""

  def __init__(self, ndim, bias):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(ndim))
    self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


class RMSNorm(nn.Module):

  def __init__(self, ndim):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(ndim))

  def forward(self, x):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * self.weight


def make_norm(config):
  if config.norm == "rms":
    return RMSNorm(config.n_embd)
  return LayerNorm(config.n_embd, bias=config.bias)


class CausalSelfAttention(nn.Module):
  """nanoGPT's attention: fused c_attn (q|k|v), no RoPE, causal SDPA."""

  def __init__(self, config):
    super().__init__()
    assert config.n_embd % config.n_head == 0
    self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
    self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
    self.n_head = config.n_head
    self.n_embd = config.n_embd

  def forward(self, x):
    b, t, c = x.size()
    q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
    k = k.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
    q = q.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
    v = v.view(b, t, self.n_head, c // self.n_head).transpose(1, 2)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0,
                                       is_causal=True)
    y = y.transpose(1, 2).contiguous().view(b, t, c)
    return self.c_proj(y)


class SwiGLU(nn.Module):
  """c_proj(silu(c_fc(x)) * c_fc2(x)): gate c_fc, up c_fc2, down c_proj."""

  def __init__(self, config):
    super().__init__()
    self.c_fc = nn.Linear(config.n_embd, config.n_hidden, bias=config.bias)
    self.c_fc2 = nn.Linear(config.n_embd, config.n_hidden, bias=config.bias)
    self.c_proj = nn.Linear(config.n_hidden, config.n_embd, bias=config.bias)

  def forward(self, x):
    return self.c_proj(F.silu(self.c_fc(x)) * self.c_fc2(x))


class Block(nn.Module):

  def __init__(self, config):
    super().__init__()
    self.ln_1 = make_norm(config)
    self.attn = CausalSelfAttention(config)
    self.ln_2 = make_norm(config)
    self.mlp = SwiGLU(config)

  def forward(self, x):
    x = x + self.attn(self.ln_1(x))
    return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """nanoGPT's GPT with SwiGLU; returns logits at every position."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    self.transformer = nn.ModuleDict(dict(
        wte=nn.Embedding(config.vocab_size, config.n_embd),
        wpe=nn.Embedding(config.block_size, config.n_embd),
        drop=nn.Dropout(config.dropout),
        h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
        ln_f=make_norm(config),
    ))
    self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight  # Weight tying.
    # Larger than nanoGPT's 0.02 init (and non-unit norm weights) so that the
    # logits are O(1) and every mapping mistake shows in them.
    for name, p in self.named_parameters():
      if name.endswith("ln_1.weight") or name.endswith("ln_2.weight") or (
          name.endswith("ln_f.weight")):
        nn.init.normal_(p, mean=1.0, std=0.3)
      else:
        nn.init.normal_(p, mean=0.0, std=0.3 / math.sqrt(p.shape[-1] / 64))

  def forward(self, idx):
    _, t = idx.size()
    pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
    x = self.transformer.drop(self.transformer.wte(idx)
                              + self.transformer.wpe(pos))
    for block in self.transformer.h:
      x = block(x)
    return self.lm_head(self.transformer.ln_f(x))


def configure_optimizers(model, weight_decay, learning_rate, betas):
  """nanoGPT's AdamW with decay on >= 2-D params only."""
  params = {n: p for n, p in model.named_parameters() if p.requires_grad}
  decay = [p for p in params.values() if p.dim() >= 2]
  nodecay = [p for p in params.values() if p.dim() < 2]
  groups = [{"params": decay, "weight_decay": weight_decay},
            {"params": nodecay, "weight_decay": 0.0}]
  return torch.optim.AdamW(groups, lr=learning_rate, betas=betas)


def model_args_of(config):
  return dict(n_layer=config.n_layer, n_head=config.n_head,
              n_embd=config.n_embd, block_size=config.block_size,
              bias=config.bias, vocab_size=config.vocab_size,
              dropout=config.dropout)


def train_config(config, norm_type):
  # The keys nanoGPT's train.py puts in `config` (its globals), abridged.
  return dict(out_dir="out", eval_interval=2000, log_interval=1,
              eval_iters=200, always_save_checkpoint=True, init_from="scratch",
              dataset="openwebtext", gradient_accumulation_steps=1,
              batch_size=4, block_size=config.block_size,
              n_layer=config.n_layer, n_head=config.n_head,
              n_embd=config.n_embd, dropout=config.dropout, bias=config.bias,
              learning_rate=1e-3, max_iters=3, weight_decay=0.1, beta1=0.9,
              beta2=0.95, grad_clip=1.0, decay_lr=False, warmup_iters=0,
              lr_decay_iters=3, min_lr=1e-4, backend="nccl", device="cpu",
              dtype="float32", compile=True, optimizer_name="adamw",
              norm_type=norm_type)


def train(model, steps, seed):
  gen = torch.Generator().manual_seed(seed)
  opt = configure_optimizers(model, 0.1, 1e-3, (0.9, 0.95))
  c = model.config
  loss = None
  for _ in range(steps):
    x = torch.randint(0, c.vocab_size, (4, c.block_size + 1), generator=gen)
    logits = model(x[:, :-1])
    loss = F.cross_entropy(logits.reshape(-1, c.vocab_size),
                           x[:, 1:].reshape(-1))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
  return opt, loss.detach()


def reference_logits(model, tokens):
  ref = GPT(model.config).double()
  ref.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
  with torch.no_grad():
    return ref(torch.from_numpy(tokens)).numpy().astype(np.float32)


def compiled_state_dict(model):
  """state_dict as train.py's torch.compile'd raw_model returns it."""
  sd = torch.compile(model).state_dict()
  assert all(k.startswith("_orig_mod.") for k in sd), list(sd)[:3]
  return sd


def write_checkpoints():
  torch.manual_seed(0)
  config = GPTConfig()
  model = GPT(config)
  opt, loss = train(model, steps=3, seed=1)
  checkpoint = {
      "model": compiled_state_dict(model),
      "optimizer": opt.state_dict(),
      "model_args": model_args_of(config),
      "iter_num": 3,
      "best_val_loss": loss,
      "config": train_config(config, "layernorm"),
  }
  torch.save(checkpoint, os.path.join(OUT, "ckpt.pt"))
  tokens = np.random.default_rng(0).integers(
      0, config.vocab_size, (2, config.block_size)).astype(np.int32)
  np.save(os.path.join(OUT, "tokens.npy"), tokens)
  np.save(os.path.join(OUT, "logits.npy"), reference_logits(model, tokens))

  bf16 = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
  torch.save({"model": bf16, "model_args": model_args_of(config)},
             os.path.join(OUT, "ckpt_bf16.pt"))

  torch.manual_seed(1)
  rms_config = GPTConfig(n_layer=1, n_embd=32, n_head=2, n_hidden=48,
                         block_size=16, norm="rms")
  rms = GPT(rms_config)
  train(rms, steps=1, seed=2)
  torch.save({"model": rms.state_dict(), "model_args": model_args_of(rms_config),
              "config": train_config(rms_config, "rmsnorm"), "iter_num": 1},
             os.path.join(OUT, "ckpt_rms.pt"))
  tokens = np.random.default_rng(1).integers(
      0, rms_config.vocab_size, (2, rms_config.block_size)).astype(np.int32)
  np.save(os.path.join(OUT, "tokens_rms.npy"), tokens)
  np.save(os.path.join(OUT, "logits_rms.npy"), reference_logits(rms, tokens))


def bytes_to_unicode():
  """GPT-2's encoder.py table: every byte to a printable unicode character."""
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
  return dict(zip(bs, [chr(c) for c in cs]))


# Hand-made merges; each merges two symbols already in the vocabulary.
MERGES = [
    ("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"),
    ("e", "r"), ("o", "n"), ("Ġ", "s"), ("r", "e"), ("a", "t"),
    ("Ġ", "w"), ("n", "d"), ("Ġa", "nd"), ("Ġ", "c"), ("i", "s"),
    ("Ġ", "1"), ("Ġ", "Ġ"), ("ĠĠ", "ĠĠ"), ("Ċ", "Ċ"), ("l", "l"),
    ("'", "ll"), ("e", "s"), ("Ġ", "i"), ("Ġi", "n"), ("Ġ", "h"),
    ("Ġh", "at"), ("Ġc", "at"), ("o", "r"), ("Ġw", "or"), ("Ġwor", "l"),
    ("Ġworl", "d"), ("H", "e"), ("He", "ll"), ("Hell", "o"), ("2", "3"),
    ("1", "2"), ("12", "3"), ("Ã", "©"), ("Ġ", "é"), ("Ġt", "h"),
]

TEXTS = [
    "Hello world",
    "Hello, world! The cat's in the hat.",
    "I'll say we've they're don't it'd I'm 'S 'LL",
    "the theater is in the thin hat and the cat\n\nthere",
    "  leading spaces and trailing   ",
    "a   b\t\tc \n d  \n\n\n e",
    "12345 3.14 1,000 123123",
    "naïve café résumé — “quotes” ½ 日本語 🙂 ∑x",
    "e\u0301 combining, \u00a0nbsp, \u2003em space, a\x1cb\x1fc",
    "Question: 2+3=?\nAnswer: 5\n#### 5\nThe answer is: 5",
    "tab\tthen\t\tword, newline\n\nword, cr\r\nlf",
    "",
    " ",
    "\n",
    "end with newline\n",
]


def random_texts(n, seed):
  rng = random.Random(seed)
  pool = (list("abcdeHT hin'slt") + [" ", " ", "  ", "\n", "\t", "'", "'s",
                                      "'ll", "1", "23", ".", ",", "!?",
                                      "é", "ü", "日", "🙂", "\u00a0", "\x1c",
                                      "\u0301", "—", "٣"])
  return ["".join(rng.choice(pool) for _ in range(rng.randint(1, 24)))
          for _ in range(n)]


GPT2_PATTERN = (r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+"""
                r"""| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def write_bpe():
  from transformers import GPT2Tokenizer  # pylint: disable=g-import-not-at-top
  byte_symbols = list(bytes_to_unicode().values())  # GPT-2's id order.
  vocab = {s: i for i, s in enumerate(byte_symbols)}
  for a, b in MERGES:
    assert a in vocab and b in vocab, (a, b)
    vocab.setdefault(a + b, len(vocab))
  vocab["<|endoftext|>"] = len(vocab)
  vocab_path = os.path.join(OUT, "vocab.json")
  merges_path = os.path.join(OUT, "merges.txt")
  with open(vocab_path, "w", encoding="utf-8") as f:
    json.dump(vocab, f, ensure_ascii=False)
  with open(merges_path, "w", encoding="utf-8") as f:
    f.write("#version: 0.2\n")
    for a, b in MERGES:
      f.write(f"{a} {b}\n")
  tok = GPT2Tokenizer(vocab_path, merges_path)
  pattern = regex.compile(GPT2_PATTERN)
  cases = []
  for text in TEXTS + random_texts(300, seed=0):
    ids = tok.encode(text)
    assert tok.decode(ids) == text, text
    cases.append({"text": text, "ids": ids,
                  "pieces": pattern.findall(text)})
  with open(os.path.join(OUT, "bpe_cases.json"), "w", encoding="utf-8") as f:
    json.dump({"eos_id": vocab["<|endoftext|>"], "cases": cases}, f,
              ensure_ascii=False, indent=0)


def main():
  os.makedirs(OUT, exist_ok=True)
  write_checkpoints()
  write_bpe()
  for name in sorted(os.listdir(OUT)):
    print(f"{name}: {os.path.getsize(os.path.join(OUT, name))} bytes")


if __name__ == "__main__":
  main()
