"""The local GCS emulator of the bucket (gs://) tests.

It lives in the package (optconsist_jax/tools/rehearse/gcs_emulator.py), where
the pod rehearsal starts it too; `running(bucket)` yields the environment
that points gcsfs, google-cloud-storage and TensorStore at it.
"""

from optconsist_jax.tools.rehearse.gcs_emulator import running  # noqa: F401
