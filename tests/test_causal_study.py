"""The causal check's methods through the whole study (small_consistency.py:causal_mini).

Base-state variants (adamw+carried, adamw+frozen_nu, muon+carried) run only
on their family's base, as populations of seeds, and their checkpoints hold
what the variant promises, read back raw from Orbax: a carried run's Adam
count goes on from the base's, a frozen-nu run's second moment is the base's
bit for bit; the report labels their roles and compares them with the fresh
matched method.
"""

import collections
import json
import pathlib

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from optconsist_jax.evaluate import results
from optconsist_jax.experiments import finetune_methods
from optconsist_jax.experiments import reproduce
from optconsist_jax.experiments import study
from optconsist_jax.io import checkpoint_layout as checkpoints

import study_config

_config = study_config.config


def _key(k):
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _opt_state(workdir):
  """{path: numpy array} of the newest checkpoint's optimizer state (raw)."""
  info = [c for c in checkpoints.list_checkpoints(workdir) if c.complete][-1]
  ref = info.path / checkpoints.OPT_STATE
  with ocp.PyTreeCheckpointer() as ckptr:
    saved = ckptr.metadata(ref).item_metadata.tree
    tree = ckptr.restore(ref, args=ocp.args.PyTreeRestore(
        restore_args=jax.tree.map(
            lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved)))
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(_key(k) for k in p): np.asarray(v) for p, v in flat}


def test_method_names_parse_and_refuse():
  assert finetune_methods.parse("adamw+carried") == ("adamw", "carried")
  assert finetune_methods.optimizer_state("adamw+frozen_nu") == (
      "frozen_second_moment")
  assert finetune_methods.optimizer_state("muon") == "fresh"
  assert not finetune_methods.applies("muon+carried", "adamw")
  assert finetune_methods.applies("muon", "adamw")
  for bad, words in (("adamw+kept", "unknown variant"),
                     ("muon+frozen_nu", "frozen_nu is AdamW's"),
                     ("lora+carried", "no base optimizer state")):
    with pytest.raises(ValueError, match=f"finetune.methods.*{words}"):
      finetune_methods.parse(bad)


def test_causal_mini_runs_variants_on_their_own_base(tmp_path):
  rc = _config("causal_mini")
  reproduce.run(rc, str(tmp_path))
  bases, runs = study.plan_runs(rc, str(tmp_path),
                                str(tmp_path / "data" / "math_train.json"))
  expected = {("adamw", "adamw"), ("adamw", "adamw+carried"),
              ("adamw", "adamw+frozen_nu"), ("muon", "adamw"),
              ("muon", "muon+carried")}
  seeds = rc.finetune.seeds
  assert collections.Counter((r.labels["base"], r.labels["method"])
                             for r in runs) == {k: seeds for k in expected}
  records = [x for r in runs for x in results.read_workdir(r.workdir)]
  assert {(x.base, x.method) for x in records if not x.is_base} == expected

  base_steps = {b.name: b.config["train"]["num_steps"] for b in bases}
  base_state = {b.name: _opt_state(b.workdir) for b in bases}
  for r in runs:
    method, base = r.labels["method"], r.labels["base"]
    state = _opt_state(r.workdir)
    steps = json.loads((pathlib.Path(r.workdir) / "done.json").read_text()
                       )["steps"]
    counts = {int(v) for k, v in state.items() if k.endswith("count")
              and not k.endswith("nu_count")}
    if method.endswith("+carried"):
      assert counts == {base_steps[base] + steps}, (r.name, counts)
    else:
      assert counts == {steps}, (r.name, counts)
    if method == "adamw+frozen_nu":
      nu = {k: v for k, v in state.items() if "/nu/" in k}
      assert nu and all(np.array_equal(v, base_state[base][k])
                        for k, v in nu.items())
      assert {int(v) for k, v in state.items() if k.endswith("nu_count")} == {
          base_steps[base]}

  summary = json.loads((tmp_path / "report" / "summary.json").read_text())
  roles = {(s["base"], s["method"]): s["role"] for s in summary}
  assert roles[("adamw", "adamw+carried")] == "matched, carried state"
  assert roles[("adamw", "adamw+frozen_nu")] == "matched, frozen nu"
  assert roles[("muon", "muon+carried")] == "matched, carried state"
  assert roles[("muon", "adamw")] == "mismatched"
  md = (tmp_path / "report" / "summary.md").read_text()
  assert "adamw+frozen_nu" in md and "muon+carried" in md
