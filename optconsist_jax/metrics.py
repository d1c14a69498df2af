"""Training metrics: writers, progress, throughput/MFU, activation stats.

Written under W/metrics/ as TensorBoard event files and to the log
(`optconsist_jax.metric_writers`, no TensorFlow); only process 0 writes
event files.

MFU (model flops utilization, Chowdhery et al. 2022 "PaLM", appendix B):
analytic training flops per token (`LlamaConfig.flops_per_token`: 6 x matmul
params + causal attention) x tokens/s / (devices x per-device peak). The peak
table holds dense bf16 tensor-core / MXU peaks from the vendors' spec sheets;
devices it does not know (CPUs) get no MFU.
"""

from __future__ import annotations

from collections.abc import Mapping
import logging as logging_std
import resource
import time
from typing import Any

from absl import logging
from clu import parameter_overview
from etils import epath
import jax
import numpy as np

from optconsist_jax import metric_writers
from optconsist_jax.platforms import tpu as tpu_facts

METRICS_DIR = "metrics"

# device_kind substring -> dense bf16 peak flop/s per device (chip for TPUs,
# except v4/v5p whose jax device is one chip with 2 megacores fused). TPUs
# from the TPU facts table (optconsist_jax.platforms.tpu, longest name first so
# "TPU v5 lite" wins over "TPU v5"); GPUs from NVIDIA's H100/H200/A100/L4/A10G
# datasheets (SXM, without sparsity).
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    *sorted(((kind, chip.peak_bf16_flops)
             for chip in tpu_facts.CHIPS.values()
             for kind in chip.device_kinds), key=lambda kf: -len(kf[0])),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("A100", 312e12),
    ("L4", 121e12),
    ("A10G", 70e12),
)


class _QuietLibraries(logging_std.Filter):
  """Drops Orbax's and clu's per-save/restore INFO chatter (warnings stay)."""

  def filter(self, record):
    return (record.levelno >= logging_std.WARNING
            or not any(s in record.pathname for s in ("/orbax/",
                                                      "/clu/platform/")))


def quiet_library_logs() -> None:
  """Keeps the absl log of a main readable (call once, in main)."""
  logging.get_absl_handler().addFilter(_QuietLibraries())


def peak_flops(device: Any | None = None) -> float | None:
  """Dense bf16 peak flop/s of one device, or None when unknown (CPU)."""
  kind = (device or jax.devices()[0]).device_kind
  for key, flops in PEAK_BF16_FLOPS:
    if key.lower() in kind.lower():
      return flops
  return None


def mfu(flops_per_token: float, tokens_per_sec: float, num_devices: int,
        peak_per_device: float | None) -> float | None:
  if not peak_per_device:
    return None
  return flops_per_token * tokens_per_sec / (num_devices * peak_per_device)


def _host_usage() -> tuple[float, int]:
  """This process's system CPU seconds and minor page faults so far."""
  r = resource.getrusage(resource.RUSAGE_SELF)
  return r.ru_stime, r.ru_minflt


class Throughput:
  """Step time, tokens/s and MFU between a start step and the latest counted.

  Also the host's system CPU seconds and minor page faults per step
  (getrusage, the whole process): on CPU they show whether the allocator
  re-maps the step's temporaries (platforms/allocator.py).

  train.py keeps two: one reset at every log (the logged rates) and one over
  the whole run after its first step (which includes compilation).

  Args:
    tokens_per_step: B x T slots of one optimizer step.
    flops_per_token: model flops per token (LlamaConfig.flops_per_token).
    num_devices: devices the step runs on.
    peak_per_device: peak flop/s of one device (`peak_flops()`; None: no MFU).
  """

  def __init__(self, tokens_per_step: int, flops_per_token: float,
               num_devices: int, peak_per_device: float | None):
    self.tokens_per_step = tokens_per_step
    self.flops_per_token = flops_per_token
    self.num_devices = num_devices
    self.peak_per_device = peak_per_device
    self.started = False
    self.t0 = self.t = 0.0
    self.step0 = self.step = 0
    self.target_tokens = 0.0
    self.usage0 = self.usage = (0.0, 0)

  def start(self, step: int, now: float | None = None) -> None:
    """Starts the window at `step` (now: time.perf_counter())."""
    now = time.perf_counter() if now is None else now
    self.started = True
    self.t0, self.step0, self.t, self.step = now, step, now, step
    self.target_tokens = 0.0
    self.usage0 = self.usage = _host_usage()

  def count(self, step: int, target_tokens: float,
            now: float | None = None) -> None:
    """Step `step` is done, with `target_tokens` tokens that carry loss."""
    self.t = time.perf_counter() if now is None else now
    self.step = step
    self.target_tokens += float(target_tokens)
    self.usage = _host_usage()

  @property
  def steps(self) -> int:
    return self.step - self.step0

  def rates(self) -> dict[str, float | None]:
    """step_time_s, tokens_per_s (all slots), target_tokens_per_s, mfu,
    host_system_s_per_step, host_minor_faults_per_step; empty before a step
    and a moment have passed."""
    n, dt = self.steps, self.t - self.t0
    if not self.started or n <= 0 or dt <= 0:
      return {}
    tokens_per_s = n * self.tokens_per_step / dt
    return {"step_time_s": dt / n, "tokens_per_s": tokens_per_s,
            "target_tokens_per_s": self.target_tokens / dt,
            "mfu": mfu(self.flops_per_token, tokens_per_s, self.num_devices,
                       self.peak_per_device),
            "host_system_s_per_step": (self.usage[0] - self.usage0[0]) / n,
            "host_minor_faults_per_step": (self.usage[1] - self.usage0[1]) / n}


