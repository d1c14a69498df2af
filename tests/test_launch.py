"""The TPU launcher's command lines (dry run) and its run path with a fake gcloud."""

import io
import itertools
import os
import shlex
import stat
import subprocess
import sys
import tarfile

import pytest

from optconsist_jax.tools.launch import __main__ as launch
from optconsist_jax.platforms import tpu


def dry(*argv):
  out = io.StringIO()
  assert launch.main([*argv, "--dry-run"], out=out) == 0
  return out.getvalue().splitlines()


def ssh_script(line):
  """The --command=... value of a printed `gcloud ... ssh` line."""
  argv = shlex.split(line)
  assert argv[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]
  (cmd,) = [a for a in argv if a.startswith("--command=")]
  return argv, cmd[len("--command="):]


TARGET = ("--name=ft7b", "--zone=us-east5-a", "--project=my-proj")


# Cloud TPU "TPU software versions" table and gcloud accelerator spellings.
@pytest.mark.parametrize("given,canonical,version", [
    ("v4-32", "v4-32", "tpu-ubuntu2204-base"),
    ("v5p-16", "v5p-16", "v2-alpha-tpuv5"),
    ("v5e-32", "v5litepod-32", "v2-alpha-tpuv5-lite"),
    ("v5litepod-8", "v5litepod-8", "v2-alpha-tpuv5-lite"),
    ("v6e-16", "v6e-16", "v2-alpha-tpuv6e"),
    ("v3-8", "v3-8", "tpu-ubuntu2204-base"),
])
def test_create_command_per_generation(given, canonical, version):
  (line,) = dry("tpu", "create", *TARGET, f"--accelerator-type={given}")
  check, create = line.split(" >/dev/null 2>&1 || ")
  assert shlex.split(check) == [
      "gcloud", "compute", "tpus", "tpu-vm", "describe", "ft7b",
      "--zone=us-east5-a", "--project=my-proj"]
  assert shlex.split(create) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "ft7b",
      "--zone=us-east5-a", "--project=my-proj",
      f"--accelerator-type={canonical}", f"--version={version}"]


def test_create_queued_spot_and_best_effort():
  line, wait = dry("tpu", "create", *TARGET, "--accelerator-type=v5p-16",
                   "--queued", "--provisioning=spot", "--valid-until=6h",
                   "--no-reuse")
  assert shlex.split(wait)[:2] == ["bash", "-c"]
  assert "--format=value(state.state)" in wait and '!= ACTIVE' in wait
  assert shlex.split(line) == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "ft7b",
      "--node-id=ft7b", "--zone=us-east5-a", "--project=my-proj",
      "--accelerator-type=v5p-16", "--runtime-version=v2-alpha-tpuv5",
      "--spot", "--valid-until-duration=6h"]
  (line,) = dry("tpu", "create", *TARGET, "--accelerator-type=v6e-16",
                "--queued", "--provisioning=best-effort", "--no-wait")
  create = shlex.split(line.split(" || ")[1])
  assert create[:2] == ["gcloud", "alpha"] and create[-1] == "--best-effort"
  (line,) = dry("tpu", "create", *TARGET, "--accelerator-type=v4-32",
                "--provisioning=spot", "--no-reuse")
  assert shlex.split(line)[4] == "create" and shlex.split(line)[-1] == "--spot"


@pytest.mark.parametrize("states,rc", [("WAITING_FOR_RESOURCES ACTIVE", 0),
                                       ("PROVISIONING FAILED", 1)])
def test_queued_wait_loop_runs(tmp_path, states, rc):
  """The wait command, run in bash with a fake gcloud reporting states."""
  fake = tmp_path / "gcloud"
  counter = tmp_path / "n"
  counter.write_text("0")
  fake.write_text(
      "#!/bin/bash\n"
      f"n=$(cat {counter}); echo $((n+1)) > {counter}\n"
      f"s=({states}); echo ${{s[$n]:-ACTIVE}}\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  _, wait = dry("tpu", "create", *TARGET, "--accelerator-type=v5p-8",
                "--queued", f"--gcloud={fake}")
  script = shlex.split(wait)[2].replace("sleep 60", "true")
  result = subprocess.run(["bash", "-c", script], capture_output=True,
                          text=True, timeout=30, check=False)
  assert result.returncode == rc, result.stderr


@pytest.mark.parametrize("argv,message", [
    (("--accelerator-type=v5e-12",), "valid types: v2-"),
    (("--accelerator-type=v7-8",), "v6e-{1,4,8,16,32,64,128,256}"),
    (("--accelerator-type=v4-32", "--provisioning=best-effort"),
     "needs --queued"),
])
def test_bad_create_input_is_a_clear_error(argv, message, capsys):
  with pytest.raises(SystemExit):
    launch.main(["tpu", "create", *TARGET, *argv, "--dry-run"])
  assert message in capsys.readouterr().err


def test_unknown_accelerator_lists_every_generation():
  with pytest.raises(ValueError) as e:
    tpu.accelerator("tpu-16")
  for prefix in ("v2-", "v3-", "v4-", "v5p-", "v5litepod-", "v6e-"):
    assert prefix in str(e.value)


