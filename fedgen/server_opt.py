"""Server-side updates of a global model from the clients' average: plain NumPy, no Flower.

FedOpt (Reddi et al., 2021, Algorithm 2) treats ``delta = average - current`` as a
pseudo-gradient. The formulas and the absence of bias correction follow Flower's own
``FedAvgM`` / ``FedAdam`` strategies (flwr.server.strategy), which cannot be reused here
because they ARE strategies: this is the same arithmetic on arrays, for one model of a
phased run. Integer buffers (counters) take the average as they are.
"""

from __future__ import annotations

import numpy as np

Arrays = list[np.ndarray]

BETA_2 = 0.99  # Flower's FedAdam default
TAU = 1e-3     # adaptivity floor; Reddi et al. found 1e-3 a robust choice


class ServerOptimizer:
    """``fedavg`` (x + lr * delta; lr = 1 is the average itself), ``fedavgm``
    (m = momentum * m + delta; x + lr * m) or ``fedadam`` (m = b1 m + (1 - b1) delta,
    v = b2 v + (1 - b2) delta^2; x + lr * m / (sqrt(v) + tau))."""

    def __init__(self, kind: str, lr: float = 1.0, momentum: float = 0.9,
                 beta_2: float = BETA_2, tau: float = TAU):
        if kind not in ("fedavg", "fedavgm", "fedadam"):
            raise ValueError(f"unknown server optimiser {kind!r}")
        self.kind, self.lr, self.momentum, self.beta_2, self.tau = kind, lr, momentum, beta_2, tau
        self.m: Arrays | None = None
        self.v: Arrays | None = None

    def step(self, current: Arrays, average: Arrays) -> Arrays:
        if self.kind == "fedavg" and self.lr == 1.0:
            return [a.copy() for a in average]
        floats = [np.issubdtype(a.dtype, np.floating) for a in average]
        delta = [a - c if f else None for a, c, f in zip(average, current, floats)]
        if self.kind == "fedavg":
            step = delta
        elif self.kind == "fedavgm":
            self.m = [d if m is None or d is None else self.momentum * m + d
                      for m, d in zip(self.m or [None] * len(delta), delta)]
            step = self.m
        else:
            b1 = self.momentum
            self.m = [None if d is None else (1 - b1) * d if m is None else b1 * m + (1 - b1) * d
                      for m, d in zip(self.m or [None] * len(delta), delta)]
            self.v = [None if d is None else (1 - self.beta_2) * d * d if v is None
                      else self.beta_2 * v + (1 - self.beta_2) * d * d
                      for v, d in zip(self.v or [None] * len(delta), delta)]
            step = [None if m is None else m / (np.sqrt(v) + self.tau)
                    for m, v in zip(self.m, self.v)]
        return [(c + self.lr * s).astype(c.dtype) if f else a.copy()
                for c, a, s, f in zip(current, average, step, floats)]


def ema_update(ema: Arrays | None, new: Arrays, decay: float) -> Arrays:
    """ema = decay * ema + (1 - decay) * new (the first call copies ``new``)."""
    if ema is None or decay == 0.0:
        return [a.copy() for a in new]
    return [(decay * e + (1 - decay) * n).astype(n.dtype)
            if np.issubdtype(n.dtype, np.floating) else n.copy() for e, n in zip(ema, new)]
