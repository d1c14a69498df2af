"""Newton-Schulz coefficient schedules for Muon: quintic and Polar Express.

Each Newton-Schulz step maps the singular values of the normalized matrix by
an odd quintic p(x) = a x + b x^3 + c x^5 (optim/muon.py). Schedules:

  `quintic`        Jordan's (3.4445, -4.7750, 2.0315) at every step (Jordan
                   2024, https://kellerjordan.github.io/posts/muon/): fast
                   early, but it leaves singular values in about [0.7, 1.2].
  `polar_express`  a different polynomial per step (Amsel, Persson, Musco,
                   Gower 2025, "The Polar Express", arXiv 2505.16932): step t
                   is the odd quintic minimizing max |1 - p(x)| over the
                   interval [l_t, u_t] the singular values are known to lie
                   in (greedy minimax, found here by Remez exchange), and the
                   next interval is [p(l_t), 2 - p(l_t)]. As in the paper,
                   l_0 = 1e-3, the fit uses [max(l_t, cushion u_t), u_t]
                   (cushion 0.0241) and is rescaled to be centred on 1 over
                   [l_t, u_t], and every step but the last is made safe for
                   singular values up to 1 + eps (eps = 0.01) by
                   p(x / (1 + eps)).

The Polar Express coefficients are computed by `polar_express(steps)` from
that method, not copied from the paper's table.
"""

from __future__ import annotations

import numpy as np

QUINTIC = (3.4445, -4.7750, 2.0315)
# The limit of the minimax quintic as [lo, hi] shrinks to 1: p(1) = 1,
# p'(1) = p''(1) = 0 (the quintic Newton-Schulz map), used once hi - lo is
# too small for the Remez system to be well conditioned.
CONVERGED = (1.875, -1.25, 0.375)
SCHEDULES = ("quintic", "polar_express")


def minimax_odd_quintic(lo: float, hi: float, iterations: int = 100
                        ) -> tuple[float, float, float, float]:
  """(a, b, c, E): p = a x + b x^3 + c x^5 minimizing E = max |1 - p| on
  [lo, hi], by Remez exchange on the alternation points lo < q < r < hi."""
  q, r = lo + (hi - lo) / 3, lo + 2 * (hi - lo) / 3
  signs = np.array([1.0, -1.0, 1.0, -1.0])
  for _ in range(iterations):
    x = np.array([lo, q, r, hi])
    a, b, c, err = np.linalg.solve(np.stack([x, x**3, x**5, signs], 1),
                                   np.ones(4))
    # Interior extrema of p: p'(x) = a + 3 b x^2 + 5 c x^4 = 0.
    root = np.sqrt(max(9 * b * b - 20 * a * c, 0.0))
    y = sorted(((-3 * b - root) / (10 * c), (-3 * b + root) / (10 * c)))
    nq, nr = np.sqrt(np.clip(y, lo * lo, hi * hi))
    if abs(nq - q) + abs(nr - r) < 1e-15:
      break
    q, r = nq, nr
  return float(a), float(b), float(c), float(abs(err))


def polar_express(steps: int, lower: float = 1e-3, eps: float = 1e-2,
                  cushion: float = 0.02407327424182761) -> np.ndarray:
  """The [steps, 3] Polar Express table (module docstring)."""
  lo, hi, out = lower, 1.0, []
  for t in range(steps):
    if hi - lo < 1e-3:
      a, b, c = CONVERGED
    else:
      a, b, c, _ = minimax_odd_quintic(max(lo, cushion * hi), hi)
    p = lambda x, a=a, b=b, c=c: a * x + b * x**3 + c * x**5
    s = 2.0 / (p(lo) + p(hi))
    a, b, c = a * s, b * s, c * s
    if t < steps - 1:
      a, b, c = a / (1 + eps), b / (1 + eps)**3, c / (1 + eps)**5
    out.append((a, b, c))
    lo = a * lo + b * lo**3 + c * lo**5
    hi = 2.0 - lo
  return np.asarray(out, np.float64)
