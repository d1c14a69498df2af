r"""Finetuning for the synthetic memorization experiment (AdamW or Muon).

The config itself is `optconsist_jax.experiments.memorization_config` (in the
package, so an installed wheel has it); this file re-exports it for the command
line. The experiment (optconsist_jax/experiments/memorization.py) finetunes one
base model on rule and fact items once per optimizer and measures memorization
and rule accuracy after every epoch; `memorization.run` fills in the data path,
the base and the model shape. By hand, with a data set written by
`memorization_data.make_dataset("/tmp/mem_data")`
(optconsist_jax.experiments.memorization_data):

  python -m optconsist_jax.train --config configs/memorization.py:muon \
      --workdir /tmp/mem_muon --config.data.path=/tmp/mem_data/train.json \
      --config.init_from.path=/tmp/base_run

Args (`--config configs/memorization.py:ARG`): the optimizer preset
(`optim.presets.preset`): `adamw` (default), `muon` (Muon on hidden matrices
with the `rms_match` scale, AdamW elsewhere), or any optimizer name (an Optax
name such as `lion`, or `pkg.module:function`) on every parameter.
"""

from optconsist_jax.experiments.memorization_config import get_config  # noqa: F401  (re-export)
from optconsist_jax.experiments.memorization_config import optim_dict  # noqa: F401  (re-export)
