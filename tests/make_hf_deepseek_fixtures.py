"""Builds the tiny DeepSeek-V3 fixtures under tests/fixtures/hf/deepseek_v3*.

Run by hand (never by the tests), in the torch + transformers venv of
tests/make_hf_fixtures.py, whose greedy check and round trip it reuses:

  .venv-fixtures/bin/python tests/make_hf_deepseek_fixtures.py

Each case is a random `deepseek_v3` causal LM (transformers'
modeling_deepseek_v3.py: multi-head latent attention, sigmoid-routed experts
with shared experts, dense first layers) saved as config.json + safetensors,
with fixed tokens (`tokens.npy`), the fp32 logits (`logits.npy`), the greedy
continuation (`greedy.npy`) and the routed experts each MoE layer chose for
each token (`experts.npy`, int32 [moe layers, B, T, top-k], ascending ids).

The two configs differ in everything our loader reads: low-rank queries
(q_lora_rank) or a direct q_proj, interleaved or rotate-half rope, YaRN rope
scaling with both mscale terms or none, group-limited routing or one group,
normalised top-k weights or not, one or two shared experts. The routing bias
(e_score_correction_bias) is drawn nonzero, so selection and weighting differ.
Each token's routing must be decided by a clear margin (> MARGIN between the
last chosen and the first unchosen score, for groups and experts), so the ids
do not hinge on rounding; otherwise the script stops and asks for another seed.

Then (unless --no-roundtrip) our hf.load + hf.save of each case must load in
transformers with the same logits, as for the other families.

It also writes a local "Hub" folder, tests/fixtures/hub/deepseek_v3/, as
tests/make_hub_fixtures.py does for the other families (`--hub-only` builds
just that): the `HUB_CASE` architecture (Moonlight's choices at toy size)
widened to the llama3 tokenizer fixture's vocabulary (tokenizer.json +
tokenizer_config.json copied beside it) and 512 positions, with `expected/`
holding a prompt, its ids, transformers' fp32 logits and the versions
(tests/test_deepseek_v3_study_e2e.py runs the small study on it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import numpy as np
import torch
import transformers

import make_hf_fixtures

OUT = make_hf_fixtures.OUT
ROOT = make_hf_fixtures.ROOT
MARGIN = 1e-4

CASES = {
    # Low-rank queries, interleaved rope with YaRN (mscale and mscale_all_dim
    # both set: cos/sin and the softmax scale both change), 2 groups of 4
    # experts with 1 group kept, normalised top-2 weights.
    "deepseek_v3": dict(
        vocab_size=64, hidden_size=48, intermediate_size=64,
        moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        num_experts_per_tok=2, n_group=2, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=24,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10,
        rms_norm_eps=2e-6, routed_scaling_factor=2.5, norm_topk_prob=True,
        rope_interleave=True, max_position_embeddings=64,
        bos_token_id=2, eos_token_id=3, num_nextn_predict_layers=0,
        rope_parameters=dict(rope_type="yarn", rope_theta=20000.0, factor=4.0,
                             original_max_position_embeddings=16,
                             beta_fast=32, beta_slow=1, mscale=1.0,
                             mscale_all_dim=0.8)),
    # Moonlight-16B-A3B's choices at toy size: direct q_proj, one group,
    # two shared experts, unnormalised weights; rotate-half rope here.
    "deepseek_v3_qdirect": dict(
        vocab_size=64, hidden_size=48, intermediate_size=80,
        moe_intermediate_size=16, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=2, n_shared_experts=2, n_routed_experts=6,
        num_experts_per_tok=3, n_group=1, topk_group=1,
        first_k_dense_replace=1, kv_lora_rank=12, q_lora_rank=None,
        qk_rope_head_dim=6, qk_nope_head_dim=10, v_head_dim=16,
        rms_norm_eps=1e-5, routed_scaling_factor=2.446, norm_topk_prob=False,
        rope_interleave=False, max_position_embeddings=64,
        bos_token_id=4, eos_token_id=5, num_nextn_predict_layers=0,
        rope_parameters=dict(rope_type="default", rope_theta=50000.0)),
}
BATCH, LENGTH = 2, 12
# The Hub folder's architecture (vocab, positions and special tokens come
# from the tokenizer): direct q_proj, interleaved rope, one group, top-2 of 8
# experts with one shared, one dense layer first.
HUB_CASE = dict(
    hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
    n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2,
    n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=8,
    q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=8, v_head_dim=8,
    rms_norm_eps=1e-5, routed_scaling_factor=2.446, norm_topk_prob=True,
    rope_interleave=True, num_nextn_predict_layers=0,
    rope_parameters=dict(rope_type="default", rope_theta=50000.0))
HUB_TOKENIZER = "llama3"


def _randomize(model):
  """Weights far from init (norms around 1, the selection bias nonzero), in
  the torch RNG's order: the fixtures stay the same bytes."""
  with torch.no_grad():
    for pname, p in model.named_parameters():
      if pname.endswith("norm.weight"):  # also q_a_ / kv_a_layernorm
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
    for bname, b in model.named_buffers():
      if bname.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn_like(b))