@pytest.mark.parametrize("name,chips,hosts", [
    # Cloud TPU docs: v4/v5p count TensorCores (2 per chip, 4 chips per host);
    # v5e/v6e count chips, up to 8 on one host, 4 per host in larger slices.
    ("v4-32", 16, 4), ("v5p-16", 8, 2), ("v5p-8", 4, 1),
    ("v5e-32", 32, 8), ("v5litepod-8", 8, 1), ("v6e-16", 16, 4),
    ("v3-8", 4, 1),
])
def test_slice_shapes(name, chips, hosts):
  acc = tpu.accelerator(name)
  assert (acc.chips, acc.num_hosts) == (chips, hosts)


def test_train_runs_on_all_workers_with_quoted_args():
  lines = dry("tpu", "train", *TARGET,
              "--config=configs/llama2_7b_metamath.py:muon,lr=2e-5",
              "--workdir=gs://bucket/runs/muon lr",
              "--set=optim.lr=3e-05", "--set", "name=it's",
              "--env=LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1")
  (line,) = lines
  argv, script = ssh_script(line)
  assert "--worker=all" in argv and "--project=my-proj" in argv
  assert "--zone=us-east5-a" in argv
  words = shlex.split(script)
  assert "nohup" in words
  assert "LIBTPU_INIT_ARGS=--xla_a=true --xla_b=1" in words
  i = words.index("optconsist_jax.train")
  assert words[i + 1:i + 5] == [
      "--config=configs/llama2_7b_metamath.py:muon,lr=2e-5",
      "--workdir=gs://bucket/runs/muon lr", "--config.optim.lr=3e-05",
      "--config.name=it's"]


def test_multi_host_train_needs_gs_workdir(capsys):
  with pytest.raises(SystemExit):
    launch.main(["tpu", "train", *TARGET, "--config=c.py", "--workdir=/tmp/w",
                 "--accelerator-type=v5p-16", "--dry-run"])
  assert "gs://" in capsys.readouterr().err
  # A single-host slice may keep its workdir on local disk.
  assert dry("tpu", "train", *TARGET, "--config=c.py", "--workdir=/tmp/w",
             "--accelerator-type=v5p-8")


def test_job_script_runs_in_bash(tmp_path):
  """Runs the remote script locally with a fake venv python that logs argv."""
  home = tmp_path / "home"
  (home / "optconsist_jax").mkdir(parents=True)
  py = home / "optconsist_venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  py.write_text('#!/bin/sh\necho "FOO=$FOO"\nfor a in "$@"; do echo "[$a]"; '
                'done\necho "cwd=$(pwd)"\n')
  py.chmod(py.stat().st_mode | stat.S_IEXEC)
  (line,) = dry("tpu", "eval", *TARGET, "--config=configs/x.py:a b",
                "--workdir=gs://b/w", "--env=FOO=1 2 'three'")
  _, script = ssh_script(line)
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}
  subprocess.run(["bash", "-c", script], env=env, check=True, timeout=30)
  pid_file = home / "optconsist_logs" / "eval.pid"
  assert pid_file.read_text().strip().isdigit()
  log = home / "optconsist_logs" / "eval.log"
  for _ in range(100):  # the job runs in the background
    if "cwd=" in (log.read_text() if log.exists() else ""):
      break
    subprocess.run(["sleep", "0.1"], check=True)
  assert log.read_text().splitlines() == [
      "FOO=1 2 'three'", "[-m]", "[optconsist_jax.evaluate]",
      "[--config=configs/x.py:a b]", "[--workdir=gs://b/w]",
      f"cwd={home}/optconsist_jax"]
  (stop,) = dry("tpu", "stop", *TARGET, "--job=eval")
  _, stop_script = ssh_script(stop)
  subprocess.run(["bash", "-c", stop_script], env=env, check=True, timeout=30)
  assert not pid_file.exists()


def test_install_from_checkout_copies_head_to_all_workers(tmp_path):
  repo = tmp_path / "repo"
  repo.mkdir()
  git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  (repo / "a.txt").write_text("hello")
  subprocess.run([*git, "add", "a.txt"], check=True)
  subprocess.run([*git, "commit", "-q", "-m", "x"], check=True)
  archive, scp, ssh = dry("tpu", "install", *TARGET, f"--source={repo}")
  # The archive command, run for real, packs the committed file.
  argv = shlex.split(archive)
  out = tmp_path / "src.tar.gz"
  argv[-2] = f"--output={out}"
  subprocess.run(argv, check=True)
  with tarfile.open(out) as tar:
    assert tar.getnames() == ["a.txt"]
  assert shlex.split(scp)[4:6] == [
      "scp", "/tmp/optconsist_jax-src.tar.gz"]
  assert "--worker=all" in shlex.split(scp)
  argv, script = ssh_script(ssh)
  assert "--worker=all" in argv
  assert '"$HOME/optconsist_jax[tpu]"' in script
  assert "--python 3.12" in script
  assert '-c "$HOME/optconsist_jax/constraints.txt"' in script


def test_install_defaults_to_this_checkout():
  """Without --source the checkout holding the package is archived."""
  archive = dry("tpu", "install", *TARGET)[0]
  argv = shlex.split(archive)
  import optconsist_jax  # pylint: disable=g-import-not-at-top
  checkout = os.path.dirname(os.path.dirname(os.path.abspath(
      optconsist_jax.__file__)))
  assert argv[:3] == ["git", "-C", checkout]
  assert os.path.isfile(os.path.join(argv[2], "pyproject.toml"))


