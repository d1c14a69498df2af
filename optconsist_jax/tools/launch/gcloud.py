"""Shell commands and the machines they reach: gcloud TPU VM slices, ssh hosts.

A `Command` is one argv (optionally skipped when another argv succeeds);
`run_commands` prints them (dry run) or runs them in order. `TpuTarget` builds
`gcloud compute tpus tpu-vm ...` argvs for a slice (ssh / scp reach every
worker with `--worker=all`), `HostTarget` plain ssh / scp argvs, and
`create_commands` / `delete_commands` the slice's own lifecycle, directly or
as a queued resource (Cloud TPU docs: "Manage queued resources", "Manage TPU
Spot VMs", "Cloud TPU Multislice overview"). A multislice target
(`TpuTarget.slices` > 1) is one queued resource NAME whose nodes are
NAME-0 .. NAME-{slices-1} (`--node-count`, `--node-prefix`); its ssh runs on
every node at once.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import re
import shlex
import subprocess
import sys

from optconsist_jax.platforms import tpu as tpu_facts

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


_NAME = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
# on-demand: no flag; reserved: the project's reservation (`--reserved`);
# spot: Spot VMs (`--spot`); best-effort: queued resources only.
PROVISIONING = ("on-demand", "reserved", "spot", "best-effort")

# In a script given to `TpuTarget.ssh_slices`, stands for the internal IP of
# worker 0 of slice 0 (looked up with `tpu-vm describe` when the command runs).
COORDINATOR = "@MEGASCALE_COORDINATOR@"

# Slice states (gcloud `state` / queued resource `state.state`) that mean the
# slice is gone and must be created again: a Spot VM or a queued resource
# reclaimed by Cloud TPU ("Manage TPU Spot VMs", "Manage queued resources").
GONE_STATES = ("PREEMPTED", "SUSPENDED", "SUSPENDING", "FAILED", "TERMINATED",
               "DELETING", "")
UP_STATES = ("ACTIVE", "READY")


@dataclasses.dataclass(frozen=True)
class TpuTarget:
  """A TPU VM slice addressed through gcloud.

  Attributes:
    name: TPU node name (lowercase letters, digits and dashes).
    zone: GCP zone, e.g. us-east5-a.
    project: GCP project; None uses gcloud's configured project.
    worker: which hosts ssh/scp reach: "all" or a worker index.
    gcloud: the gcloud executable.
    slices: number of slices; > 1 is a multislice queued resource NAME with
      nodes NAME-0, NAME-1, ... (ssh / scp reach all of them).
  """

  name: str
  zone: str
  project: str | None = None
  worker: str = "all"
  gcloud: str = "gcloud"
  slices: int = 1

  def __post_init__(self):
    if not _NAME.fullmatch(self.name or ""):
      raise ValueError(
          f"--name={self.name!r}: a TPU name is lowercase letters, digits and"
          " dashes, starting with a letter")
    if not re.fullmatch(r"[a-z]+-[a-z]+\d+-[a-z]", self.zone or ""):
      raise ValueError(f"--zone={self.zone!r}: expected a zone like us-east5-a")
    if self.worker != "all" and not self.worker.isdigit():
      raise ValueError(f"--worker={self.worker!r}: 'all' or a worker index")
    if self.slices < 1:
      raise ValueError(f"--num-slices={self.slices}: expected >= 1")

  def nodes(self) -> list[str]:
    """The TPU node names: NAME, or NAME-0 .. NAME-{slices-1}."""
    if self.slices == 1:
      return [self.name]
    return [f"{self.name}-{i}" for i in range(self.slices)]

  def location(self) -> list[str]:
    loc = [f"--zone={self.zone}"]
    if self.project:
      loc.append(f"--project={self.project}")
    return loc

  def tpu_vm(self, verb: str, *extra: str,
             node: str | None = None) -> tuple[str, ...]:
    """`gcloud compute tpus tpu-vm VERB NODE --zone=...` + extra."""
    return (self.gcloud, "compute", "tpus", "tpu-vm", verb, node or self.name,
            *self.location(), *extra)

  def queued_resource(self, verb: str, *extra: str) -> tuple[str, ...]:
    """`gcloud compute tpus queued-resources VERB NAME --zone=...` + extra."""
    return (self.gcloud, "compute", "tpus", "queued-resources", verb,
            self.name, *self.location(), *extra)

  def state_argv(self, queued: bool) -> tuple[str, ...]:
    """Prints the slice's state (queued resource: `state.state`)."""
    if queued:
      return self.queued_resource("describe", "--format=value(state.state)")
    return self.tpu_vm("describe", "--format=value(state)")

  def ssh(self, script: str, worker: str | None = None) -> Command:
    """Runs `script` on the workers of every node."""
    return self.ssh_slices([script] * self.slices, worker)

  def ssh_slices(self, scripts: Sequence[str],
                 worker: str | None = None) -> Command:
    """Runs scripts[i] on the workers of node i (all nodes at once).

    Several nodes: one `bash -c` line starting an ssh per node in the
    background and failing if any fails; a script holding `COORDINATOR` gets
    slice 0 worker 0's internal IP in its place.
    """
    if len(scripts) != self.slices:
      raise ValueError(f"{len(scripts)} scripts for {self.slices} slices")
    worker = f"--worker={worker or self.worker}"
    argvs = [self.tpu_vm("ssh", worker, f"--command={script}", node=node)
             for node, script in zip(self.nodes(), scripts)]
    if self.slices == 1 and COORDINATOR not in scripts[0]:
      return Command(argvs[0])
    lines = ["set -u"]
    if any(COORDINATOR in s for s in scripts):
      ip = shlex.join(self.tpu_vm(
          "describe", "--format=value(networkEndpoints[0].ipAddress)",
          node=self.nodes()[0]))
      lines.append(f'addr="$({ip})" && [ -n "$addr" ] || {{ echo "no IP for'
                   f' {self.nodes()[0]} worker 0" >&2; exit 1; }}')
    lines.append("pids=()")
    for argv in argvs:
      words = [shlex.quote(a) if COORDINATOR not in a else '"$addr"'.join(
          shlex.quote(part) for part in a.split(COORDINATOR)) for a in argv]
      lines.append(" ".join(words) + " & pids+=($!)")
    lines.append('rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done;'
                 " exit $rc")
    return Command(("bash", "-c", "; ".join(lines)))

  def scp(self, local: str, remote: str) -> Command:
    """Copies a local file to the workers of every node."""
    argvs = [(self.gcloud, "compute", "tpus", "tpu-vm", "scp", local,
              f"{node}:{remote}", *self.location(), f"--worker={self.worker}")
             for node in self.nodes()]
    if len(argvs) == 1:
      return Command(argvs[0])
    return Command(("bash", "-c", " && ".join(shlex.join(a) for a in argvs)))


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
    provisioning: on-demand, reserved (the project's TPU reservation), spot or
      best-effort (best-effort needs queued).
    queued: request through a queued resource named like the node (needed
      for several slices).
    reuse: skip creation when a node of that name already exists.
    valid_until: queued only: give up after this duration (e.g. 6h).
    wait: queued only: block until the queued resource is ACTIVE.
  """

  accelerator: tpu_facts.Accelerator
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


def _provisioning_flags(provisioning: str) -> list[str]:
  return [] if provisioning == "on-demand" else [f"--{provisioning}"]


def create_commands(target: TpuTarget, spec: SliceSpec) -> list[Command]:
  """Creates the slice(s) (directly or as a queued resource), maybe reusing.

  Several slices: one queued resource with `--node-count` and
  `--node-prefix` (Cloud TPU "Multislice": nodes NAME-0, NAME-1, ...).
  """
  acc = spec.accelerator
  if target.slices > 1 and not spec.queued:
    raise ValueError(f"--num-slices={target.slices} needs --queued (Cloud TPU"
                     " creates several slices as one queued resource)")
  if spec.queued:
    alpha = ("alpha",) if spec.provisioning == "best-effort" else ()
    nodes = ([f"--node-id={target.name}"] if target.slices == 1 else
             [f"--node-count={target.slices}", f"--node-prefix={target.name}"])
    argv = [target.gcloud, *alpha, "compute", "tpus", "queued-resources",
            "create", target.name, *nodes,
            *target.location(), f"--accelerator-type={acc.accelerator_type}",
            f"--runtime-version={spec.version}"]
    argv += _provisioning_flags(spec.provisioning)
    if spec.valid_until:
      argv.append(f"--valid-until-duration={spec.valid_until}")
    check = target.queued_resource("describe")
    commands = [Command(tuple(argv), unless=check if spec.reuse else None)]
    if spec.wait:
      # A queued request returns at once; the node exists once it is ACTIVE.
      state = shlex.join(target.state_argv(queued=True))
      commands.append(Command((
          "bash", "-c",
          f'while s="$({state})"; [ "$s" != ACTIVE ]; do case "$s" in'
          f" FAILED|SUSPENDED*) echo {target.name} is $s >&2; exit 1;; esac;"
          f' echo "waiting for {target.name}: $s"; sleep 60; done')))
    return commands
  argv = list(target.tpu_vm("create",
                            f"--accelerator-type={acc.accelerator_type}",
                            f"--version={spec.version}"))
  argv += _provisioning_flags(spec.provisioning)
  check = target.tpu_vm("describe")
  return [Command(tuple(argv), unless=check if spec.reuse else None)]


def delete_commands(target: TpuTarget, queued: bool) -> list[Command]:
  """Deletes the slice (queued: the queued resource and its nodes)."""
  if target.slices > 1 and not queued:
    raise ValueError(f"--num-slices={target.slices}: delete with --queued (the"
                     " queued resource holds the slices)")
  if queued:
    return [Command(target.queued_resource("delete", "--force", "--quiet"))]
  return [Command(target.tpu_vm("delete", "--quiet"))]
