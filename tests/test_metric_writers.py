"""optconsist_jax.metric_writers: event files TensorBoard reads, no TensorFlow."""

import logging as logging_std
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from optconsist_jax import metric_writers

REPO = pathlib.Path(__file__).resolve().parent.parent


def _read(logdir: pathlib.Path):
  """TensorBoard's own reader: tag -> [(step, value)], and the tag's plugin."""
  # deferred: the reader's gfile imports TensorFlow; only these tests need it.
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  acc = event_accumulator.EventAccumulator(
      str(logdir), size_guidance={event_accumulator.TENSORS: 0})
  acc.Reload()
  out = {}
  for tag in acc.Tags()["tensors"]:
    out[tag] = ([(e.step, tensor_util.make_ndarray(e.tensor_proto))
                 for e in acc.Tensors(tag)],
                acc.SummaryMetadata(tag).plugin_data.plugin_name)
  return out


def test_scalars_and_texts_read_back_through_tensorboard(tmp_path):
  w = metric_writers.MetricWriter(tmp_path / "metrics")
  w.write_scalars(1, {"loss": 2.5, "lr": 1e-3})
  w.write_scalars(2, {"loss": np.float64(1.25), "tokens": 7})
  w.write_texts(0, {"params_overview": "| a | b |\nü"})
  w.close()
  files = list((tmp_path / "metrics").glob("events.out.tfevents.*"))
  assert len(files) == 1, files
  got = _read(tmp_path / "metrics")
  assert [(s, float(v)) for s, v in got["loss"][0]] == [(1, 2.5), (2, 1.25)]
  assert got["loss"][1] == "scalars"
  assert [(s, float(v)) for s, v in got["lr"][0]] == [(1, np.float32(1e-3))]
  assert [(s, float(v)) for s, v in got["tokens"][0]] == [(2, 7.0)]
  (step, text), = got["params_overview"][0]
  assert step == 0 and got["params_overview"][1] == "text"
  assert text.item().decode() == "| a | b |\nü"


def test_a_flush_makes_the_records_readable_before_close(tmp_path):
  w = metric_writers.MetricWriter(tmp_path)
  w.write_scalars(3, {"x": 0.5})
  w.flush()
  assert [(s, float(v)) for s, v in _read(tmp_path)["x"][0]] == [(3, 0.5)]
  w.close()


def test_log_lines_match_clus_logging_writer_format(tmp_path, caplog):
  # clu.metric_writers.LoggingWriter.write_scalars: "[%d] k=v, ..." sorted,
  # floats with .6g, others with str().
  w = metric_writers.MetricWriter(None)  # No logdir: the log only.
  with caplog.at_level(logging_std.INFO):
    w.write_scalars(12, {"b": 1 / 3, "a": 3, "c": 1234567.0})
  assert "[12] a=3, b=0.333333, c=1.23457e+06" in caplog.text
  w.close()
  assert not list(tmp_path.iterdir())


def test_progress_reports_rate_and_eta_when_due():
  written = []

  class Sink:

    def write_scalars(self, step, scalars):
      written.append((step, scalars))

  p = metric_writers.Progress(num_train_steps=100, writer=Sink(),
                              every_secs=10.0)
  assert p(0, now=0.0) is None  # The origin.
  assert p(5, now=5.0) is None  # Not due yet.
  msg = p(20, now=11.0)  # 20 steps in 11 s.
  assert msg == "1.8 steps/s, 20.0% (20/100), ETA 0m44s"
  assert written[-1][0] == 20
  np.testing.assert_allclose(written[-1][1]["steps_per_sec"], 20 / 11)
  assert p(21, now=12.0) is None
  # The last step reports whenever it comes.
  assert p(100, now=13.0) == "40.0 steps/s, 100.0% (100/100), ETA 0m00s"


def test_progress_every_steps():
  p = metric_writers.Progress(num_train_steps=None, every_steps=4,
                              every_secs=None)
  p(0, now=0.0)
  assert [s for s in range(1, 13) if p(s, now=float(s))] == [4, 8, 12]


@pytest.mark.parametrize("module", ["optconsist_jax.train.loop",
                                    "optconsist_jax.evaluate.job"])
def test_training_and_evaluation_do_not_import_tensorflow(module, tmp_path):
  code = (f"import sys, {module}\n"
          "from optconsist_jax import metric_writers\n"
          f"w = metric_writers.MetricWriter({str(tmp_path)!r})\n"
          "w.write_scalars(1, {'x': 1.0}); w.close()\n"
          "bad = sorted(m for m in sys.modules if m.split('.')[0] in\n"
          "             ('tensorflow', 'keras'))\n"
          "assert not bad, bad[:5]\n")
  subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)
