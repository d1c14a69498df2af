"""configs/llama2_7b_metamath.py: every variant converts to the typed config."""

import importlib.util
import pathlib

from flax import nnx
import jax
import pytest

from optconsist_jax import optim
from optconsist_jax.train.config import ExperimentConfig
from optconsist_jax.model import Llama

CONFIG = pathlib.Path(__file__).parent.parent / "configs" / "llama2_7b_metamath.py"


def load():
  spec = importlib.util.spec_from_file_location("llama2_7b_metamath", CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def has_lora():
  return importlib.util.find_spec("optconsist_jax.model.lora") is not None


VARIANTS = ["adamw", "muon", "lora16", "lora64", "lora256",
            "adamw,lr=3e-5", "muon,lr=2e-5,adam_lr=3e-6",
            "lora64,lr=2e-4,epochs=4,accum=12,init=gs://b/run"]


@pytest.mark.parametrize("arg", VARIANTS)
def test_variant_converts_and_builds_its_optimizer(arg):
  if arg.startswith("lora") and not has_lora():
    pytest.skip("optconsist_jax.model.lora not written yet")
  cfg = load().get_config(arg)
  exp = ExperimentConfig.from_dict(cfg.to_dict())
  # 11 epochs of ~103M tokens in packed 768 x 1024 rows: ~131 steps/epoch.
  steps = exp.train.num_epochs * 131
  exp = exp.resolve_total_steps(steps)
  assert exp.model.num_params() == 6_738_415_616  # Llama-2-7B
  assert (exp.data.seq_len, exp.data.global_batch_size) == (1024, 768)
  assert exp.model.dtype == "bfloat16" and exp.model.param_dtype == "float32"
  assert exp.model.scan_layers and exp.model.remat_policy == "full"
  assert exp.mesh.data == 1 and exp.mesh.fsdp == -1  # the fsdp preset
  assert exp.optim.clip_norm == 1.0
  for group in exp.optim.groups.values():
    sched = group.schedule
    assert (sched.kind, sched.warmup_fraction, sched.floor) == (
        "cosine", 0.1, 0.01)
    assert sched.total_steps == steps and group.weight_decay == 0.0
  assert exp.checkpoint.save_epoch_ends and exp.checkpoint.keep_epochs
  assert exp.checkpoint.epoch_params_only
  if "epochs" not in arg:
    assert exp.train.num_epochs == 11
  # The optimizer builds on the abstract 7B tree (shapes only) and its state
  # initializes: kwargs and routes are valid for the real model.
  lora = None
  if exp.lora is not None:
    from optconsist_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora = lora_lib
  def make():
    model = Llama(exp.model, rngs=nnx.Rngs(0))
    if lora is not None:
      out = lora.apply_lora(model, exp.lora, rngs=nnx.Rngs(1))
      model = model if out is None else out
    return model
  abstract = nnx.eval_shape(make)
  trainable = lora.LoRAParam if lora is not None else nnx.Param
  params = nnx.state(abstract, trainable)
  tx = optim.build(exp.optim, params)
  jax.eval_shape(tx.init, params)
  n_trainable = sum(x.size for x in jax.tree.leaves(params))
  if lora is None:
    assert n_trainable == 6_738_415_616
  else:
    rank = exp.lora.rank
    # A [in, r] + B [r, out] on q,k,v,o (4096 x 4096), gate/up (4096 x 11008),
    # down (11008 x 4096) in each of 32 layers.
    per_layer = rank * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert n_trainable == 32 * per_layer


def test_defaults_follow_the_reference():
  m = load()
  lrs = {}
  for v in ("adamw", "muon", "lora16", "lora256"):
    groups = m.get_config(v).optim.groups
    lrs[v] = {g: groups[g].schedule.peak for g in groups}
  assert lrs["adamw"] == {"adamw": 1e-5}
  assert lrs["muon"] == {"muon": 5e-5, "adamw": 1e-5}
  assert m.get_config("muon").optim.groups.muon.kwargs.scale == "rms_match"
  assert lrs["lora16"] == {"adamw": 2e-4} and lrs["lora256"] == {"adamw": 5e-5}
  assert m.get_config("lora64").lora.alpha == 128


@pytest.mark.parametrize("arg,message", [
    ("sgd", "unknown variant 'sgd'"),
    ("adamw,lr", "bad setting 'lr'"),
    ("adamw,foo=1", "bad setting 'foo=1'"),
    ("adamw,adam_lr=1e-5", "muon variant only"),
])
def test_bad_arg_is_a_clear_error(arg, message):
  with pytest.raises(ValueError, match=message):
    load().get_config(arg)


EVAL_CONFIG = CONFIG.with_name("llama2_7b_metamath_eval.py")


@pytest.mark.parametrize("arg", ["", "data_dir=/data/eval/,limit=50"])
def test_eval_config_converts(arg):
  from optconsist_jax.evaluate.config import EvalConfig  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("eval_cfg", EVAL_CONFIG)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = EvalConfig.from_dict(module.get_config(arg).to_dict())
  assert set(c.math.protocols) == {"metamath", "gsm8k_fewshot"}
  assert c.math.num_shots == 5
  files = [c.math.test, c.multiple_choice.hellaswag,
           c.multiple_choice.arc_challenge, c.multiple_choice.winogrande,
           c.lm_loss.path]
  assert all(f for f in files)  # every benchmark is on
  if arg:
    assert all(f.startswith("/data/eval/") for f in files)
    assert c.math.limit == 50
  with pytest.raises(ValueError, match="bad setting"):
    module.get_config("dir=x")
