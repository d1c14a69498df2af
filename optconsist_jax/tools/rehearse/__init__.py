"""The pod rehearsal (`python -m optconsist_jax.tools.rehearse`, `make
rehearsal`): a multi-host run's preemption, hang and restart onto another
mesh, on this machine, against a local GCS emulator."""