def test_install_from_git_url_and_bad_source(capsys):
  (ssh,) = dry("tpu", "install", *TARGET,
               "--source=git+https://github.com/o/r.git@v1")
  _, script = ssh_script(ssh)
  words = shlex.split(script)
  i = words.index("--depth=1")
  assert words[i + 1:i + 3] == ["https://github.com/o/r.git", "v1"]
  assert "checkout -q -f FETCH_HEAD" in script
  with pytest.raises(SystemExit):
    launch.main(["tpu", "install", *TARGET, "--source=/nonexistent",
                 "--dry-run"])
  assert "--source='/nonexistent'" in capsys.readouterr().err


def test_host_eval_and_logs():
  (line,) = dry("host", "eval", "--host=me@gpu1", "--config=c.py:x",
                "--workdir=/data/run")
  argv = shlex.split(line)
  assert argv[:2] == ["ssh", "me@gpu1"] and "optconsist_jax.evaluate" in argv[2]
  (logs,) = dry("tpu", "logs", *TARGET)
  argv, script = ssh_script(logs)
  assert "--worker=0" in argv
  assert script == 'tail -n 100 -F "$HOME/optconsist_logs/train.log"'


def test_delete():
  assert shlex.split(dry("tpu", "delete", *TARGET)[0]) == [
      "gcloud", "compute", "tpus", "tpu-vm", "delete", "ft7b",
      "--zone=us-east5-a", "--project=my-proj", "--quiet"]
  assert shlex.split(dry("tpu", "delete", *TARGET, "--queued")[0]) == [
      "gcloud", "compute", "tpus", "queued-resources", "delete", "ft7b",
      "--zone=us-east5-a", "--project=my-proj", "--force", "--quiet"]