def _routing_margin(gate, x: torch.Tensor) -> float:
  """Smallest gap between chosen and unchosen group / expert scores."""
  logits = torch.nn.functional.linear(x.reshape(-1, gate.hidden_dim).float(),
                                      gate.weight.float())
  choice = logits.sigmoid() + gate.e_score_correction_bias
  g, e = gate.num_group, gate.num_experts
  margins = []
  if gate.topk_group < g:
    group = choice.view(-1, g, e // g).topk(2, dim=-1)[0].sum(-1)
    top = group.sort(-1, descending=True)[0]
    margins.append((top[:, gate.topk_group - 1] - top[:, gate.topk_group]))
    keep = torch.zeros_like(group).scatter_(
        1, group.topk(gate.topk_group, -1)[1], 1)
    choice = choice.masked_fill(
        ~keep.bool().repeat_interleave(e // g, -1), float("-inf"))
  top = choice.sort(-1, descending=True)[0]
  if gate.top_k < top.shape[-1] and torch.isfinite(top[:, gate.top_k]).all():
    margins.append(top[:, gate.top_k - 1] - top[:, gate.top_k])
  return float(min(m.min() for m in margins)) if margins else float("inf")


def build(name: str, config_kw: dict, seed: int) -> None:
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model("deepseek_v3", **config_kw)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  _randomize(model)
  model.eval()
  gates = [layer.mlp.gate for layer in model.model.layers
           if hasattr(layer.mlp, "gate")]
  chosen, margins = [], []

  def record(module, args, out):
    chosen.append(out[2].sort(-1)[0].numpy().astype(np.int32))
    margins.append(_routing_margin(module, args[0]))

  hooks = [g.register_forward_hook(record) for g in gates]
  rng = np.random.default_rng(seed)
  tokens = rng.integers(0, config.vocab_size, (BATCH, LENGTH)).astype(np.int32)
  with torch.no_grad():
    logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  for h in hooks:
    h.remove()
  if min(margins) < MARGIN:
    raise SystemExit(f"{name}: routing margin {min(margins):.2e} < {MARGIN};"
                     " change the seed")
  experts = np.stack(chosen).reshape(len(gates), BATCH, LENGTH, -1)
  out_dir = os.path.join(OUT, name)
  shutil.rmtree(out_dir, ignore_errors=True)
  model.save_pretrained(out_dir)
  gen = os.path.join(out_dir, "generation_config.json")
  if os.path.exists(gen):
    os.remove(gen)
  np.save(os.path.join(out_dir, "tokens.npy"), tokens)
  np.save(os.path.join(out_dir, "logits.npy"), logits.astype(np.float32))
  np.save(os.path.join(out_dir, "experts.npy"), experts)
  np.save(os.path.join(out_dir, "greedy.npy"),
          make_hf_fixtures.greedy(model, tokens))
  print(f"{name}: {sorted(os.listdir(out_dir))}, routing margin"
        f" {min(margins):.2e}")


def build_hub(seed: int) -> None:
  """tests/fixtures/hub/deepseek_v3: a random HUB_CASE model + tokenizer."""
  import make_hub_fixtures  # pylint: disable=g-import-not-at-top
  out_dir = os.path.join(make_hub_fixtures.OUT, "deepseek_v3")
  shutil.rmtree(out_dir, ignore_errors=True)
  os.makedirs(out_dir)
  tok_dir = os.path.join(make_hub_fixtures.TOKENIZERS, HUB_TOKENIZER)
  for fname in ("tokenizer.json", "tokenizer_config.json"):
    shutil.copy(os.path.join(tok_dir, fname), out_dir)
  tok = transformers.PreTrainedTokenizerFast.from_pretrained(out_dir)
  eos = tok.eos_token_id
  bos = tok.bos_token_id if tok.bos_token_id is not None else eos
  torch.manual_seed(seed)
  config = transformers.AutoConfig.for_model(
      "deepseek_v3", **HUB_CASE, vocab_size=-(-len(tok) // 64) * 64,
      max_position_embeddings=make_hub_fixtures.POSITIONS, bos_token_id=bos,
      eos_token_id=eos, pad_token_id=tok.pad_token_id)
  model = transformers.AutoModelForCausalLM.from_config(
      config, attn_implementation="eager", dtype=torch.float32)
  _randomize(model)
  model.eval()
  ids = tok(make_hub_fixtures.PROMPT)["input_ids"]
  margins = []
  hooks = [layer.mlp.gate.register_forward_hook(
      lambda m, args, out: margins.append(_routing_margin(m, args[0])))
           for layer in model.model.layers if hasattr(layer.mlp, "gate")]
  with torch.no_grad():
    logits = model(torch.tensor([ids])).logits.float().numpy()
  for h in hooks:
    h.remove()
  if min(margins) < MARGIN:
    raise SystemExit(f"hub deepseek_v3: routing margin {min(margins):.2e} <"
                     f" {MARGIN}; change the seed")
  model.save_pretrained(out_dir)
  gen = os.path.join(out_dir, "generation_config.json")
  if os.path.exists(gen):
    os.remove(gen)
  expected = os.path.join(out_dir, "expected")
  os.makedirs(expected)
  with open(os.path.join(expected, "prompt.json"), "w") as f:
    json.dump({"text": make_hub_fixtures.PROMPT, "ids": ids}, f, indent=1)
  np.save(os.path.join(expected, "logits.npy"), logits.astype(np.float32))
  with open(os.path.join(expected, "VERSIONS.json"), "w") as f:
    json.dump({"transformers": transformers.__version__,
               "torch": torch.__version__, "python": sys.version.split()[0],
               "generator": "tests/make_hf_deepseek_fixtures.py",
               "seed": seed}, f, indent=2)
  print(f"hub deepseek_v3: vocab {config.vocab_size} (tokenizer {len(tok)}),"
        f" bos {bos}, eos {eos}, prompt {len(ids)} ids, routing margin"
        f" {min(margins):.2e}, files {sorted(os.listdir(out_dir))}")


def roundtrip(name: str, project_python: str) -> None:
  """Our load -> our save -> transformers load gives the expected logits."""
  src = os.path.join(OUT, name)
  with tempfile.TemporaryDirectory() as tmp:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([project_python, "-c", make_hf_fixtures._SAVE_SNIPPET, src,
                    tmp, str(2 * 10**9)], check=True, env=env, cwd=ROOT)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        tmp, attn_implementation="eager", dtype=torch.float32)
    model.eval()
    tokens = np.load(os.path.join(src, "tokens.npy"))
    expected = np.load(os.path.join(src, "logits.npy"))
    with torch.no_grad():
      logits = model(torch.from_numpy(tokens).long()).logits.float().numpy()
  err = float(np.max(np.abs(logits - expected)))
  if err > 1e-4:
    raise SystemExit(f"{name}: round trip through hf.save differs by {err}")
  print(f"{name}: transformers loads hf.save output, max |dlogits| ="
        f" {err:.2e} OK")


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--project-python",
                      default=os.path.join(ROOT, ".venv", "bin", "python"))
  parser.add_argument("--no-roundtrip", action="store_true")
  parser.add_argument("--roundtrip-only", action="store_true")
  parser.add_argument("--hub-only", action="store_true",
                      help="build only tests/fixtures/hub/deepseek_v3")
  args = parser.parse_args()
  torch.set_num_threads(1)
  if args.hub_only:
    build_hub(300)
    return
  if not args.roundtrip_only:
    build_hub(300)
    for seed, (name, config_kw) in enumerate(CASES.items()):
      build(name, config_kw, 100 + seed)
    versions_path = os.path.join(OUT, "VERSIONS.json")
    with open(versions_path) as f:
      versions = json.load(f)
    for name in CASES:
      versions["cases"][name] = {
          "transformers": transformers.__version__,
          "torch": torch.__version__, "python": sys.version.split()[0],
          "generator": "tests/make_hf_deepseek_fixtures.py"}
    with open(versions_path, "w") as f:
      json.dump(versions, f, indent=2, sort_keys=True)
  if not args.no_roundtrip:
    for name in CASES:
      roundtrip(name, args.project_python)


if __name__ == "__main__":
  main()
