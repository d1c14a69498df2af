r"""The small reproduction of arXiv 2605.06654 (README's main job).

  python -m optconsist_jax.experiments.reproduce --config configs/small_consistency.py:quick \
      --workdir workdirs/small_consistency

Args (`--config configs/small_consistency.py:ARG`):
  quick        (default) `make demo`: 2 bases (AdamW, Muon) x 3 methods
               (AdamW, Muon, LoRA) x 3 learning rates x 3 finetuning seeds
               = 54 runs, each one end-of-schedule run of 2 epochs, on
               standard's model shaped like a large one; sized for a 2-core
               CPU (<= 20 min from a fresh clone including the venv;
               measured: README). No memorization experiment (standard's).
  full         sized for one GPU (not yet run on a GPU): a wider, deeper
               model, more pretraining, more finetuning data, levels 1-2
               problems, 3 pretraining seeds per base paired one to one with
               the 3 finetuning seeds.
  matrix       the consistency matrix: bases pretrained with AdamW, Muon,
               Lion, Adafactor, Adagrad and PSGD Kron (`kron`, the kron
               extra; `make demo MODE=matrix` installs it), 3 pretraining
               seeds each, each finetuned with all six and with LoRA (4
               learning rates, one end-of-schedule run of 2 epochs per
               point), standard's model and held-out items
               (docs/reproduction.md).
  standard     README's headline answer (<= 2 h on 2 cores, estimate in
               docs/reproduction.md): AdamW and Muon bases x 3 pretraining
               seeds (finetuning seed s starts from pretraining seed s),
               AdamW / Muon / LoRA finetuning on grids of 6 learning rates
               x2 apart, one run per epoch budget (1 and 2 epochs, each
               its own whole schedule: every frontier point an
               end-of-schedule model), retention on 400 held-out documents
               (docstring paragraphs) and learning on 256 problems (both
               resampled in the
               report's intervals), the memorization experiment over an LR
               grid; the model shaped like a large one (>= 70% of its
               parameters in the blocks' matrices: a 512-piece tokenizer).
  causal       a causal check of the paper's story: the first quick mode's
               model (56% embedding and head) and bases, finetuned with
               AdamW and Muon, and with the base's own
               optimizer state: `adamw+carried` (Adam's moments and count
               carried over from pretraining) and `adamw+frozen_nu` (AdamW
               preconditioned by the base's frozen second moment) on the
               AdamW base, `muon+carried` (Muon's momentum) on the Muon
               base; 4 learning rates, 3 seeds; no memorization or
               fingerprints (docs/reproduction.md).
  mini         seconds per stage; the test suite's end-to-end run (2 seeds).
  matrix_mini  the matrix's shape in miniature (2 x 2 optimizers), for CI.
  causal_mini  causal's variants (and fresh AdamW) in miniature, for CI.

What it does (optconsist_jax/experiments/reproduce.py):
  1. pretrains one tiny Llama per optimizer in `pretrain.optimizers` (and per
     pretraining seed) on the Python standard library's docstrings (real
     text present offline), holding out 5% of the files for retention;
  2. finetunes each base with every method in `finetune.methods` over its
     learning-rate grid `finetune.lrs[method]` and `finetune.seeds` seeds
     (data order, adapter init and dropout), on generated arithmetic word
     problems (MetaMathQA format), one checkpoint per epoch (or, with
     `finetune.epoch_budgets`, one run per budget evaluated at its end);
     every seed and LR of one (base, method) trains as one population;
  3. evaluates every checkpoint (and each base): learning = answer accuracy
     on held-out problems under the MetaMath protocol, and the held-out
     finetuning loss (the plot's learning axis by default); retention =
     held-out standard-library LM loss;
  4. reports the learning/forgetting Pareto frontier per base and the
     matched / mismatched / LoRA comparison over seeds; then the
     memorization experiment (standard) and the activation fingerprints of
     the bases.
Every stage is skipped when its outputs exist, so an interrupted run resumes.

Learning-rate refinement (`--config.finetune.refine_rounds=N`: 2 in
standard mode, off in the others): after the grid is trained and
evaluated, each (base, method) whose frontier brackets its base's common learning level L (on some seed) with
two checkpoints more than `finetune.refine_max_width` apart in learning
(default 0.3, issue #27's bar), from two adjacent learning rates, gets their
geometric midpoint for every seed; those runs train and evaluate, L is
recomputed, up to N rounds (experiments/refine.py). Only midpoints between
the grid's rates: L beyond a grid's end needs a wider grid, not a guess.
Override anything on the command line, e.g. `--config.finetune.seeds=5`;
`--config.reproduce.bases=adamw:PATH,muon:PATH` finetunes and evaluates
external bases (a Hugging Face folder or Hub repo, a nanoGPT ckpt.pt, an
Orbax run) instead of pretraining; NAME is the optimizer each was pretrained
with, optional for a base of io/provenance.py (`reproduce.bases=
Qwen/Qwen2.5-7B` is labelled adamw from it; experiments/external_bases.py).

Every optimizer family is a name: a preset of optim/presets.py or any Optax
optimizer (`lion`, `adafactor`, `adagrad`, ...), with its learning rate in
`pretrain.lrs` / `finetune.lrs` and extra keyword arguments in
`optim_kwargs`.
"""

