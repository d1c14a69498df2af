"""The documentation's commands, run as a newcomer runs them: in a fresh clone.

The test reads every ```bash block of README.md and docs/*.md, clones this
checkout's HEAD into a temporary directory and runs each command there with
relative paths (`python` is the interpreter running the tests). Long jobs get
small overrides appended (absl and argparse let a later flag win) or their
mini mode; placeholders (W, DIR, ...) become relative paths. Each test asserts
the exit status and the outputs the documentation says the command writes. A
command no test runs is listed in NOT_RUN below with the reason;
`test_every_command_is_run_or_marked` fails on any other, and on a NOT_RUN
entry that no longer matches a command.

Commit before running: the clone is of HEAD, not of the working tree.
"""

from __future__ import annotations

import collections
import io
import json
import os
import pathlib
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zipfile

import numpy as np
import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
README_MAX_LINES = 250

# Commands of README.md and docs/*.md that no test here runs, by their first
# words (a command matches when it starts with the key's words), with why.
NOT_RUN = {
    "make test": "it is the suite this test belongs to; CI runs it",
    "make rehearsal":
        "the 4 x 2 rehearsal, minutes; tests/test_rehearsal.py runs README's"
        " smaller command of the same driver (RUN['rehearse'])",
    "make demo MODE=matrix":
        "about 2 h on a 2-core CPU (docs/reproduction.md);"
        " tests/test_reproduce.py runs matrix_mini and checks the runs it"
        " plans",
    "make demo MODE=causal":
        "a 47-minute study on a loaded 2-core CPU (docs/reproduction.md); its"
        " pieces run in tests/test_causal_study.py (causal_mini) and"
        " tests/test_base_optimizer_state.py",
    "make demo MODE=standard":
        "1 h 42 min on a 2-core CPU (docs/reproduction.md);"
        " tests/test_reproduce.py checks the runs it plans",
    "python -m optconsist_jax.experiments.reproduce":
        "needs your checkpoints; tests/test_reproduce.py runs it on an Orbax"
        " run and a Hugging Face folder",
    "XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu"
    " python -m optconsist_jax.tools.layouts":
        "tests/test_layouts.py runs this sweep on 8 CPU devices",
    "python -m optconsist_jax.data.fetch":
        "needs the Hub; tests/test_fetch.py covers it offline",
    "python3.11 -m venv .venv-fixtures":
        "set-up for a timed benchmark (the torch side)",
    ".venv-fixtures/bin/pip install torch==2.13.0 transformers":
        "torch wheel for Python 3.11 on the measuring machine's disk",
    ".venv/bin/python bench/model_throughput.py":
        "a timed benchmark, minutes",
    "JAX_PLATFORMS=cpu nice -n 19 .venv/bin/python -m"
    " optconsist_jax.tools.plan --compare --model llama2_7b":
        "minutes of AOT compiles per row; bench/results/families_plan_7b.md"
        " holds the output (test_plan_command_on_a_small_model runs the"
        " planner on a tiny model)",
    "BUCKET=gs://BUCKET ZONE=us-east5-a":
        "needs gcloud, a bucket and TPU quota; tests/test_llama2_7b_config.py"
        " runs the script with DRY_RUN=1 and checks that base= reaches both"
        " the training and the eval job",
}


# ---------------------------------------------------------------------------
# Parsing README.md and docs/*.md.


def doc_files() -> list[pathlib.Path]:
  """README.md and every docs/*.md page."""
  return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def doc_commands() -> list[tuple[str, list[str]]]:
  """(file, argv) of every command in the docs' ```bash blocks."""
  out = []
  for path in doc_files():
    text = path.read_text()
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
      for line in block.replace("\\\n", " ").splitlines():
        if not line.strip():
          continue
        code, _, _ = line.partition(" #")
        out.append((str(path.relative_to(REPO)), shlex.split(code)))
  return out


def _starts_with(argv: list[str], words: list[str]) -> bool:
  return argv[:len(words)] == words


TRAIN = ["python", "-m", "optconsist_jax.train"]
PLAN = ["python", "-m", "optconsist_jax.tools.plan"]

