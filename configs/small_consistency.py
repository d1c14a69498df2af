r"""The small reproduction of arXiv 2605.06654 (README's main job).

  python -m optconsist_jax.experiments.reproduce --config configs/small_consistency.py:quick \
      --workdir workdirs/small_consistency

Args (`--config configs/small_consistency.py:ARG`):
  quick  (default) a 2-core CPU finishes everything in about 10 minutes
         (9 min 7 s measured; results/small_consistency_quick/).
  full   sized for one GPU, an estimated hour (not yet run on a GPU): a
         wider, deeper model, more pretraining, more finetuning data, levels
         1-2 problems and a three-point learning-rate sweep.
  mini   seconds per stage; the test suite's end-to-end run.

What it does (optconsist_jax/experiments/reproduce.py):
  1. pretrains one tiny Llama twice on the Python standard library's
     docstrings (real text present offline), once with AdamW and once with
     Muon, holding out 5% of the files for retention;
  2. finetunes each base with AdamW, Muon and LoRA over `finetune.lrs` on
     generated arithmetic word problems (MetaMathQA format), one checkpoint
     per epoch;
  3. evaluates every checkpoint (and each base): learning = answer accuracy
     on held-out problems under the MetaMath protocol, and the held-out
     finetuning loss (the plot's learning axis by default); retention =
     held-out standard-library LM loss;
  4. reports the learning/forgetting Pareto frontier per base and a
     matched / mismatched / LoRA table; then the memorization experiment and
     the activation fingerprints of the two bases.
Every stage is skipped when its outputs exist, so an interrupted run resumes.
Override anything on the command line, e.g. `--config.seed=1`.
"""

import ml_collections

_MODES = ("quick", "full", "mini")


def get_config(arg: str = "quick") -> ml_collections.ConfigDict:
  if arg not in _MODES:
    raise ValueError(f"configs/small_consistency.py: unknown mode {arg!r};"
                     f" expected one of {_MODES}")
  c = ml_collections.ConfigDict()
  c.mode = arg
  c.seed = 0
  # The shipped tiny SentencePiece tokenizer (2,048 pieces, trained on the
  # stdlib docstrings and the synthetic problems).
  c.tokenizer_path = ""

  c.model = dict(vocab_size=2048, hidden_size=96, intermediate_size=256,
                 num_layers=3, num_heads=4, num_kv_heads=2,
                 max_position_embeddings=256)
  c.pretrain = dict(optimizers=("adamw", "muon"), steps=250, seq_len=128,
                    global_batch_size=16, lr=3e-3)
  c.finetune = dict(
      methods=("adamw", "muon", "lora"),
      lrs=dict(adamw=(3e-4, 1e-3), muon=(3e-4, 1e-3), lora=(1e-3, 3e-3)),
      epochs=3, train_examples=800, levels=(1,), seq_len=128,
      global_batch_size=16, lora_rank=8, lora_alpha=16.0, lora_dropout=0.0)
  # Exact-match accuracy of a model this small sits near zero, so the plot's
  # learning axis is the held-out finetuning loss; accuracy is recorded too
  # (--config.eval.learning_metric=math/metamath/acc plots it instead).
  c.eval = dict(math_examples=64, max_new_tokens=40, retention_docs=26,
                retention_max_len=128, learning_metric="-math/response_loss")
  c.memorization = dict(enabled=True)
  c.fingerprints = dict(enabled=True)

  if arg == "full":
    # ~5.4M params. The docstrings are ~0.58M tokens, so 1,000 steps of
    # 16 x 256 tokens is ~7 passes: more would only overfit the base.
    c.model = dict(vocab_size=2048, hidden_size=256, intermediate_size=704,
                   num_layers=6, num_heads=8, num_kv_heads=4,
                   max_position_embeddings=512)
    c.pretrain.update(steps=1000, seq_len=256, global_batch_size=16)
    c.finetune.update(
        lrs=dict(adamw=(1e-4, 3e-4, 1e-3), muon=(1e-4, 3e-4, 1e-3),
                 lora=(3e-4, 1e-3, 3e-3)),
        epochs=4, train_examples=8000, levels=(1, 2), seq_len=256,
        global_batch_size=32, lora_rank=16, lora_alpha=32.0)
    c.eval.update(math_examples=256, max_new_tokens=96, retention_max_len=256)
  elif arg == "mini":
    c.model = dict(vocab_size=2048, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=2, num_kv_heads=1,
                   max_position_embeddings=128)
    c.pretrain.update(steps=4, seq_len=64, global_batch_size=8)
    c.finetune.update(lrs=dict(adamw=(1e-3,), muon=(1e-3,), lora=(3e-3,)),
                      epochs=2, train_examples=24, seq_len=128,
                      global_batch_size=8, lora_rank=2, lora_alpha=4.0)
    c.eval.update(math_examples=4, max_new_tokens=8, retention_docs=2,
                  retention_max_len=64)
    c.memorization.enabled = False
    c.fingerprints.enabled = True
  return c
