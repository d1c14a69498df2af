"""What runs on the workers: install, stage data, fetch datasets, start jobs.

Pure builders (settings in, `gcloud.Command`s out) for a `gcloud.Target`
(every host of a TPU slice, or one ssh host). Paths on a worker are relative
to the login user's $HOME (`Remote`). A job runs under nohup; its log, pid
and exit code land in `Remote.log_dir` (`<job>.log`, `<job>.pid`,
`<job>.rc`), which `job_status_command` (every worker's state and newest
step), `logs_commands`, `stop_job_commands` and `collect_stacks_commands`
(a hung job's Python stacks) read.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shlex

from optconsist_jax.tools.launch.gcloud import Command
from optconsist_jax.tools.launch.gcloud import COORDINATOR
from optconsist_jax.tools.launch.gcloud import Target

_SAFE_REMOTE = re.compile(r"[A-Za-z0-9._/-]+")


@dataclasses.dataclass(frozen=True)
class Remote:
  """Where things live on a worker, relative to the login user's $HOME."""

  repo_dir: str = "optconsist_jax"
  venv_dir: str = "optconsist_venv"
  log_dir: str = "optconsist_logs"
  python_version: str = "3.12"

  def __post_init__(self):
    for key in ("repo_dir", "venv_dir", "log_dir"):
      value = getattr(self, key)
      if not _SAFE_REMOTE.fullmatch(value) or value.startswith("/"):
        raise ValueError(
            f"--{key.replace('_', '-')}={value!r}: use a path relative to the"
            " worker's $HOME made of letters, digits, '._/-'")

  def home(self, path: str) -> str:
    return f'"$HOME/{path}"'

  @property
  def python(self) -> str:
    return self.home(f"{self.venv_dir}/bin/python")


@dataclasses.dataclass(frozen=True)
class JobSpec:
  """A training or eval program started on every worker under nohup.

  Attributes:
    module: python module to run (optconsist_jax.train / .evaluate).
    job: short name for the log and pid files (train, eval).
    config: `--config` value, a path relative to the repo plus `:arg`.
    workdir: where checkpoints and metrics go; gs:// for TPU slices.
    overrides: `key=value` pairs passed as `--config.key=value`.
    env: `KEY=VALUE` environment variables for the program.
    extra_args: further flags passed through verbatim.
  """

  module: str
  job: str
  config: str
  workdir: str
  overrides: tuple[str, ...] = ()
  env: tuple[str, ...] = ()
  extra_args: tuple[str, ...] = ()

  def __post_init__(self):
    if not self.config:
      raise ValueError("--config is required (e.g."
                       " configs/llama2_7b_metamath.py:adamw)")
    if not self.workdir:
      raise ValueError("--workdir is required")
    for o in self.overrides:
      if "=" not in o or o.startswith("="):
        raise ValueError(f"--set {o!r}: expected key=value")
    for e in self.env:
      if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", e, flags=re.S):
        raise ValueError(f"--env {e!r}: expected NAME=value")
    if not _SAFE_REMOTE.fullmatch(self.job):
      raise ValueError(f"job name {self.job!r}: letters, digits, '._-' only")

  def argv(self) -> list[str]:
    args = [f"--config={self.config}", f"--workdir={self.workdir}"]
    args += [f"--config.{o}" for o in self.overrides]
    return args + list(self.extra_args)


def _check_dest(dest: str) -> None:
  if not _SAFE_REMOTE.fullmatch(dest) or dest.startswith("/") or ".." in dest:
    raise ValueError(f"--dest={dest!r}: a path relative to the repo dir made of"
                     " letters, digits, '._/-'")


def source_archive_commands(source: str, archive: str) -> list[Command]:
  """Packs a local git checkout's HEAD into a tarball (committed files only)."""
  return [Command(("git", "-C", source, "archive", "--format=tar.gz",
                   f"--output={archive}", "HEAD"))]


