"""A mode's study config, and a small base with one finetuning run of it.

Shared by the bench scripts that time the small reproduction's pieces
(imported from the script's own directory): `mode_config` reads a mode of
configs/small_consistency.py; `base_and_finetune` pretrains a base of that
mode's model for a few steps, writes the mode's generated math problems and
finetunes the base with AdamW, all under one workdir.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import pathlib
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent


def mode_config(mode: str) -> dict[str, Any]:
  """configs/small_consistency.py:MODE as a plain dict."""
  spec = importlib.util.spec_from_file_location(
      "small_consistency", REPO / "configs" / "small_consistency.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(mode).to_dict()


@dataclasses.dataclass
class SmallStudy:
  """What `base_and_finetune` built: the base, the run, the data files."""
  base: Any  # experiments.study.Base
  run: Any  # experiments.study.Run
  files: dict[str, str]  # "train" / "test" -> MetaMathQA-format JSON
  finetune: Any  # train.loop's result of the finetuning run


def base_and_finetune(rc, workdir: str, base_steps: int,
                      finetune_steps: int, lr: float) -> SmallStudy:
  """Pretrains an AdamW base `base_steps` steps, finetunes it with AdamW."""
  # deferred: jax and the package load after the scripts' argument parsing.
  from optconsist_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  from optconsist_jax.experiments import study  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import config as config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import loop  # pylint: disable=g-import-not-at-top
  c = study.pretrain_run_config(rc, "adamw", 0)
  c["train"].update(num_steps=base_steps)
  base_dir = os.path.join(workdir, "base")
  loop.train(config_types.ExperimentConfig.from_dict(c), base_dir)
  train, test = synthetic.make_splits(rc.finetune.train_examples,
                                      rc.eval.math_examples, 0,
                                      levels=rc.finetune.levels)
  files = {}
  for name, problems in (("train", train), ("test", test)):
    files[name] = os.path.join(workdir, f"{name}.json")
    with open(files[name], "w") as fh:
      json.dump([synthetic.render_metamath(p) for p in problems], fh)
  base = study.Base("adamw", 0, base_dir, "orbax", rc.tokenizer_path, c)
  f = study.finetune_run_config(rc, base, "adamw", lr, 0, files["train"])
  f["train"].update(num_epochs=0, num_steps=finetune_steps)
  run = study.Run("ft", os.path.join(workdir, "ft"), dict(
      base="adamw", method="adamw", lr=lr, seed=0), f, base)
  result = loop.train(config_types.ExperimentConfig.from_dict(f), run.workdir)
  return SmallStudy(base, run, files, result)
