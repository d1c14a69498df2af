"""Every storage path on a bucket: gs:// against a local GCS emulator.

The commands run as a user runs them (`python -m ...`) with a gs:// workdir;
the emulator (tests/gcs_emulator.py) stands in for Cloud Storage, reached by
the real clients (gcsfs through etils.epath, TensorStore for Orbax's arrays).
What lands in the bucket is checked through google-cloud-storage, a client
the code under test does not use.
"""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import threading
import time

import jax.numpy as jnp
import numpy as np
import pytest

from gcs_emulator import running as emulator_running
from optconsist_jax import storage
from optconsist_jax.data import formats
from optconsist_jax.data import pipeline as data_lib
from optconsist_jax.data.tokenizer import Tokenizer
from optconsist_jax.evaluate import results
from optconsist_jax.io import checkpoint_layout as ckpt_lib
from optconsist_jax.io import hf
from optconsist_jax.io import weights

REPO = pathlib.Path(__file__).resolve().parent.parent
BUCKET = "optconsist-test"
RUN = f"gs://{BUCKET}/runs/tiny"
NUM_STEPS = 6
TRAIN = [sys.executable, "-m", "optconsist_jax.train", "--config",
         str(REPO / "configs" / "tiny_metamath.py") + ":adamw", "--workdir",
         RUN, "--config.data.synthetic_examples=120",
         "--config.data.seq_len=64",
         "--config.data.global_batch_size=8",
         f"--config.train.num_steps={NUM_STEPS}", "--config.train.log_every=1",
         "--config.train.stats_every=1", "--config.checkpoint.every_steps=1",
         "--config.train.progress_every_secs=1000"]
