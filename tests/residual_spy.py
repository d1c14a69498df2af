"""Records every residual stream the model's statistics see (tests)."""

import jax
import numpy as np

from optconsist_jax.model import llama as llama_lib


def capture_residuals(monkeypatch, *jitted) -> list[np.ndarray]:
  """Patches llama.residual_stats to record its inputs, in call order; the
  `jitted` functions' caches are cleared so they trace the spy."""
  captured = []
  original = llama_lib.residual_stats

  def spy(x_BTD):
    jax.debug.callback(lambda x: captured.append(np.asarray(x)), x_BTD,
                       ordered=True)
    return original(x_BTD)
  monkeypatch.setattr(llama_lib, "residual_stats", spy)
  for fn in jitted:
    fn.clear_cache()
  return captured
