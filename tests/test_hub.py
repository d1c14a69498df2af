"""Hub repo ids in hf.load, configs and the tokenizer, through huggingface_hub.

Everything runs against tests/fake_hub.py: a Hub stand-in on 127.0.0.1 with
the Hub's URL layout and headers, HF_ENDPOINT pointed at it and a fresh
HF_HUB_CACHE, so the real snapshot_download / hf_hub_download code paths run
(repo info, tree listing, HEAD with X-Repo-Commit / ETag, LFS redirects to a
"CDN" that must not see the token, the cache's blobs/snapshots/refs layout).
"""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from optconsist_jax.io import hf
from optconsist_jax.io import hf_layout
from optconsist_jax.io import hub
from optconsist_jax.io import weights
from fake_hub import FakeHub, Repo

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "hf")
TOKENIZER = os.path.join(os.path.dirname(os.path.dirname(hf.__file__)),
                         "data", "assets")
REPO = "tiny-org/tiny-llama"
TOKEN = "hf_test_token_123"
COMMIT = "a" * 40


def _tokenizer_bytes():
  with open(os.path.join(TOKENIZER, "tiny.model"), "rb") as f:
    return f.read()


def _model_repo(fixture="sharded", token=None):
  d = os.path.join(FIXTURES, fixture)
  files = {}
  for name in os.listdir(d):
    if name.endswith((".json", ".safetensors")):
      with open(os.path.join(d, name), "rb") as f:
        files[name] = f.read()
  files["tokenizer.model"] = _tokenizer_bytes()
  # What a real Llama repo also holds and hf.load must not download.
  files["pytorch_model.bin"] = b"\0" * 4096
  files["README.md"] = b"# tiny\n"
  files["original/consolidated.00.pth"] = b"\1" * 4096
  return Repo(files=files, commit=COMMIT, token=token)


@pytest.fixture
def env(tmp_path, monkeypatch):
  monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf_cache"))
  monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
  monkeypatch.delenv("HF_TOKEN", raising=False)
  monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
  monkeypatch.chdir(tmp_path)
  return monkeypatch