def install_commands(target: Target, remote: Remote, source: str,
                     extras: str = "tpu",
                     archive: str = "/tmp/optconsist_jax-src.tar.gz"
                     ) -> list[Command]:
  """Installs the package with `extras` on every worker in its own venv.

  `source` is a local git checkout (its committed HEAD is copied as a
  tarball) or a `git+https://...[@ref]` URL cloned on the workers. Python
  `remote.python_version` comes from uv, so the image's system Python (3.10
  on the Ubuntu 22.04 TPU images) does not matter.
  """
  if not re.fullmatch(r"[a-z0-9_]+(,[a-z0-9_]+)*", extras):
    raise ValueError(f"--extras={extras!r}: comma-separated extra names")
  repo, venv = remote.home(remote.repo_dir), remote.home(remote.venv_dir)
  commands: list[Command] = []
  if source.startswith("git+"):
    url, _, ref = source[len("git+"):].partition("@")
    # init + fetch works in a non-empty dir, keeping files staged there.
    fetch = (f"git init -q {repo} && git -C {repo} fetch -q --depth=1"
             f" {shlex.quote(url)} {shlex.quote(ref or 'HEAD')}"
             f" && git -C {repo} checkout -q -f FETCH_HEAD")
  else:
    if not os.path.isdir(source):
      raise ValueError(f"--source={source!r} is neither a directory (a git"
                       " checkout) nor a git+https:// URL")
    commands += source_archive_commands(source, archive)
    commands.append(target.scp(archive, "optconsist_jax-src.tar.gz"))
    # Extract over the old tree: files staged into it (data, weights) stay.
    fetch = (f"mkdir -p {repo} && tar -xzf"
             f' "$HOME/optconsist_jax-src.tar.gz" -C {repo}')
  uv = '"$HOME/.local/bin/uv"'
  script = " && ".join([
      "set -e",
      "python3 -m pip install -q --user --upgrade uv",
      fetch,
      f"{uv} venv -q --allow-existing --python {remote.python_version} {venv}",
      # The exact versions the tests passed with (constraints.txt).
      f"{uv} pip install -q --python {remote.python}"
      f" -c {remote.home(f'{remote.repo_dir}/constraints.txt')}"
      f" {remote.home(f'{remote.repo_dir}[{extras}]')}",
      # On a slice this runs on every host at once, as JAX's pod check wants.
      f"{remote.python} -c 'import jax; print(jax.device_count())'",
  ])
  commands.append(target.ssh(script))
  return commands


def stage_commands(target: Target, remote: Remote, src: str,
                   dest: str) -> list[Command]:
  """Copies gs:// files or folders to `dest` under the repo dir on every worker.

  Hugging Face folders and the MetaMathQA / eval files are read from local
  disk (the Orbax workdir may stay on gs://).
  """
  if not src.startswith("gs://"):
    raise ValueError(f"--src={src!r}: expected a gs:// path")
  _check_dest(dest)
  repo = remote.home(remote.repo_dir)
  script = (f"mkdir -p {repo} && cd {repo} && gcloud storage cp -r"
            f" {shlex.quote(src)} {shlex.quote(dest)}")
  return [target.ssh(script)]


def fetch_commands(target: Target, remote: Remote, data: str, dest: str,
                   token_file: str | None = None) -> list[Command]:
  """Downloads datasets from the Hugging Face Hub on every worker.

  Runs `python -m optconsist_jax.data.fetch DATA DEST` in the repo dir (it
  keeps files already there, so staged data stays). With `token_file` (a
  local Hugging Face token file, e.g. ~/.cache/huggingface/token), copies it
  to each worker's ~/.cache/huggingface/token first, where huggingface_hub
  finds it: the jobs can then download gated model repos
  (meta-llama/Llama-2-7b-hf). The token travels by scp, never on a command
  line.
  """
  if not re.fullmatch(r"[a-z0-9]+(,[a-z0-9]+)*", data):
    raise ValueError(f"--data={data!r}: comma-separated dataset names (see"
                     " python -m optconsist_jax.data.fetch --help)")
  _check_dest(dest)
  commands: list[Command] = []
  if token_file:
    if not os.path.isfile(os.path.expanduser(token_file)):
      raise ValueError(f"--hf-token-file={token_file!r}: no such file (log in"
                       " with `hf auth login`, or leave the flag out)")
    commands.append(target.scp(os.path.expanduser(token_file),
                               "optconsist-hf-token"))
    commands.append(target.ssh(
        'mkdir -p "$HOME/.cache/huggingface" && mv "$HOME/optconsist-hf-token"'
        ' "$HOME/.cache/huggingface/token" && chmod 600'
        ' "$HOME/.cache/huggingface/token"'))
  repo = remote.home(remote.repo_dir)
  script = (f"mkdir -p {repo} && cd {repo} && {remote.python} -m"
            f" optconsist_jax.data.fetch {data} {shlex.quote(dest)}")
  commands.append(target.ssh(script))
  return commands


# The port of the multislice coordinator (libtpu's default, as XPK sets it).
MEGASCALE_PORT = 8080


