"""Optimizer fingerprints: weight spectra and residual-stream statistics.

The paper (arXiv 2605.06654) argues that optimizers leave different marks on a
model ("optimizers regularize activations differently"); Muon's orthogonalized
updates are expected to flatten the singular-value spectra of the hidden
matrices and to change the scale of the residual stream. This module measures
both for a set of models (e.g. the AdamW- and Muon-pretrained bases) and plots
them side by side.

* `weight_spectra`: singular values of every layer's q, k, v, o, gate, up and
  down kernel (DeepSeek-V3: MLA's q / q_a / q_b, kv_a, kv_b, o, the dense
  and shared-expert MLPs and each routed expert's gate, up, down) (numpy SVD
  of the [in, out] matrix), each divided by its
  LARGEST singular value (so spectra of layers and models of any scale
  compare; the first value is always 1). `stable_rank` = sum(s^2)/max(s)^2.
* `activation_stats`: per-layer mean, RMS, max |x| and kurtosis of the
  residual stream after each block (`forward(return_stats=True)`,
  model/llama.py `residual_stats`) on held-out text, packed into full rows
  (no padding enters the statistics).
* `compare`: both for several named models -> spectra.png, activations.png
  and fingerprints.json.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
import functools
import json
import os
from typing import Any

from flax import nnx
import jax
import numpy as np

from optconsist_jax.evaluate import probes
from optconsist_jax.evaluate import probes_geometry as geometry

# The hidden matrices' paths -> kinds: the update probes' table
# (evaluate/probes_geometry.py MATRIX_KINDS: Llama's q ... down, DeepSeek-V3's
# MLA projections, dense / shared / routed-expert MLPs) less the embedding,
# the head and the router.
MATRIX_KINDS = {path: kind for path, kind in geometry.MATRIX_KINDS.items()
                if kind not in geometry.NON_HIDDEN_KINDS}
STATS = ("mean", "rms", "max_abs", "kurtosis")
# Axis titles of the activation panels (the residual stream is unitless).
_STAT_TITLES = {"mean": "mean of x", "rms": "RMS of x", "max_abs": "max |x|",
                "kurtosis": "kurtosis of x (Gaussian = 3)"}


def weight_spectra(params: Any) -> dict[str, np.ndarray]:
  """Normalized singular values of each hidden matrix, per layer (expert).

  Args:
    params: a model (Llama or DeepSeek-V3), its `nnx.state(model,
      nnx.Param)`, or that state's pure dict (layer params stacked on a
      leading L axis; routed experts on [L, E]).

  Returns:
    kind -> float64 [N, min(in, out)] for each kind the params have: the
    singular values of each of its N matrices (layer l's kernel; for the
    routed experts each layer's each expert's, layer-major; for MLA's
    projections the dense then the MoE layers'), descending, divided by the
    largest one.
  """
  flat = geometry.pure_params(params)
  stacks: dict[str, list[np.ndarray]] = {}
  for path, kind in MATRIX_KINDS.items():
    if path in flat:
      w = np.asarray(jax.device_get(flat[path]), np.float64)
      stacks.setdefault(kind, []).append(w.reshape(-1, *w.shape[-2:]))
  if not stacks:
    raise KeyError("weight_spectra: none of the hidden matrices"
                   f" {sorted(MATRIX_KINDS)} in the params (expected a Llama"
                   f" or DeepSeek-V3 param tree; got {sorted(flat)[:5]})")
  out = {}
  for kind, ws in stacks.items():
    s_NK = np.linalg.svd(np.concatenate(ws), compute_uv=False)
    out[kind] = s_NK / np.maximum(s_NK[:, :1], 1e-30)
  return out


def stable_rank(spectra_LK: np.ndarray) -> np.ndarray:
  """sum(s^2) / max(s)^2 per layer of max-normalized spectra -> [L]."""
  return np.sum(np.square(spectra_LK), axis=-1)


# The eval job's probes pack held-out text the same way (one definition).
pack_rows = probes.pack_rows


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _stats(graphdef, state, tokens_BT):
  model = nnx.merge(graphdef, state)
  return model.forward(tokens_BT, return_stats=True).stats


def activation_stats(model: nnx.Module, tokenizer: Any, texts: Sequence[str],
                     *, seq_len: int = 128, batch_size: int = 16,
                     max_rows: int | None = 64) -> dict[str, np.ndarray]:
  """Per-layer residual-stream statistics on `texts`.

  Rows come from `pack_rows`; the last partial batch is dropped so all
  batches have equal size. Across batches: mean is averaged, RMS is the root
  of the averaged mean square, max_abs the maximum; kurtosis is the average
  of the per-batch kurtoses (exact with one batch: set `batch_size` >= rows).

  Returns:
    stat -> float64 [L] for stat in STATS, and "num_tokens".
  """
  rows = pack_rows(tokenizer, texts, seq_len, max_rows)
  batch_size = min(batch_size, len(rows))
  n_batches = len(rows) // batch_size
  graphdef, state = nnx.split(model)
  per_batch = []
  for b in range(n_batches):
    s = _stats(graphdef, state, rows[b * batch_size:(b + 1) * batch_size])
    per_batch.append({k: np.asarray(v, np.float64) for k, v in s.items()})
  stack = {k: np.stack([p[k] for p in per_batch]) for k in STATS}
  return {
      "mean": stack["mean"].mean(0),
      "rms": np.sqrt(np.mean(np.square(stack["rms"]), 0)),
      "max_abs": stack["max_abs"].max(0),
      "kurtosis": stack["kurtosis"].mean(0),
      "num_tokens": n_batches * batch_size * seq_len,
  }


def compare(named_models: Mapping[str, tuple[nnx.Module, Any]],
            texts: Sequence[str], out_dir: str | os.PathLike, *,
            seq_len: int = 128, batch_size: int = 16,
            max_rows: int | None = 64) -> dict[str, str]:
  """Spectra and activation statistics of several models, side by side.

  Args:
    named_models: name (e.g. "adamw", "muon") -> (model, tokenizer).
    texts: held-out text for the activation statistics.
    out_dir: where the outputs go (created).
    seq_len, batch_size, max_rows: see `activation_stats`.

  Returns:
    {"spectra": spectra.png, "activations": activations.png,
     "json": fingerprints.json}. The JSON holds, per model, the spectra
    ([L][k] lists per kind), stable ranks ([L] per kind) and the statistics
    ([L] per stat).
  """
  if not named_models:
    raise ValueError("fingerprints.compare: no models given")
  # deferred: matplotlib is slow to import; only plots need it.
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  # deferred: pyplot after the Agg backend is chosen.
  from matplotlib import pyplot as plt  # pylint: disable=g-import-not-at-top
  from matplotlib import ticker  # pylint: disable=g-import-not-at-top

  out_dir = os.fspath(out_dir)
  os.makedirs(out_dir, exist_ok=True)
  numbers: dict[str, Any] = {}
  for name, (model, tokenizer) in named_models.items():
    spectra = weight_spectra(model)
    stats = activation_stats(model, tokenizer, texts, seq_len=seq_len,
                             batch_size=batch_size, max_rows=max_rows)
    numbers[name] = {
        "spectra": {k: v.tolist() for k, v in spectra.items()},
        "stable_rank": {k: stable_rank(v).tolist()
                        for k, v in spectra.items()},
        "activations": {k: np.asarray(stats[k]).tolist() for k in STATS},
        "num_tokens": int(stats["num_tokens"]),
    }
  paths = {"spectra": os.path.join(out_dir, "spectra.png"),
           "activations": os.path.join(out_dir, "activations.png"),
           "json": os.path.join(out_dir, "fingerprints.json")}
  colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]

  kinds = list(dict.fromkeys(k for d in numbers.values()
                             for k in d["spectra"]))
  fig, axes = plt.subplots(1, len(kinds), figsize=(3 * len(kinds), 3.5),
                           squeeze=False)
  axes = axes[0]
  for ax, kind in zip(axes, kinds):
    for i, (name, d) in enumerate(numbers.items()):
      if kind not in d["spectra"]:
        continue
      s_LK = np.asarray(d["spectra"][kind])
      idx = np.arange(1, s_LK.shape[1] + 1)
      c = colors[i % len(colors)]
      ax.plot(idx, s_LK.mean(0), color=c, label=name)
      ax.fill_between(idx, s_LK.min(0), s_LK.max(0), color=c, alpha=0.2)
    ax.set_title(f"{kind} matrices")
    ax.set_xlabel("singular value rank i (1 = largest)")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("s_i / s_max (mean over layers;\nband: min to max)")
  fig.suptitle("Weight spectra: singular values relative to the largest"
               " (flatter = higher stable rank)", fontsize=10)
  axes[0].legend(fontsize=8, title="model", title_fontsize=8)
  fig.tight_layout()
  fig.savefig(paths["spectra"], dpi=110)
  plt.close(fig)

  fig, axes = plt.subplots(1, len(STATS), figsize=(3.6 * len(STATS), 3.2))
  for ax, stat in zip(axes, STATS):
    for i, (name, d) in enumerate(numbers.items()):
      v = d["activations"][stat]
      ax.plot(np.arange(len(v)), v, "-o", color=colors[i % len(colors)],
              label=name)
    ax.set_title(f"residual stream: {_STAT_TITLES.get(stat, stat)}",
                 fontsize=10)
    ax.set_xlabel("layer (output of block; 0 = first)")
    ax.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
  axes[0].set_ylabel("value over held-out tokens")
  axes[0].legend(fontsize=8, title="model", title_fontsize=8)
  fig.tight_layout()
  fig.savefig(paths["activations"], dpi=110)
  plt.close(fig)

  with open(paths["json"], "w", encoding="utf-8") as f:
    json.dump({"normalization": "singular values / largest per matrix",
               "models": numbers}, f)
  return paths
