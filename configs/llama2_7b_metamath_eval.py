r"""The eval job for the runs of configs/llama2_7b_metamath.py.

  python -m optconsist_jax.evaluate --watch \
      --config configs/llama2_7b_metamath_eval.py \
      --workdir gs://BUCKET/runs/7b_adamw_lr1e-5

Learning: GSM8K test (all 1,319 items) under both protocols, the MetaMath
zero-shot prompt ("Let's think step by step.", answer after "The answer is: ")
and the 5-shot strict "#### N" match, greedy decoding with each protocol's
published budget. Forgetting: HellaSwag (validation, acc_norm), ARC-Challenge
(test, acc_norm), WinoGrande (validation, acc) scored by log-likelihood like
lm-evaluation-harness, their mean as the headline retention score
(Biderman et al. 2024), and the held-out LM loss. The base model (the run's
init_from, Llama-2-7B) is evaluated first as the step-0 point. The model,
LoRA settings and tokenizer come from the run's W/config.json.

Arg (`:ARG`): optional comma-separated `key=value` settings:
  data_dir   folder holding the files below (default ".", the repo dir on a
             TPU worker): gsm8k_test.jsonl, gsm8k_train.jsonl (the few
             shots), hellaswag_val.jsonl, arc_challenge_test.jsonl,
             winogrande_val.jsonl, which `python -m optconsist_jax.data.fetch
             gsm8k,hellaswag,arc,winogrande DATA_DIR` downloads from the Hub
             (`launch tpu fetch` on every worker), and heldout_text.jsonl
             (documents for the LM loss, JSON lines with `text`; not on the
             Hub: `launch tpu stage` it from a bucket)
  limit      first items of every set (default 0 = all), for a quick check.
  mesh       eval mesh preset (default fsdp).
  base       the training config's `base=` preset (default llama2_7b): the
             run is labelled with that base's pretraining optimizer from
             io/provenance.py (AdamW for the Llama, OLMo and Qwen bases, Muon
             for moonlight_16b_a3b), so the report knows which method is
             matched. launch/llama2_7b_metamath.sh passes the training
             run's BASE here.
"""

import ml_collections

from optconsist_jax.io import provenance

_KEYS = ("data_dir", "limit", "mesh", "base")


def _record(base: str) -> provenance.Base:
  """The provenance record of a training config `base=` preset.

  Moonlight's by its Hub id: its preset is model/deepseek_v3_config.py's,
  which provenance.by_preset does not list.
  """
  if base == "moonlight_16b_a3b":
    return provenance.lookup("moonshotai/Moonlight-16B-A3B")
  return provenance.by_preset(base)


def get_config(arg: str = "") -> ml_collections.ConfigDict:
  s = {}
  for part in (p.strip() for p in (arg or "").split(",")):
    if not part:
      continue
    key, sep, value = part.partition("=")
    if not sep or key not in _KEYS:
      raise ValueError(f"configs/llama2_7b_metamath_eval.py: bad setting"
                       f" {part!r}; expected key=value with key in {_KEYS}")
    s[key] = value
  d = s.get("data_dir", ".").rstrip("/") or "."
  limit = int(s.get("limit", 0))

  c = ml_collections.ConfigDict()
  c.mesh = dict(preset=s.get("mesh", "fsdp"))
  if s.get("base") == "moonlight_16b_a3b":
    # The training config's expert rule (configs/llama2_7b_metamath.py
    # MESH_RULES): a no-op on the fsdp mesh, expert parallelism with data > 1.
    c.mesh["extra_rules"] = (("expert", "data"),)
  c.tokenizer_path = ""  # the run's data.tokenizer_path
  c.math = dict(protocols=("metamath", "gsm8k_fewshot"),
                test=f"{d}/gsm8k_test.jsonl", train=f"{d}/gsm8k_train.jsonl",
                num_shots=5, shot_seed=1234, limit=limit, batch_size=64,
                max_new_tokens=0)
  c.multiple_choice = dict(
      hellaswag=f"{d}/hellaswag_val.jsonl",
      arc_challenge=f"{d}/arc_challenge_test.jsonl",
      winogrande=f"{d}/winogrande_val.jsonl", limit=limit, batch_size=32,
      # None: lm-evaluation-harness's default for the tokenizer (since
      # v0.4.9.2 the tokenizer's own; Llama-2's adds BOS).
      add_bos=ml_collections.config_dict.placeholder(bool), max_len=1024)
  c.lm_loss = dict(path=f"{d}/heldout_text.jsonl", limit=limit, max_len=1024,
                   batch_size=16)
  c.learning_metric = "math/metamath/acc"
  c.retention_metric = ""  # mc/mean
  c.method = ""  # from the run: lora, or the hidden matrices' optimizer
  # The base's pretraining optimizer (Llama-2: AdamW, arXiv 2307.09288).
  try:
    c.base = _record(s.get("base", "llama2_7b")).optimizer
  except KeyError as e:
    raise ValueError(f"configs/llama2_7b_metamath_eval.py: base="
                     f"{s['base']!r}: {e.args[0]}") from None
  c.lr = ml_collections.config_dict.placeholder(float)
  c.base_model = ""  # the run's init_from
  # Beside training: poll every 5 minutes; stop 6 h after the last checkpoint.
  c.watch = dict(poll_secs=300.0, idle_timeout_secs=6 * 3600.0)
  return c
