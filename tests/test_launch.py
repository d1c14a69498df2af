"""The TPU launcher's command lines (dry run) and its run path with a fake gcloud."""

import io
import os
import shlex
import stat
import subprocess
import sys
import tarfile

import pytest

from optconsist_jax.tools.launch import __main__ as launch
from optconsist_jax import platforms as tpu


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
  stages = [l for l in out.splitlines() if "gcloud storage cp" in l]
  assert len(stages) == 1 and "gs://bkt/data/heldout_text.jsonl" in stages[0]
  assert "llama-2-7b-hf" not in out


SUPERVISE = ("tpu", "supervise", *TARGET, "--accelerator-type=v5p-8",
             "--queued", "--provisioning=spot",
             "--source=git+https://github.com/o/r.git",
             "--config=configs/tiny_metamath.py", "--workdir=/w",
             "--stage=gs://b/data=.", "--poll-secs=0.01")


def _fake_cloud(tmp_path, exits):
  """A fake gcloud whose ssh runs the remote script locally in bash.

  The queued resource's state lives in a file (create: ACTIVE, delete: gone);
  ssh fails while the slice is not ACTIVE; the install script (pip, uv) is
  only recorded. The venv's python is the training job: its n-th run exits
  with exits[n] ("gone": the slice is reclaimed under it, as a Spot
  preemption does, and it dies).
  """
  home = tmp_path / "home"
  (home / "optconsist_jax").mkdir(parents=True)
  state, calls, runs = tmp_path / "state", tmp_path / "calls", tmp_path / "runs"
  state.write_text("")
  runs.write_text("")
  py = home / "optconsist_venv" / "bin" / "python"
  py.parent.mkdir(parents=True)
  cases = "".join(
      f"  {i}) {'echo SUSPENDED > ' + str(state) + '; exit 137' if e == 'gone' else f'exit {e}'};;\n"
      for i, e in enumerate(exits))
  py.write_text(
      "#!/bin/bash\n"
      f'echo "$*" >> {runs}\n'
      f"n=$(($(wc -l < {runs}) - 1))\n"
      "sleep 0.05\n"
      f'case $n in\n{cases}  *) exit 99;;\nesac\n')
  fake = tmp_path / "gcloud"
  fake.write_text(
      "#!/bin/bash\n"
      f'echo "$*" >> {calls}\n'
      f's=$(cat {state})\n'
      'case "$*" in\n'
      '  *"queued-resources create"*) echo ACTIVE > ' f'{state};;\n'
      '  *"queued-resources delete"*) echo -n > ' f'{state};;\n'
      '  *"queued-resources describe"*)\n'
      '    [ -n "$s" ] || exit 1; case "$*" in *--format*) echo "$s";; esac;;\n'
      '  *"tpu-vm ssh"*)\n'
      '    [ "$s" = ACTIVE ] || exit 255\n'
      '    for a in "$@"; do case "$a" in --command=*) cmd="${a#--command=}";;'
      ' esac; done\n'
      '    case "$cmd" in *"pip install"*|*"gcloud storage"*) exit 0;; esac\n'
      f'    HOME={home} bash -c "$cmd";;\n'
      'esac\n')
  fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
  py.chmod(py.stat().st_mode | stat.S_IEXEC)
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
