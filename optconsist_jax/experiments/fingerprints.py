"""Optimizer fingerprints: weight spectra and residual-stream statistics.

The paper (arXiv 2605.06654) argues that optimizers leave different marks on a
model ("optimizers regularize activations differently"); Muon's orthogonalized
updates are expected to flatten the singular-value spectra of the hidden
matrices and to change the scale of the residual stream. This module measures
both for a set of models (e.g. the AdamW- and Muon-pretrained bases) and plots
them side by side.

* `weight_spectra`: singular values of every layer's q, k, v, o, gate, up and
  down kernel (numpy SVD of the [in, out] matrix), each divided by its
  LARGEST singular value (so spectra of layers and models of any scale
  compare; the first value is always 1). `stable_rank` = sum(s^2)/max(s)^2.
* `activation_stats`: per-layer mean, RMS, max |x| and kurtosis of the
  residual stream after each block (`Llama.forward(return_stats=True)`,
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

# matrix kind -> path of its stacked [L, in, out] kernel in the param tree.
MATRIX_KINDS = {
    "q": ("layers", "attn", "q_proj", "kernel"),
    "k": ("layers", "attn", "k_proj", "kernel"),
    "v": ("layers", "attn", "v_proj", "kernel"),
    "o": ("layers", "attn", "o_proj", "kernel"),
    "gate": ("layers", "mlp", "gate_proj", "kernel"),
    "up": ("layers", "mlp", "up_proj", "kernel"),
    "down": ("layers", "mlp", "down_proj", "kernel"),
}
STATS = ("mean", "rms", "max_abs", "kurtosis")
# Axis titles of the activation panels (the residual stream is unitless).
_STAT_TITLES = {"mean": "mean of x", "rms": "RMS of x", "max_abs": "max |x|",
                "kurtosis": "kurtosis of x (Gaussian = 3)"}


def _pure(params: Any) -> Mapping[str, Any]:
  """A nested dict of arrays from a model, an nnx.State or a nested dict."""
  if isinstance(params, nnx.Module):
    params = nnx.state(params, nnx.Param)
  if isinstance(params, nnx.State):
    params = nnx.to_pure_dict(params)
  return params


def _kernel(params: Mapping[str, Any], path: tuple[str, ...]) -> np.ndarray:
  node = params
  for i, key in enumerate(path):
    if not isinstance(node, Mapping) or key not in node:
      raise KeyError(f"weight_spectra: no param {'/'.join(path[:i + 1])!r}"
                     " (expected a Llama param tree)")
    node = node[key]
  return np.asarray(jax.device_get(node), np.float64)


def weight_spectra(params: Any) -> dict[str, np.ndarray]:
  """Normalized singular values of each hidden matrix, per layer.

  Args:
    params: a Llama model, its `nnx.state(model, nnx.Param)`, or that state's
      pure dict (layer params stacked on a leading L axis).

  Returns:
    kind -> float64 [L, min(in, out)]: singular values of layer l's kernel,
    descending, divided by the largest one.
  """
  params = _pure(params)
  out = {}
  for kind, path in MATRIX_KINDS.items():
    w_LIO = _kernel(params, path)
    s_LK = np.linalg.svd(w_LIO, compute_uv=False)
    out[kind] = s_LK / np.maximum(s_LK[:, :1], 1e-30)
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

  fig, axes = plt.subplots(1, len(MATRIX_KINDS),
                           figsize=(3 * len(MATRIX_KINDS), 3.5))
  for ax, kind in zip(axes, MATRIX_KINDS):
    for i, (name, d) in enumerate(numbers.items()):
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
