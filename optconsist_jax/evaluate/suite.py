"""The configured evals on one model: data loaded once, scores, headline.

`load_eval_data` reads (or generates) every eval set an `EvalConfig` names;
`run_evals` scores one model on them (learning: math accuracy; retention:
multiple choice, LM loss, lm-evaluation-harness tasks); `headline` picks the
learning and retention numbers of a results row. `probe_base` prepares the
mechanism probes' checkpoint-independent half once per job (the base's
singular vectors, the held-out batches, the base's activation statistics)
and `run_probes` probes one finetuned model against it (evaluate/probes.py).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
import dataclasses
import json
import math
import time
from typing import Any

from flax import nnx
import jax
import numpy as np

from optconsist_jax import storage
from optconsist_jax.data import corpus
from optconsist_jax.data import formats
from optconsist_jax.data.records import MathExample
from optconsist_jax.data.records import MultipleChoice
from optconsist_jax.data import synthetic
from optconsist_jax import sharding
from optconsist_jax.evaluate.config import EvalConfig
from optconsist_jax.evaluate.config import ProbesEvalConfig
from optconsist_jax.evaluate.config import MATH_FORMATS
from optconsist_jax.evaluate.config import MC_BENCHMARKS
from optconsist_jax.evaluate.config import MC_MEAN_SCORE
from optconsist_jax.evaluate.config import SYNTHETIC
from optconsist_jax.evaluate import lm_loss as lm_loss_lib
from optconsist_jax.evaluate import math as math_lib
from optconsist_jax.evaluate import multiple_choice as mc_lib
from optconsist_jax.evaluate import probes as probes_lib
from optconsist_jax.evaluate import probes_geometry
from optconsist_jax.evaluate import results


@dataclasses.dataclass
class EvalData:
  math_test: list[MathExample]
  math_shots: list[MathExample]
  mc_items: list[MultipleChoice]
  documents: list[str]


def _limit(xs: list, n: int) -> list:
  return xs[:n] if n else xs


def load_eval_data(config: EvalConfig, run_data: Any,
                   data_dir: str) -> EvalData:
  """Reads (or generates) every eval set once.

  Args:
    config: the eval config.
    run_data: the run's DataConfig (its seed and synthetic training size, so
      synthetic test sets are disjoint from the training set).
    data_dir: where generated sets are written.
  """
  seed = int(run_data.seed or 0)

  def synthetic_file(name: str, records: list[dict]) -> str:
    path = storage.join(data_dir, name)
    storage.write_text(path, "".join(json.dumps(r) + "\n" for r in records))
    return path

  m = config.math
  math_test, shots = [], []
  if m.test and m.protocols:
    if m.test == SYNTHETIC or m.train == SYNTHETIC:
      # Disjoint from the run's synthetic training problems (same generator
      # call as data.pipeline's synthetic format).
      n_train = int(run_data.synthetic_examples or 20000)
      train_p, test_p = synthetic.make_splits(n_train, m.limit or 200, seed)
    test_path = (synthetic_file("gsm8k_test.jsonl",
                                [synthetic.render_gsm8k(p) for p in test_p])
                 if m.test == SYNTHETIC else m.test)
    math_test = _limit(MATH_FORMATS[m.format if m.test != SYNTHETIC
                                    else "gsm8k"](test_path), m.limit)
    if "gsm8k_fewshot" in m.protocols:
      train_path = (synthetic_file(
          "gsm8k_train.jsonl",
          [synthetic.render_gsm8k(p) for p in train_p[:1000]])
                    if m.train == SYNTHETIC else m.train)
      shots = math_lib.sample_shots(formats.read_gsm8k(train_path),
                                    m.num_shots, m.shot_seed)
  c = config.multiple_choice
  readers = {"hellaswag": (formats.read_hellaswag, synthetic.hellaswag_records),
             "arc_challenge": (formats.read_arc, synthetic.arc_records),
             "winogrande": (formats.read_winogrande,
                            synthetic.winogrande_records)}
  items = []
  for k, bench in enumerate(MC_BENCHMARKS):
    src = getattr(c, bench)
    if not src:
      continue
    read, make = readers[bench]
    path = (synthetic_file(f"{bench}.jsonl", make(c.limit or 100, seed + 1 + k))
            if src == SYNTHETIC else src)
    for item in _limit(read(path), c.limit):
      # Readers name ARC "arc"; our metric names say which ARC.
      items.append(dataclasses.replace(item, benchmark=bench))
  docs = []
  if config.lm_loss.path == "stdlib":
    docs = corpus.python_stdlib_text("heldout")
  elif config.lm_loss.path:
    docs = formats.read_text(config.lm_loss.path)
  docs = _limit(docs, config.lm_loss.limit)
  return EvalData(math_test, shots, items, docs)


def mc_mean_items(predictions: list[dict[str, Any]]
                  ) -> list[dict[str, int]]:
  """mc/mean's per-item scores: {"sum", "count"} of each prediction.

  mc/mean is the mean over benchmarks of their `MC_MEAN_SCORE` accuracy.
  Item k of benchmark b (n_b items) counts L / n_b, L the least common
  multiple of the n_b, and scores that much when right, so sum(sum) /
  sum(count) is mc/mean, in integers (exact in float64 below 2^53), and a
  resample of the items (report/resample.py) reweighs every benchmark as
  the mean does.
  """
  sizes: dict[str, int] = {}
  for p in predictions:
    sizes[p["benchmark"]] = sizes.get(p["benchmark"], 0) + 1
  lcm = math.lcm(*sizes.values())
  out = []
  for p in predictions:
    weight = lcm // sizes[p["benchmark"]]
    score = MC_MEAN_SCORE[p["benchmark"]]
    right = p[results.MC_PREDICTIONS[score]] == p["label"]
    out.append({"sum": weight * int(right), "count": weight})
  return out


def run_evals(model: nnx.Module, tokenizer, data: EvalData,
              config: EvalConfig, *, mesh: jax.sharding.Mesh | None = None,
              progress: Callable[[str], None] | None = None
              ) -> tuple[dict[str, float], list[dict]]:
  """All configured evals of one model: (metrics, per-item predictions).

  Args:
    model: the model.
    tokenizer: its tokenizer.
    data: the eval sets (`load_eval_data`).
    config: the eval config.
    mesh: the eval mesh, over whose batch axes the harness tasks shard their
      batches (None: jit places them).
    progress: called with one line per finished eval (what, how many items,
      the score, seconds; the first model's include compilation).
  """
  metrics: dict[str, float] = {}
  predictions: list[dict[str, Any]] = []
  clock = [time.perf_counter()]

  def done(what: str) -> None:
    now = time.perf_counter()
    if progress is not None:
      progress(f"  {what} ({now - clock[0]:.1f} s)")
    clock[0] = now

  m = config.math
  for protocol in m.protocols if data.math_test else ():
    gen_config = math_lib.default_generation(protocol)
    gen_config = dataclasses.replace(
        gen_config, batch_size=m.batch_size,
        max_new_tokens=m.max_new_tokens or gen_config.max_new_tokens)
    r = math_lib.accuracy(model, tokenizer, data.math_test, protocol,
                          shots=data.math_shots, generation=gen_config)
    metrics[f"math/{protocol}/acc"] = r.accuracy
    metrics[f"math/{protocol}/tokens_per_second"] = r.tokens_per_second
    predictions += [{"eval": f"math/{protocol}", **p} for p in r.predictions]
    done(f"math/{protocol}: {r.total} problems, accuracy {r.accuracy:.3f}")
  if m.response_loss and data.math_test:
    r = math_lib.response_loss(model, tokenizer, data.math_test,
                               batch_size=m.batch_size)
    metrics["math/response_loss"] = r.loss
    # Per problem, for the report's item resampling (results.item_scores).
    predictions += [{"eval": "math/response_loss", "index": i, "nll": n,
                     "tokens": t}
                    for i, (n, t) in enumerate(zip(r.item_nll,
                                                   r.item_tokens))]
    done(f"math/response_loss: {len(data.math_test)} responses,"
         f" {metrics['math/response_loss']:.4f} nats/token")
  if data.mc_items:
    c = config.multiple_choice
    r = mc_lib.evaluate(model, tokenizer, data.mc_items, add_bos=c.add_bos,
                        batch_size=c.batch_size, max_len=c.max_len)
    for bench, s in r.scores.items():
      metrics[f"mc/{bench}/acc"] = s["acc"]
      metrics[f"mc/{bench}/acc_norm"] = s["acc_norm"]
      metrics[f"mc/{bench}/acc_bytes"] = s["acc_bytes"]
    mean_items = mc_mean_items(r.predictions)
    metrics["mc/mean"] = (sum(i["sum"] for i in mean_items)
                          / sum(i["count"] for i in mean_items))
    predictions += [{"eval": f"mc/{p['benchmark']}", **p,
                     "items": {"mc/mean": i}}
                    for p, i in zip(r.predictions, mean_items)]
    done(f"multiple choice: {len(data.mc_items)} items"
         f" ({', '.join(r.scores)}), mean {metrics['mc/mean']:.3f}")
  if config.harness.tasks:
    harness_lib = _harness_lib()
    r = harness_lib.evaluate_tasks(model, tokenizer, config.harness,
                                   mesh=mesh, rules=config.mesh.rules)
    metrics.update(r.metrics)
    predictions += r.predictions
    done(f"lm-evaluation-harness: {', '.join(config.harness.tasks)}")
  if data.documents:
    c = config.lm_loss
    r = lm_loss_lib.evaluate(model, tokenizer, data.documents,
                             max_len=c.max_len, batch_size=c.batch_size)
    metrics["lm_loss/loss"] = r.loss
    metrics["lm_loss/perplexity"] = r.perplexity
    metrics["lm_loss/tokens"] = float(r.tokens)
    predictions += [{"eval": "lm_loss", "index": i, "nll": n, "tokens": t}
                    for i, (n, t) in enumerate(zip(r.doc_nll, r.doc_tokens))]
    done(f"lm_loss: {r.tokens} tokens of {len(data.documents)} documents,"
         f" {r.loss:.4f} nats/token")
  return metrics, predictions


@dataclasses.dataclass
class ProbeBase:
  """The base side of the probes, computed once per eval job.

  Attributes:
    model: the base model (on the eval mesh).
    source: where it came from (for messages and records).
    reference: the base's (and displacement's) top singular vectors, or
      None without the geometry probe.
    batches: the held-out batches (full rows of packed text).
    base_stats: the base's residual statistics on them, or None without
      the activation probe.
    has_init: the pretraining-overlap probe is on (the init was known).
    seconds: how long this took.
  """

  model: nnx.Module
  source: str
  reference: probes_geometry.Reference | None
  batches: list[dict[str, Any]]
  base_stats: dict[str, np.ndarray] | None
  has_init: bool
  seconds: float


def probe_batches(tokenizer, documents: list[str], config: ProbesEvalConfig,
                  *, context: int, mesh: jax.sharding.Mesh | None = None,
                  rules: Any = None) -> list[dict[str, Any]]:
  """`hvp_batches` batches of `batch_size` full rows of held-out text.

  Rows of min(seq_len, context) + 1 tokens (`probes.pack_rows`), placed
  over the mesh's batch axes when the batch divides them.
  """
  if not documents:
    raise ValueError("eval config.probes: the probes need held-out text;"
                     " set lm_loss.path (it is empty)")
  seq_len = min(config.seq_len, context)
  need = config.batch_size * config.hvp_batches
  try:
    rows = probes_lib.pack_rows(tokenizer, documents, seq_len + 1, need)
  except ValueError:  # Not one full row.
    rows = np.zeros((0, seq_len + 1), np.int32)
  if len(rows) < need:
    raise ValueError(
        f"eval config.probes: the held-out text (lm_loss, {len(documents)}"
        f" documents) fills {len(rows)} rows of {seq_len + 1} tokens; the"
        f" probes need batch_size x hvp_batches = {need}: lower them or"
        " raise lm_loss.limit")
  place = None
  if mesh is not None:
    s = sharding.batch_sharding(mesh, rules or sharding.RULES)
    spec = s.spec[0] if len(s.spec) else None
    shards = 1 if spec is None else sharding.axes_size(mesh, spec)
    place = s if config.batch_size % shards == 0 else None
  out = []
  for b in range(config.hvp_batches):
    batch = probes_lib.lm_batch(rows[b * config.batch_size:
                                     (b + 1) * config.batch_size])
    out.append(jax.device_put(batch, place) if place is not None else batch)
  return out


def probe_base(base: nnx.Module, source: str, tokenizer,
               documents: list[str], config: ProbesEvalConfig, *,
               init: Any | None = None,
               mesh: jax.sharding.Mesh | None = None,
               rules: Any = None) -> ProbeBase:
  """The checkpoint-independent half of the probes of one base.

  Args:
    base: the base model on the eval mesh.
    source: its path (messages).
    tokenizer, documents: the held-out text (the LM-loss eval's).
    config: the probes config.
    init: the base's init params (`probes.init_params`), or None.
    mesh, rules: the eval mesh (batches are placed over its batch axes).
  """
  t0 = time.perf_counter()
  context = int(base.config.max_position_embeddings)
  batches = (probe_batches(tokenizer, documents, config, context=context,
                           mesh=mesh, rules=rules)
             if {"second_order", "activations"} & set(config.which) else [])
  graphdef, params, rest = probes_lib.split_model(base)
  reference = base_stats = None
  if "geometry" in config.which:
    reference = probes_geometry.reference(
        params, init, fractions=config.fractions,
        layer_batch=config.layer_batch or None)
  if "activations" in config.which:
    base_stats = probes_lib.residual_summary(graphdef, rest, params, batches)
  return ProbeBase(model=base, source=source, reference=reference,
                   batches=batches, base_stats=base_stats,
                   has_init=init is not None and reference is not None,
                   seconds=time.perf_counter() - t0)


def run_probes(model: nnx.Module, base: ProbeBase,
               config: ProbesEvalConfig) -> dict[str, float]:
  """The configured probes of `model` against `base` (`probes.evaluate`)."""
  return probes_lib.evaluate(
      base.model, model, base.batches, reference=base.reference,
      fractions=config.fractions, layer_batch=config.layer_batch or None,
      which=config.which, base_stats=base.base_stats)


def _harness_lib():
  try:
    # deferred: the optional lm-eval extra; missing it is a config error here.
    from optconsist_jax.evaluate import harness  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError(f"eval config.harness.tasks is set but {e}") from None
  return harness


def eval_settings(config: EvalConfig, tokenizer) -> dict[str, Any]:
  """How the scores were made, stated in every results row."""
  out: dict[str, Any] = {}
  c = config.multiple_choice
  if any(getattr(c, b) for b in MC_BENCHMARKS):
    out["mc_add_bos"] = (mc_lib.harness_add_bos(tokenizer)
                         if c.add_bos is None else c.add_bos)
  h = config.harness
  if h.tasks:
    # deferred: the optional lm-eval extra, only when harness tasks are set.
    import lm_eval  # pylint: disable=g-import-not-at-top
    out["harness"] = {
        "version": lm_eval.__version__, "tasks": list(h.tasks),
        "add_bos": (mc_lib.harness_add_bos(tokenizer) if h.add_bos is None
                    else h.add_bos),
        "num_fewshot": h.num_fewshot, "limit": h.limit, "max_len": h.max_len}
  return out


def _metric(metrics: Mapping[str, float], name: str, what: str) -> float:
  sign, key = (-1.0, name[1:]) if name.startswith("-") else (1.0, name)
  if key not in metrics:
    raise ValueError(f"eval config.{what}={name!r}: no such metric; have"
                     f" {sorted(metrics)}")
  return sign * float(metrics[key])


def headline(metrics: Mapping[str, float], config: EvalConfig
             ) -> tuple[float, str, float, str]:
  """(learning, its name, retention, its name), both higher-is-better."""
  lname = config.learning_metric or next(
      (f"math/{p}/acc" for p in config.math.protocols
       if f"math/{p}/acc" in metrics), "")
  rname = config.retention_metric or (
      "mc/mean" if "mc/mean" in metrics else
      "-lm_loss/loss" if "lm_loss/loss" in metrics else "")
  learning = _metric(metrics, lname, "learning_metric") if lname else 0.0
  retention = _metric(metrics, rname, "retention_metric") if rname else 0.0
  return learning, lname or "none", retention, rname or "none"
