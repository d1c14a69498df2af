"""Cloud TPU VM launcher: create a slice, install, train, evaluate, logs, delete.

Every subcommand builds a list of shell commands (argv lists) first and then
runs them one by one, stopping at the first failure; with `--dry-run` it
prints them instead, one per line, quoted so that pasting the line into a
shell runs exactly that argv. Tests check these lines.

    python -m optconsist_jax.tools.launch tpu create --name=ft7b --zone=us-east5-a \
        --accelerator-type=v5p-16 --dry-run
    python -m optconsist_jax.tools.launch tpu install --name=ft7b --zone=us-east5-a
    python -m optconsist_jax.tools.launch tpu fetch --name=ft7b --zone=us-east5-a \
        --data=metamathqa --hf-token-file=~/.cache/huggingface/token
    python -m optconsist_jax.tools.launch tpu stage --name=ft7b --zone=us-east5-a \
        --src=gs://BUCKET/llama-2-7b-hf --dest=.
    python -m optconsist_jax.tools.launch tpu train --name=ft7b --zone=us-east5-a \
        --config=configs/llama2_7b_metamath.py:adamw \
        --workdir=gs://BUCKET/runs/adamw
    python -m optconsist_jax.tools.launch tpu eval --name=ft7b-eval ...
    python -m optconsist_jax.tools.launch tpu logs --name=ft7b --zone=us-east5-a
    python -m optconsist_jax.tools.launch tpu delete --name=ft7b --zone=us-east5-a

Multi-host: `gcloud compute tpus tpu-vm ssh --worker=all` starts the same
program on every host of the slice; `jax.distributed.initialize()` (called by
train.py / evaluate.py) finds the other hosts from the TPU metadata. Every
process reads only its slice of the data and all of them write each Orbax
checkpoint together, so the workdir must be storage every host sees: a gs://
path (Orbax / tensorstore write it directly).

Slice shapes and software versions follow the Cloud TPU documentation
("TPU versions", "TPU software versions": v6e -> v2-alpha-tpuv6e,
v5p -> v2-alpha-tpuv5, v5e -> v2-alpha-tpuv5-lite, v4 and older ->
tpu-ubuntu2204-base) and queued resources / Spot VMs ("Manage queued
resources", "Manage TPU Spot VMs").
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

from optconsist_jax import errors
from optconsist_jax import paths
from optconsist_jax.tools import tpu as tpu_facts

# The checkout this module runs from (the default --source).
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------
# TPU generations and accelerator types.


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
  """One Cloud TPU generation.

  Attributes:
    name: generation name used in docs and tables (v4, v5p, v5e, v6e).
    type_prefix: prefix of the gcloud accelerator type (v5e is `v5litepod`).
    runtime_version: the TPU software version for JAX on this generation.
    suffix_unit: what the number after the prefix counts: "cores"
      (TensorCores, 2 per chip: v2/v3/v4/v5p) or "chips" (v5e, v6e).
    cores_per_chip: TensorCores per chip (the JAX devices per chip is 1 for
      v4/v5p megacore, 2 for v2/v3, 1 for v5e/v6e).
    devices_per_chip: JAX devices per chip.
    chips_per_host: chips attached to one TPU VM host in a multi-host slice.
    max_single_host_chips: largest slice that is a single host.
    hbm_gib_per_chip: HBM per chip in GiB.
    peak_bf16_tflops: peak dense bf16 TFLOP/s per chip.
    sizes: valid numbers after the prefix.
  """

  name: str
  type_prefix: str
  runtime_version: str
  suffix_unit: str
  cores_per_chip: int
  devices_per_chip: int
  chips_per_host: int
  max_single_host_chips: int
  hbm_gib_per_chip: float
  peak_bf16_tflops: float
  sizes: tuple[int, ...]


def _multiples(step: int, top: int) -> tuple[int, ...]:
  return tuple(range(step, top + 1, step))


def _generation(name, type_prefix, runtime_version, suffix_unit,
                cores_per_chip, devices_per_chip, chips_per_host,
                max_single_host_chips, sizes) -> TpuGeneration:
  chip = tpu_facts.CHIPS[name]
  return TpuGeneration(name, type_prefix, runtime_version, suffix_unit,
                       cores_per_chip, devices_per_chip, chips_per_host,
                       max_single_host_chips, chip.hbm_gib,
                       chip.peak_bf16_flops / 1e12, sizes)


# Per-chip HBM and peak bf16 from the TPU facts table (tools/tpu.py).
GENERATIONS: dict[str, TpuGeneration] = {
    "v2": _generation("v2", "v2", "tpu-ubuntu2204-base", "cores", 2, 2, 4,
                      4, (8, 32, 128, 256, 512)),
    "v3": _generation("v3", "v3", "tpu-ubuntu2204-base", "cores", 2, 2, 4,
                      4, (8, 32, 64, 128, 256, 512, 1024, 2048)),
    "v4": _generation("v4", "v4", "tpu-ubuntu2204-base", "cores", 2, 1, 4,
                      4, _multiples(8, 4096)),
    "v5p": _generation("v5p", "v5p", "v2-alpha-tpuv5", "cores", 2, 1, 4, 4,
                       _multiples(8, 12288)),
    "v5e": _generation("v5e", "v5litepod", "v2-alpha-tpuv5-lite", "chips",
                       1, 1, 4, 8, (1, 4, 8, 16, 32, 64, 128, 256)),
    "v6e": _generation("v6e", "v6e", "v2-alpha-tpuv6e", "chips", 1, 1, 4, 8,
                       (1, 4, 8, 16, 32, 64, 128, 256)),
}

# Names people write that gcloud spells differently.
_PREFIX_ALIASES = {"v5e": "v5litepod", "v5lite": "v5litepod"}


def _describe_sizes(gen: TpuGeneration) -> str:
  if len(gen.sizes) > 12:
    step = gen.sizes[0]
    return (f"{gen.type_prefix}-N (N = {gen.suffix_unit}, a multiple of {step}"
            f" from {gen.sizes[0]} to {gen.sizes[-1]})")
  return f"{gen.type_prefix}-{{{','.join(str(s) for s in gen.sizes)}}}"


def valid_accelerator_types() -> str:
  """A one-line description of every valid accelerator type."""
  parts = [_describe_sizes(g) for g in GENERATIONS.values()]
  return "; ".join(parts) + " (v5e-N is accepted for v5litepod-N)"


@dataclasses.dataclass(frozen=True)
class Accelerator:
  """A TPU slice shape, e.g. `v5p-16` = 8 v5p chips on 2 hosts."""

  accelerator_type: str  # canonical gcloud spelling
  generation: TpuGeneration
  size: int

  @property
  def chips(self) -> int:
    if self.generation.suffix_unit == "cores":
      return self.size // self.generation.cores_per_chip
    return self.size

  @property
  def num_devices(self) -> int:
    return self.chips * self.generation.devices_per_chip

  @property
  def num_hosts(self) -> int:
    if self.chips <= self.generation.max_single_host_chips:
      return 1
    return self.chips // self.generation.chips_per_host

  @property
  def hbm_gib_total(self) -> float:
    return self.chips * self.generation.hbm_gib_per_chip

  @property
  def peak_bf16_tflops_total(self) -> float:
    return self.chips * self.generation.peak_bf16_tflops


def accelerator(accelerator_type: str) -> Accelerator:
  """Parses and validates an accelerator type ("v5p-16", "v5e-32", ...).

  Raises:
    ValueError: naming the bad type and listing the valid ones.
  """
  m = re.fullmatch(r"([a-z0-9]+)-(\d+)", accelerator_type.strip().lower())
  if m:
    prefix = _PREFIX_ALIASES.get(m.group(1), m.group(1))
    size = int(m.group(2))
    for gen in GENERATIONS.values():
      if gen.type_prefix == prefix and size in gen.sizes:
        return Accelerator(f"{prefix}-{size}", gen, size)
  raise ValueError(
      f"unknown accelerator type {accelerator_type!r}; valid types: "
      f"{valid_accelerator_types()}")


# ----------------------------------------------------------------------------
# Commands.


@dataclasses.dataclass(frozen=True)
class Command:
  """One shell command; skipped when `unless` (another argv) succeeds."""

  argv: tuple[str, ...]
  unless: tuple[str, ...] | None = None

  def shell(self) -> str:
    line = shlex.join(self.argv)
    if self.unless:
      line = f"{shlex.join(self.unless)} >/dev/null 2>&1 || {line}"
    return line


def run_commands(commands: Sequence[Command], dry_run: bool,
                 out=sys.stdout) -> int:
  """Prints (dry run) or runs the commands in order; returns an exit code."""
  for cmd in commands:
    if dry_run:
      print(cmd.shell(), file=out)
      continue
    print(f"+ {cmd.shell()}", file=out, flush=True)
    if cmd.unless is not None:
      check = subprocess.run(cmd.unless, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, check=False)
      if check.returncode == 0:
        print("  (exists, skipped)", file=out, flush=True)
        continue
    rc = subprocess.run(cmd.argv, check=False).returncode
    if rc:
      print(f"command failed with exit code {rc}: {cmd.shell()}",
            file=sys.stderr)
      return rc
  return 0


# ----------------------------------------------------------------------------
# Typed settings.

_SAFE_REMOTE = re.compile(r"[A-Za-z0-9._/-]+")
_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
PROVISIONING = ("on-demand", "spot", "best-effort")


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
class TpuTarget:
  """A TPU VM slice addressed through gcloud.

  Attributes:
    name: TPU node name (lowercase letters, digits and dashes).
    zone: GCP zone, e.g. us-east5-a.
    project: GCP project; None uses gcloud's configured project.
    worker: which hosts ssh/scp reach: "all" or a worker index.
    gcloud: the gcloud executable.
  """

  name: str
  zone: str
  project: str | None = None
  worker: str = "all"
  gcloud: str = "gcloud"

  def __post_init__(self):
    if not _NAME.fullmatch(self.name or ""):
      raise ValueError(
          f"--name={self.name!r}: a TPU name is lowercase letters, digits and"
          " dashes, starting with a letter")
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", self.zone or ""):
      raise ValueError(f"--zone={self.zone!r}: expected a zone like us-east5-a")
    if self.worker != "all" and not self.worker.isdigit():
      raise ValueError(f"--worker={self.worker!r}: 'all' or a worker index")

  def _location(self) -> list[str]:
    loc = [f"--zone={self.zone}"]
    if self.project:
      loc.append(f"--project={self.project}")
    return loc

  def tpu_vm(self, verb: str, *extra: str) -> tuple[str, ...]:
    return (self.gcloud, "compute", "tpus", "tpu-vm", verb, self.name,
            *self._location(), *extra)

  def ssh(self, script: str, worker: str | None = None) -> Command:
    return Command(self.tpu_vm("ssh", f"--worker={worker or self.worker}",
                               f"--command={script}"))

  def scp(self, local: str, remote: str) -> Command:
    return Command((self.gcloud, "compute", "tpus", "tpu-vm", "scp", local,
                    f"{self.name}:{remote}", *self._location(),
                    f"--worker={self.worker}"))


@dataclasses.dataclass(frozen=True)
class HostTarget:
  """A plain machine reached with ssh (e.g. a GPU host for the eval job)."""

  host: str
  ssh_bin: str = "ssh"
  scp_bin: str = "scp"

  def __post_init__(self):
    if not re.fullmatch(r"[A-Za-z0-9_.@-]+", self.host or ""):
      raise ValueError(f"--host={self.host!r}: expected [user@]hostname")

  def ssh(self, script: str, worker: str | None = None) -> Command:
    del worker
    return Command((self.ssh_bin, self.host, script))

  def scp(self, local: str, remote: str) -> Command:
    return Command((self.scp_bin, local, f"{self.host}:{remote}"))


Target = TpuTarget | HostTarget


@dataclasses.dataclass(frozen=True)
class SliceSpec:
  """What `tpu create` asks for.

  Attributes:
    accelerator: parsed accelerator type.
    runtime_version: TPU software version; None = the generation's default.
    provisioning: on-demand, spot or best-effort (best-effort needs queued).
    queued: request through a queued resource named like the node.
    reuse: skip creation when a node of that name already exists.
    valid_until: queued only: give up after this duration (e.g. 6h).
    wait: queued only: block until the queued resource is ACTIVE.
  """

  accelerator: Accelerator
  runtime_version: str | None = None
  provisioning: str = "on-demand"
  queued: bool = False
  reuse: bool = True
  valid_until: str | None = None
  wait: bool = True

  def __post_init__(self):
    if self.provisioning not in PROVISIONING:
      raise ValueError(f"--provisioning={self.provisioning!r}; expected one of"
                       f" {PROVISIONING}")
    if self.provisioning == "best-effort" and not self.queued:
      raise ValueError("--provisioning=best-effort needs --queued (only queued"
                       " resources have a best-effort tier)")
    if self.valid_until and not self.queued:
      raise ValueError("--valid-until needs --queued")

  @property
  def version(self) -> str:
    return self.runtime_version or self.accelerator.generation.runtime_version


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


# ----------------------------------------------------------------------------
# Command builders (pure: settings in, commands out).


def create_commands(target: TpuTarget, spec: SliceSpec) -> list[Command]:
  """Creates the slice (directly or as a queued resource), optionally reusing."""
  acc = spec.accelerator
  loc = target._location()  # pylint: disable=protected-access
  if spec.queued:
    alpha = ("alpha",) if spec.provisioning == "best-effort" else ()
    argv = [target.gcloud, *alpha, "compute", "tpus", "queued-resources",
            "create", target.name, f"--node-id={target.name}", *loc,
            f"--accelerator-type={acc.accelerator_type}",
            f"--runtime-version={spec.version}"]
    if spec.provisioning == "spot":
      argv.append("--spot")
    elif spec.provisioning == "best-effort":
      argv.append("--best-effort")
    if spec.valid_until:
      argv.append(f"--valid-until-duration={spec.valid_until}")
    check = (target.gcloud, "compute", "tpus", "queued-resources", "describe",
             target.name, *loc)
    commands = [Command(tuple(argv), unless=check if spec.reuse else None)]
    if spec.wait:
      # A queued request returns at once; the node exists once it is ACTIVE.
      state = shlex.join((*check, "--format=value(state.state)"))
      commands.append(Command((
          "bash", "-c",
          f'while s="$({state})"; [ "$s" != ACTIVE ]; do case "$s" in'
          f" FAILED|SUSPENDED*) echo {target.name} is $s >&2; exit 1;; esac;"
          f' echo "waiting for {target.name}: $s"; sleep 60; done')))
    return commands
  else:
    argv = list(target.tpu_vm("create",
                              f"--accelerator-type={acc.accelerator_type}",
                              f"--version={spec.version}"))
    if spec.provisioning == "spot":
      argv.append("--spot")
    check = target.tpu_vm("describe")
  return [Command(tuple(argv), unless=check if spec.reuse else None)]


def delete_commands(target: TpuTarget, queued: bool) -> list[Command]:
  if queued:
    return [Command((target.gcloud, "compute", "tpus", "queued-resources",
                     "delete", target.name, *target._location(),  # pylint: disable=protected-access
                     "--force", "--quiet"))]
  return [Command(target.tpu_vm("delete", "--quiet"))]


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
  if not _SAFE_REMOTE.fullmatch(dest) or dest.startswith("/") or ".." in dest:
    raise ValueError(f"--dest={dest!r}: a path relative to the repo dir made of"
                     " letters, digits, '._/-'")
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
  if not _SAFE_REMOTE.fullmatch(dest) or dest.startswith("/") or ".." in dest:
    raise ValueError(f"--dest={dest!r}: a path relative to the repo dir made of"
                     " letters, digits, '._/-'")
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


def start_job_commands(target: Target, remote: Remote,
                       job: JobSpec) -> list[Command]:
  """Starts `job` on every worker under nohup; logs and pid in log_dir.

  The program's exit code lands in `<job>.rc` when it ends (`job_status`
  reads it): 0 finished, 75 preempted and saved (errors.PREEMPTED), ...
  """
  log = remote.home(f"{remote.log_dir}/{job.job}.log")
  pid = remote.home(f"{remote.log_dir}/{job.job}.pid")
  rc = remote.home(f"{remote.log_dir}/{job.job}.rc")
  env = " ".join(shlex.quote(e) for e in job.env)
  program = " ".join([remote.python, "-m", shlex.quote(job.module),
                      *(shlex.quote(a) for a in job.argv())])
  script = (
      f"mkdir -p {remote.home(remote.log_dir)} && cd {remote.home(remote.repo_dir)}"
      f" && rm -f {rc} {pid} && ( trap '' HUP; nohup env {env + ' ' if env else ''}"
      f"{program} > {log} 2>&1 < /dev/null & echo $! > {pid}; wait $!;"
      f" echo $? > {rc} ) > /dev/null 2>&1 < /dev/null &"
      f" while [ ! -s {pid} ]; do sleep 0.1; done; echo started {shlex.quote(job.job)} pid $(cat {pid})"
      " on $(hostname)")
  return [target.ssh(script)]


def job_status_command(target: Target, remote: Remote, job: str) -> Command:
  """Prints `running`, `exit <code>` or `none` for the job on worker 0."""
  pid = remote.home(f"{remote.log_dir}/{job}.pid")
  rc = remote.home(f"{remote.log_dir}/{job}.rc")
  # A job that just ended may not have its .rc yet: wait up to 5 s for it.
  script = (f"if [ ! -f {rc} ] && [ -f {pid} ] && kill -0 $(cat {pid})"
            " 2>/dev/null; then echo running; else for i in $(seq 50); do"
            f" [ -f {rc} ] && break; sleep 0.1; done; if [ -f {rc} ]; then"
            f" echo exit $(cat {rc}); else echo none; fi; fi")
  return target.ssh(script, worker="0")


# Slice states (gcloud `state` / queued resource `state.state`) that mean the
# slice is gone and must be created again: a Spot VM or a queued resource
# reclaimed by Cloud TPU ("Manage TPU Spot VMs", "Manage queued resources").
GONE_STATES = ("PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "TERMINATED",
               "DELETING", "")
UP_STATES = ("ACTIVE", "READY")


@dataclasses.dataclass
class Supervisor:
  """Keeps one training job going on a (spot / queued) slice until it ends.

  Each poll: if the slice is gone (preempted / suspended / missing) it is
  deleted, created again, installed, staged and the job started (it resumes
  from its gs:// workdir); if the job exited with errors.PREEMPTED (SIGTERM,
  checkpoint saved) it is started again; exit 0 ends the supervision; any
  other exit code (2 refused input, 3 non-finite loss, 74 failed save, a
  crash) stops it with that code, since a restart would fail the same way.
  At most `max_restarts` restarts.
  """

  target: TpuTarget
  spec: SliceSpec
  setup: list[Command]  # install + stage + start, after a (re)create
  start: list[Command]  # start the job on a live slice
  status: Command
  max_restarts: int = 10
  poll_secs: float = 300.0
  out: object = sys.stdout
  sleep: Callable[[float], None] = time.sleep

  def _say(self, msg: str):
    print(f"[supervise] {msg}", file=self.out, flush=True)

  def slice_state(self) -> str:
    t = self.target
    loc = t._location()  # pylint: disable=protected-access
    if self.spec.queued:
      argv = (t.gcloud, "compute", "tpus", "queued-resources", "describe",
              t.name, *loc, "--format=value(state.state)")
    else:
      argv = t.tpu_vm("describe", "--format=value(state)")
    r = subprocess.run(argv, capture_output=True, text=True, check=False)
    return r.stdout.strip() if r.returncode == 0 else ""

  def job_state(self) -> str:
    r = subprocess.run(self.status.argv, capture_output=True, text=True,
                       check=False)
    if r.returncode:
      return "unreachable"
    return (r.stdout.strip().splitlines() or ["none"])[-1]

  def _run(self, commands: list[Command]) -> int:
    return run_commands(commands, False, out=self.out)

  def recreate(self) -> int:
    commands = (delete_commands(self.target, self.spec.queued)
                + create_commands(self.target, dataclasses.replace(
                    self.spec, reuse=False, wait=True)) + self.setup)
    self._run(commands[:1])  # Deleting what is already gone may fail.
    return self._run(commands[1:])

  def run(self) -> int:
    restarts = 0
    rc = self._run(create_commands(self.target, self.spec) + self.setup)
    if rc:
      return rc
    while True:
      self.sleep(self.poll_secs)
      state = self.slice_state()
      if state not in UP_STATES:
        if state not in GONE_STATES:
          self._say(f"slice {self.target.name} is {state}; waiting")
          continue
        if restarts >= self.max_restarts:
          self._say(f"slice {self.target.name} is {state or 'gone'}; gave up"
                    f" after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        self._say(f"slice {self.target.name} is {state or 'gone'}"
                  f" (preempted): creating it again and resuming (restart"
                  f" {restarts} of {self.max_restarts})")
        rc = self.recreate()
        if rc:
          return rc
        continue
      job = self.job_state()
      if job in ("running", "unreachable"):
        continue
      code = int(job.split()[1]) if job.startswith("exit ") else None
      if code == errors.OK:
        self._say("the job finished (exit 0)")
        return errors.OK
      if code == errors.PREEMPTED or code is None:
        if restarts >= self.max_restarts:
          self._say(f"gave up after {restarts} restarts")
          return errors.PREEMPTED
        restarts += 1
        why = ("was preempted and saved (exit 75)" if code is not None
               else "is not running (the VM restarted?)")
        self._say(f"the job {why}: starting it again to resume (restart"
                  f" {restarts} of {self.max_restarts})")
        rc = self._run(self.start)
        if rc:
          return rc
        continue
      if self.slice_state() not in UP_STATES:
        continue  # Killed by the slice going away: recreated next poll.
      self._say(f"the job failed with exit code {code}; not restarting (see"
                " its log: launch tpu logs)")
      return code


def stop_job_commands(target: Target, remote: Remote, job: str) -> list[Command]:
  """Stops the job started by `start_job_commands`, by its recorded pid."""
  pid = remote.home(f"{remote.log_dir}/{job}.pid")
  script = (f"if [ -f {pid} ]; then kill $(cat {pid}) 2>/dev/null;"
            f" rm -f {pid}; fi; true")
  return [target.ssh(script)]


def logs_commands(target: Target, remote: Remote, job: str, follow: bool,
                  lines: int) -> list[Command]:
  log = remote.home(f"{remote.log_dir}/{job}.log")
  flag = "-F" if follow else ""
  script = f"tail -n {int(lines)} {flag} {log}".replace("  ", " ")
  return [target.ssh(script)]


# ----------------------------------------------------------------------------
# Command line.


def _add_target_args(p: argparse.ArgumentParser, worker_default: str = "all"):
  p.add_argument("--name", required=True, help="TPU node name")
  p.add_argument("--zone", required=True, help="GCP zone, e.g. us-east5-a")
  p.add_argument("--project", default=None,
                 help="GCP project (default: gcloud's configured project)")
  p.add_argument("--worker", default=worker_default,
                 help="'all' or a worker index (ssh/scp)")
  p.add_argument("--gcloud", default="gcloud", help="gcloud executable")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands instead of running them")


def _add_slice_args(p: argparse.ArgumentParser, required: bool):
  p.add_argument("--accelerator-type", required=required,
                 help="e.g. v4-32, v5p-16, v5litepod-32 (or v5e-32), v6e-16")
  p.add_argument("--runtime-version", default=None,
                 help="TPU software version (default: per generation)")
  p.add_argument("--provisioning", default="on-demand", choices=PROVISIONING)
  p.add_argument("--queued", action="store_true",
                 help="request through a queued resource")
  p.add_argument("--valid-until", default=None,
                 help="queued: drop the request after this duration, e.g. 6h")
  p.add_argument("--no-wait", dest="wait", action="store_false",
                 help="queued: return without waiting for ACTIVE")
  p.add_argument("--no-reuse", dest="reuse", action="store_false",
                 help="fail instead of reusing an existing node of that name")


def _add_remote_args(p: argparse.ArgumentParser):
  p.add_argument("--repo-dir", default=Remote.repo_dir)
  p.add_argument("--venv-dir", default=Remote.venv_dir)
  p.add_argument("--log-dir", default=Remote.log_dir)
  p.add_argument("--python-version", default=Remote.python_version)


def _add_install_args(p: argparse.ArgumentParser, extras: str):
  p.add_argument("--source", default=_CHECKOUT,
                 help="local git checkout (HEAD is copied; default: the one"
                 " holding this package) or git+https://URL[@ref]")
  p.add_argument("--extras", default=extras, help="pip extras to install")


def _add_job_args(p: argparse.ArgumentParser, module: str, job: str):
  p.add_argument("--config", required=True,
                 help="config file and arg, e.g. configs/llama2_7b_metamath.py:adamw")
  p.add_argument("--workdir", required=True, help="gs://BUCKET/PATH")
  p.add_argument("--set", dest="overrides", action="append", default=[],
                 metavar="KEY=VALUE", help="config override (repeatable)")
  p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                 help="environment variable for the program (repeatable)")
  p.add_argument("--module", default=module)
  p.add_argument("--job", default=job, help="name of the log/pid files")
  p.add_argument("--arg", dest="extra_args", action="append", default=[],
                 help="extra flag passed through to the program (repeatable)")


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m optconsist_jax.tools.launch",
      description="Cloud TPU VM / host launcher. Every subcommand takes "
      "--dry-run to print its commands.")
  groups = parser.add_subparsers(dest="group", required=True)

  tpu = groups.add_parser("tpu", help="Cloud TPU VM slices (gcloud)")
  sub = tpu.add_subparsers(dest="verb", required=True)
  p = sub.add_parser("create", help="create (or reuse) a slice")
  _add_target_args(p)
  _add_slice_args(p, required=True)
  p = sub.add_parser("install", help="install the package on every worker")
  _add_target_args(p)
  _add_remote_args(p)
  _add_install_args(p, "tpu")
  for verb, module in (("train", "optconsist_jax.train"),
                       ("eval", "optconsist_jax.evaluate")):
    p = sub.add_parser(verb, help=f"start {module} on every worker (nohup)")
    _add_target_args(p)
    _add_remote_args(p)
    _add_job_args(p, module, verb)
    p.add_argument("--accelerator-type", default=None,
                   help="optional: checked, and a single-host slice may use a"
                   " local workdir")
  p = sub.add_parser("stage", help="copy gs:// data / HF folders to workers")
  _add_target_args(p)
  _add_remote_args(p)
  p.add_argument("--src", required=True, help="gs://BUCKET/PATH")
  p.add_argument("--dest", required=True,
                 help="destination, relative to the repo dir on each worker")
  p = sub.add_parser("fetch", help="download datasets from the Hugging Face"
                     " Hub on every worker (and install an HF token)")
  _add_target_args(p)
  _add_remote_args(p)
  p.add_argument("--data", required=True,
                 help="metamathqa, gsm8k, hellaswag, arc, winogrande or all"
                 " (comma-separated)")
  p.add_argument("--dest", default=".",
                 help="destination, relative to the repo dir on each worker")
  p.add_argument("--hf-token-file", default=None,
                 help="local Hugging Face token file to copy to every worker"
                 " (for gated model repos)")
  p = sub.add_parser("up", help="create + install + train")
  _add_target_args(p)
  _add_slice_args(p, required=True)
  _add_remote_args(p)
  _add_install_args(p, "tpu")
  _add_job_args(p, "optconsist_jax.train", "train")
  p = sub.add_parser(
      "supervise", help="up, then keep the job going: recreate a preempted"
      " slice and restart a preempted job until it finishes")
  _add_target_args(p)
  _add_slice_args(p, required=True)
  _add_remote_args(p)
  _add_install_args(p, "tpu")
  _add_job_args(p, "optconsist_jax.train", "train")
  p.add_argument("--stage", action="append", default=[],
                 metavar="gs://SRC=DEST", help="stage after each (re)create"
                 " (repeatable; see `tpu stage`)")
  p.add_argument("--fetch", default=None, metavar="DATA",
                 help="datasets to fetch from the Hugging Face Hub after each"
                 " (re)create (see `tpu fetch`)")
  p.add_argument("--hf-token-file", default=None,
                 help="with --fetch: local Hugging Face token file to copy to"
                 " every worker")
  p.add_argument("--max-restarts", type=int, default=10)
  p.add_argument("--poll-secs", type=float, default=300.0)
  p = sub.add_parser("logs", help="print / stream a job's log")
  _add_target_args(p, worker_default="0")
  _add_remote_args(p)
  p.add_argument("--job", default="train")
  p.add_argument("--lines", type=int, default=100)
  p.add_argument("--no-follow", dest="follow", action="store_false")
  p = sub.add_parser("stop", help="stop a job by its recorded pid")
  _add_target_args(p)
  _add_remote_args(p)
  p.add_argument("--job", default="train")
  p = sub.add_parser("delete", help="delete the slice")
  _add_target_args(p)
  p.add_argument("--queued", action="store_true",
                 help="delete the queued resource (and its node)")

  host = groups.add_parser("host", help="a plain machine over ssh (eval job)")
  hsub = host.add_subparsers(dest="verb", required=True)
  for verb in ("install", "eval", "logs", "stop"):
    p = hsub.add_parser(verb)
    p.add_argument("--host", required=True, help="[user@]hostname")
    p.add_argument("--dry-run", action="store_true")
    _add_remote_args(p)
    if verb == "install":
      _add_install_args(p, "cuda")
    elif verb == "eval":
      _add_job_args(p, "optconsist_jax.evaluate", "eval")
    elif verb == "logs":
      p.add_argument("--job", default="eval")
      p.add_argument("--lines", type=int, default=100)
      p.add_argument("--no-follow", dest="follow", action="store_false")
    else:
      p.add_argument("--job", default="eval")
  return parser


def _job(args) -> JobSpec:
  return JobSpec(module=args.module, job=args.job, config=args.config,
                 workdir=args.workdir, overrides=tuple(args.overrides),
                 env=tuple(args.env), extra_args=tuple(args.extra_args))


def _check_workdir(job: JobSpec, acc: Accelerator | None, verb: str):
  """Slices vanish with their disks and hosts don't share them: want gs://."""
  if job.workdir.startswith("gs://"):
    return
  if acc is not None and acc.num_hosts == 1:
    return
  where = (f"{acc.accelerator_type} has {acc.num_hosts} hosts"
           if acc else "the slice size is unknown (pass --accelerator-type for"
           " a single-host slice)")
  raise ValueError(
      f"tpu {verb} --workdir={job.workdir!r}: every host writes each"
      f" checkpoint together and {where}; use a gs://BUCKET/PATH workdir")