def megascale_env(slice_id: int, num_slices: int) -> tuple[str, ...]:
  """The multislice (DCN) variables of slice `slice_id` for jax and libtpu.

  Cloud TPU writes the same four into each node's `tpu-env` metadata when it
  creates a multislice queued resource; jax (clusters/cloud_tpu_cluster.py)
  and libtpu read the environment first, so setting them makes the values
  the job runs with the launcher's: slice ids in node order, the coordinator
  on slice 0 worker 0 (`gcloud.COORDINATOR`, its IP looked up at start).
  """
  return (f"MEGASCALE_COORDINATOR_ADDRESS={COORDINATOR}:{MEGASCALE_PORT}",
          f"MEGASCALE_NUM_SLICES={num_slices}",
          f"MEGASCALE_SLICE_ID={slice_id}", f"MEGASCALE_PORT={MEGASCALE_PORT}")


def _start_script(remote: Remote, job: JobSpec,
                  extra_env: tuple[str, ...] = ()) -> str:
  log = remote.home(f"{remote.log_dir}/{job.job}.log")
  pid = remote.home(f"{remote.log_dir}/{job.job}.pid")
  rc = remote.home(f"{remote.log_dir}/{job.job}.rc")
  # PYTHONFAULTHANDLER: a SIGABRT (the hang watchdog without py-spy) prints
  # every thread's Python stack to the log (Python docs: faulthandler).
  env = " ".join(shlex.quote(e) if COORDINATOR not in e else e
                 for e in ("PYTHONFAULTHANDLER=1", *extra_env, *job.env))
  program = " ".join([remote.python, "-m", shlex.quote(job.module),
                      *(shlex.quote(a) for a in job.argv())])
  return (
      f"mkdir -p {remote.home(remote.log_dir)} && cd {remote.home(remote.repo_dir)}"
      f" && rm -f {rc} {pid} && ( trap '' HUP; nohup env {env}"
      f" {program} > {log} 2>&1 < /dev/null & echo $! > {pid}; wait $!;"
      f" echo $? > {rc} ) > /dev/null 2>&1 < /dev/null &"
      f" while [ ! -s {pid} ]; do sleep 0.1; done; echo started {shlex.quote(job.job)} pid $(cat {pid})"
      " on $(hostname)")


def start_job_commands(target: Target, remote: Remote, job: JobSpec,
                       megascale: bool = True) -> list[Command]:
  """Starts `job` on every worker under nohup; logs and pid in log_dir.

  The program's exit code lands in `<job>.rc` when it ends (`job_status`
  reads it): 0 finished, 75 preempted and saved (errors.PREEMPTED), ...
  On several slices each gets its `megascale_env` unless `megascale` is
  False (then Cloud TPU's `tpu-env` metadata provides them).
  """
  slices = getattr(target, "slices", 1)
  if slices == 1 or not megascale:
    return [target.ssh(_start_script(remote, job))]
  return [target.ssh_slices([
      _start_script(remote, job, megascale_env(i, slices))
      for i in range(slices)])]


# One line per worker: `job-state HOST STATE STEP [idle]`, STATE `running`,
# `exit:CODE` or `none`; STEP the newest step in the log (`-` if none); idle:
# running and waiting for input.
STATUS_PREFIX = "job-state"

# Step marks in a job's log: clu's LoggingWriter `] [STEP] loss=...` (train,
# every host) and lines starting `evaluating step N`, `step N` (evaluate) or
# `done: step N`; not the trainer's `resumed from ... at step N`, written
# before it compiles (the watchdog's startup_timeout applies until a step).
STEP_MARKS = r"\] \[[0-9]+\]|^(evaluating |done: )?step [0-9]+"
# evaluate --watch's line while it waits for the trainer (not a hang).
IDLE_LINE = "waiting for new checkpoints"


def job_status_command(target: Target, remote: Remote, job: str) -> Command:
  """Prints a `STATUS_PREFIX` line for the job on every worker."""
  pid = remote.home(f"{remote.log_dir}/{job}.pid")
  rc = remote.home(f"{remote.log_dir}/{job}.rc")
  log = remote.home(f"{remote.log_dir}/{job}.log")
  # A job that just ended may not have its .rc yet: wait up to 5 s for it.
  script = (f"if [ ! -f {rc} ] && [ -f {pid} ] && kill -0 $(cat {pid})"
            " 2>/dev/null; then s=running; else for i in $(seq 50); do"
            f" [ -f {rc} ] && break; sleep 0.1; done; if [ -f {rc} ]; then"
            f" s=exit:$(cat {rc}); else s=none; fi; fi;"
            f" n=$(tail -c 262144 {log} 2>/dev/null | grep -oE"
            f" {shlex.quote(STEP_MARKS)} | tail -n 1 | grep -oE '[0-9]+');"
            f" i=; [ $s = running ] && tail -n 1 {log} 2>/dev/null | grep -q"
            f" {shlex.quote('^' + IDLE_LINE)} && i=' idle';"
            f' echo "{STATUS_PREFIX} $(hostname) $s ${{n:--}}$i"')
  return target.ssh(script)


