"""What per-round local differential privacy adds up to over a whole federation (a privacy accountant).

Each round a client releases one clipped, Gaussian-noised update (Flower's LocalDpMod), which is
(epsilon, delta)-DP per round. Over k rounds the guarantees compose. Two standard bounds:
- basic composition (Dwork & Roth 2014, Theorem 3.16): (k epsilon, k delta);
- zero-concentrated DP (Bun & Steinke 2016): the Gaussian mechanism with sensitivity S and noise std sigma
  is rho-zCDP with rho = S^2 / (2 sigma^2) (Proposition 1.6); rho adds up over rounds (Lemma 2.3); and
  rho-zCDP implies (rho + 2 sqrt(rho ln(1/delta)), delta)-DP for every delta (Proposition 1.3).
The zCDP bound grows with sqrt(k) rather than k, so it is the one to quote for many rounds.
"""

from __future__ import annotations

import math


def compose_rounds(epsilon: float, delta: float, sensitivity: float, noise_std: float, rounds: int) -> dict:
    """The privacy spent by a client that took part in ``rounds`` rounds (each (epsilon, delta)-DP)."""
    rho = rounds * sensitivity ** 2 / (2 * noise_std ** 2)
    return {"rounds": rounds,
            "basic_composition": {"epsilon": rounds * epsilon, "delta": rounds * delta},
            "zcdp": {"rho": rho, "epsilon": rho + 2 * math.sqrt(rho * math.log(1 / delta)), "delta": delta}}