def build(args) -> list[Command]:
  """Turns parsed arguments into the commands to run."""
  remote = (Remote(args.repo_dir, args.venv_dir, args.log_dir,
                   args.python_version) if hasattr(args, "repo_dir") else None)
  if args.group == "host":
    target = HostTarget(args.host)
    if args.verb == "install":
      return install_commands(target, remote, args.source, args.extras)
    if args.verb == "eval":
      return start_job_commands(target, remote, _job(args))
    if args.verb == "logs":
      return logs_commands(target, remote, args.job, args.follow, args.lines)
    return stop_job_commands(target, remote, args.job)

  target = TpuTarget(args.name, args.zone, args.project, args.worker,
                     args.gcloud)
  acc = (accelerator(args.accelerator_type)
         if getattr(args, "accelerator_type", None) else None)
  if args.verb in ("create", "up"):
    spec = SliceSpec(acc, args.runtime_version, args.provisioning,
                     args.queued, args.reuse, args.valid_until, args.wait)
    commands = create_commands(target, spec)
    if args.verb == "create":
      return commands
    job = _job(args)
    _check_workdir(job, acc, args.verb)
    return (commands + install_commands(target, remote, args.source,
                                        args.extras)
            + start_job_commands(target, remote, job))
  if args.verb == "install":
    return install_commands(target, remote, args.source, args.extras)
  if args.verb == "stage":
    return stage_commands(target, remote, args.src, args.dest)
  if args.verb == "fetch":
    return fetch_commands(target, remote, args.data, args.dest,
                          args.hf_token_file)
  if args.verb in ("train", "eval"):
    job = _job(args)
    _check_workdir(job, acc, args.verb)
    return start_job_commands(target, remote, job)
  if args.verb == "logs":
    return logs_commands(target, remote, args.job, args.follow, args.lines)
  if args.verb == "stop":
    return stop_job_commands(target, remote, args.job)
  return delete_commands(target, args.queued)