def layer_stats_scalars(stats: Mapping[str, Any],
                        prefix: str = "activations") -> dict[str, float]:
  """{"mean": [L], ...} -> {"activations/mean/layer_00": x, ...}."""
  out = {}
  for name, values in stats.items():
    values = np.asarray(values)
    for i, v in enumerate(values):
      out[f"{prefix}/{name}/layer_{i:02d}"] = float(v)
  return out


class DeferredFetch:
  """Holds step k's device metrics and fetches them after step k+1 starts.

  `jax.device_get` on this step's metrics would wait for the step to finish
  and leave the device idle while Python prepares the next batch; fetching
  the previous step's values instead costs no stall (the device is busy with
  the step just dispatched).
  """

  def __init__(self):
    self._pending: tuple[int, Any, float] | None = None

  def push(self, step: int, device_metrics: Any) -> tuple[int, dict, float] | None:
    """Queues this step's metrics; returns the previous step's, fetched."""
    out = self.pop()
    self._pending = (step, device_metrics, time.perf_counter())
    return out

  def pop(self) -> tuple[int, dict, float] | None:
    """Fetches and returns what is queued, if anything (blocks on it)."""
    if self._pending is None:
      return None
    step, m, t = self._pending
    self._pending = None
    return step, jax.tree.map(lambda x: np.asarray(jax.device_get(x)), m), t


class Writer:
  """The metric writer and progress reports of one run."""

  def __init__(self, workdir: str, *, num_train_steps: int | None,
               progress_every_steps: int | None = None,
               progress_every_secs: float | None = 60.0):
    self.logdir = epath.Path(workdir) / METRICS_DIR
    is_main = jax.process_index() == 0
    self.writer = metric_writers.MetricWriter(self.logdir if is_main
                                              else None)
    self.progress = metric_writers.Progress(
        num_train_steps=num_train_steps, writer=self.writer,
        every_steps=progress_every_steps, every_secs=progress_every_secs)

  def scalars(self, step: int, values: Mapping[str, Any]):
    self.writer.write_scalars(
        step, {k: float(v) for k, v in values.items() if v is not None})

  def parameter_overview(self, params: Any, title: str = "params"):
    """Logs a table of names, shapes, sizes, mean/std and sharding."""
    table = parameter_overview.get_parameter_overview(
        _to_nested_dict(params), include_stats="global")
    logging.info("%s:\n%s", title, table)
    if jax.process_index() == 0:
      self.writer.write_texts(0, {f"{title}_overview": f"```\n{table}\n```"})
    return table

  def close(self):
    self.writer.close()  # Flushes (and copies a bucket's files) once.


def _to_nested_dict(tree: Any) -> dict[str, Any]:
  """A pytree (nnx.State, dicts, ...) as a nested dict keyed by path parts."""
  out: dict[str, Any] = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    node = out
    keys = [str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k))))
            for k in path]
    for k in keys[:-1]:
      node = node.setdefault(k, {})
    node[keys[-1] if keys else "value"] = leaf
  return out