@pytest.mark.parametrize("exists", [True, False])
def test_real_run_reuses_an_existing_slice(tmp_path, exists):
  """Without --dry-run the commands run; `describe` succeeding skips create."""
  calls = tmp_path / "calls"
  fake = tmp_path / "gcloud"
  fake.write_text(
      f'#!/bin/sh\necho "$*" >> {calls}\n'
      f'case "$*" in *describe*) exit {0 if exists else 1};; esac\nexit 0\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  out = io.StringIO()
  rc = launch.main(["tpu", "create", *TARGET, "--accelerator-type=v4-8",
                    f"--gcloud={fake}"], out=out)
  assert rc == 0
  verbs = [line.split()[3] for line in calls.read_text().splitlines()]
  assert verbs == (["describe"] if exists else ["describe", "create"])


def test_real_run_stops_at_first_failure(tmp_path):
  fake = tmp_path / "gcloud"
  fake.write_text("#!/bin/sh\nexit 3\n")
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  rc = launch.main(["tpu", "delete", *TARGET, f"--gcloud={fake}"],
                   out=io.StringIO())
  assert rc == 3


def test_stage_copies_to_every_worker(capsys):
  (line,) = dry("tpu", "stage", *TARGET, "--src=gs://b/Llama 2/hf",
                "--dest=.")
  argv, script = ssh_script(line)
  assert "--worker=all" in argv
  words = shlex.split(script)
  assert words[-6:] == ["gcloud", "storage", "cp", "-r", "gs://b/Llama 2/hf",
                        "."]
  with pytest.raises(SystemExit):
    launch.main(["tpu", "stage", *TARGET, "--src=/local", "--dest=.",
                 "--dry-run"])
  assert "gs://" in capsys.readouterr().err


def test_fetch_downloads_on_every_worker_and_copies_the_token_by_scp(
    tmp_path, capsys):
  token = tmp_path / "token"
  token.write_text("hf_secret_value\n")
  lines = dry("tpu", "fetch", *TARGET, "--data=gsm8k,arc", "--dest=data",
              f"--hf-token-file={token}")
  assert len(lines) == 3
  scp = shlex.split(lines[0])
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert str(token) in scp and "--worker=all" in scp
  _, install = ssh_script(lines[1])
  assert '"$HOME/.cache/huggingface/token"' in install and "chmod 600" in install
  argv, script = ssh_script(lines[2])
  assert "--worker=all" in argv
  assert script.endswith("-m optconsist_jax.data.fetch gsm8k,arc data")
  assert not any("hf_secret_value" in line for line in lines)
  # Without a token file: only the fetch itself.
  (line,) = dry("tpu", "fetch", *TARGET, "--data=all")
  assert ssh_script(line)[1].endswith("optconsist_jax.data.fetch all .")
  for bad in ("--data=gsm8k;rm", "--dest=/abs", f"--hf-token-file={tmp_path}/x"):
    with pytest.raises(SystemExit):
      launch.main(["tpu", "fetch", *TARGET, "--data=gsm8k", bad, "--dry-run"])
  capsys.readouterr()


def test_7b_script_fetches_weights_and_data_itself(tmp_path):
  """launch/llama2_7b_metamath.sh with only a bucket, zone and accelerator."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, BUCKET="gs://bkt", ZONE="us-east5-a",
             ACCEL="v5p-16", DRY_RUN="1", PYTHON=sys.executable,
             HF_TOKEN_FILE=str(tmp_path / "none"))
  p = subprocess.run(["bash", os.path.join(root, "launch",
                                           "llama2_7b_metamath.sh")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 0, p.stderr
  out = p.stdout
  assert "optconsist_jax.data.fetch metamathqa ." in out
  assert "optconsist_jax.data.fetch gsm8k,hellaswag,arc,winogrande ." in out
  # Weights are no longer copied from the bucket; only the held-out text is.
  # (Copies from the bucket are stage's `cp -r`; the hang watchdog's
  # `gcloud storage cp` of stack dumps goes the other way, to the workdir.)
  stages = [l for l in out.splitlines() if "gcloud storage cp -r" in l]
  assert len(stages) == 1 and "gs://bkt/data/heldout_text.jsonl" in stages[0]
  assert "llama-2-7b-hf" not in out


SUPERVISE = ("tpu", "supervise", *TARGET, "--accelerator-type=v5p-8",
             "--queued", "--provisioning=spot",
             "--source=git+https://github.com/o/r.git",
             "--config=configs/tiny_metamath.py", "--workdir=/w",
             "--stage=gs://b/data=.", "--poll-secs=0.01")


_HANG = (
    # Logs a step as clu's LoggingWriter does, then hangs; SIGABRT prints a
    # stack the way faulthandler does, SIGTERM ends it.
    'echo "I1206 12:00:00.0 1 logging_writer.py:48] [5] loss=1.0"\n'
    'sleep 1000 & s=$!\n'
    "trap 'kill $s; echo \"Thread 0x0001 (most recent call first):\";"
    " echo \"  File loop.py, line 330 in run\"; exit 134' ABRT\n"
    "trap 'kill $s; exit 143' TERM\n"
    'wait $s; exit 99')


def _set_state(state, value):
  """Shell that replaces the fake slice's state file at once (a rename): a
  reader never sees it empty mid-write, which reads as a deleted slice."""
  return f'echo -n {value} > {state}.$$ && mv -f {state}.$$ {state}'


def _fake_cloud(tmp_path, exits, nodes=("ft7b",)):
  """A fake gcloud whose ssh runs the remote script locally in bash.

  The queued resource's state lives in a file (create: ACTIVE, delete: gone);
  ssh fails while the slice is not ACTIVE; the install script (pip, uv) and
  the stage copy are only recorded. Each node is a HOME of its own whose
  `hostname` is the node's name; `gcloud storage cp` copies gs://X to
  tmp_path/gcs/X. The venv's python is the job: its n-th run (over all
  nodes) exits with exits[n] ("gone": the slice is reclaimed under it, as a
  Spot preemption does, and it dies; "hang": see _HANG) and records its
  MEGASCALE_* variables in tmp_path/envs.
  """
  state, calls, runs = tmp_path / "state", tmp_path / "calls", tmp_path / "runs"
  state.write_text("")
  runs.write_text("")
  cases = "".join(
      f"  {i}) {_set_state(state, 'SUSPENDED') + '; exit 137' if e == 'gone' else _HANG if e == 'hang' else f'exit {e}'};;\n"
      for i, e in enumerate(exits))
  for node in nodes:
    home = tmp_path / "homes" / node
    (home / "optconsist_jax").mkdir(parents=True)
    py = home / "optconsist_venv" / "bin" / "python"
    py.parent.mkdir(parents=True)
    py.write_text(
        "#!/bin/bash\n"
        f'echo "$*" >> {runs}\n'
        f'echo "$(hostname) ${{MEGASCALE_SLICE_ID:-}} ${{MEGASCALE_NUM_SLICES:-}}'
        f' ${{MEGASCALE_COORDINATOR_ADDRESS:-}} $PYTHONFAULTHANDLER" >> {tmp_path}/envs\n'
        f"n=$(($(wc -l < {runs}) - 1))\n"
        "sleep 0.05\n"
        f'case $n in\n{cases}  *) exit 99;;\nesac\n')
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    host = tmp_path / "bin" / node / "hostname"
    host.parent.mkdir(parents=True)
    host.write_text(f"#!/bin/sh\necho {node}\n")
    host.chmod(0o755)
  fake = tmp_path / "gcloud"
  fake.write_text(
      "#!/bin/bash\n"
      f'echo "$*" >> {calls}\n'
      f's=$(cat {state})\n'
      'case "$*" in\n'
      f'  *"queued-resources create"*) {_set_state(state, "ACTIVE")};;\n'
      f'  *"queued-resources delete"*) {_set_state(state, "")};;\n'
      '  *"queued-resources describe"*)\n'
      '    [ -n "$s" ] || exit 1; case "$*" in *--format*) echo "$s";; esac;;\n'
      '  *"tpu-vm describe"*networkEndpoints*) echo 10.9.8.7;;\n'
      '  "storage cp "*) d={tmp_path}/gcs/${{4#gs://}}; mkdir -p "$(dirname "$d")";'
      ' cp "$3" "$d";;\n'
      '  *"tpu-vm ssh"*)\n'
      '    [ "$s" = ACTIVE ] || exit 255\n'
      '    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}";;'
      ' esac; done\n'
      '    case "$cmd" in *"pip install"*|*"gcloud storage cp -r"*) exit 0;; esac\n'
      f'    HOME={tmp_path}/homes/$5 PATH={tmp_path}/bin/$5:{tmp_path}:$PATH'
      ' bash -c "$cmd";;\n'
      'esac\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  return fake, calls, runs


def test_supervise_restarts_a_preempted_run(tmp_path):
  """Job exit 75 -> started again; slice reclaimed -> recreated, reinstalled,
  restaged and started again; exit 0 -> done."""
  fake, calls, runs = _fake_cloud(tmp_path, [75, "gone", 0])
  out = io.StringIO()
  rc = launch.main([*SUPERVISE, f"--gcloud={fake}"], out=out)
  assert rc == 0, out.getvalue()
  lines = runs.read_text().splitlines()
  assert len(lines) == 3  # Three runs of the same command (it resumes).
  assert all(line == ("-m optconsist_jax.train --config=configs/tiny_metamath.py"
                      " --workdir=/w") for line in lines)
  verbs = [" ".join(c.split()[2:5]) for c in calls.read_text().splitlines()]
  creates = [v for v in verbs if v == "queued-resources create ft7b"]
  deletes = [v for v in verbs if v == "queued-resources delete ft7b"]
  assert len(creates) == 2 and len(deletes) == 1
  text = out.getvalue()
  assert "preempted and saved (exit 75)" in text
  assert "is SUSPENDED (preempted): creating it again" in text
  assert "the job finished (exit 0)" in text
  # After the recreate the data was staged again before the job started.
  staged = [i for i, c in enumerate(calls.read_text().splitlines())
            if "gcloud storage cp" in c]
  assert len(staged) == 2


@pytest.mark.parametrize("code", [2, 3, 74])
def test_supervise_does_not_restart_a_failed_run(tmp_path, code):
  fake, _, runs = _fake_cloud(tmp_path, [code])
  out = io.StringIO()
  rc = launch.main([*SUPERVISE, f"--gcloud={fake}"], out=out)
  assert rc == code
  assert len(runs.read_text().splitlines()) == 1
  assert f"failed with exit code {code}; not restarting" in out.getvalue()


def test_supervise_gives_up_after_max_restarts(tmp_path):
  fake, _, runs = _fake_cloud(tmp_path, [75, 75, 75])
  out = io.StringIO()
  rc = launch.main([*SUPERVISE, f"--gcloud={fake}", "--max-restarts=1"],
                   out=out)
  assert rc == 75 and len(runs.read_text().splitlines()) == 2
  assert "gave up after 1 restarts" in out.getvalue()


def test_launcher_imports_without_jax():
  """launch/tpu.sh runs the launcher with a laptop's Python, often without jax."""
  code = ("import sys; sys.modules['jax'] = None; sys.modules['jaxlib'] = None;"
          " import optconsist_jax.tools.launch")
  p = subprocess.run([sys.executable, "-c", code], capture_output=True,
                     text=True, check=False,
                     cwd=os.path.dirname(os.path.dirname(
                         os.path.abspath(__file__))))
  assert p.returncode == 0, p.stderr[-2000:]