def supervisor(args, out=sys.stdout, sleep=time.sleep) -> Supervisor:
  """The Supervisor of `tpu supervise` from parsed arguments."""
  remote = Remote(args.repo_dir, args.venv_dir, args.log_dir,
                  args.python_version)
  target = TpuTarget(args.name, args.zone, args.project, args.worker,
                     args.gcloud)
  spec = SliceSpec(accelerator(args.accelerator_type), args.runtime_version,
                   args.provisioning, args.queued, args.reuse,
                   args.valid_until, args.wait)
  job = _job(args)
  _check_workdir(job, spec.accelerator, "supervise")
  stage = []
  for pair in args.stage:
    src, sep, dest = pair.rpartition("=")
    if not sep:
      raise ValueError(f"--stage={pair!r}: expected gs://SRC=DEST")
    stage += stage_commands(target, remote, src, dest)
  if args.fetch:
    stage += fetch_commands(target, remote, args.fetch, ".",
                            args.hf_token_file)
  start = start_job_commands(target, remote, job)
  if args.max_restarts < 0 or args.poll_secs <= 0:
    raise ValueError("--max-restarts must be >= 0 and --poll-secs > 0")
  return Supervisor(
      target=target, spec=spec,
      setup=install_commands(target, remote, args.source, args.extras)
      + stage + start, start=start,
      status=job_status_command(target, remote, job.job),
      max_restarts=args.max_restarts, poll_secs=args.poll_secs, out=out,
      sleep=sleep)


def main(argv: Sequence[str] | None = None, out=sys.stdout,
         sleep=time.sleep) -> int:
  parser = _parser()
  args = parser.parse_args(argv)
  if getattr(args, "source", None):
    args.source = paths.resolve(args.source)  # Local; remote paths stay.
  try:
    if getattr(args, "verb", None) == "supervise":
      sup = supervisor(args, out=out, sleep=sleep)
      if args.dry_run:
        run_commands(create_commands(sup.target, sup.spec) + sup.setup, True,
                     out=out)
        print(f"# then every {sup.poll_secs:g} s: {sup.status.shell()}"
              " (recreate a preempted slice, restart a job that exited"
              f" {errors.PREEMPTED})", file=out)
        return 0
      return sup.run()
    commands = build(args)
  except ValueError as e:
    parser.error(str(e))
  return run_commands(commands, args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
