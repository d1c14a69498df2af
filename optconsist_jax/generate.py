"""Old import path of optconsist_jax.model.generate (kept for one release)."""

import sys

from optconsist_jax.model import generate

sys.modules[__name__] = generate