# ---------------------------------------------------------------------------
# Multislice, reserved capacity, every worker's status, the hang watchdog.

# The flags of each gcloud command the launcher uses (gcloud reference:
# `compute tpus tpu-vm create|describe|ssh|scp|delete`, `compute tpus
# queued-resources create|describe|delete`), so that a typo fails.
_LOCATION = {"--zone", "--project"}
GCLOUD_FLAGS = {
    ("tpu-vm", "create"): _LOCATION | {"--accelerator-type", "--version",
                                       "--spot", "--reserved"},
    ("tpu-vm", "describe"): _LOCATION | {"--format"},
    ("tpu-vm", "ssh"): _LOCATION | {"--worker", "--command"},
    ("tpu-vm", "scp"): _LOCATION | {"--worker"},
    ("tpu-vm", "delete"): _LOCATION | {"--quiet"},
    ("queued-resources", "create"): _LOCATION | {
        "--node-id", "--node-count", "--node-prefix", "--accelerator-type",
        "--runtime-version", "--reserved", "--spot", "--best-effort",
        "--valid-until-duration"},
    ("queued-resources", "describe"): _LOCATION | {"--format"},
    ("queued-resources", "delete"): _LOCATION | {"--force", "--quiet"},
}
_TIERS = {"--reserved", "--spot", "--best-effort"}
MULTI = ("--name=ms", "--zone=us-east5-a", "--project=my-proj",
         "--num-slices=2")


def _recording_gcloud(tmp_path):
  """A `gcloud` on PATH that records each argv (fields \\x1f, records \\x1e);
  queued resources are ACTIVE, nodes have an IP, nothing exists before."""
  rec = tmp_path / "argvs"
  bindir = tmp_path / "rec-bin"
  bindir.mkdir()
  (bindir / "gcloud").write_text(
      "#!/bin/bash\n"
      # One write per call: the multislice wrappers run gcloud for every
      # node at once, and separate writes of two calls would interleave.
      "r=; for a in \"$@\"; do r+=\"$a\"$'\\x1f'; done\n"
      f"printf '%s\\x1e' \"$r\" >> {rec}\n"
      'case "$*" in *"value(state.state)"*) echo ACTIVE;;'
      ' *networkEndpoints*) echo 10.0.0.2;; *describe*) exit 1;; esac\n')
  (bindir / "gcloud").chmod(0o755)
  return bindir, rec