# Which commands the tests below run: each test picks its commands with one
# of these, and the completeness check uses the same ones.
RUN = {
    "demo": lambda a: a == ["make", "demo"],
    "train": lambda a: _starts_with(
        a, TRAIN + ["--config", "configs/tiny_metamath.py:adamw"]) and not any(
            x.startswith("--config.profile.steps=") for x in a),
    "train_profile": lambda a: _starts_with(a, TRAIN) and any(
        x.startswith("--config.profile.steps=") for x in a),
    "train_nanogpt": lambda a: _starts_with(a, TRAIN) and any(
        x.startswith("--config.init_from.path=") for x in a),
    "evaluate": lambda a: _starts_with(
        a, ["python", "-m", "optconsist_jax.evaluate"]),
    "report": lambda a: _starts_with(a, ["python", "-m", "optconsist_jax.report"]),
    "synthetic": lambda a: _starts_with(
        a, ["python", "-m", "optconsist_jax.data.synthetic"]),
    "tfds": lambda a: _starts_with(
        a, ["python", "-m", "optconsist_jax.data.tfds_builders"]),
    "launch": lambda a: _starts_with(a, ["launch/tpu.sh"]),
    "plan": lambda a: (_starts_with(a, PLAN) and "--search" not in a
                       and "--eval" not in a),
    "plan_eval": lambda a: _starts_with(a, PLAN) and "--eval" in a,
    "plan_search": lambda a: _starts_with(a, PLAN) and "--search" in a,
    # Run by tests/test_rehearsal.py (the pod rehearsal, end to end).
    "rehearse": lambda a: _starts_with(
        a, ["python", "-m", "optconsist_jax.tools.rehearse"]),
}


def commands(kind: str) -> list[list[str]]:
  """The docs' commands that RUN[kind] picks; at least one must exist."""
  found = [argv for _, argv in doc_commands() if RUN[kind](argv)]
  assert found, f"README.md and docs/ have no {kind} command"
  return found


def _without_optional(argv: list[str]) -> list[str]:
  """Drops the docs' optional `[...]` groups (the options they show stay)."""
  out = []
  for a in argv:
    a = a.strip("[]")
    if a and a != "...":
      out.append(a)
  return out


def _replace(argv: list[str], mapping: dict[str, str]) -> list[str]:
  """Replaces whole placeholders, also as `--flag=PLACEHOLDER` values."""
  out = []
  for a in argv:
    flag, eq, value = a.partition("=")
    if a in mapping:
      out.append(mapping[a])
    elif eq and value in mapping:
      out.append(f"{flag}={mapping[value]}")
    else:
      out.append(a)
  return out


# ---------------------------------------------------------------------------
# The clone and how commands run in it.


def user_env(environ) -> dict[str, str]:
  """The tests' environment as a user's shell has it: no fake devices, no
  platform choice (the commands pick their backend themselves). Only LLVM's
  optimization level stays at the suite's -O0 (tests/conftest.py): it
  halves compile time and changes no result (IEEE semantics at every level),
  and compiling is most of what these commands do on tiny models."""
  env = dict(environ)
  env.pop("JAX_PLATFORMS", None)
  env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"
  return env


def make_clone(root: pathlib.Path) -> tuple[pathlib.Path, dict[str, str]]:
  """A fresh clone of HEAD under `root`; `python` on PATH is this
  interpreter: (the clone, the environment its commands run in)."""
  work = root / "optconsist_jax"
  subprocess.run(["git", "clone", "-q", "--no-hardlinks", str(REPO),
                  str(work)], check=True)
  shim = root / "bin"
  shim.mkdir()
  # A script, not a symlink: a venv's python finds its site-packages only
  # when started by its own path.
  (shim / "python").write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
  (shim / "python").chmod(0o755)
  env = user_env(os.environ)
  env["PATH"] = f"{shim}{os.pathsep}{env.get('PATH', '')}"
  env["PYTHONPATH"] = str(work)
  # A home as after `hf auth login` (docs/cloud-tpu.md's fetch passes the token
  # file).
  home = root / "home"
  (home / ".cache" / "huggingface").mkdir(parents=True)
  (home / ".cache" / "huggingface" / "token").write_text("hf_test_token\n")
  env["HOME"] = str(home)
  return work, env


