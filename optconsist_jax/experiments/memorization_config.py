r"""Finetuning config of the synthetic memorization experiment (AdamW or Muon).

The experiment (`optconsist_jax.experiments.memorization`) finetunes one base
model on a mix of rule items (arithmetic word problems whose answer follows
from the question) and fact items (made-up "locker numbers" that can only be
memorized), once per optimizer, and measures memorization and rule accuracy
after every epoch. `memorization.run` fills in the data path, the base and the
model shape from the base's own W/config.json. It lives in the package so an
installed wheel has it; configs/memorization.py re-exports it for
`--config configs/memorization.py:ARG` (usage there).

Args (`get_config(ARG)`): the optimizer preset (`optim.presets.preset`):
`adamw` (default), `muon` (Muon on hidden matrices with the `rms_match` scale,
AdamW elsewhere), or any optimizer name (an Optax name such as `lion`, or
`pkg.module:function`) on every parameter. All use the same peak learning rate,
since rms_match puts Muon's updates on AdamW's scale.
"""

import ml_collections

from optconsist_jax.optim import presets


def optim_dict(name: str, peak_lr: float, warmup_fraction: float = 0.05,
               floor: float = 0.1) -> dict:
  """The optim section for `name`; the cosine decays over the whole run."""
  try:
    return presets.preset(name, peak_lr=peak_lr,
                          warmup_fraction=warmup_fraction, floor=floor,
                          adam_kwargs=dict(b2=0.95)).to_dict()
  except ValueError as e:
    raise ValueError(f"memorization config {name!r}: {e}") from None


def get_config(arg: str = "adamw") -> ml_collections.ConfigDict:
  """The finetuning config for optimizer preset `arg` (module docstring)."""
  c = ml_collections.ConfigDict()
  # Overwritten by memorization.run with the base run's resolved model.
  c.model = dict(preset="tiny_gqa", vocab_size=2048,
                 max_position_embeddings=256)
  c.mesh = dict(preset="fsdp")
  c.optim = optim_dict(arg, peak_lr=2e-3)
  c.data = dict(format="metamathqa", path="", seq_len=128,
                global_batch_size=16, seed=0, tokenizer_path="")
  c.train = dict(num_epochs=4, num_steps=0, grad_accum_steps=1, seed=0,
                 dropout_seed=ml_collections.config_dict.placeholder(int),
                 log_every=10, stats_every=0, progress_every_secs=30.0,
                 parameter_overview=False)
  # One checkpoint per epoch end, all kept: each is one point of the curves.
  c.checkpoint = dict(every_steps=0, keep=1, keep_epochs=True,
                      async_save=False)
  c.init_from = dict(path="", kind="auto",
                     step=ml_collections.config_dict.placeholder(int))
  return c
