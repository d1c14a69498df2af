"""paths.resolve / resolve_keys: what a command line turns into an absolute path."""

import os

from optconsist_jax import paths


def test_relative_paths_become_absolute_urls_stay(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert paths.resolve("runs/a/../b") == os.path.join(str(tmp_path), "runs",
                                                      "b")
  assert paths.resolve("~/x") == os.path.join(os.path.expanduser("~"), "x")
  for keep in ("gs://bucket/run", "s3://b/k", "", None):
    assert paths.resolve(keep) == keep
  # A workdir that looks like org/name is still a local directory.
  assert paths.resolve("runs/tiny") == str(tmp_path / "runs" / "tiny")


def test_config_keys_keep_hub_refs_and_source_words(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "local").mkdir()
  (tmp_path / "local" / "model").mkdir()
  config = {"data": {"path": "d/train.json", "tokenizer_path": "",
                     "seq_len": 8},
            "init_from": {"path": "meta-llama/Llama-2-7b-hf@main"},
            "math": {"test": "synthetic"}, "base_model": "local/model"}
  out = paths.resolve_keys(config, ("data.path", "data.tokenizer_path",
                                    "data.cache_dir", "init_from.path",
                                    "math.test", "base_model", "absent.key"),
                           keep=("synthetic",))
  assert out["data"] == {"path": str(tmp_path / "d" / "train.json"),
                         "tokenizer_path": "", "seq_len": 8}
  assert out["init_from"]["path"] == "meta-llama/Llama-2-7b-hf@main"
  assert out["math"]["test"] == "synthetic"
  # An existing local folder of the same shape as a repo id is local.
  assert out["base_model"] == str(tmp_path / "local" / "model")
  assert config["data"]["path"] == "d/train.json"  # input not modified
