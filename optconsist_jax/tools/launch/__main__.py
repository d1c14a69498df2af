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
    python -m optconsist_jax.tools.launch tpu supervise --name=ft7b \
        --zone=us-east5-a --accelerator-type=v5p-16 --num-slices=2 --queued \
        --provisioning=reserved --config=... --workdir=gs://BUCKET/runs/x

Multislice (Cloud TPU "Multislice overview"): `--num-slices=N --queued` asks
for one queued resource NAME with `--node-count=N --node-prefix=NAME` (nodes
NAME-0 ..), every worker command runs on all of them at once, a training job
gets `--config.mesh.dcn_data=N` (sharding.MeshConfig: the `data` axis spans
the slices over DCN) and, per slice, MEGASCALE_COORDINATOR_ADDRESS (slice 0
worker 0), MEGASCALE_NUM_SLICES, MEGASCALE_SLICE_ID and MEGASCALE_PORT
(worker_commands.megascale_env).

Multi-host: `gcloud compute tpus tpu-vm ssh --worker=all` starts the same
program on every host of the slice; `jax.distributed.initialize()` (called by
train.py / evaluate.py) finds the other hosts from the TPU metadata. Every
process reads only its slice of the data and all of them write each Orbax
checkpoint together, so the workdir must be storage every host sees: a gs://
path (Orbax / tensorstore write it directly).

The pieces: accelerator types and software versions in platforms/tpu.py (the TPU
facts table), gcloud slice commands in tools/launch/gcloud.py, what runs on
the workers in tools/launch/worker_commands.py, `tpu supervise` in
tools/launch/supervise.py; this module is the command line.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Sequence

from optconsist_jax import errors
from optconsist_jax import paths
from optconsist_jax.tools.launch import gcloud
from optconsist_jax.tools.launch import supervise
from optconsist_jax.platforms import tpu as tpu_facts
from optconsist_jax.tools.launch import worker_commands as workers

# The checkout this module runs from (the default --source): the folder
# holding the optconsist_jax package.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))))

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
  p.add_argument("--num-slices", type=int, default=1,
                 help="slices of a multislice queued resource NAME (nodes"
                 " NAME-0, NAME-1, ...; the `data` mesh axis spans them)")
  p.add_argument("--dry-run", action="store_true",
                 help="print the commands instead of running them")


def _add_slice_args(p: argparse.ArgumentParser, required: bool):
  p.add_argument("--accelerator-type", required=required,
                 help="e.g. v4-32, v5p-16, v5litepod-32 (or v5e-32), v6e-16")
  p.add_argument("--runtime-version", default=None,
                 help="TPU software version (default: per generation)")
  p.add_argument("--provisioning", default="on-demand",
                 choices=gcloud.PROVISIONING,
                 help="reserved: the project's TPU reservation (--reserved);"
                 " spot: Spot VMs; best-effort: queued only")
  p.add_argument("--queued", action="store_true",
                 help="request through a queued resource")
  p.add_argument("--valid-until", default=None,
                 help="queued: drop the request after this duration, e.g. 6h")
  p.add_argument("--no-wait", dest="wait", action="store_false",
                 help="queued: return without waiting for ACTIVE")
  p.add_argument("--no-reuse", dest="reuse", action="store_false",
                 help="fail instead of reusing an existing node of that name")


def _add_remote_args(p: argparse.ArgumentParser):
  p.add_argument("--repo-dir", default=workers.Remote.repo_dir)
  p.add_argument("--venv-dir", default=workers.Remote.venv_dir)
  p.add_argument("--log-dir", default=workers.Remote.log_dir)
  p.add_argument("--python-version", default=workers.Remote.python_version)


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
  p.add_argument("--no-megascale-env", dest="megascale_env",
                 action="store_false",
                 help="several slices: leave MEGASCALE_* to Cloud TPU's"
                 " tpu-env metadata instead of setting them per slice")


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
      " slice, restart a preempted or hung job (its stacks saved) until it"
      " finishes")
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
  p.add_argument("--hang-timeout", type=float, default=3600.0,
                 help="seconds without a new step on any worker before the"
                 " job's Python stacks are saved to WORKDIR/hangs/ and it is"
                 " restarted (0: off)")
  p.add_argument("--startup-timeout", type=float, default=0.0,
                 help="the same before a start's first step (downloading"
                 " weights, compiling; 0: --hang-timeout)")
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


def _job(args) -> workers.JobSpec:
  """The job; on several slices training's `data` axis spans them."""
  overrides = tuple(args.overrides)
  slices = getattr(args, "num_slices", 1)
  if (slices > 1 and args.module == "optconsist_jax.train"
      and not any(o.startswith("mesh.dcn_data=") for o in overrides)):
    # sharding.MeshConfig.dcn_data: a hybrid (ICI x DCN) device mesh.
    overrides += (f"mesh.dcn_data={slices}",)
  return workers.JobSpec(
      module=args.module, job=args.job, config=args.config,
      workdir=args.workdir, overrides=overrides,
      env=tuple(args.env), extra_args=tuple(args.extra_args))


def _start(target, remote, job, args) -> list[gcloud.Command]:
  return workers.start_job_commands(target, remote, job,
                                    megascale=args.megascale_env)


def _remote(args) -> workers.Remote:
  return workers.Remote(args.repo_dir, args.venv_dir, args.log_dir,
                        args.python_version)


def _tpu_target(args) -> gcloud.TpuTarget:
  return gcloud.TpuTarget(args.name, args.zone, args.project, args.worker,
                          args.gcloud, args.num_slices)


