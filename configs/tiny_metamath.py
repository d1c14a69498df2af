r"""A tiny Llama trained on generated MetaMathQA-format problems (CPU, ~1 min).

  python -m optconsist_jax.train --config configs/tiny_metamath.py \
      --workdir /tmp/tiny_metamath

Args (`--config configs/tiny_metamath.py:ARG`): the optimizer preset
(`optim.presets.preset`), `adamw` (default), `muon` (Muon on hidden matrices,
AdamW elsewhere), `lora` (rank-8 adapters on every projection, AdamW on the
adapters; meant with `--config.init_from.path=` a trained base, e.g. an
earlier run's workdir), or any optimizer name on every parameter (an Optax
name such as `lion`, or `pkg.module:function`).

Data: 2,000 generated arithmetic word problems in MetaMathQA format
(optconsist_jax.data.synthetic), Alpaca prompt, loss on the response, the
shipped tiny SentencePiece tokenizer (2,048 pieces), packed into rows of 192
tokens. Model: the `tiny_gqa` preset (3 layers, width 64, GQA 8/2 heads) with
the tokenizer's vocabulary. Random init (no base model), so the loss falls from
ln(2048) ~ 7.6. Overrides such as `--config.train.num_epochs=1` or
`--config.mesh.preset=dp` work on the command line.
"""

import ml_collections

from optconsist_jax.optim import presets


def get_config(arg: str = "adamw") -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = dict(preset="tiny_gqa", vocab_size=2048,
                 max_position_embeddings=256)
  # All devices on the fsdp axis; on one CPU device this is a 1-device mesh.
  c.mesh = dict(preset="fsdp")

  lr = 3e-3
  if arg == "lora":
    c.lora = dict(rank=8, alpha=16.0, dropout=0.05,
                  targets=("q", "k", "v", "o", "gate", "up", "down"))
  try:
    c.optim = presets.preset(
        arg, peak_lr={"muon": 0.02, "lora": 1e-2}.get(arg, lr),
        adam_peak_lr=lr, warmup_fraction=0.05, floor=0.1,
        # Muon's own 'shape' scale, at its own (larger) learning rate.
        kwargs=dict(scale="shape") if arg == "muon" else None,
        adam_kwargs=dict(b2=0.95)).to_dict()
  except ValueError as e:
    raise ValueError(f"configs/tiny_metamath.py:{arg}: {e}") from None

  # format/path/tokenizer_path are here to be overridden, e.g. with
  # --config.data.format=metamathqa --config.data.path=MetaMathQA-395K.json
  # --config.data.tokenizer_path=GPT2_DIR (README: the authors' nanoGPT bases).
  c.data = dict(format="synthetic", path="", tokenizer_path="",
                synthetic_examples=2000, seq_len=192, global_batch_size=16,
                seed=0)
  c.train = dict(num_epochs=3, num_steps=0, grad_accum_steps=1, seed=0,
                 dropout_seed=ml_collections.config_dict.placeholder(int),
                 log_every=10, stats_every=50, progress_every_secs=10.0,
                 compilation_cache_dir="auto")  # Off on CPU unless a path.
  # A jax.profiler trace of steps START:END into W/profile ("": none).
  c.profile = dict(steps="")
  c.checkpoint = dict(every_steps=50, keep=2, keep_epochs=True,
                      async_save=True)
  c.init_from = dict(path="", kind="auto",
                     step=ml_collections.config_dict.placeholder(int))
  return c