@pytest.fixture(scope="module")
def clone(tmp_path_factory):
  return make_clone(tmp_path_factory.mktemp("readme"))


def run(clone, argv: list[str], timeout: float = 900, *,
        loads_libtpu: bool = False) -> str:
  """Runs argv in the clone; asserts exit 0 and, unless the command loads
  libtpu on purpose (the planner), no TPU-runtime noise."""
  work, env = clone
  # $VAR as the user's shell expands it.
  argv = [re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), ""), a)
          for a in argv]
  p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True,
                     timeout=timeout)
  out = p.stdout + p.stderr
  assert p.returncode == 0, f"{shlex.join(argv)} exited {p.returncode}:\n" + (
      out[-4000:])
  for noise in ("unexpected worker hostname", "Failed to find host bounds"):
    assert loads_libtpu or noise not in out, (
        f"{shlex.join(argv)} printed {noise!r}")
  return out


def _venv() -> str:
  """The environment running the tests (make's VENV=; used as it is)."""
  return os.path.dirname(os.path.dirname(sys.executable))


# ---------------------------------------------------------------------------
# Tests, in the order of README.md and docs/.


def run_mini_demo(root: pathlib.Path) -> tuple[pathlib.Path, str]:
  """README's `make demo` in mini mode with a relative workdir, in a fresh
  clone under `root`: (the workdir, the command's output). The conftest's
  session fixture `mini_demo` runs it once for this file and
  tests/test_reproduce.py, whose mini_run tests read its workdir."""
  clone = make_clone(root)
  (demo,) = commands("demo")
  out = run(clone, demo + ["MODE=mini", "WORKDIR=workdirs/mini",
                           f"VENV={_venv()}"], timeout=1800)
  return clone[0] / "workdirs" / "mini", out


@pytest.mark.xdist_group("mini_run")
def test_demo_in_mini_mode_with_a_relative_workdir(mini_demo):
  w, out = mini_demo
  # README: W/report/ (per-base frontiers, all/, summary.md), fingerprints.
  for rel in ("report/adamw_base/pareto.png", "report/muon_base/pareto.svg",
              "report/adamw_base/pareto.md", "report/all/pareto.png",
              "report/summary.md", "fingerprints/spectra.png",
              "fingerprints/activations.png", "run_info.json"):
    assert (w / rel).stat().st_size > 0, rel
    assert str(w / rel) in out, f"the output listing misses {rel}"
  assert "Outputs:" in out


def test_train_resumes_then_evaluate_and_report(clone):
  """The training, eval and report commands on one relative workdir."""
  (train,) = commands("train")
  train = _replace(_without_optional(train), {"W": "runs/tiny"})
  small = ["--config.train.stats_every=0", "--config.checkpoint.every_steps=2",
           "--config.train.num_steps=40"]
  w = clone[0] / "runs" / "tiny"
  # Stopped (SIGTERM, as a preemption) once a checkpoint exists...
  work, env = clone
  proc = subprocess.Popen(train + small, cwd=work, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True)
  deadline = time.time() + 900
  while not (w / "checkpoints" / "2").is_dir() and proc.poll() is None:
    assert time.time() < deadline, "no checkpoint after 900 s"
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out = proc.communicate(timeout=900)[0]
  # 75: stopped by SIGTERM after saving (0 if it had already finished).
  assert proc.returncode in (0, 75), out[-3000:]
  assert "stopped by SIGTERM" in out or "done: step 40" in out, out[-2000:]
  # ... the same command resumes from the relative workdir's checkpoint.
  out = run(clone, train + small)
  assert "done: step 40" in out and str(w) in out
  assert f"resumed from {w / 'checkpoints'}" in out
  assert not list(w.rglob("*orbax-checkpoint-tmp*"))

  (evaluate,) = commands("evaluate")
  evaluate = [a for a in _replace(_without_optional(evaluate),
                                  {"W": "runs/tiny"})
              if a != "--watch"]
  # The 7B eval config needs the 7B data: the default (synthetic) one here.
  if "--config" in evaluate:
    i = evaluate.index("--config")
    del evaluate[i:i + 2]
  out = run(clone, evaluate + [
      "--config.math.limit=4", "--config.math.max_new_tokens=8",
      "--config.multiple_choice.limit=4", "--config.lm_loss.limit=2",
      "--config.lm_loss.max_len=64"])
  # One results object per evaluated checkpoint (evaluate/results.py).
  results = w / "eval" / "results"
  lines = [json.loads(p.read_text()) for p in results.glob("*.json")]
  steps = sorted(r["step"] for r in lines)
  assert steps and steps[-1] == 40, steps
  assert f"Results in {results}/" in out

  (report,) = commands("report")
  report = [a for a in report if a not in ("W2", "...")]
  out = run(clone, _replace(report, {"W1": "runs/tiny", "DIR": "plots"}))
  for name in ("pareto.png", "pareto.svg", "pareto.md"):
    assert (clone[0] / "plots" / name).stat().st_size > 0


