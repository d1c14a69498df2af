r"""Llama-2-7B finetuned on MetaMathQA: AdamW, Muon or LoRA (the paper's core run).

  python -m optconsist_jax.train \
      --config configs/llama2_7b_metamath.py:adamw,lr=1e-5 \
      --workdir gs://BUCKET/runs/7b_adamw_lr1e-5

Arg (`--config configs/llama2_7b_metamath.py:ARG`): a variant, then optional
comma-separated `key=value` settings:

  variant    adamw (default) | muon | lora16 | lora64 | lora256
  lr         peak learning rate (the sweep axis). Defaults: adamw 1e-5
             (Biderman et al. 2024 full FT); muon 5e-5 on the hidden matrices
             (a concurrent Muon-finetuning recipe: Muon 5e-5 vs AdamW 1e-5,
             update scale 0.2 * sqrt(max(m, n)) of Liu et al. 2025, arXiv
             2502.16982 = `rms_match`); lora 2e-4 (r16),
             1e-4 (r64), 5e-5 (r256) (Biderman et al. 2024).
  adam_lr    muon only: peak LR of the AdamW group (embeddings, norms, head);
             default 1e-5.
  epochs     passes over MetaMathQA (default 11, one checkpoint per epoch).
  accum      gradient-accumulation micro-batches per step (default 24: 32
             rows per micro-batch, i.e. 4 rows per chip on 8 chips, 1 on 32).
  init       Hugging Face Hub repo `org/name[@revision]`, a local Hugging
             Face folder (config.json, *.safetensors, tokenizer.model) or an
             Orbax run (may be gs://). Default `HF_MODEL`, Llama-2-7B on the
             Hub at a pinned commit (gated: accept Meta's license on the Hub
             and set HF_TOKEN); every host downloads it into its own
             Hugging Face cache (optconsist_jax.io.hub).
  tokenizer  SentencePiece model or Hub repo; default the init repo's
             tokenizer.model (a Hub init), else `<init>/tokenizer.model`.
  data       MetaMathQA-395K.json; default `MetaMathQA-395K.json`, which
             `python -m optconsist_jax.data.fetch metamathqa .` writes.
  mesh       mesh preset (default fsdp).

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

import ml_collections

from optconsist_jax.io import hub
from optconsist_jax.optim import presets

VARIANTS = ("adamw", "muon", "lora16", "lora64", "lora256")
_DEFAULT_LR = {"adamw": 1e-5, "muon": 5e-5, "lora16": 2e-4, "lora64": 1e-4,
               "lora256": 5e-5}
_KEYS = ("lr", "adam_lr", "epochs", "accum", "init", "tokenizer", "data",
         "mesh")

# meta-llama/Llama-2-7b-hf at the commit public Hugging Face caches show for
# its main branch (not checked against the Hub from here; a wrong revision
# fails with one line: pass init=meta-llama/Llama-2-7b-hf@main then).
HF_MODEL = "meta-llama/Llama-2-7b-hf@01c7f73d771dfac7d292323805ebc428287df4f9"

SEQ_LEN = 1024
GLOBAL_BATCH = 768
EPOCHS = 11


def parse_arg(arg: str) -> tuple[str, dict[str, str]]:
  """'muon,lr=2e-5' -> ('muon', {'lr': '2e-5'}); bad input names the key."""
  parts = [p.strip() for p in (arg or "adamw").split(",") if p.strip()]
  variant, settings = "adamw", {}
  if parts and "=" not in parts[0]:
    variant = parts.pop(0)
  if variant not in VARIANTS:
    raise ValueError(f"configs/llama2_7b_metamath.py: unknown variant"
                     f" {variant!r}; expected one of {VARIANTS}")
  for p in parts:
    key, sep, value = p.partition("=")
    if not sep or key not in _KEYS:
      raise ValueError(f"configs/llama2_7b_metamath.py: bad setting {p!r};"
                       f" expected key=value with key in {_KEYS}")
    settings[key] = value
  if "adam_lr" in settings and variant != "muon":
    raise ValueError("configs/llama2_7b_metamath.py: adam_lr is for the muon"
                     " variant only")
  return variant, settings


def get_config(arg: str = "adamw") -> ml_collections.ConfigDict:
  variant, s = parse_arg(arg)
  lr = float(s.get("lr", _DEFAULT_LR[variant]))
  init = s.get("init", HF_MODEL)
  # A Hub repo's tokenizer.model comes from the same repo and revision.
  tokenizer = s.get("tokenizer", init if hub.is_hub_ref(init)
                    else f"{init}/tokenizer.model")

  c = ml_collections.ConfigDict()
  c.model = dict(preset="llama2_7b", param_dtype="float32", dtype="bfloat16",
                 scan_layers=True, remat_policy="full")
  # Axis sizes unset: the preset's; `--config.mesh.fsdp=4` etc. override them
  # (the rows of `python -m optconsist_jax.tools.plan --search` print such flags).
  c.mesh = dict(preset=s.get("mesh", "fsdp"),
                data=ml_collections.config_dict.placeholder(int),
                fsdp=ml_collections.config_dict.placeholder(int),
                tensor=ml_collections.config_dict.placeholder(int),
                dcn_data=ml_collections.config_dict.placeholder(int))

  # The paper's schedule, clipping and AdamW betas are the presets' defaults;
  # total_steps 0 decays over the run's length (train.py fills it in).
  if variant == "muon":
    c.optim = presets.preset(
        "muon", peak_lr=lr, adam_peak_lr=float(s.get("adam_lr", 1e-5)),
        kwargs=dict(nesterov=True)).to_dict()
  elif variant == "adamw":
    c.optim = presets.preset("adamw", peak_lr=lr).to_dict()
  else:
    rank = int(variant[len("lora"):])
    c.lora = dict(rank=rank, alpha=2.0 * rank, dropout=0.05,
                  targets="q,k,v,o,gate,up,down".split(","))
    c.optim = presets.preset("lora", peak_lr=lr).to_dict()

  c.data = dict(format="metamathqa", path=s.get("data", "MetaMathQA-395K.json"),
                tokenizer_path=tokenizer,
                seq_len=SEQ_LEN, global_batch_size=GLOBAL_BATCH, pack=True,
                seed=0, num_workers=0)
  c.train = dict(num_epochs=int(s.get("epochs", EPOCHS)), num_steps=0,
                 grad_accum_steps=int(s.get("accum", 24)), seed=0,
                 # LoRA dropout needs randomness; full FT runs deterministically.
                 dropout_seed=(0 if variant.startswith("lora") else
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

