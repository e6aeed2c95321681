"""Weight averaging used by the strategies."""

from __future__ import annotations

from typing import Sequence

import numpy as np


def weighted_average(models: Sequence[Sequence[np.ndarray]],
                     weights: Sequence[float]) -> list[np.ndarray]:
    """sum_k w_k * theta_k / sum_k w_k, layer by layer (McMahan et al. 2017, FedAvg).

    Pass ``weights`` = sample counts for sample-weighted FedAvg, or ones for the
    unweighted average. Each output keeps its input dtype (integer buffers are rounded).
    """
    w = np.asarray(weights, dtype=np.float64)
    if len(models) == 0 or len(w) != len(models) or w.sum() <= 0:
        raise ValueError(f"need one positive weight per model, got {len(models)} models "
                         f"and weights {list(weights)}")
    w = w / w.sum()
    out = []
    for layers in zip(*models):
        ref = np.asarray(layers[0])
        floating = np.issubdtype(ref.dtype, np.floating)
        acc = np.zeros(ref.shape, dtype=ref.dtype if floating else np.float64)
        for wk, layer in zip(w, layers):  # accumulate in place: no per-client temporaries
            acc += acc.dtype.type(wk) * np.asarray(layer, dtype=acc.dtype)
        out.append(acc if floating else np.rint(acc).astype(ref.dtype))
    return out