def test_profile_command_writes_a_trace(clone):
  """The docs' profiling command, on a short run: a trace under W/profile."""
  (cmd,) = commands("train_profile")
  out = run(clone, _replace(cmd, {"W": "runs/profiled"}) + [
      "--config.train.num_steps=5", "--config.train.stats_every=0",
      "--config.checkpoint.every_steps=0"])
  w = clone[0] / "runs" / "profiled"
  assert "done: step 5" in out and str(w / "profile") in out
  xplanes = list((w / "profile" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert xplanes and all(p.stat().st_size > 0 for p in xplanes), xplanes


def test_data_commands(clone):
  (synthetic,) = commands("synthetic")
  run(clone, synthetic)
  out_dir = clone[0] / synthetic[-1]
  # The docs list the file names; the tfds builders read the same ones.
  text = "".join(p.read_text() for p in doc_files())
  for name in ("MetaMathQA-synthetic.json", "gsm8k_test.jsonl",
               "hellaswag_val.jsonl", "arc_challenge_test.jsonl",
               "winogrande_val.jsonl"):
    assert (out_dir / name).stat().st_size > 0
    assert name in text, name
  for build in commands("tfds"):
    out = run(clone, build)
    name, data_dir = build[3], clone[0] / build[5]
    assert f"optconsist_{name}" in out
    assert list((data_dir / f"optconsist_{name}").rglob("*.array_record*"))


class _Global:

  def __init__(self, module, name):
    self.module, self.name = module, name


class _Tensor:

  def __init__(self, key, shape):
    self.key, self.shape = key, tuple(shape)


class _StorageRef:

  def __init__(self, key, numel):
    self.key, self.numel = key, numel


class _TorchPickler(pickle._Pickler):  # pylint: disable=protected-access
  """torch.save's data.pkl for float32 tensors, written without torch."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def persistent_id(self, obj):
    if isinstance(obj, _StorageRef):
      return ("storage", _Global("torch", "FloatStorage"), obj.key, "cpu",
              obj.numel)
    return None

  def _save_global(self, obj):
    self.write(pickle.GLOBAL + f"{obj.module}\n{obj.name}\n".encode())

  def _save_tensor(self, t):
    stride = tuple(int(np.prod(t.shape[i + 1:])) for i in range(len(t.shape)))
    self.save(_Global("torch._utils", "_rebuild_tensor_v2"))
    self.save((_StorageRef(t.key, int(np.prod(t.shape))), 0, t.shape, stride,
               False, collections.OrderedDict()))
    self.write(pickle.REDUCE)

  dispatch[_Global] = _save_global
  dispatch[_Tensor] = _save_tensor


def widen_nanogpt(src, dst, vocab_size: int, block_size: int) -> None:
  """The nanoGPT fixture with more token and position rows (new rows random).

  The fixture (tests/make_nanogpt_fixture.py, written by torch) has 96 tokens
  and 32 positions; a GPT-2 byte-level tokenizer has at least 257 tokens and
  the docs' command uses 1,024 positions. Every other tensor, the tied
  wte/lm_head storage and the checkpoint's layout are kept.
  """
  from optconsist_jax.io import torch_pickle  # pylint: disable=g-import-not-at-top
  ckpt = torch_pickle.read_torch_checkpoint(src)
  rng = np.random.default_rng(0)
  records, by_record, state = {}, {}, {}
  for name, t in ckpt["model"].items():
    if t.storage.record not in by_record:
      a = t.numpy().astype("<f4")
      for part, n in (("wte.", vocab_size), ("lm_head.", vocab_size),
                      ("wpe.", block_size)):
        if part in name:
          extra = 0.02 * rng.standard_normal((n - a.shape[0], a.shape[1]))
          a = np.concatenate([a, extra.astype("<f4")])
      records[str(len(records))] = a
      by_record[t.storage.record] = _Tensor(str(len(records) - 1), a.shape)
    state[name] = by_record[t.storage.record]
  out = {"model": state,
         "model_args": {**ckpt["model_args"], "vocab_size": vocab_size,
                        "block_size": block_size},
         "iter_num": ckpt.get("iter_num", 0), "config": ckpt.get("config")}
  buf = io.BytesIO()
  _TorchPickler(buf, protocol=2).dump(out)
  with zipfile.ZipFile(dst, "w") as zf:
    zf.writestr("ckpt/data.pkl", buf.getvalue())
    zf.writestr("ckpt/byteorder", "little")
    zf.writestr("ckpt/version", "3\n")
    for key, a in records.items():
      zf.writestr(f"ckpt/data/{key}", a.tobytes())


def test_widened_nanogpt_fixture_keeps_the_model(tmp_path):
  """The widened file reads back with the original weights (torch-free check
  of the writer above: the first 96 logits are the fixture's own)."""
  from optconsist_jax.io import nanogpt  # pylint: disable=g-import-not-at-top
  fixtures = REPO / "tests" / "fixtures" / "nanogpt"
  wide = tmp_path / "ckpt.pt"
  widen_nanogpt(fixtures / "ckpt.pt", wide, vocab_size=320, block_size=1024)
  config = nanogpt.read_config(wide)
  assert (config.vocab_size, config.max_position_embeddings) == (320, 1024)
  assert config.tie_embeddings
  _, model = nanogpt.load_nanogpt(wide)
  tokens = np.load(fixtures / "tokens.npy")
  np.testing.assert_allclose(np.asarray(model(tokens))[..., :96],
                             np.load(fixtures / "logits.npy"),
                             rtol=1e-4, atol=1e-4)


def test_nanogpt_finetune_command(clone):
  """The docs' command, literally, on the nanoGPT fixture (widened) with a
  GPT-2-format tokenizer folder and a MetaMathQA file under its names."""
  work = clone[0]
  fixtures = REPO / "tests" / "fixtures" / "nanogpt"
  (cmd,) = commands("train_nanogpt")
  paths = dict(a.split("=", 1) for a in cmd if a.startswith("--config.")
               and a.split("=", 1)[0] in ("--config.init_from.path",
                                          "--config.data.tokenizer_path",
                                          "--config.data.path"))
  widen_nanogpt(fixtures / "ckpt.pt", work / paths["--config.init_from.path"],
                vocab_size=320, block_size=1024)
  tok_dir = work / paths["--config.data.tokenizer_path"]
  tok_dir.mkdir()
  for f in ("vocab.json", "merges.txt"):
    shutil.copy(fixtures / f, tok_dir / f)
  from optconsist_jax.data import synthetic  # pylint: disable=g-import-not-at-top
  train, _ = synthetic.make_splits(48, 4, 0)
  (work / paths["--config.data.path"]).write_text(
      json.dumps([synthetic.render_metamath(p) for p in train]))
  out = run(clone, _replace(cmd, {"W": "runs/nanogpt"}) + [
      "--config.train.num_steps=2", "--config.train.stats_every=0",
      "--config.data.global_batch_size=4"])
  assert "done: step 2" in out
  config = json.loads((work / "runs" / "nanogpt" / "config.json").read_text())
  assert config["model"]["vocab_size"] == 320
  assert config["init_from"]["path"] == str(work / "ckpt.pt")


def test_launch_commands_dry_run(clone):
  """The Cloud TPU commands need gcloud: each runs with --dry-run."""
  for cmd in commands("launch"):
    out = run(clone, cmd + ["--dry-run"], timeout=120)
    assert "gcloud compute tpus" in out, out


def test_plan_command_on_a_small_model(clone):
  """The planner command with a tiny model (the 7B compiles take
  minutes each): same meshes and optimizers, one of its topologies (each
  topology repeats every compile: tests/test_plan.py covers the others)."""
  pytest.importorskip("libtpu")
  (plan,) = commands("plan")
  topologies = "v5e-16"
  out = run(clone, plan + ["--model", "tiny_gqa", "--seq_len", "64",
                           "--global_batch", "64", "--topology", topologies],
            timeout=1200, loads_libtpu=True)
  # One table row per topology x mesh x optimizer the command names (the
  # last --topology wins, as absl parses flags).
  arg = {k: plan[plan.index(k) + 1] for k in ("--mesh", "--optimizer")}
  arg["--topology"] = topologies
  rows = [l for l in out.splitlines() if l.startswith("| v")]
  assert len(rows) == np.prod([len(v.split(",")) for v in arg.values()])
  for topology in arg["--topology"].split(","):
    assert any(l.startswith(f"| {topology} |") for l in rows), topology


def test_plan_eval_command_on_a_small_model(clone):
  """The eval plan with a tiny model (the 7B compiles take long): two of its
  programs, its table and verdict."""
  pytest.importorskip("libtpu")
  (cmd,) = commands("plan_eval")
  out = run(clone, cmd + ["--model", "tiny_gqa", "--only",
                          "lm_loss,probe_second_order"],
            timeout=1200, loads_libtpu=True)
  assert "| probe_second_order | probes |" in out, out
  assert "largest combined residency: " in out, out
  md = cmd[cmd.index("--markdown") + 1]
  assert (pathlib.Path(clone[0]) / md).exists()


def test_plan_search_command_on_a_small_model(clone):
  """The layout search with a tiny model: ranked rows, overrides."""
  pytest.importorskip("libtpu")
  (search,) = commands("plan_search")
  out = run(clone, search + ["--model", "tiny_gqa", "--seq_len", "64",
                             "--global_batch", "64", "--micro_batches", "1"],
            timeout=1200, loads_libtpu=True)
  assert "--config.mesh." in out, out
  md = search[search.index("--markdown") + 1]
  assert (pathlib.Path(clone[0]) / md).exists()


def test_every_command_is_run_or_marked():
  """Each command of README.md and docs/ is run above or listed in NOT_RUN
  (with why), not both; and every NOT_RUN entry still matches a command."""
  unmatched = set(NOT_RUN)
  for path, argv in doc_commands():
    ran = [kind for kind, picks in RUN.items() if picks(argv)]
    listed = [key for key in NOT_RUN if _starts_with(argv, shlex.split(key))]
    unmatched -= set(listed)
    where = f"{path}: {shlex.join(argv)!r}"
    assert ran or listed, (
        f"{where} is neither run by this test nor listed in its NOT_RUN")
    assert not (ran and listed), f"{where} is run ({ran}) and in NOT_RUN"
  assert not unmatched, f"NOT_RUN entries matching no command: {unmatched}"


def test_readme_is_short():
  lines = (REPO / "README.md").read_text().splitlines()
  assert len(lines) <= README_MAX_LINES, (
      f"README.md has {len(lines)} lines; at most {README_MAX_LINES}: move"
      " detail to docs/")


def test_relative_links_point_to_files():
  """Every relative link (and image) of README.md and docs/*.md resolves."""
  broken = []
  for path in doc_files():
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
        continue
      file, _, anchor = target.partition("#")
      dest = path.parent / file
      if not dest.exists():
        broken.append(f"{path.relative_to(REPO)}: {target}")
      elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
        broken.append(f"{path.relative_to(REPO)}: {target} (no such heading)")
  assert not broken, broken


def _anchors(path: pathlib.Path) -> set[str]:
  """GitHub's anchors for the headings of a markdown file."""
  text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-")
          for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}
