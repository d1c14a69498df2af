r"""Llama-2-7B finetuned on MetaMathQA: AdamW, Muon or LoRA (the paper's core run).

  python -m optconsist_jax.train \
      --config configs/llama2_7b_metamath.py:adamw,lr=1e-5 \
      --workdir gs://BUCKET/runs/7b_adamw_lr1e-5

Arg (`--config configs/llama2_7b_metamath.py:ARG`): a variant, then optional
comma-separated `key=value` settings:

  variant    adamw (default) | muon | lora16 | lora64 | lora256, or any
             optimizer: a preset of optim/presets.py (`muon_gspmd`,
             `muon_contrib`, `lora` = lora16), an Optax name (`lion`,
             `adafactor`, `contrib.prodigy`) or an import path
             (`my_pkg.my_opt:make`), on every parameter (the muon presets:
             on the hidden matrices, AdamW on the rest).
  lr         peak learning rate (the sweep axis). Defaults: adamw 1e-5
             (Biderman et al. 2024 full FT); muon 5e-5 on the hidden matrices
             (a concurrent Muon-finetuning recipe: Muon 5e-5 vs AdamW 1e-5,
             update scale 0.2 * sqrt(max(m, n)) of Liu et al. 2025, arXiv
             2502.16982 = `rms_match`); lora 2e-4 (r16),
             1e-4 (r64), 5e-5 (r256) (Biderman et al. 2024); muon_gspmd
             as muon; any other optimizer 1e-5 (pick its own with lr=).
  adam_lr    muon presets only: peak LR of the AdamW group (embeddings,
             norms, head); default 1e-5.
  base       the base model's preset (model/architecture.py): llama2_7b
             (default), llama3_1_8b, olmo2_7b, qwen2_5_7b, qwen3_8b (AdamW
             bases) or moonlight_16b_a3b (Moonlight-16B-A3B, DeepSeek-V3
             MLA + MoE, pretrained with Muon; the study's Muon base at this
             scale). It sets the architecture and the default `init`, the
             base's Hub repo in io/provenance.py (Llama-2-7B at a pinned
             commit, the others at main), whose pretraining optimizer the
             eval config's `base=` labels, and for Moonlight the mesh's
             expert rule (MESH_RULES).
  epochs     passes over MetaMathQA (default 11, one checkpoint per epoch).
  accum      gradient-accumulation micro-batches per step (default 24: 32
             rows per micro-batch, i.e. 4 rows per chip on 8 chips, 1 on 32).
  init       Hugging Face Hub repo `org/name[@revision]`, a local Hugging
             Face folder (config.json, *.safetensors, tokenizer.model or
             tokenizer.json) or an Orbax run (may be gs://). Default the
             base's repo (`HF_MODEL` for Llama-2-7B; the repos are gated or
             licensed: accept the license on the Hub and set HF_TOKEN);
             every host downloads it into its own Hugging Face cache
             (optconsist_jax.io.hub).
  tokenizer  SentencePiece model, tokenizer.json folder or Hub repo; default
             the init repo's tokenizer (a Hub init: its tokenizer.model, else
             its tokenizer.json), else `<init>/tokenizer.model` for Llama-2
             and the `<init>` folder's tokenizer.json for the other bases.
  data       MetaMathQA-395K.json; default `MetaMathQA-395K.json`, which
             `python -m optconsist_jax.data.fetch metamathqa .` writes.
  mesh       mesh preset (default fsdp; Moonlight: MOONLIGHT_MESH).

Fixed settings (Biderman et al. 2024, "LoRA Learns Less and Forgets Less",
arXiv 2405.09673): sequence length 1024,
global batch 768 rows (packed), cosine schedule with 10% warmup down to 1% of
peak, weight decay 0, grad-norm clip 1.0; bf16 compute with fp32 params, scan
over layers with full remat; LoRA alpha = 2 x rank, dropout 0.05 on
q,k,v,o,gate,up,down with embeddings and head frozen.

The data file is read from local disk: on a TPU slice fetch it on every
worker first (`python -m optconsist_jax.tools.launch tpu fetch`, which runs
optconsist_jax.data.fetch there; launch/llama2_7b_metamath.sh does it). Local
Hugging Face folders must be on every worker too (`launch tpu stage`); Orbax
`init` paths and the workdir may be gs://.

The matching eval job is configs/llama2_7b_metamath_eval.py (GSM8K with both
prompt protocols, HellaSwag / ARC-Challenge / WinoGrande, held-out LM loss).
"""