def test_parse_ref(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert hub.parse_ref("meta-llama/Llama-2-7b-hf") == hub.HubRef(
      "meta-llama/Llama-2-7b-hf", "main")
  assert hub.parse_ref("hf://org/m@v1.0") == hub.HubRef("org/m", "v1.0")
  assert hub.parse_ref("org/m@refs/pr/3").revision == "refs/pr/3"
  for local in ("llama-2-7b-hf", "/abs/org/m", "gs://b/org/m", "a/b/c",
                "ckpt.pt", "", "dir/tokenizer.model", "data/x.json"):
    assert hub.parse_ref(local) is None, local
  (tmp_path / "org" / "m").mkdir(parents=True)
  assert hub.parse_ref("org/m") is None  # an existing local path wins
  assert hub.parse_ref("hf://org/m") == hub.HubRef("org/m")
  with pytest.raises(hub.HubError, match="expected hf://org/name"):
    hub.parse_ref("hf://not a repo")


def test_load_from_hub_matches_transformers_and_downloads_only_needed(env):
  tokens = np.load(os.path.join(FIXTURES, "sharded", "tokens.npy"))
  expected = np.load(os.path.join(FIXTURES, "sharded", "logits.npy"))
  with FakeHub({("model", REPO): _model_repo(token=TOKEN)}) as server:
    env.setenv("HF_ENDPOINT", server.endpoint)
    env.setenv("HF_TOKEN", TOKEN)
    _, model = hf.load(f"{REPO}@main")
    # Only config, tokenizer and safetensors files came over the wire.
    assert server.count("GET", "pytorch_model.bin") == 0
    assert server.count("GET", "README.md") == 0
    assert server.count("GET", "consolidated") == 0
    # LFS: the six shards and tokenizer.model; config and index are git blobs.
    assert server.count("GET", "cdn:/blobs/") == 7
    assert server.cdn_auth_leaks == 0
    n_requests = len(server.requests)
    # A second load resolves the revision again but downloads nothing.
    hf.load(f"hf://{REPO}")
    assert server.count("GET", "cdn:/blobs/") == 7
    assert len(server.requests) > n_requests
  np.testing.assert_allclose(np.asarray(model(tokens)), expected, atol=1e-4)
  # The shared cache has the Hub client's layout.
  repo_dir = os.path.join(os.environ["HF_HUB_CACHE"],
                          "models--tiny-org--tiny-llama")
  with open(os.path.join(repo_dir, "refs", "main")) as f:
    assert f.read() == COMMIT
  snap = os.path.join(repo_dir, "snapshots", COMMIT)
  assert sorted(os.listdir(snap)) == sorted(
      ["config.json", "tokenizer.model", "model.safetensors.index.json"]
      + [f"model-0000{i}-of-00006.safetensors" for i in range(1, 7)])


def test_offline_uses_the_cache_and_fails_clearly_without_it(env):
  with FakeHub({("model", REPO): _model_repo()}) as server:
    env.setenv("HF_ENDPOINT", server.endpoint)
    folder = hub.model_dir(REPO)
  # Server gone; HF_HUB_OFFLINE=1 reads the cache.
  env.setenv("HF_HUB_OFFLINE", "1")
  assert hub.model_dir(REPO) == folder
  _, model = hf.load(REPO)
  expected = np.load(os.path.join(FIXTURES, "sharded", "logits.npy"))
  tokens = np.load(os.path.join(FIXTURES, "sharded", "tokens.npy"))
  np.testing.assert_allclose(np.asarray(model(tokens)), expected, atol=1e-4)
  with pytest.raises(hub.HubError) as e:
    hub.model_dir("tiny-org/never-downloaded")
  msg = str(e.value)
  assert "\n" not in msg
  assert "tiny-org/never-downloaded@main" in msg and "local cache" in msg


def _error_line(callable_):
  with pytest.raises(hub.HubError) as e:
    callable_()
  msg = str(e.value)
  assert "\n" not in msg, msg
  return msg


def test_hub_errors_are_one_clear_line(env):
  repos = {("model", REPO): _model_repo(),
           ("model", "gated/llama"): _model_repo(token=TOKEN),
           ("model", "org/bin-only"): Repo(files={
               "config.json": b'{"model_type": "llama"}',
               "pytorch_model.bin": b"\0" * 128})}
  with FakeHub(repos) as server:
    env.setenv("HF_ENDPOINT", server.endpoint)
    msg = _error_line(lambda: hf.load("tiny-org/no-such-repo"))
    assert "tiny-org/no-such-repo@main" in msg and "no such model repo" in msg
    assert "no such local path either" in msg
    msg = _error_line(lambda: hf.load(f"{REPO}@v9"))
    assert f"{REPO}@v9" in msg and "revision 'v9' not found" in msg
    msg = _error_line(lambda: hf.load("gated/llama"))
    assert "gated" in msg and "HF_TOKEN" in msg
    msg = _error_line(lambda: hub.download(hub.HubRef(REPO), "nope.json"))
    assert "no file nope.json" in msg and REPO in msg
    msg = _error_line(lambda: hf.load("org/bin-only"))
    assert "no *.safetensors" in msg


def test_tokenizer_from_the_model_repo(env):
  from optconsist_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  with FakeHub({("model", REPO): _model_repo()}) as server:
    env.setenv("HF_ENDPOINT", server.endpoint)
    path = hub.tokenizer_file(REPO)
    with open(path, "rb") as f:
      assert hashlib.sha256(f.read()).digest() == hashlib.sha256(
          _tokenizer_bytes()).digest()
    tok = pipeline.load_tokenizer(pipeline.DataConfig(
        format="metamathqa", path="x.json", tokenizer_path=REPO))
  assert tok.vocab_size == pipeline.load_tokenizer(pipeline.DataConfig(
      format="metamathqa", path="x.json")).vocab_size
  assert hub.tokenizer_file("local/tokenizer.model") == "local/tokenizer.model"


def _env_with_repo():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  path = [root] + [p for p in [os.environ.get("PYTHONPATH")] if p]
  return dict(os.environ, PYTHONPATH=os.pathsep.join(path))


def test_processes_sharing_a_cache_do_not_race(env, tmp_path):
  """Two processes resolve the same repo into one cache at once."""
  script = ("import sys; from optconsist_jax.io import hub;"
            " print(hub.model_dir(sys.argv[1]))")
  with FakeHub({("model", REPO): _model_repo()}) as server:
    env.setenv("HF_ENDPOINT", server.endpoint)
    procs = [subprocess.Popen([sys.executable, "-c", script, REPO],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env_with_repo())
             for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err
  folders = {out.strip().splitlines()[-1] for out, _ in outs}
  assert len(folders) == 1
  (folder,) = folders
  for name in os.listdir(folder):
    with open(os.path.join(folder, name), "rb") as f:
      assert f.read() == _model_repo().files[name], name


def test_train_init_from_hub_repo_with_from_init(env, tmp_path):
  """config.init_from.path = a Hub repo id: architecture and params from it."""
  from optconsist_jax.train import config as config_types  # pylint: disable=g-import-not-at-top
  from optconsist_jax import sharding  # pylint: disable=g-import-not-at-top
  from optconsist_jax.train import setup as train_setup  # pylint: disable=g-import-not-at-top
  import test_train  # pylint: disable=g-import-not-at-top
  with FakeHub({("model", REPO): _model_repo("gqa")}) as server:
    env.setenv("HF_ENDPOINT", server.endpoint)
    assert weights.kind_of(f"{REPO}@main") == "hf"
    cfg = test_train._config(**{"init_from.path": f"{REPO}@main",  # pylint: disable=protected-access
                                "model.preset": "from_init"})
    # from_init read only config.json so far.
    assert server.count("GET", "cdn:/blobs/") == 0
    with open(os.path.join(FIXTURES, "gqa", "config.json")) as f:
      want = hf_layout.config_from_hf(json.load(f))
    assert cfg.model == want.replace(
        **{k: getattr(cfg.model, k) for k in config_types.NUMERICS_KEYS})
    train_setup.preflight(cfg, sharding.make_mesh(cfg.mesh))
    params, how, _ = test_train._initial_params(cfg, tmp_path / "w")  # pylint: disable=protected-access
  assert how == f"initialized from Hugging Face repo {REPO}@main"
  test_train._assert_same_params(  # pylint: disable=protected-access
      params, hf.load(os.path.join(FIXTURES, "gqa"))[1])


def test_7b_config_defaults_to_a_pinned_hub_repo_and_its_tokenizer():
  import importlib.util  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location(
      "cfg7b", os.path.join(os.path.dirname(__file__), "..", "configs",
                            "llama2_7b_metamath.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  c = module.get_config("adamw")
  ref = hub.parse_ref(c.init_from.path)
  assert ref.repo_id == "meta-llama/Llama-2-7b-hf" and len(ref.revision) == 40
  assert c.data.tokenizer_path == c.init_from.path
  local = module.get_config("adamw,init=/ckpt/llama")
  assert local.data.tokenizer_path == "/ckpt/llama/tokenizer.model"
