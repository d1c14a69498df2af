"""lm-evaluation-harness tasks scored by the harness itself on the project's model.

`HarnessLM` implements the harness's model interface (`lm_eval.api.model.LM`,
lm-eval 0.4.13: `pip install -e .[harness]`) on a Flax `Llama`, so
`lm_eval.simple_evaluate(model=HarnessLM(...), tasks=[...])` runs any task the
installed harness knows, or any task YAML in a local directory, with the
harness's own prompts, request construction, filters and metrics:

* `loglikelihood`: (context, continuation) pairs are tokenized as the
  harness's `TemplateLM._encode_pair` does (the same `encode_pair` as the
  built-in scorer, evaluate/multiple_choice.py) and scored in batches padded to a
  short ladder of lengths (`length_bucket` x 2^k, few compiled shapes);
  `is_greedy` is whether greedy decoding reproduces the continuation.
* `loglikelihood_rolling`: the document's tokens (BOS first when `add_bos`,
  as Hugging Face's Llama tokenizer encodes them in the harness's HF backend)
  are cut into the harness's disjoint rolling windows
  (`lm_eval.utils.get_rolling_token_windows`, prefix token BOS, window
  `max_len`) and the window scores summed.
* `generate_until`: greedy decoding with the KV cache
  (optconsist_jax.model.generate), stopped at the request's `until` strings plus the
  EOS piece, the context left-truncated to `max_len - max_gen_toks` tokens;
  requests with the same generation kwargs are decoded together.

BOS: `add_bos=None` follows the harness's default (v0.4.9.2 on) for the
tokenizer in use: BOS for Llama's SentencePiece tokenizer, none for GPT-2's
(`multiple_choice.harness_add_bos`).

Multiple hosts: the harness's own data-parallel path needs torch collectives,
so every process runs the whole harness loop on the same requests
(`world_size` 1 to the harness) and the model does the distribution: each
batch is a global array sharded over the eval mesh's batch axes, so each
process's devices score their slice of the rows, and the scores are gathered
back (`multihost_utils.process_allgather`) before the harness sees them. Only
process 0 should write results. Generation runs through
`generate.generate` on the same sharded params.

`evaluate_tasks` is what the eval job calls: it runs the configured tasks and
returns flat metric names (`harness/<task>/<metric>[/<filter>]`) and per-item
records.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import functools
import json
import os
from typing import Any

from flax import nnx
import jax
import numpy as np

try:
  import lm_eval  # pylint: disable=g-import-not-at-top
  from lm_eval.api import model as lm_model  # pylint: disable=g-import-not-at-top
except ImportError as e:  # pragma: no cover - exercised without the extra.
  raise ImportError(
      "optconsist_jax.evaluate.harness needs lm-evaluation-harness: pip install"
      " 'optconsist_jax[harness]' (lm-eval==0.4.13)") from e

from optconsist_jax.model import generate as gen
from optconsist_jax.evaluate import multiple_choice as mc


def _request_args(requests: Sequence[Any]) -> list[tuple]:
  """`Instance.args` of harness requests (plain tuples pass through)."""
  return [r.args if hasattr(r, "args") else tuple(r) for r in requests]


class HarnessLM(lm_model.LM):
  """The project's model behind lm-evaluation-harness's `LM` interface."""

  def __init__(self, model: nnx.Module, tokenizer: gen.Tokenizer, *,
               add_bos: bool | None = None, batch_size: int = 16,
               max_len: int = 2048, max_gen_toks: int = 256,
               length_bucket: int = 64, gen_batch_size: int = 8,
               mesh: jax.sharding.Mesh | None = None, rules: Any = None):
    """The adapter.

    Args:
      model: a `Llama` (params may be sharded on `mesh`).
      tokenizer: the project's tokenizer (data.tokenizer / data.gpt2_bpe).
      add_bos: BOS before every context; None = the harness's default for
        the tokenizer.
      batch_size: rows per scoring forward (a multiple of the mesh's batch
        axes size when `mesh` is given).
      max_len: the model's context for scoring and generation (the harness's
        `max_length`; capped at the model's own, `generate.context_length`).
      max_gen_toks: generated tokens when a request does not say.
      length_bucket: the shortest padded length; longer ones double.
      gen_batch_size: prompts decoded together.
      mesh, rules: the eval mesh and its logical rules (shard each batch's
        rows over the batch axes); None: let jit place the inputs.
    """
    super().__init__()
    self.model = model
    self.tokenizer = tokenizer
    self.add_bos = (mc.harness_add_bos(tokenizer) if add_bos is None
                    else bool(add_bos))
    self.batch_size = batch_size
    self.max_len = gen.fit_to_context(max_len, model)
    self.max_gen_toks = max_gen_toks
    self.length_bucket = length_bucket
    self.gen_batch_size = gen_batch_size
    self.mesh = mesh
    self.rules = rules

  # -- the harness's tokenization conventions ------------------------------

  @property
  def prefix_token_id(self) -> int:
    """Conditioning token of an empty context and of rolling windows."""
    bos = self.tokenizer.bos_id
    return bos if bos is not None and bos >= 0 else self.tokenizer.eos_id

  @property
  def eos_string(self) -> str | None:
    """The EOS token's text, a stop string as in the harness's HF backend."""
    piece = getattr(self.tokenizer, "id_to_piece", None)
    return piece(self.tokenizer.eos_id) if piece else None

  @property
  def tokenizer_name(self) -> str:
    return getattr(self.tokenizer, "path", "") or type(self.tokenizer).__name__

  def _score(self, pairs: Sequence[tuple[list[int], list[int]]]
             ) -> tuple[np.ndarray, np.ndarray]:
    return mc.score_requests(self.model, pairs, batch_size=self.batch_size,
                             max_len=self.max_len,
                             length_bucket=self.length_bucket,
                             mesh=self.mesh, rules=self.rules)

  # -- the LM interface ----------------------------------------------------

  def loglikelihood(self, requests, disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), is_greedy) per (context, cont)."""
    del disable_tqdm
    pairs = [mc.encode_pair(self.tokenizer, ctx, cont, add_bos=self.add_bos)
             for ctx, cont in _request_args(requests)]
    ll, greedy = self._score(pairs)
    out = [(float(l), bool(g)) for l, g in zip(ll, greedy)]
    for args, ans in zip(_request_args(requests), out):
      self.cache_hook.add_partial("loglikelihood", args, ans)
    return out

  def rolling_windows(self, text: str) -> list[tuple[list[int], list[int]]]:
    """The harness's disjoint (context, predicted) windows of one document."""
    # deferred: lm_eval.utils takes ~0.4 s to import; only on first use.
    from lm_eval import utils  # pylint: disable=g-import-not-at-top
    tokens = self.tokenizer.encode(text, bos=self.add_bos)
    return [utils.make_disjoint_window(w)
            for w in utils.get_rolling_token_windows(
                token_list=tokens, prefix_token=self.prefix_token_id,
                max_seq_len=self.max_len, context_len=1)]

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    """Total log-likelihood of each document (all windows summed)."""
    del disable_tqdm
    windows, owner = [], []
    texts = [args[0] for args in _request_args(requests)]
    for i, text in enumerate(texts):
      for w in self.rolling_windows(text):
        windows.append(w)
        owner.append(i)
    ll, _ = self._score(windows) if windows else (np.zeros(0), None)
    totals = np.zeros(len(texts), np.float64)
    np.add.at(totals, np.asarray(owner, np.int64), ll)
    out = [float(t) for t in totals]
    for text, total in zip(texts, out):
      self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
    return out

  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy completions, cut at the request's stop strings and at EOS."""
    del disable_tqdm
    # deferred: lm_eval.models imports model backends (torch, transformers).
    from lm_eval.models import utils as model_utils  # pylint: disable=g-import-not-at-top
    args = _request_args(requests)
    groups: dict[str, list[int]] = {}
    for i, (_, kwargs) in enumerate(args):
      groups.setdefault(json.dumps(kwargs, sort_keys=True, default=str),
                        []).append(i)
    out = [""] * len(args)
    for idx in groups.values():
      kwargs = model_utils.normalize_gen_kwargs(args[idx[0]][1],
                                                self.max_gen_toks)
      if kwargs.get("do_sample") or kwargs.get("temperature", 0.0):
        raise ValueError(
            f"harness request asks for sampling ({args[idx[0]][1]}); the"
            " adapter decodes greedily only")
      until = model_utils.handle_stop_sequences(kwargs.pop("until", None),
                                                eos=self.eos_string)
      max_new = int(kwargs.pop("max_gen_toks"))
      if max_new >= self.max_len:
        raise ValueError(f"harness request wants {max_new} new tokens; the"
                         f" adapter's max_len is {self.max_len}")
      config = gen.GenerationConfig(
          max_new_tokens=max_new,
          stop_strings=tuple(s for s in until if s),
          batch_size=self.gen_batch_size,
          max_prompt_len=self.max_len - max_new,
          prompt_bucket=self.length_bucket, add_bos=self.add_bos)
      result = gen.generate(self.model, self.tokenizer,
                            [args[i][0] for i in idx], config)
      for i, text in zip(idx, result.completions):
        out[i] = text
        self.cache_hook.add_partial("generate_until", args[i], text)
    return out

  def get_model_info(self) -> dict[str, Any]:
    """Recorded by `simple_evaluate` in the results' config."""
    return {"model_backend": "optconsist_jax", "add_bos": self.add_bos,
            "max_length": self.max_len, "tokenizer": self.tokenizer_name}