import re

import ml_collections

from optconsist_jax.io import hub
from optconsist_jax.io import provenance
from optconsist_jax.optim import presets

# The named variants, with their own default learning rates; any other
# optimizer name works too (module docstring).
VARIANTS = ("adamw", "muon", "lora16", "lora64", "lora256")
_DEFAULT_LR = {"adamw": 1e-5, "muon": 5e-5, "lora16": 2e-4, "lora64": 1e-4,
               "lora256": 5e-5, "muon_gspmd": 5e-5}
_KEYS = ("lr", "adam_lr", "base", "epochs", "accum", "init", "tokenizer",
         "data", "mesh")
_LORA = re.compile(r"lora(?P<rank>[0-9]+)")

# meta-llama/Llama-2-7b-hf at the commit public Hugging Face caches show for
# its main branch (not checked against the Hub from here; a wrong revision
# fails with one line: pass init=meta-llama/Llama-2-7b-hf@main then).
HF_MODEL = "meta-llama/Llama-2-7b-hf@01c7f73d771dfac7d292323805ebc428287df4f9"

# base= presets -> their Hub repo (io/provenance.py records each one's
# pretraining optimizer and its source).
BASES = {"llama2_7b": HF_MODEL}
BASES.update({p: provenance.by_preset(p).hub_id for p in (
    "llama3_1_8b", "olmo2_7b", "qwen2_5_7b", "qwen3_8b")})
# Moonlight's record is found by its Hub id: its preset is
# model/deepseek_v3_config.py's, which provenance.by_preset does not list.
MOONLIGHT = "moonshotai/Moonlight-16B-A3B"
BASES["moonlight_16b_a3b"] = provenance.lookup(MOONLIGHT).hub_id

# Extra sharding rules per base (sharding.py). Moonlight's routed experts
# (90% of its 16B parameters) split over the `data` axis: with the default
# fsdp mesh (data = 1) that rule shards nothing and the experts are FSDP
# like every weight; on a mesh with data > 1 (`mesh=dp_fsdp`, or
# --config.mesh.data=N) each data group holds 1/N of the experts instead of
# a replica (expert parallelism, Lepikhin et al. 2020, GShard, arXiv
# 2006.16668). docs/cloud-tpu.md has the compiled plan of both.
MESH_RULES = {"moonlight_16b_a3b": (("expert", "data"),)}
MOONLIGHT_MESH = "fsdp"

SEQ_LEN = 1024
GLOBAL_BATCH = 768
EPOCHS = 11


def _hidden_matrix(variant: str) -> bool:
  """True for the muon presets (Muon on the hidden matrices + AdamW)."""
  return presets.preset(variant).routes[0][0] == "hidden_matrix"


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
  """'muon,lr=2e-5' -> ('muon', {'lr': '2e-5'}); bad input names the key."""
  parts = [p.strip() for p in (arg or "adamw").split(",") if p.strip()]
  variant, settings = "adamw", {}
  if parts and "=" not in parts[0]:
    variant = parts.pop(0)
  if variant == "lora":
    variant = "lora16"
  if not _LORA.fullmatch(variant):
    try:
      presets.preset(variant)
    except ValueError as e:
      raise ValueError(f"configs/llama2_7b_metamath.py: unknown variant"
                       f" {variant!r}: not one of {VARIANTS} nor an"
                       f" optimizer ({e})") from None
  for p in parts:
    key, sep, value = p.partition("=")
    if not sep or key not in _KEYS:
      raise ValueError(f"configs/llama2_7b_metamath.py: bad setting {p!r};"
                       f" expected key=value with key in {_KEYS}")
    settings[key] = value
  if "adam_lr" in settings and (_LORA.fullmatch(variant)
                                or not _hidden_matrix(variant)):
    raise ValueError("configs/llama2_7b_metamath.py: adam_lr is for the muon"
                     " variant only")
  if settings.get("base", "llama2_7b") not in BASES:
    raise ValueError(f"configs/llama2_7b_metamath.py: base="
                     f"{settings['base']!r}; expected one of {list(BASES)}")
  return variant, settings