EVAL = [sys.executable, "-m", "optconsist_jax.evaluate", "--workdir", RUN,
        "--config.math.limit=2", "--config.math.max_new_tokens=4",
        "--config.multiple_choice.limit=2", "--config.lm_loss.limit=2",
        "--config.lm_loss.max_len=32"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The emulator, its env in this process (and so in every subprocess)."""
  with emulator_running(BUCKET) as env:
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    os.environ[storage.CACHE_ENV] = str(tmp_path_factory.mktemp("gcs_cache"))
    try:
      yield env
    finally:
      for k, v in old.items():
        if v is None:
          os.environ.pop(k, None)
        else:
          os.environ[k] = v
      os.environ.pop(storage.CACHE_ENV, None)


def _objects(prefix: str) -> dict[str, int]:
  """name -> size of the bucket's objects under prefix (another client)."""
  # pylint: disable-next=g-import-not-at-top
  from google.cloud import storage as gcs_client
  client = gcs_client.Client(project="test")
  return {b.name: b.size for b in client.list_blobs(BUCKET, prefix=prefix)}


def _run(argv, cwd, timeout=600):
  p = subprocess.run(argv, cwd=cwd, capture_output=True, text=True,
                     timeout=timeout)
  out = p.stdout + p.stderr
  assert p.returncode == 0, f"{argv[2]} exited {p.returncode}:\n{out[-4000:]}"
  return out


@pytest.fixture(scope="module")
def trained(gcs, tmp_path_factory):
  """The tiny run trained into the bucket: SIGTERM once a checkpoint is
  committed, then the same command resumes it to the end."""
  del gcs
  cwd = tmp_path_factory.mktemp("cwd")
  proc = subprocess.Popen(TRAIN, cwd=cwd, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  deadline = time.time() + 600
  while proc.poll() is None and not any(
      c.complete for c in ckpt_lib.list_checkpoints(RUN)):
    assert time.time() < deadline, "no checkpoint in the bucket after 600 s"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  first = proc.communicate(timeout=600)[0]
  # 75: stopped by SIGTERM after saving (a save every step keeps the run
  # from finishing before the signal).
  assert proc.returncode == 75, first[-4000:]
  second = _run(TRAIN, cwd)
  return cwd, first, second


def test_train_and_resume_in_a_bucket(trained):
  cwd, first, second = trained
  assert "stopped by SIGTERM" in first, first[-3000:]
  assert f"resumed from {RUN}/checkpoints" in second, second[-3000:]
  assert f"done: step {NUM_STEPS}" in second, second[-3000:]
  names = _objects("runs/tiny/")
  assert "runs/tiny/config.json" in names
  infos = ckpt_lib.list_checkpoints(RUN)
  assert infos and all(c.complete for c in infos)
  assert infos[-1].step == NUM_STEPS
  assert not any("orbax-checkpoint-tmp" in n for n in names)
  # Orbax's arrays (TensorStore) and its metadata (epath -> gcsfs).
  final = f"runs/tiny/checkpoints/{NUM_STEPS}/"
  assert any(n.startswith(final + "params/") and "ocdbt" in n for n in names)
  assert f"{final}meta/metadata" in names
  # TensorBoard events, copied up from a local folder.
  assert any(n.startswith("runs/tiny/metrics/events.out.tfevents")
             and size > 0 for n, size in names.items())
  # Nothing was written to a local path spelled like the URL.
  assert not (cwd / "gs:").exists() and os.listdir(cwd) == [], os.listdir(cwd)


@pytest.fixture(scope="module")
def evaluated(trained):
  """Two eval jobs at once on the bucket workdir (one of them --watch)."""
  cwd, _, _ = trained
  procs = [subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
           for argv in (EVAL, EVAL + ["--watch"])]
  outs = [p.communicate(timeout=600)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-4000:]
  return outs


def test_evaluate_and_report_on_a_bucket(trained, evaluated):
  cwd, _, _ = trained
  steps = [c.step for c in ckpt_lib.list_checkpoints(RUN)]
  for out in evaluated:
    assert f"Results in {RUN}/eval/results/ (one object per checkpoint)" in (
        out)
  assert f"final step {NUM_STEPS} evaluated; done" in evaluated[1]
  names = _objects("runs/tiny/eval/")
  for s in steps:
    assert f"runs/tiny/eval/results/step_{s:08d}.json" in names
    assert names[f"runs/tiny/eval/predictions/step_{s:08d}.jsonl"] > 0
  assert any(n.startswith("runs/tiny/eval/metrics/events") for n in names)
  assert any(n.startswith("runs/tiny/eval/data/") for n in names)
  # Both jobs evaluated every checkpoint: one record each, nothing lost.
  records = results.read_workdir(RUN)
  assert [r.step for r in records] == steps
  assert {r.run for r in records} == {"tiny"}
  # A second pass finds everything done.
  assert "nothing new to evaluate" in _run(EVAL, cwd)

  out = _run([sys.executable, "-m", "optconsist_jax.report", RUN, "--out",
              f"gs://{BUCKET}/report"], cwd)
  assert f"outputs in gs://{BUCKET}/report" in out
  report = _objects("report/")
  for name in ("pareto.png", "pareto.svg", "pareto.md"):
    assert report[f"report/{name}"] > 0, sorted(report)
  table = storage.read_text(f"gs://{BUCKET}/report/pareto.md")
  assert len([l for l in table.splitlines() if l.startswith("| tiny")]) == (
      len(steps))
  assert not (cwd / "gs:").exists()


def test_old_results_file_merges_with_objects(gcs):
  del gcs
  w = f"gs://{BUCKET}/runs/legacy"
  rec = lambda step, learning: results.EvalRecord(  # noqa: E731
      step=step, epoch=1.0, method="adamw", base="adamw", lr=1e-3,
      learning=learning, retention=0.5, checkpoint=f"{w}/checkpoints/{step}")
  storage.write_text(f"{w}/eval/results.jsonl",
                     rec(1, 0.1).to_json() + "\n" + rec(2, 0.2).to_json()
                     + "\n" + rec(3, 0.3).to_json()[:25])  # a torn last line
  results.write_record(w, rec(2, 0.25))
  results.write_record(w, rec(4, 0.4))
  got = {r.step: r.learning for r in results.read_workdir(w)}
  # Step 2 twice: its object wins over the old line; the torn step 3 is lost.
  assert got == {1: 0.1, 2: 0.25, 4: 0.4}


def test_two_record_writers_lose_nothing_and_duplicate_nothing(gcs):
  """Records written at once by two writers, some steps by both."""
  del gcs
  w = f"gs://{BUCKET}/runs/concurrent"
  steps_a, steps_b = range(0, 12), range(6, 18)

  def writer(steps, who):
    for s in steps:
      results.write_record(w, results.EvalRecord(
          step=s, epoch=float(s), method="adamw", base="adamw", lr=1e-3,
          learning=s / 100, retention=-s / 100, checkpoint=f"ckpt/{s}",
          settings={"writer": who}))

  threads = [threading.Thread(target=writer, args=(steps_a, "a")),
             threading.Thread(target=writer, args=(steps_b, "b"))]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  records = results.read_workdir(w)
  assert [r.step for r in records] == list(range(18))
  assert all(r.learning == r.step / 100 for r in records)
  assert len(_objects("runs/concurrent/eval/results/")) == 18


def test_data_and_tokenizer_from_a_bucket(gcs, tmp_path):
  del gcs
  tok_local = Tokenizer.tiny().path
  storage.upload(tok_local, f"gs://{BUCKET}/tok/tokenizer.model")
  tok = data_lib.load_tokenizer(data_lib.DataConfig(
      format="synthetic", tokenizer_path=f"gs://{BUCKET}/tok/tokenizer.model"))
  text = "Natalia sold 48 clips in April."
  assert tok.encode(text) == Tokenizer.tiny().encode(text)

  rows = [{"question": f"What is {i} + 1?", "answer": f"so\n#### {i + 1}"}
          for i in range(3)]
  local = tmp_path / "gsm8k.jsonl"
  local.write_text("".join(json.dumps(r) + "\n" for r in rows))
  storage.upload(local, f"gs://{BUCKET}/data/gsm8k.jsonl")
  assert (formats.read_gsm8k(f"gs://{BUCKET}/data/gsm8k.jsonl")
          == formats.read_gsm8k(str(local)))
  storage.write_text(f"gs://{BUCKET}/data/docs.txt", "one doc\n\nand two\n")
  assert formats.read_text(f"gs://{BUCKET}/data/docs.txt") == ["one doc",
                                                               "and two"]
  with pytest.raises(FileNotFoundError, match="data file not found"):
    formats.read_gsm8k(f"gs://{BUCKET}/data/missing.jsonl")


def test_hf_weights_from_a_bucket(gcs, tmp_path):
  del gcs
  # Sharded: an index and the shards it lists.
  fixture = REPO / "tests" / "fixtures" / "hf" / "sharded"
  remote = f"gs://{BUCKET}/hf/sharded"
  storage.upload_dir(fixture, remote)
  assert weights.kind_of(remote) == "hf"
  tokens = jnp.asarray(np.load(fixture / "tokens.npy"), jnp.int32)
  _, local_model = hf.load(str(fixture))
  _, bucket_model = hf.load(remote)
  want = np.asarray(local_model(tokens))
  np.testing.assert_array_equal(np.asarray(bucket_model(tokens)), want)
  # And transformers' own logits, which the fixture holds.
  np.testing.assert_allclose(want, np.load(fixture / "logits.npy"),
                             atol=1e-4, rtol=0)
  # Written to a bucket folder and read back: the same model.
  config, model = hf.load(remote)
  hf.save(config, model, f"gs://{BUCKET}/hf/saved")
  _, again = hf.load(f"gs://{BUCKET}/hf/saved")
  np.testing.assert_array_equal(np.asarray(again(tokens)), want)
  shutil.rmtree(tmp_path, ignore_errors=True)
