"""configs/llama2_7b_metamath.py: every variant converts to the typed config."""

import importlib.util
import pathlib

from flax import nnx
import jax
import pytest

from optconsist_jax import optim
from optconsist_jax.train.config import ExperimentConfig
from optconsist_jax.model import architecture

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
  n_trainable = _build_optimizer(exp)
  if exp.lora is None:
    assert n_trainable == 6_738_415_616
  else:
    rank = exp.lora.rank
    # A [in, r] + B [r, out] on q,k,v,o (4096 x 4096), gate/up (4096 x 11008),
    # down (11008 x 4096) in each of 32 layers.
    per_layer = rank * (4 * (4096 + 4096) + 3 * (4096 + 11008))
    assert n_trainable == 32 * per_layer


def _build_optimizer(exp) -> int:
  """Builds the optimizer on the abstract model (shapes only) and inits its
  state: kwargs and routes are valid for the real model. Returns the
  number of trainable parameters."""
  lora = None
  if exp.lora is not None:
    from optconsist_jax.model import lora as lora_lib  # pylint: disable=g-import-not-at-top
    lora = lora_lib
  transform = (None if lora is None else
               lambda m: lora.apply_lora(m, exp.lora, rngs=nnx.Rngs(1)))
  abstract = architecture.abstract_model(exp.model, transform=transform)
  trainable = lora.LoRAParam if lora is not None else nnx.Param
  params = nnx.state(abstract, trainable)
  tx = optim.build(exp.optim, params)
  jax.eval_shape(tx.init, params)
  return sum(x.size for x in jax.tree.leaves(params))


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


# Any optimizer name or preset, and any 7-8B base of the provenance table.
OTHER_ARGS = ["lion", "muon_gspmd,adam_lr=3e-6", "muon_contrib", "lora",
              "optax:adafactor,lr=3e-4", "adamw,base=llama3_1_8b",
              "muon,base=olmo2_7b", "lora64,base=qwen2_5_7b",
              "signum,base=qwen3_8b,init=/ckpt/qwen3",
              "muon,base=moonlight_16b_a3b",
              "adamw,base=moonlight_16b_a3b,mesh=dp_fsdp"]


@pytest.mark.parametrize("arg", OTHER_ARGS)
def test_any_optimizer_and_base_convert(arg):
  from optconsist_jax.io import hub  # pylint: disable=g-import-not-at-top
  from optconsist_jax.io import provenance  # pylint: disable=g-import-not-at-top
  cfg = load().get_config(arg)
  exp = ExperimentConfig.from_dict(cfg.to_dict()).resolve_total_steps(100)
  variant, settings = arg.split(",")[0], dict(
      p.split("=") for p in arg.split(",")[1:])
  base = settings.get("base", "llama2_7b")
  assert exp.model == architecture.preset(base).replace(
      param_dtype="float32", dtype="bfloat16", scan_layers=True,
      remat_policy="full")
  # Moonlight's routed experts split over `data` (a no-op on fsdp's data=1).
  moe = base == "moonlight_16b_a3b"
  assert exp.mesh.extra_rules == ((("expert", "data"),) if moe else ())
  assert exp.mesh.data == (2 if "mesh=dp_fsdp" in arg else 1)
  # The optimizer: the named one on every parameter, Muon on the hidden
  # matrices beside AdamW, or AdamW on the LoRA adapters.
  groups = exp.optim.groups
  if variant.startswith("muon"):
    assert set(groups) == {"muon", "adamw"}
    assert groups["muon"].optimizer == ("contrib.muon" if "contrib" in variant
                                        else "muon")
  elif variant.startswith("lora"):
    assert exp.lora.rank == (16 if variant == "lora" else int(variant[4:]))
    assert [g.optimizer for g in groups.values()] == ["adamw"]
  else:
    assert [g.optimizer for g in groups.values()] == [variant]
  peak = float(settings.get("lr", 0)) or None
  if peak:
    assert [g.schedule.peak for g in groups.values()] == [peak]
  if "adam_lr" in settings:
    assert groups["adamw"].schedule.peak == float(settings["adam_lr"])
  n_trainable = _build_optimizer(exp)
  if exp.lora is None:
    # All but DeepSeek-V3's routing bias (a load-balancing buffer).
    bias = exp.model.num_moe_layers * exp.model.n_routed_experts if moe else 0
    assert n_trainable == exp.model.num_params() - bias
  # The base's Hub repo (the provenance table's) and its tokenizer, or the
  # local folder's tokenizer.json.
  if "init" in settings:
    assert exp.init_from.path == exp.data.tokenizer_path == settings["init"]
  elif base != "llama2_7b":
    assert hub.parse_ref(exp.init_from.path).repo_id == (
        "moonshotai/Moonlight-16B-A3B" if moe else
        provenance.by_preset(base).hub_id)
    assert provenance.lookup(exp.init_from.path).optimizer == (
        "muon" if moe else "adamw")
    assert exp.data.tokenizer_path == exp.init_from.path


@pytest.mark.parametrize("arg,message", [
    ("no_such_opt", "unknown variant 'no_such_opt'.*unknown optimizer"),
    ("adamw,base=llama2_13b", r"base='llama2_13b'; expected one of"),
    ("lion,adam_lr=1e-5", "muon variant only"),
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
  # Every base of the 7B config is labelled with its pretraining optimizer:
  # Moonlight-16B-A3B's is Muon (arXiv 2502.16982), the others' AdamW.
  for base in load().BASES:
    assert module.get_config(f"base={base}").base == (
        "muon" if base == "moonlight_16b_a3b" else "adamw")
  moon = EvalConfig.from_dict(
      module.get_config("base=moonlight_16b_a3b").to_dict())
  assert moon.mesh.extra_rules == (("expert", "data"),)
  with pytest.raises(ValueError, match=r"base='tiny_mha': model preset"):
    module.get_config("base=tiny_mha")


def test_launch_script_passes_base_to_training_and_eval(tmp_path):
  """launch/llama2_7b_metamath.sh BASE=...: both jobs get base=."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = CONFIG.parent.parent
  env = dict(os.environ, BUCKET="gs://bkt", ZONE="us-east5-a",
             ACCEL="v5p-32", DRY_RUN="1", PYTHON=sys.executable,
             HF_TOKEN_FILE=str(tmp_path / "none"), VARIANT="muon",
             BASE="moonlight_16b_a3b")
  p = subprocess.run(["bash", str(root / "launch" / "llama2_7b_metamath.sh")],
                     capture_output=True, text=True, env=env, timeout=120,
                     check=False)
  assert p.returncode == 0, p.stderr
  out = p.stdout
  work = "--workdir=gs://bkt/runs/moonlight_16b_a3b-muon"
  assert ("optconsist_jax.train --config=configs/llama2_7b_metamath.py:"
          f"muon,base=moonlight_16b_a3b {work}") in out
  assert ("optconsist_jax.evaluate --config=configs/llama2_7b_metamath_eval"
          f".py:base=moonlight_16b_a3b {work} --watch") in out
  assert "queued-resources create ft-moonlight-16b-a3b-muon " in out