# ---------------------------------------------------------------------------
# The eval job's entry point.


@functools.cache
def task_manager(include_path: tuple[str, ...], include_defaults: bool):
  """One harness TaskManager per job (indexing the task YAMLs is slow)."""
  # deferred: lm_eval.tasks indexes the task registry; only when tasks run.
  from lm_eval.tasks import TaskManager  # pylint: disable=g-import-not-at-top
  for path in include_path:
    if not os.path.isdir(path):
      raise FileNotFoundError(
          f"eval config.harness.include_path: {path} is not a directory")
  return TaskManager(include_path=list(include_path) or None,
                     include_defaults=include_defaults)


@dataclasses.dataclass
class HarnessResult:
  """Flat metrics, per-item records and the harness's own results dict."""

  metrics: dict[str, float]
  predictions: list[dict[str, Any]]
  add_bos: bool
  raw: dict[str, Any]


def _plain(x: Any) -> Any:
  """JSON-ready copy of a harness sample (numpy values, tuples, objects)."""
  if isinstance(x, dict):
    return {str(k): _plain(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_plain(v) for v in x]
  if isinstance(x, np.ndarray):
    return x.tolist()
  if isinstance(x, (np.generic,)):
    return x.item()
  if x is None or isinstance(x, (str, int, float, bool)):
    return x
  return str(x)


def metric_name(task: str, key: str) -> str | None:
  """"acc_norm,none" -> harness/<task>/acc_norm; filters add a last part."""
  if "," not in key:
    return None
  metric, filt = key.split(",", 1)
  return f"harness/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")


