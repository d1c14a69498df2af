"""python -m optconsist_jax.data.fetch against a local fake Hub.

tests/fake_hub.py serves tiny versions of the five dataset repos, in the
published layouts (parquet with the Hub datasets' columns, MetaMathQA's JSON
list), at the commits fetch.SOURCES pins. The tests check what the readers
and tfds builders get, and that a wrong repo id, a missing file and a
checksum mismatch each end in one clear line (exit status 2).
"""

import dataclasses
import hashlib
import io
import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from optconsist_jax.data import fetch
from optconsist_jax.data import formats
from fake_hub import FakeHub, Repo

METAMATH = [
    {"type": "GSM_Rephrased", "query": "What is 2 + 3?",
     "original_question": "2 + 3?",
     "response": "2 + 3 = 5.\nThe answer is: 5"},
    {"type": "MATH_AnsAug", "query": "Compute 4 * 6.",
     "original_question": "4 * 6?", "response": "It is 24.\nThe answer is: 24"},
]
GSM8K_TRAIN = [{"question": "Tom has 3 apples and gets 4. How many?",
                "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
               {"question": "Half of 10?", "answer": "10 / 2 = 5\n#### 5"}]
GSM8K_TEST = [{"question": "Ann has 2 pens and buys 2. How many?",
               "answer": "2 + 2 = 4\n#### 4"}]
HELLASWAG = [{
    "ind": 24, "activity_label": "Roof shingle removal",
    "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
    "ctx": "A man is sitting on a roof. he",
    "endings": ["is using wrap to wrap a pair of skis.",
                "is ripping level tiles off.",
                "is holding a rubik's cube.",
                "starts pulling up roofing on a roof."],
    "source_id": "activitynet~v_-JhWjGDPHMY", "split": "val",
    "split_type": "indomain", "label": "3"}]
ARC = [{"id": "Mercury_7175875",
        "question": "An astronomer observes that a planet rotates faster"
                    " after a meteorite impact. Which is the most likely"
                    " effect of this increase in rotation?",
        "choices": {"text": ["Planetary density will decrease.",
                             "Planetary years will become longer.",
                             "Planetary days will become shorter.",
                             "Planetary gravity will become stronger."],
                    "label": ["A", "B", "C", "D"]},
        "answerKey": "C"},
       {"id": "Mercury_SC_409171", "question": "Which is a gas?",
        "choices": {"text": ["ice", "steam", "rock"],
                    "label": ["1", "2", "3"]},
        "answerKey": "2"}]
WINOGRANDE = [{"sentence": "Sarah was a much better surgeon than Maria so _"
                           " always got the harder cases.",
               "option1": "Sarah", "option2": "Maria", "answer": "1"},
              {"sentence": "The trophy didn't fit in the suitcase because _"
                           " was too big.",
               "option1": "trophy", "option2": "suitcase", "answer": "1"}]


def _parquet(rows):
  buf = io.BytesIO()
  pq.write_table(pa.Table.from_pylist(rows), buf)
  return buf.getvalue()


CONTENT = {
    ("metamathqa", "MetaMathQA-395K.json"): json.dumps(METAMATH).encode(),
    ("gsm8k", "main/train-00000-of-00001.parquet"): _parquet(GSM8K_TRAIN),
    ("gsm8k", "main/test-00000-of-00001.parquet"): _parquet(GSM8K_TEST),
    ("hellaswag", "data/validation-00000-of-00001.parquet"):
        _parquet(HELLASWAG),
    ("arc", "ARC-Challenge/test-00000-of-00001.parquet"): _parquet(ARC),
    ("winogrande", "winogrande_xl/validation-00000-of-00001.parquet"):
        _parquet(WINOGRANDE),
}
ROWS = {"MetaMathQA-395K.json": METAMATH, "gsm8k_train.jsonl": GSM8K_TRAIN,
        "gsm8k_test.jsonl": GSM8K_TEST, "hellaswag_val.jsonl": HELLASWAG,
        "arc_challenge_test.jsonl": ARC, "winogrande_val.jsonl": WINOGRANDE}


def _repos(content=CONTENT):
  repos = {}
  for name, source in fetch.SOURCES.items():
    files = {p: data for (n, p), data in content.items() if n == name}
    files["README.md"] = b"---\nlicense: mit\n---\n"
    repos[("dataset", source.repo_id)] = Repo(files=files,
                                              commit=source.revision)
  return repos


@pytest.fixture
def tiny_sources(monkeypatch, tmp_path):
  """SOURCES with the tiny files' row counts and sha256s (pinned where the
  real table pins one)."""
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  for name, source in list(fetch.SOURCES.items()):
    files = tuple(dataclasses.replace(
        f, rows=len(ROWS[f.out]),
        sha256=(hashlib.sha256(CONTENT[(name, f.path)]).hexdigest()
                if f.sha256 else None))
                  for f in source.files)
    monkeypatch.setitem(fetch.SOURCES, name,
                        dataclasses.replace(source, files=files))
  return monkeypatch


def test_table_is_complete_and_pinned_to_commits():
  assert set(fetch.NAMES) == {"metamathqa", "gsm8k", "hellaswag", "arc",
                              "winogrande"}
  outs = [f.out for s in fetch.SOURCES.values() for f in s.files]
  assert len(outs) == len(set(outs)) == 6
  for s in fetch.SOURCES.values():
    assert len(s.revision) == 40 and int(s.revision, 16) >= 0, s.revision
    assert s.reader in formats.READERS and s.provenance
    for f in s.files:
      assert f.sha256 is None or len(bytes.fromhex(f.sha256)) == 32


def test_fetch_all_writes_what_readers_and_eval_config_read(
    tiny_sources, tmp_path, capsys):
  out = tmp_path / "data"
  with FakeHub(_repos()) as server:
    tiny_sources.setenv("HF_ENDPOINT", server.endpoint)
    assert fetch.main(["all", str(out)]) == 0
    assert server.count("GET", "README.md") == 0
  printed = capsys.readouterr().out
  assert f"6 files in {out}" in printed
  # Exactly the rows published, field by field.
  for name, rows in ROWS.items():
    path = out / name
    if name.endswith(".json"):
      assert json.loads(path.read_text()) == rows
    else:
      assert [json.loads(l) for l in path.read_text().splitlines()] == rows
  # What the readers make of them (labels as lm-evaluation-harness defines).
  assert [r.answer for r in formats.read_metamathqa(out / "MetaMathQA-395K.json")] == ["5", "24"]
  assert [r.answer for r in formats.read_gsm8k(out / "gsm8k_train.jsonl")] == ["7", "5"]
  (hs,) = formats.read_hellaswag(out / "hellaswag_val.jsonl")
  assert hs.label == 3 and hs.contexts[0] == "Roof shingle removal: A man is sitting on a roof. He"
  assert [r.label for r in formats.read_arc(out / "arc_challenge_test.jsonl")] == [2, 1]
  assert [r.label for r in formats.read_winogrande(out / "winogrande_val.jsonl")] == [0, 0]
  # The eval config's data_dir names.
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "eval_cfg", os.path.join(os.path.dirname(__file__), "..", "configs",
                               "llama2_7b_metamath_eval.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config(f"data_dir={out}")
  for path in (c.math.test, c.math.train, *(c.multiple_choice[k] for k in (
      "hellaswag", "arc_challenge", "winogrande"))):
    assert os.path.isfile(path), path
  manifest = json.loads((out / fetch.MANIFEST).read_text())
  assert manifest["hellaswag_val.jsonl"] == {
      "repo": "Rowan/hellaswag", "revision": fetch.SOURCES["hellaswag"].revision,
      "path": "data/validation-00000-of-00001.parquet",
      "sha256": hashlib.sha256(CONTENT[("hellaswag", "data/validation-00000-of-00001.parquet")]).hexdigest()}


def test_rerun_keeps_files_and_never_overwrites_staged_data(
    tiny_sources, tmp_path, capsys):
  out = tmp_path / "data"
  out.mkdir()
  (out / "winogrande_val.jsonl").write_text("hand-staged\n")
  with FakeHub(_repos()) as server:
    tiny_sources.setenv("HF_ENDPOINT", server.endpoint)
    assert fetch.main(["gsm8k,winogrande", str(out)]) == 0
    gets = server.count("GET", "")
    assert fetch.main(["gsm8k", str(out)]) == 0
    assert server.count("GET", "") == gets  # nothing re-downloaded
  printed = capsys.readouterr().out
  assert "exists (not written by fetch); kept" in printed
  assert "already fetched" in printed
  assert (out / "winogrande_val.jsonl").read_text() == "hand-staged\n"


def _fails_with_one_line(argv, capsys):
  assert fetch.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("fetch: error: ") and "\n" not in err, err
  return err


def test_wrong_repo_id_missing_file_and_checksum_are_one_line(
    tiny_sources, tmp_path, capsys):
  out = str(tmp_path / "data")
  source = fetch.SOURCES["winogrande"]
  with FakeHub(_repos()) as server:
    tiny_sources.setenv("HF_ENDPOINT", server.endpoint)
    tiny_sources.setitem(fetch.SOURCES, "winogrande", dataclasses.replace(
        source, repo_id="allenai/winogrand"))
    err = _fails_with_one_line(["winogrande", out], capsys)
    assert "allenai/winogrand@01e74176" in err and "no such dataset repo" in err

    missing = dataclasses.replace(source.files[0], path="winogrande_xl/dev.parquet")
    tiny_sources.setitem(fetch.SOURCES, "winogrande", dataclasses.replace(
        source, files=(missing,)))
    err = _fails_with_one_line(["winogrande", out], capsys)
    assert "no file winogrande_xl/dev.parquet" in err

    arc = fetch.SOURCES["arc"]
    wrong = dataclasses.replace(arc.files[0], sha256="0" * 64)
    tiny_sources.setitem(fetch.SOURCES, "arc", dataclasses.replace(
        arc, files=(wrong,)))
    err = _fails_with_one_line(["arc", out], capsys)
    assert "ARC-Challenge/test-00000-of-00001.parquet" in err
    assert "differs from the pinned " + "0" * 64 in err

    tiny_sources.setitem(fetch.SOURCES, "arc", dataclasses.replace(
        arc, revision="f" * 40))
    err = _fails_with_one_line(["arc", out], capsys)
    assert "revision 'ffff" in err and "not found" in err

    err = _fails_with_one_line(["squad", out], capsys)
    assert "unknown dataset 'squad'" in err
  assert not os.path.exists(os.path.join(out, "arc_challenge_test.jsonl"))


def test_corrupt_cached_blob_and_bad_rows_are_caught(
    tiny_sources, tmp_path, capsys):
  out = tmp_path / "data"
  with FakeHub(_repos()) as server:
    tiny_sources.setenv("HF_ENDPOINT", server.endpoint)
    assert fetch.main(["winogrande", str(out)]) == 0
    # Corrupt the cached blob: the unpinned file is still checked against
    # the Hub's sha256 (the blob's name).
    cache = os.environ["HF_HUB_CACHE"]
    blobs = os.path.join(cache, "datasets--allenai--winogrande", "blobs")
    (blob,) = os.listdir(blobs)
    with open(os.path.join(blobs, blob), "ab") as f:
      f.write(b"x")
    err = _fails_with_one_line(["winogrande", str(out), "--force"], capsys)
    assert "differs from the Hub's " + blob in err
  # A published split with the wrong record count.
  source = fetch.SOURCES["gsm8k"]
  files = (dataclasses.replace(source.files[0], rows=7473),) + source.files[1:]
  tiny_sources.setitem(fetch.SOURCES, "gsm8k", dataclasses.replace(
      source, files=files))
  with FakeHub(_repos()) as server:
    tiny_sources.setenv("HF_ENDPOINT", server.endpoint)
    err = _fails_with_one_line(["gsm8k", str(tmp_path / "d2")], capsys)
  assert "2 records, the published split has 7473" in err
  assert not (tmp_path / "d2" / "gsm8k_train.jsonl").exists()


def test_tfds_builders_read_the_fetch_dir(tiny_sources, tmp_path):
  from optconsist_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  out = tmp_path / "data"
  with FakeHub(_repos()) as server:
    tiny_sources.setenv("HF_ENDPOINT", server.endpoint)
    assert fetch.main(["arc", str(out)]) == 0
  data_dir = str(tmp_path / "tfds")
  tfds_builders.build("arc", str(out), data_dir)
  assert tfds_builders.read("arc", "test", data_dir) == formats.read_arc(
      out / "arc_challenge_test.jsonl")


def test_command_line_exit_status_and_one_line(tmp_path):
  """The module as a program, in a fresh process (environment read there)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  with FakeHub({}) as server:  # a Hub without the repo
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, HF_ENDPOINT=server.endpoint,
               PYTHONPATH=os.pathsep.join(
                   [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
               HF_HUB_CACHE=str(tmp_path / "cache"),
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    env.pop("HF_HUB_OFFLINE", None)
    p = subprocess.run(
        [sys.executable, "-m", "optconsist_jax.data.fetch", "winogrande",
         str(tmp_path / "out")], capture_output=True, text=True, env=env,
        timeout=120)
  assert p.returncode == 2
  assert p.stderr.strip().splitlines()[-1] == (
      f"fetch: error: dataset allenai/winogrande@"
      f"{fetch.SOURCES['winogrande'].revision} ({server.endpoint}): no such"
      " dataset repo (check the id; a private repo also needs HF_TOKEN)")
