"""The Cloud TPU launcher: `python -m optconsist_jax.tools.launch` (__main__.py)
over gcloud.py (the gcloud commands), worker_commands.py (what each worker
runs) and supervise.py (restarts after preemption)."""
