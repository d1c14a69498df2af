"""configs/small_consistency.py's modes for tests, and the mini study on
external bases that the family end-to-end tests run."""

import importlib.util
import pathlib

from optconsist_jax.experiments import reproduce
from optconsist_jax.experiments import study

CONFIG = pathlib.Path(__file__).resolve().parent.parent / "configs" / (
    "small_consistency.py")


def config_dict(mode: str) -> dict:
  """get_config(mode).to_dict() of the small reproduction's config."""
  spec = importlib.util.spec_from_file_location("small_consistency", CONFIG)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(mode).to_dict()


def config(mode: str, **overrides) -> study.ReproConfig:
  """The typed config; `section__key=value` sets one key, `section=value`
  a whole section."""
  d = config_dict(mode)
  for key, value in overrides.items():
    section, _, name = key.partition("__")
    if name:
      d[section][name] = value
    else:
      d[section] = value
  return study.ReproConfig.from_dict(d)


def run_mini_study(workdir: pathlib.Path, bases: str, methods: tuple[str, ...],
                   probes: bool):
  """The mini study on `bases` (reproduce.bases syntax), one seed and epoch,
  a few problems and documents: (workdir, outputs, bases, runs)."""
  d = config_dict("mini")
  d["reproduce"].update(bases=bases, matrix="never")
  d["finetune"].update(methods=methods, seeds=1, epochs=1, train_examples=16,
                       seq_len=192)
  d["eval"].update(math_examples=4, max_new_tokens=4, retention_docs=2,
                   probes=probes)
  d["fingerprints"] = {"enabled": False}
  rc = study.ReproConfig.from_dict(d)
  outputs = reproduce.run(rc, str(workdir))
  planned_bases, runs = study.plan_runs(
      rc, str(workdir), str(workdir / "data" / "math_train.json"))
  return workdir, outputs, planned_bases, runs