def _item_value(x: Any) -> float | None:
  """A per-sample metric value as a finite number, or None (tuples, ...)."""
  if isinstance(x, (bool, np.bool_)):
    return float(x)
  if isinstance(x, (int, float, np.integer, np.floating)) and np.isfinite(x):
    return float(x)
  return None


def mean_metrics(task: str, samples: Sequence[dict[str, Any]],
                 metrics: dict[str, float]) -> dict[tuple[str, str], str]:
  """(metric, filter) -> metric name, for the task's per-item means.

  A metric's per-sample values are the report's items
  (`EvalRecord.items`, report/resample.py) when each is a number and
  their mean is the harness's own aggregate (acc, acc_norm, exact_match,
  ...: the "mean" aggregation); metrics aggregated otherwise (perplexity,
  f1 or mcc over the corpus, group scores) are not.
  """
  values: dict[tuple[str, str], list[float | None]] = {}
  for s in samples:
    for m in s["metrics"]:
      values.setdefault((m, s["filter"]), []).append(
          _item_value(s.get(m)))
  out = {}
  for (m, filt), xs in values.items():
    name = metric_name(task, f"{m},{filt}")
    if (name in metrics and xs and None not in xs
        and np.isclose(sum(xs) / len(xs), metrics[name], rtol=1e-9,
                       atol=1e-12)):
      out[(m, filt)] = name
  return out


def evaluate_tasks(model: nnx.Module, tokenizer: gen.Tokenizer,
                   config: Any, *,
                   mesh: jax.sharding.Mesh | None = None, rules: Any = None
                   ) -> HarnessResult:
  """Runs `config.tasks` through `lm_eval.simple_evaluate` on `model`.

  Args:
    model: the model (params on `mesh`).
    tokenizer: its tokenizer.
    config: an `evaluate.HarnessEvalConfig` (tasks, include_path, ...).
    mesh, rules: the eval mesh and its logical rules.

  Returns:
    metrics `harness/<task>/<metric>[/<filter>]` (stderr too), one record per
    item and filter, and the harness's results dict.
  """
  manager = task_manager(tuple(config.include_path), config.include_defaults)
  lm = HarnessLM(model, tokenizer, add_bos=config.add_bos,
                 batch_size=config.batch_size, max_len=config.max_len,
                 max_gen_toks=config.max_gen_toks,
                 gen_batch_size=config.gen_batch_size, mesh=mesh, rules=rules)
  unknown = [t for t in config.tasks if t not in manager.all_tasks]
  if unknown:
    raise ValueError(
        f"eval config.harness.tasks: {unknown} unknown to lm-eval"
        f" {lm_eval.__version__}"
        + (f" with include_path {list(config.include_path)}"
           if config.include_path else "")
        + ("" if config.include_defaults else
           " (include_defaults=False: built-in tasks not indexed)"))
  raw = lm_eval.simple_evaluate(
      model=lm, tasks=list(config.tasks), task_manager=manager,
      num_fewshot=config.num_fewshot, limit=config.limit or None,
      log_samples=True, random_seed=0, numpy_random_seed=1234,
      torch_random_seed=None, fewshot_random_seed=config.fewshot_seed)
  metrics: dict[str, float] = {}
  for task, values in raw["results"].items():
    for key, value in values.items():
      name = metric_name(task, key)
      if name is None or isinstance(value, bool):
        continue
      if isinstance(value, (int, float, np.floating, np.integer)):
        metrics[name] = float(value)
  predictions = []
  for task, samples in raw.get("samples", {}).items():
    means = mean_metrics(task, samples, metrics)
    for s in samples:
      predictions.append(_plain({
          "eval": f"harness/{task}", "doc_id": s["doc_id"],
          "filter": s["filter"], "target": s["target"],
          "arguments": s["arguments"], "resps": s["filtered_resps"],
          **{m: s[m] for m in s["metrics"] if m in s},
          "items": {means[(m, s["filter"])]: s[m] for m in s["metrics"]
                    if (m, s["filter"]) in means}}))
  return HarnessResult(metrics, predictions, lm.add_bos, raw)

