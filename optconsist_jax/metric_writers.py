"""Metric writers: TensorBoard event files and the log, without TensorFlow.

The event files follow TensorBoard's format (records framed as in
tensorflow/core/lib/io/record_writer.cc, `Event` protos with TF2-style
tensor summaries: scalars for the "scalars" plugin, strings for "text"),
built with TensorBoard's own protos and record framing, which need numpy
and protobuf only. clu's `SummaryWriter` wrote the same through TensorFlow,
whose import cost 8-9 s of CPU in every training and evaluation process.

A gs:// logdir is written locally and each flush copies the files whole to
the bucket through `optconsist_jax.storage` (TensorFlow's GCS files also
upload the whole file on every flush), so metrics take the same credentials
and emulator as every other path.
"""

from __future__ import annotations

from collections.abc import Mapping
import itertools
import os
import shutil
import socket
import tempfile
import time
from typing import Any

from absl import logging
import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.proto import summary_pb2
from tensorboard.plugins.scalar import metadata as scalar_metadata
from tensorboard.plugins.text import metadata as text_metadata
from tensorboard.summary.writer import record_writer
from tensorboard.util import tensor_util

from optconsist_jax import storage

_FILE_IDS = itertools.count()


def log_line(step: int, scalars: Mapping[str, Any]) -> str:
  """`[step] k=v, ...` sorted by name, floats to 6 digits (clu's format)."""
  values = ", ".join(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in sorted(scalars.items()))
  return f"[{step}] {values}"


class EventFile:
  """One TensorBoard event file in a local folder, appended to."""

  def __init__(self, logdir: str):
    os.makedirs(logdir, exist_ok=True)
    # TensorBoard's naming: events.out.tfevents.<time>.<host>.<pid>.<id>.
    name = (f"events.out.tfevents.{int(time.time()):010d}."
            f"{socket.gethostname()}.{os.getpid()}.{next(_FILE_IDS)}.v2")
    self.path = os.path.join(logdir, name)
    self._file = open(self.path, "wb")  # pylint: disable=consider-using-with
    self._records = record_writer.RecordWriter(self._file)
    self.add(event_pb2.Event(wall_time=time.time(),
                             file_version="brain.Event:2"))

  def add(self, event: event_pb2.Event) -> None:
    self._records.write(event.SerializeToString())

  def summary(self, step: int, tag: str, tensor: Any,
              metadata: summary_pb2.SummaryMetadata) -> None:
    event = event_pb2.Event(wall_time=time.time(), step=int(step))
    event.summary.value.add(tag=tag, metadata=metadata,
                            tensor=tensor_util.make_tensor_proto(tensor))
    self.add(event)

  def flush(self) -> None:
    self._file.flush()

  def close(self) -> None:
    self._file.close()


class MetricWriter:
  """Scalars and texts to the log and (`logdir` not None) an event file.

  `logdir` may be a gs:// path (see the module docstring). The interface
  is clu's `MetricWriter` subset the project uses.
  """

  def __init__(self, logdir: str | os.PathLike[str] | None):
    self.dest = None if logdir is None else os.fspath(logdir)
    self._local = None
    self._events = None
    if self.dest is not None:
      if storage.is_remote(self.dest):
        self._local = tempfile.mkdtemp(prefix="optconsist_metrics_")
      self._events = EventFile(self._local or self.dest)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    logging.info("%s", log_line(step, scalars))
    if self._events is None:
      return
    md = summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(
            plugin_name=scalar_metadata.PLUGIN_NAME),
        data_class=summary_pb2.DataClass.DATA_CLASS_SCALAR)
    for tag, value in scalars.items():
      self._events.summary(step, tag, np.float32(value), md)

  def write_texts(self, step: int, texts: Mapping[str, str]) -> None:
    logging.info("[%d] texts: %s", step, sorted(texts))
    if self._events is None:
      return
    for tag, text in texts.items():
      md = text_metadata.create_summary_metadata(display_name=None,
                                                 description=None)
      self._events.summary(step, tag, np.array(text.encode(), dtype=object),
                           md)

  def flush(self) -> None:
    if self._events is not None:
      self._events.flush()
      if self._local is not None:
        storage.upload_dir(self._local, self.dest)

  def close(self) -> None:
    if self._events is None:
      return
    self.flush()
    self._events.close()
    self._events = None
    if self._local is not None:
      shutil.rmtree(self._local, ignore_errors=True)


def _format_secs(secs: float) -> str:
  minutes, secs = divmod(int(secs), 60)
  hours, minutes = divmod(minutes, 60)
  return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s"


class Progress:
  """Logs steps/s, the share done and an ETA every `every_secs` seconds.

  Called after every step; also reports at `num_train_steps`. Each report
  writes `steps_per_sec` and `uptime` (seconds since this object was made)
  through `writer`, as clu's ReportProgress did.
  """

  def __init__(self, *, num_train_steps: int | None,
               writer: MetricWriter | None = None,
               every_steps: int | None = None,
               every_secs: float | None = 60.0):
    self.num_train_steps = num_train_steps
    self.every_steps = every_steps
    self.every_secs = every_secs
    self.writer = writer
    self._t0 = time.monotonic()
    self._last: tuple[int, float] | None = None

  def __call__(self, step: int, now: float | None = None) -> str | None:
    """Reports at `step` if due; returns the message then, else None."""
    now = time.monotonic() if now is None else now
    if self._last is None:  # The first call sets the origin.
      self._last = (step, now)
      return None
    last_step, last_t = self._last
    due = step != last_step and (
        step == self.num_train_steps
        or (self.every_steps and step % self.every_steps == 0)
        or (self.every_secs is not None and now - last_t > self.every_secs))
    if not due:
      return None
    rate = (step - last_step) / max(now - last_t, 1e-9)
    message = f"{rate:.1f} steps/s"
    if self.num_train_steps:
      eta = (self.num_train_steps - step) / rate
      message += (f", {100 * step / self.num_train_steps:.1f}% "
                  f"({step}/{self.num_train_steps}), ETA {_format_secs(eta)}")
    logging.info("progress: %s", message)
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": rate,
                                       "uptime": now - self._t0})
    self._last = (step, now)
    return message