def _run_lines(lines, bindir, tmp_path):
  """Runs printed dry-run lines in bash with the recording gcloud first."""
  env = dict(os.environ, PATH=f"{bindir}:{os.environ['PATH']}",
             HOME=str(tmp_path))
  for line in lines:
    if line.startswith("#") or line.startswith("git "):
      continue
    p = subprocess.run(["bash", "-c", line], env=env, capture_output=True,
                       text=True, timeout=60, check=False)
    assert p.returncode == 0, (line, p.stderr)


def _argvs(rec):
  return [r.split("\x1f")[:-1] for r in rec.read_text().split("\x1e")[:-1]]


def test_every_gcloud_command_uses_documented_flags(tmp_path):
  """Every gcloud argv the launcher runs (also inside its bash wrappers),
  recorded by a fake gcloud, has only its subcommand's documented flags."""
  bindir, rec = _recording_gcloud(tmp_path)
  token = tmp_path / "token"
  token.write_text("t")
  job = ("--config=c.py", "--workdir=gs://b/w")
  src = "--source=git+https://github.com/o/r.git"
  runs = [
      ("create", *TARGET, "--accelerator-type=v5p-16"),
      ("create", *TARGET, "--accelerator-type=v5p-16", "--provisioning=reserved"),
      ("create", *TARGET, "--accelerator-type=v5p-16", "--provisioning=spot"),
      ("create", *TARGET, "--accelerator-type=v5p-16", "--queued",
       "--provisioning=spot", "--valid-until=6h"),
      ("create", *TARGET, "--accelerator-type=v6e-16", "--queued",
       "--provisioning=best-effort"),
      ("create", *MULTI, "--accelerator-type=v5p-16", "--queued",
       "--provisioning=reserved"),
  ]
  for target in (TARGET, MULTI):
    runs += [
        ("install", *target, src),
        ("fetch", *target, "--data=gsm8k", f"--hf-token-file={token}"),
        ("stage", *target, "--src=gs://b/x", "--dest=."),
        ("train", *target, *job), ("eval", *target, *job),
        ("logs", *target, "--no-follow"), ("stop", *target),
        ("delete", *target, "--queued"),
        ("supervise", *target, "--accelerator-type=v5p-16", "--queued",
         "--provisioning=reserved", src, *job, "--stage=gs://b/d=."),
    ]
  runs.append(("delete", *TARGET))
  for argv in runs:
    _run_lines(dry("tpu", *argv), bindir, tmp_path)
  argvs = _argvs(rec)
  seen = set()
  for argv in argvs:  # gcloud's arguments
    words = argv[1:] if argv[0] == "alpha" else argv
    assert words[:2] == ["compute", "tpus"], argv
    key = tuple(words[2:4])
    assert key in GCLOUD_FLAGS, argv
    seen.add(key)
    flags = [w.split("=")[0] for w in words[4:] if w.startswith("--")]
    assert set(flags) <= GCLOUD_FLAGS[key], (argv, set(flags) - GCLOUD_FLAGS[key])
    assert len(flags) == len(set(flags)), argv
    assert len(_TIERS & set(flags)) <= 1, argv
    if key == ("queued-resources", "create"):
      # One node by id, or a count of nodes named by a prefix.
      assert ("--node-id" in flags) != ("--node-count" in flags), argv
      assert ("--node-prefix" in flags) == ("--node-count" in flags), argv
    positional = [w for w in words[4:] if not w.startswith("--")]
    assert len(positional) == (2 if key[1] == "scp" else 1), argv
  assert seen == set(GCLOUD_FLAGS)
  # The multislice commands reached both nodes.
  nodes = {a[4] for a in argvs if a[2:4] == ["tpu-vm", "ssh"]}
  assert {"ms-0", "ms-1", "ft7b"} <= nodes


def test_multislice_queued_resource_and_reserved_capacity(capsys):
  check, wait = dry("tpu", "create", *MULTI, "--accelerator-type=v5p-16",
                    "--queued", "--provisioning=reserved")
  create = shlex.split(check.split(" || ")[1])
  assert create == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "ms",
      "--node-count=2", "--node-prefix=ms", "--zone=us-east5-a",
      "--project=my-proj", "--accelerator-type=v5p-16",
      "--runtime-version=v2-alpha-tpuv5", "--reserved"]
  assert "--format=value(state.state)" in wait
  (line,) = dry("tpu", "create", *TARGET, "--accelerator-type=v4-32",
                "--provisioning=reserved", "--no-reuse")
  assert shlex.split(line)[4:6] == ["create", "ft7b"]
  assert shlex.split(line)[-1] == "--reserved"
  (line,) = dry("tpu", "create", *TARGET, "--accelerator-type=v4-32",
                "--queued", "--provisioning=reserved", "--no-wait")
  assert shlex.split(line.split(" || ")[1])[-1] == "--reserved"
  for argv in ((*MULTI, "--accelerator-type=v5p-16"),):
    with pytest.raises(SystemExit):
      launch.main(["tpu", "create", *argv, "--dry-run"])
    assert "needs --queued" in capsys.readouterr().err
  with pytest.raises(SystemExit):
    launch.main(["tpu", "delete", *MULTI, "--dry-run"])
  assert "--queued" in capsys.readouterr().err