import os

import ml_collections

from optconsist_jax.report import brackets

_MODES = ("quick", "standard", "full", "matrix", "mini", "matrix_mini",
          "causal", "causal_mini")

# The six families of the matrix, and the keyword arguments they need.
_MATRIX_OPTIMIZERS = ("adamw", "muon", "lion", "adafactor", "adagrad",
                      "kron")
# Adagrad with Duchi et al.'s zero start: with Optax's default 0.1 the
# accumulator dwarfs a clipped gradient's squares and the first steps are
# plain SGD at a hundredth of the intended size.
_OPTIM_KWARGS = dict(adagrad=dict(initial_accumulator_value=0.0, eps=1e-10))

# The model shaped like a large one (standard): a 512-piece tokenizer (the
# shipped tiny one's training text and settings; data/tiny_tokenizer.py)
# keeps embedding + head to 2 x 512 x 96 = 98K of 577K parameters, so 83%
# sit in the blocks' matrices (Llama-2-7B: ~96%; quick's model: 44%).
_TOKENIZER_512 = os.path.normpath(os.path.join(
    os.path.dirname(os.path.abspath(__file__)), os.pardir, "optconsist_jax",
    "data", "assets", "tiny512.model"))
_SHAPED_MODEL = dict(vocab_size=512, hidden_size=96, intermediate_size=320,
                     num_layers=4, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256)
# The causal check's model (results/small_consistency_causal): the first
# quick mode's, with the shipped 2,048-piece tokenizer (tokenizer_path "");
# 56% of its parameters are embedding and head.
_CAUSAL_MODEL = dict(vocab_size=2048, hidden_size=96, intermediate_size=256,
                     num_layers=3, num_heads=4, num_kv_heads=2,
                     max_position_embeddings=256)
# Its grids: 4 rates half a decade apart, from mild forgetting to strong,
# measured on its AdamW base (seed 0, 2 epochs): AdamW 3e-5 / 1e-3 lose
# 0.016 / 1.34 nats, Muon 1e-4 / 3e-3 0.011 / 1.97, LoRA 3e-4 / 1e-2
# 0.026 / 1.74.
_CAUSAL_GRIDS = dict(adamw=(3e-5, 1e-4, 3e-4, 1e-3),
                     muon=(1e-4, 3e-4, 1e-3, 3e-3),
                     lora=(3e-4, 1e-3, 3e-3, 1e-2))


# The causal check's methods: fresh AdamW and Muon on both bases, and the
# base-state variants (experiments/finetune_methods.py) on their own base.
_CAUSAL_METHODS = ("adamw", "muon", "adamw+carried", "adamw+frozen_nu",
                   "muon+carried")


def _causal_lrs(lrs):
  """Each variant on its family's grid."""
  return {m: lrs[m.partition("+")[0]] for m in _CAUSAL_METHODS}


