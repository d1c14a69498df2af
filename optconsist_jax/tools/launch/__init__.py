"""The Cloud TPU launcher: `python -m optconsist_jax.tools.launch` (__main__.py)
over gcloud.py (the gcloud commands), worker_commands.py (what each worker
runs), supervise.py (restarts after preemption, the hang watchdog) and
local.py (the same supervision of N processes on this machine: the pod
rehearsal, tools/rehearse)."""