def test_multislice_train_env_per_slice_and_dcn_mesh(tmp_path):
  """Runs the printed start line in bash: each node's ssh (fake gcloud that
  runs the remote script in that node's HOME) gets its slice's MEGASCALE_*
  and the `data` axis over DCN."""
  fake, calls, runs = _fake_cloud(tmp_path, [0, 0], nodes=("ms-0", "ms-1"))
  (tmp_path / "state").write_text("ACTIVE\n")
  (line,) = dry("tpu", "train", *MULTI, "--config=c.py",
                "--workdir=gs://b/w", f"--gcloud={fake}")
  subprocess.run(["bash", "-c", line], check=True, timeout=60)
  for _ in range(100):
    if len((tmp_path / "envs").read_text().splitlines()
           if (tmp_path / "envs").exists() else []) == 2:
      break
    subprocess.run(["sleep", "0.1"], check=True)
  envs = sorted((tmp_path / "envs").read_text().splitlines())
  # host, slice id, slices, coordinator (slice 0 worker 0's IP), faulthandler
  assert envs == ["ms-0 0 2 10.9.8.7:8080 1", "ms-1 1 2 10.9.8.7:8080 1"]
  assert runs.read_text().splitlines() == [
      "-m optconsist_jax.train --config=c.py --workdir=gs://b/w"
      " --config.mesh.dcn_data=2"] * 2
  describe = [c for c in calls.read_text().splitlines() if "describe" in c]
  assert describe and describe[0].split()[3:5] == ["describe", "ms-0"]
  # An explicit dcn_data wins; --no-megascale-env leaves them to Cloud TPU.
  (line,) = dry("tpu", "train", *MULTI, "--config=c.py", "--workdir=gs://b/w",
                "--set=mesh.dcn_data=1", "--no-megascale-env")
  assert "mesh.dcn_data=2" not in line and "MEGASCALE" not in line
  assert "ms-0" in line and "ms-1" in line
  with pytest.raises(SystemExit):  # two hosts: the workdir must be shared
    launch.main(["tpu", "train", *MULTI, "--config=c.py", "--workdir=/w",
                 "--accelerator-type=v5p-8", "--dry-run"])


@pytest.mark.parametrize("lines,workers,kind,code", [
    (["running 5", "running 5"], 2, "running", None),
    (["running 5", "exit:3 5"], 2, "failed", 3),
    (["exit:75 5", "running 5"], 2, "partial", None),
    (["exit:75 5", "exit:0 9"], 2, "preempted", 75),
    (["exit:0 9", "exit:0 9"], 2, "done", 0),
    (["none -", "exit:0 9"], 2, "none", None),
    (["running 5"], 2, "unreachable", None),
])
def test_job_state_over_every_worker(lines, workers, kind, code):
  from optconsist_jax.tools.launch import supervise  # pylint: disable=g-import-not-at-top
  stdout = "noise\n" + "".join(
      f"job-state host{i} {line}\n" for i, line in enumerate(lines))
  state = supervise.parse_job_state(stdout, workers)
  assert (state.kind, state.code) == (kind, code)


def test_status_script_reports_state_and_step_on_every_worker(tmp_path):
  """The status script, run in bash over a worker's log and pid files."""
  home = tmp_path / "home"
  logs = home / "optconsist_logs"
  logs.mkdir(parents=True)
  status = [l for l in dry("tpu", "supervise", *TARGET,
                           "--accelerator-type=v5p-8", "--config=c.py",
                           "--workdir=gs://b/w", "--job=eval",
                           "--source=git+https://x/y")
            if "job-state" in l]
  (status,) = status
  argv, script = ssh_script(status)
  assert "--worker=all" in argv
  env = {"HOME": str(home), "PATH": os.environ["PATH"]}
  sleeper = subprocess.Popen(["sleep", "60"])
  try:
    (logs / "eval.pid").write_text(f"{sleeper.pid}\n")
    (logs / "eval.log").write_text(
        "I1206 12:00:00 1 logging_writer.py:48] [12] loss=1.0\n"
        "I1206 12:00:09 1 logging_writer.py:48] [40] loss=0.9\nother\n")
    host = subprocess.run(["hostname"], capture_output=True, text=True,
                          check=True).stdout.strip()
    out = lambda: subprocess.run(["bash", "-c", script], env=env,  # noqa: E731
                                 capture_output=True, text=True, check=True,
                                 timeout=30).stdout.strip()
    assert out() == f"job-state {host} running 40"
    with (logs / "eval.log").open("a") as f:
      f.write("evaluating step 200 (gs://b/w/checkpoints/200)\nstep 200: ok\n"
              "waiting for new checkpoints in gs://b/w/checkpoints\n")
    assert out() == f"job-state {host} running 200 idle"
  finally:
    sleeper.kill()
    sleeper.wait()
  (logs / "eval.rc").write_text("75\n")
  assert out() == f"job-state {host} exit:75 200"
  (logs / "eval.rc").unlink()
  (logs / "eval.log").unlink()
  assert out() == f"job-state {host} none -"