def get_config(arg: str = "quick") -> ml_collections.ConfigDict:
  if arg not in _MODES:
    raise ValueError(f"configs/small_consistency.py: unknown mode {arg!r};"
                     f" expected one of {_MODES}")
  c = ml_collections.ConfigDict()
  c.mode = arg
  c.seed = 0
  # The model shaped like a large one, with its 512-piece tokenizer.
  c.tokenizer_path = _TOKENIZER_512
  c.model = dict(_SHAPED_MODEL)
  c.pretrain = dict(optimizers=("adamw", "muon"), steps=250, seq_len=128,
                    global_batch_size=16, lr=3e-3, lrs=dict(), seeds=1)
  # Each grid: 3 rates x4 apart from mild forgetting to strong, measured
  # on the AdamW base (mean of 3 seeds; `make demo`,
  # results/small_consistency_quick): AdamW 5e-5 / 8e-4 lose 0.023 / 0.94
  # nats of held-out loss, Muon 1.5e-4 / 2.4e-3 0.023 / 1.73, LoRA 5e-4 /
  # 8e-3 0.063 / 1.21. Muon's rms_match updates forget less per unit of
  # LR than AdamW's; LoRA takes its usual higher LRs. 400 problems
  # x 2 epochs = 46 steps per run, one end-of-schedule run per point (the
  # CPU budget: 54 runs); level-1 problems are at most 125 tokens with the
  # 512-piece tokenizer, so rows of 128 hold one each with little padding.
  c.finetune = dict(
      methods=("adamw", "muon", "lora"),
      lrs=dict(adamw=(5e-5, 2e-4, 8e-4), muon=(1.5e-4, 6e-4, 2.4e-3),
               lora=(5e-4, 2e-3, 8e-3)),
      seeds=3, epochs=2, epoch_budgets=(2,), train_examples=400,
      levels=(1,), seq_len=128, global_batch_size=16, lora_rank=8,
      lora_alpha=16.0, lora_dropout=0.0, refine_rounds=0,
      refine_max_width=brackets.MAX_WIDTH)
  # Exact-match accuracy of a model this small sits near zero, so the plot's
  # learning axis is the held-out finetuning loss; accuracy is recorded too
  # (--config.eval.learning_metric=math/metamath/acc plots it instead).
  # probes: the update probes of every checkpoint (the report's mechanism
  # table; evaluate/config.py ProbesEvalConfig).
  # Responses are ~1.2x longer in the 512-piece tokenizer's tokens.
  c.eval = dict(math_examples=64, max_new_tokens=56, retention_docs=26,
                retention_max_len=128, learning_metric="-math/response_loss",
                probes=True)
  c.optim_kwargs = dict(_OPTIM_KWARGS)
  # The memorization experiment runs in standard mode (its LR grid).
  c.memorization = dict(enabled=False)
  c.fingerprints = dict(enabled=True)
  # NAME:PATH,... of external bases ("" = pretrain our own); the report's
  # consistency matrix: auto (from 3 pretraining optimizers on), always,
  # never; processes evaluating runs side by side (experiments/eval_pool.py):
  # 1, since on 2 cores one process already keeps ~88% of both busy and two
  # are slower (bench/results/eval_workers.json).
  c.reproduce = dict(bases="", matrix="auto", eval_workers=1)

  if arg == "standard":
    c.pretrain.update(seeds=3)
    # 6 rates x2 apart, from mild forgetting (the lowest rate kept the base
    # within ~0.02 nats) to strong.
    c.finetune.update(
        lrs=dict(adamw=(2e-5, 4e-5, 8e-5, 1.6e-4, 3.2e-4, 6.4e-4),
                 muon=(6e-5, 1.2e-4, 2.4e-4, 4.8e-4, 9.6e-4, 1.92e-3),
                 lora=(2e-4, 4e-4, 8e-4, 1.6e-3, 3.2e-3, 6.4e-3)),
        seeds=3, epochs=2, epoch_budgets=(1, 2),
        # Two rounds of midpoints near L: x2 apart grids bracket L with
        # checkpoints up to ~0.8 nats of learning apart; each round halves
        # the gap in LR (issue bar: 0.3 nats).
        refine_rounds=2)
    # Retention documents are paragraphs of the held-out docstrings (~500;
    # files are only ~27), the first 400 of them.
    c.eval.update(math_examples=256, retention_docs=400,
                  retention_unit="paragraph")
    c.memorization.enabled = True
  elif arg == "full":
    # ~5.4M params, the 2,048-piece tokenizer. The docstrings are ~0.58M
    # tokens, so 1,000 steps of 16 x 256 tokens is ~7 passes: more would
    # only overfit the base.
    c.tokenizer_path = ""
    c.model = dict(vocab_size=2048, hidden_size=256, intermediate_size=704,
                   num_layers=6, num_heads=8, num_kv_heads=4,
                   max_position_embeddings=512)
    c.pretrain.update(steps=1000, seq_len=256, global_batch_size=16, seeds=3)
    c.finetune.update(
        lrs=dict(adamw=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
                 muon=(1e-5, 3e-5, 1e-4, 3e-4, 1e-3),
                 lora=(1e-4, 3e-4, 1e-3, 3e-3)),
        # One run per budget, each evaluated at its end (as standard).
        epochs=4, epoch_budgets=(2, 4), train_examples=8000, levels=(1, 2),
        seq_len=256,
        global_batch_size=32, lora_rank=16, lora_alpha=32.0)
    c.eval.update(math_examples=256, max_new_tokens=96, retention_max_len=256)
  elif arg == "matrix":
    # Standard's model shaped like a large one (the Muon base is then 83%
    # Muon-trained, not 44%), pretraining seeds as the unit (finetuning seed
    # s from pretraining seed s), every frontier point an end-of-schedule
    # model (one 2-epoch schedule per run, only its end kept and evaluated).
    c.pretrain.update(
        optimizers=_MATRIX_OPTIMIZERS, seeds=3,
        # Lion, Adafactor, Adagrad: the best held-out loss of a sweep on
        # quick's model (250 steps, seed 0; nats per token): Lion 3e-4 /
        # 1e-3 / 3e-3: 5.98 / 5.31 / 5.34; Adafactor (steps relative to
        # each parameter's RMS) 1e-2 / 3e-2 / 1e-1: 5.52 / 4.49 / 4.17;
        # Adagrad 1e-2 / 3e-2 / 1e-1: 5.04 / 5.32 / 5.64 (AdamW 3e-3: 4.72,
        # Muon 3e-3: 4.29, a unigram model 6.22). PSGD Kron on this model
        # (250 steps, seed 0, mean training loss of the last 25 steps):
        # 3e-4 / 1e-3 / 3e-3 / 1e-2 / 3e-2: 4.68 / 3.57 / 3.09 / 4.06 /
        # 4.52.
        lrs=dict(adamw=3e-3, muon=3e-3, lion=1e-3, adafactor=1e-1,
                 adagrad=1e-2, kron=3e-3))
    # Grids from the first matrix runs (quick's model): Lion 3e-6 .. 1e-4
    # lost 0.000-0.39 nats and Adafactor 3e-4 .. 1e-2 0.001-0.48 (no strong
    # end), so both moved up half a decade; Adagrad 3e-4 .. 1e-2 lost
    # 0.09-4.1 (no mild end), so it moved down half a decade. Kron's is
    # AdamW's (both pretrain best at 3e-3; its whitened update has about
    # Adam's RMS).
    c.finetune.update(
        methods=_MATRIX_OPTIMIZERS + ("lora",),
        lrs=dict(adamw=(3e-5, 1e-4, 3e-4, 1e-3),
                 muon=(1e-4, 3e-4, 1e-3, 3e-3),
                 lion=(1e-5, 3e-5, 1e-4, 3e-4),
                 adafactor=(1e-3, 3e-3, 1e-2, 3e-2),
                 adagrad=(1e-4, 3e-4, 1e-3, 3e-3),
                 kron=(3e-5, 1e-4, 3e-4, 1e-3),
                 lora=(3e-4, 1e-3, 3e-3, 1e-2)),
        seeds=3, epochs=2, epoch_budgets=(2,))
    # Standard's held-out items (resampled in the report's intervals), the
    # issue's floors: 256 problems, 200 documents.
    c.eval.update(math_examples=256, retention_docs=200,
                  retention_unit="paragraph", probes=False)
    c.reproduce.matrix = "always"
  elif arg == "causal":
    # The model, grids and sizes of its results (_CAUSAL_MODEL: one run of
    # 2 epochs per point, both epochs' checkpoints on the frontier). A
    # variant runs only on its family's base (finetune_methods.applies).
    c.tokenizer_path = ""
    c.model = dict(_CAUSAL_MODEL)
    c.finetune.update(
        methods=_CAUSAL_METHODS,
        lrs={**_CAUSAL_GRIDS, **_causal_lrs(_CAUSAL_GRIDS)},
        epoch_budgets=(), seq_len=96)
    c.eval.max_new_tokens = 40
    c.fingerprints.enabled = False
  if arg in ("mini", "matrix_mini", "causal_mini"):
    c.tokenizer_path = ""
    c.model = dict(vocab_size=2048, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=2, num_kv_heads=1,
                   max_position_embeddings=128)
    c.pretrain.update(steps=4, seq_len=64, global_batch_size=8)
    c.finetune.update(lrs=dict(adamw=(1e-3,), muon=(1e-3,), lora=(3e-3,)),
                      seeds=2, epochs=2, epoch_budgets=(),
                      train_examples=24, seq_len=128, global_batch_size=8,
                      lora_rank=2, lora_alpha=4.0)
    c.eval.update(math_examples=4, max_new_tokens=8, retention_docs=2,
                  retention_max_len=64)
    c.fingerprints.enabled = True
    if arg == "matrix_mini":
      optimizers = ("adamw", "adagrad")
      c.pretrain.update(optimizers=optimizers,
                        lrs=dict(adamw=3e-3, adagrad=1e-2))
      c.finetune.update(methods=optimizers,
                        lrs=dict(adamw=(1e-3,), adagrad=(1e-3,)),
                        seeds=1, epochs=1)
      c.fingerprints.enabled = False
      c.reproduce.matrix = "always"
    if arg == "causal_mini":
      # Every variant, beside fresh AdamW only (fewer populations to compile).
      c.finetune.update(methods=("adamw",) + _CAUSAL_METHODS[2:],
                        lrs=_causal_lrs(c.finetune.lrs), epochs=1)
      c.eval.probes = False
      c.fingerprints.enabled = False
  return c