def get_config(arg: str = "adamw") -> ml_collections.ConfigDict:
  variant, s = parse_arg(arg)
  lr = float(s.get("lr", _DEFAULT_LR.get(variant, 1e-5)))
  base = s.get("base", "llama2_7b")
  init = s.get("init", BASES[base])
  # A Hub repo's tokenizer comes from the same repo and revision; a local
  # folder holds Llama-2's tokenizer.model or the others' tokenizer.json.
  if hub.is_hub_ref(init):
    default_tokenizer = init
  elif base == "llama2_7b":
    default_tokenizer = f"{init}/tokenizer.model"
  else:
    default_tokenizer = init
  tokenizer = s.get("tokenizer", default_tokenizer)
  lora = _LORA.fullmatch(variant)

  c = ml_collections.ConfigDict()
  c.model = dict(preset=base, param_dtype="float32", dtype="bfloat16",
                 scan_layers=True, remat_policy="full")
  # Axis sizes unset: the preset's; `--config.mesh.fsdp=4` etc. override them
  # (the rows of `python -m optconsist_jax.tools.plan --search` print such flags).
  default_mesh = MOONLIGHT_MESH if base == "moonlight_16b_a3b" else "fsdp"
  c.mesh = dict(preset=s.get("mesh", default_mesh),
                data=ml_collections.config_dict.placeholder(int),
                fsdp=ml_collections.config_dict.placeholder(int),
                tensor=ml_collections.config_dict.placeholder(int),
                dcn_data=ml_collections.config_dict.placeholder(int))
  if base in MESH_RULES:
    c.mesh["extra_rules"] = MESH_RULES[base]

  # The paper's schedule, clipping and AdamW betas are the presets' defaults;
  # total_steps 0 decays over the run's length (train.py fills it in).
  if lora:
    rank = int(lora["rank"])
    c.lora = dict(rank=rank, alpha=2.0 * rank, dropout=0.05,
                  targets="q,k,v,o,gate,up,down".split(","))
    c.optim = presets.preset("lora", peak_lr=lr).to_dict()
  elif _hidden_matrix(variant):
    # Nesterov momentum for our Muon (optax.contrib.muon's own default).
    kwargs = dict(nesterov=True) if variant != "muon_contrib" else None
    c.optim = presets.preset(
        variant, peak_lr=lr, adam_peak_lr=float(s.get("adam_lr", 1e-5)),
        kwargs=kwargs).to_dict()
  else:
    c.optim = presets.preset(variant, peak_lr=lr).to_dict()

  c.data = dict(format="metamathqa", path=s.get("data", "MetaMathQA-395K.json"),
                tokenizer_path=tokenizer,
                seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, pack=True,
                seed=0, num_workers=0)
  c.train = dict(num_epochs=int(s.get("epochs", EPOCHS)), num_steps=0,
                 grad_accum_steps=int(s.get("accum", 24)), seed=0,
                 # LoRA dropout needs randomness; full FT runs deterministically.
                 dropout_seed=(0 if lora else
                               ml_collections.config_dict.placeholder(int)),
                 log_every=10, stats_every=100, progress_every_secs=60.0,
                 # W/compilation_cache on TPU: a restart skips the compile.
                 compilation_cache_dir="auto")
  # A jax.profiler trace, e.g. --config.profile.steps=20:22 ("": none).
  c.profile = dict(steps="")
  # One checkpoint per epoch (kept: one learning/forgetting point each) plus
  # the newest periodic one for resuming after preemption. Epoch checkpoints
  # keep only the params once a newer one commits (27 GB of fp32 params instead
  # of ~80 GB with AdamW's two fp32 moments); the newest keeps the full state.
  c.checkpoint = dict(every_steps=50, keep=1, keep_epochs=True,
                      save_epoch_ends=True, async_save=True,
                      epoch_params_only=True)
  c.init_from = dict(path=init, kind="auto",
                     step=ml_collections.config_dict.placeholder(int))
  return c