def stop_job_commands(target: Target, remote: Remote, job: str,
                      grace_secs: float | None = None) -> list[Command]:
  """Stops the job started by `start_job_commands`, by its recorded pid.

  With `grace_secs`: SIGTERM, then SIGKILL after that many seconds, then
  waits (up to 10 s) for the exit code, so that a new start cannot race the
  old job's `.rc`.
  """
  pid = remote.home(f"{remote.log_dir}/{job}.pid")
  if grace_secs is None:
    script = (f"if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null;"
              f" rm -f {pid}; fi; true")
    return [target.ssh(script)]
  rc = remote.home(f"{remote.log_dir}/{job}.rc")
  ticks = max(1, int(grace_secs * 10))
  script = (f"if [ -f {pid} ]; then p=$(cat {pid}); kill $p 2>/dev/null;"
            f" for i in $(seq {ticks}); do kill -0 $p 2>/dev/null || break;"
            " sleep 0.1; done; kill -9 $p 2>/dev/null; for i in $(seq 100); do"
            f" [ -f {rc} ] && break; sleep 0.1; done; rm -f {pid}; fi; true")
  return [target.ssh(script)]


def collect_stacks_commands(target: Target, remote: Remote, job: str,
                            dest: str) -> list[Command]:
  """Saves the job's Python stacks on every worker to `dest`/HOST.txt.

  `py-spy dump` (on PATH or in the venv; with sudo when ptrace needs it)
  leaves the job running; without py-spy, SIGABRT makes faulthandler
  (PYTHONFAULTHANDLER, set at start) print every thread's stack to the log
  and end the job, and the log's new bytes are saved. `dest` is a gs://
  folder (gcloud storage cp) or a path on the workers (relative: to the
  repo dir, as the job's workdir is).
  """
  if not (dest.startswith("gs://") or _SAFE_REMOTE.fullmatch(dest)):
    raise ValueError(f"stack folder {dest!r}: a gs:// path or a plain path")
  pid = remote.home(f"{remote.log_dir}/{job}.pid")
  log = remote.home(f"{remote.log_dir}/{job}.log")
  out = remote.home(f"{remote.log_dir}/{job}.stacks.txt")
  spy = remote.home(f"{remote.venv_dir}/bin/py-spy")
  to = shlex.quote(dest.rstrip("/"))
  copy = (f'gcloud storage cp {out} {to}/"$h.txt"' if dest.startswith("gs://")
          else f'mkdir -p {to} && cp {out} {to}/"$h.txt"')
  script = (
      f"cd {remote.home(remote.repo_dir)} 2>/dev/null; mkdir -p"
      f" {remote.home(remote.log_dir)}; h=$(hostname); p=$(cat {pid} 2>/dev/null);"
      f" spy=$(command -v py-spy || ls {spy} 2>/dev/null);"
      f' if [ -z "$p" ] || ! kill -0 "$p" 2>/dev/null; then'
      f' echo "no running {job} job on $h" > {out};'
      f' elif [ -n "$spy" ] && {{ "$spy" dump --pid "$p" ||'
      f' sudo -n "$spy" dump --pid "$p"; }} > {out} 2>&1; then :;'
      f" else b=$(stat -c %s {log} 2>/dev/null || echo 0);"
      f' kill -ABRT "$p"; for i in $(seq 100); do kill -0 "$p" 2>/dev/null ||'
      f" break; sleep 0.1; done; sleep 1; tail -c +$((b + 1)) {log} > {out};"
      f" fi; {copy} && echo \"stacks of $h -> {dest.rstrip('/')}/$h.txt\"")
  return [target.ssh(script)]


def logs_commands(target: Target, remote: Remote, job: str, follow: bool,
                  lines: int) -> list[Command]:
  """Prints the last `lines` of the job's log (and follows it)."""
  log = remote.home(f"{remote.log_dir}/{job}.log")
  flag = "-F" if follow else ""
  script = f"tail -n {int(lines)} {flag} {log}".replace("  ", " ")
  return [target.ssh(script)]