@pytest.mark.parametrize("py_spy", [False, True])
def test_watchdog_saves_stacks_and_restarts_a_hung_job(tmp_path, py_spy):
  """A job that stops logging steps: after --hang-timeout every worker's
  stacks land in WORKDIR/hangs/TIME/HOST.txt (py-spy when installed, else
  faulthandler's dump on SIGABRT), the job is stopped and started again."""
  fake, _, runs = _fake_cloud(tmp_path, ["hang", 0])
  if py_spy:
    spy = tmp_path / "bin" / "ft7b" / "py-spy"
    spy.write_text('#!/bin/sh\necho "Thread $3 (idle): MainThread"\n'
                   'echo "    run (optconsist_jax/train/loop.py:330)"\n')
    spy.chmod(0o755)
  workdir = tmp_path / "w"
  out = io.StringIO()
  rc = launch.main(["tpu", "supervise", *TARGET, "--accelerator-type=v5p-8",
                    "--queued", "--source=git+https://github.com/o/r.git",
                    "--config=c.py", f"--workdir={workdir}",
                    "--poll-secs=0.05", "--hang-timeout=1",
                    f"--gcloud={fake}"], out=out)
  text = out.getvalue()
  assert rc == 0, text
  assert "no step progress for 1 s (newest step per worker: ft7b 5)" in text
  assert "the job finished (exit 0)" in text
  assert len(runs.read_text().splitlines()) == 2
  (stacks,) = (workdir / "hangs").glob("*/ft7b.txt")
  body = stacks.read_text()
  if py_spy:
    assert "run (optconsist_jax/train/loop.py:330)" in body
  else:
    assert "most recent call first" in body and "loop.py, line 330" in body
  # The hung process is gone: the restart did not race it.
  rc_file = tmp_path / "homes" / "ft7b" / "optconsist_logs" / "train.rc"
  assert rc_file.read_text().strip() == "0"


def test_watchdog_leaves_an_idle_eval_alone(tmp_path):
  """evaluate --watch waiting for checkpoints is not a hang."""
  from optconsist_jax.tools.launch import supervise  # pylint: disable=g-import-not-at-top
  states = iter(["job-state h running 5 idle"] * 5 + ["job-state h exit:0 5"])
  clock = itertools.count(0, 100)

  class Sup(supervise.Supervisor):
    def slice_state(self):
      return "ACTIVE"

    def job_state(self):
      return supervise.parse_job_state(next(states), 1)

    def _run(self, commands):
      self.ran = getattr(self, "ran", 0) + len(commands)
      return 0

  from optconsist_jax.tools.launch import gcloud  # pylint: disable=g-import-not-at-top
  target = gcloud.TpuTarget("ev", "us-east5-a")
  sup = Sup(target=target, spec=gcloud.SliceSpec(tpu.accelerator("v5p-8")),
            setup=[], start=[], status=target.ssh("true"), workers=1,
            hang_timeout=150, sleep=lambda s: None, clock=lambda: next(clock),
            out=io.StringIO(),
            collect=lambda where: pytest.fail("collected stacks"))
  assert sup.run() == 0
  assert "no step progress" not in sup.out.getvalue()


def test_multislice_supervise_reads_every_worker_and_restarts(tmp_path):
  """Two slices: the job is preempted (exit 75) on both -> started again on
  both (each with its MEGASCALE_*); done when every worker exited 0."""
  fake, calls, runs = _fake_cloud(tmp_path, [75, 75, 0, 0],
                                  nodes=("ms-0", "ms-1"))
  out = io.StringIO()
  rc = launch.main(["tpu", "supervise", *MULTI, "--accelerator-type=v5p-8",
                    "--queued", "--provisioning=reserved",
                    "--source=git+https://github.com/o/r.git",
                    "--config=c.py", "--workdir=gs://b/w", "--poll-secs=0.05",
                    f"--gcloud={fake}"], out=out)
  assert rc == 0, out.getvalue()
  assert "preempted and saved (exit 75)" in out.getvalue()
  assert len(runs.read_text().splitlines()) == 4
  creates = [c for c in calls.read_text().splitlines()
             if "queued-resources create" in c]
  assert len(creates) == 1 and "--node-count=2 --node-prefix=ms" in creates[0]
  assert "--reserved" in creates[0]
  hosts = sorted(l.split()[0] for l in (tmp_path / "envs").read_text()
                 .splitlines())
  assert hosts == ["ms-0", "ms-0", "ms-1", "ms-1"]


def test_7b_script_supervises_the_eval_slice_and_multislice(tmp_path):
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, BUCKET="gs://bkt", ZONE="us-east5-a",
             ACCEL="v5p-16", DRY_RUN="1", PYTHON=sys.executable, SLICES="2",
             PROVISIONING="reserved", HF_TOKEN_FILE=str(tmp_path / "none"))
  p = subprocess.run(["bash", os.path.join(root, "launch",
                                           "llama2_7b_metamath.sh")],
                     capture_output=True, text=True, env=env, timeout=120)
  assert p.returncode == 0, p.stderr
  polls = [l for l in p.stdout.splitlines() if l.startswith("# then every")]
  assert len(polls) == 2  # the eval slice and the training slices
  assert "ft-7b-adamw-eval" in polls[0] and "ft-7b-adamw " in polls[1]
  hangs = [l for l in p.stdout.splitlines() if l.startswith("# no new step")]
  assert len(hangs) == 2 and "gs://bkt/runs/7b-adamw/hangs/TIME/" in hangs[1]
  creates = [l for l in p.stdout.splitlines() if "queued-resources create" in l]
  assert len(creates) == 2
  assert "--node-count=2 --node-prefix=ft-7b-adamw " in creates[1]
  assert all("--reserved" in c for c in creates)
  assert "MEGASCALE_SLICE_ID=1" in p.stdout
  assert "optconsist_jax.evaluate" in p.stdout and "--watch" in p.stdout