def _slice_spec(args) -> gcloud.SliceSpec:
  return gcloud.SliceSpec(
      tpu_facts.accelerator(args.accelerator_type), args.runtime_version,
      args.provisioning, args.queued, args.reuse, args.valid_until, args.wait)


def _check_workdir(job: workers.JobSpec, acc: tpu_facts.Accelerator | None,
                   verb: str, slices: int = 1):
  """Slices vanish with their disks and hosts don't share them: want gs://."""
  if job.workdir.startswith("gs://"):
    return
  if acc is not None and acc.num_hosts * slices == 1:
    return
  where = (f"{slices} x {acc.accelerator_type} have"
           f" {acc.num_hosts * slices} hosts" if acc and slices > 1 else
           f"{acc.accelerator_type} has {acc.num_hosts} hosts"
           if acc else "the slice size is unknown (pass --accelerator-type for"
           " a single-host slice)")
  raise ValueError(
      f"tpu {verb} --workdir={job.workdir!r}: every host writes each"
      f" checkpoint together and {where}; use a gs://BUCKET/PATH workdir")


def build(args) -> list[gcloud.Command]:
  """Turns parsed arguments into the commands to run."""
  remote = _remote(args) if hasattr(args, "repo_dir") else None
  if args.group == "host":
    target = gcloud.HostTarget(args.host)
  else:
    target = _tpu_target(args)
  if args.verb in ("create", "up"):
    spec = _slice_spec(args)
    commands = gcloud.create_commands(target, spec)
    if args.verb == "create":
      return commands
    job = _job(args)
    _check_workdir(job, spec.accelerator, args.verb, args.num_slices)
    return (commands + workers.install_commands(target, remote, args.source,
                                                args.extras)
            + _start(target, remote, job, args))
  if args.verb == "install":
    return workers.install_commands(target, remote, args.source, args.extras)
  if args.verb == "stage":
    return workers.stage_commands(target, remote, args.src, args.dest)
  if args.verb == "fetch":
    return workers.fetch_commands(target, remote, args.data, args.dest,
                                  args.hf_token_file)
  if args.verb in ("train", "eval"):
    job = _job(args)
    if args.group == "tpu":
      acc = (tpu_facts.accelerator(args.accelerator_type)
             if args.accelerator_type else None)
      _check_workdir(job, acc, args.verb, args.num_slices)
    return _start(target, remote, job, args)
  if args.verb == "logs":
    return workers.logs_commands(target, remote, args.job, args.follow,
                                 args.lines)
  if args.verb == "stop":
    return workers.stop_job_commands(target, remote, args.job)
  return gcloud.delete_commands(target, args.queued)


def supervisor(args, out=sys.stdout,
               sleep=time.sleep) -> supervise.Supervisor:
  """The Supervisor of `tpu supervise` from parsed arguments."""
  remote, target, spec = _remote(args), _tpu_target(args), _slice_spec(args)
  job = _job(args)
  _check_workdir(job, spec.accelerator, "supervise", args.num_slices)
  stage = []
  for pair in args.stage:
    src, sep, dest = pair.rpartition("=")
    if not sep:
      raise ValueError(f"--stage={pair!r}: expected gs://SRC=DEST")
    stage += workers.stage_commands(target, remote, src, dest)
  if args.fetch:
    stage += workers.fetch_commands(target, remote, args.fetch, ".",
                                    args.hf_token_file)
  start = _start(target, remote, job, args)
  if (args.max_restarts < 0 or args.poll_secs <= 0 or args.hang_timeout < 0
      or args.startup_timeout < 0):
    raise ValueError("--max-restarts must be >= 0, --poll-secs > 0 and"
                     " --hang-timeout, --startup-timeout >= 0")
  return supervise.Supervisor(
      target=target, spec=spec,
      # Its own source archive: an eval slice may be supervised alongside.
      setup=workers.install_commands(
          target, remote, args.source, args.extras,
          archive=f"/tmp/optconsist_jax-src-{target.name}.tar.gz")
      + stage + start, start=start,
      status=workers.job_status_command(target, remote, job.job),
      workers=spec.accelerator.num_hosts * target.slices,
      max_restarts=args.max_restarts, poll_secs=args.poll_secs,
      hang_timeout=args.hang_timeout, startup_timeout=args.startup_timeout,
      stacks_dir=f"{job.workdir.rstrip('/')}/hangs",
      collect=lambda where: workers.collect_stacks_commands(
          target, remote, job.job, where),
      stop=workers.stop_job_commands(target, remote, job.job, grace_secs=30),
      out=out, sleep=sleep)


def _print_supervision(sup: supervise.Supervisor, out):
  """`tpu supervise --dry-run`: the commands, then what each poll does."""
  gcloud.run_commands(
      gcloud.create_commands(sup.target, sup.spec) + sup.setup, True, out=out)
  print(f"# then every {sup.poll_secs:g} s: the slice state,"
        f" {shlex.join(sup.target.state_argv(sup.spec.queued))} (recreate"
        " a reclaimed slice), and the job on every worker:", file=out)
  print(sup.status.shell(), file=out)
  print(f"# restart a job that exited {errors.PREEMPTED}; stop at any other"
        " exit code", file=out)
  if sup.hang_timeout:
    print(f"# no new step for {sup.hang_timeout:g} s: save every worker's"
          f" Python stacks to {sup.stacks_dir}/TIME/, stop, start again:",
          file=out)
    gcloud.run_commands(sup.collect(f"{sup.stacks_dir}/TIME") + sup.stop,
                        True, out=out)


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
        _print_supervision(sup, out)
        return 0
      return sup.run()
    commands = build(args)
  except ValueError as e:
    parser.error(str(e))
  return gcloud.run_commands(commands, args.dry_run, out=out)


if __name__ == "__main__":
  sys.exit(main())
