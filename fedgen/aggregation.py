"""Weight averaging and pooled client evaluation used by the strategies."""

from __future__ import annotations

import json
from typing import Mapping, Sequence

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


def rowwise_average(layers: Sequence[np.ndarray], row_weights: np.ndarray,
                    fallback: np.ndarray) -> np.ndarray:
    """Average one (rows, ...) array row by row: row r is sum_k W[k, r] layers[k][r] /
    sum_k W[k, r], with ``row_weights`` W of shape (clients, rows).

    For a class-embedding table whose row c only clients holding class c train: weighting
    row c by each client's count of class c keeps the clients without it, whose copy of
    the row never moved, from diluting its update. A row no client weights keeps
    ``fallback``'s row (the plain average).
    """
    w = np.asarray(row_weights, dtype=np.float64)
    stack = np.stack([np.asarray(x, dtype=np.float64) for x in layers])
    if w.shape != stack.shape[:2]:
        raise ValueError(f"row_weights of shape {w.shape} for {len(layers)} arrays of "
                         f"{stack.shape[1]} rows")
    total = w.sum(axis=0)
    shape = (*w.shape, *([1] * (stack.ndim - 2)))
    mixed = (w.reshape(shape) * stack).sum(axis=0) / np.where(total > 0, total, 1).reshape(
        shape[1:])
    out = np.where((total > 0).reshape(shape[1:]), mixed, fallback)
    return out.astype(np.asarray(fallback).dtype)


def pool_evaluations(replies: Sequence[tuple[str, int, float, Mapping]],
                     num_classes: int) -> dict:
    """Evaluation where the data is: pool the nodes' ``(name, examples, loss, metrics)``.

    Accuracy and loss are sample-weighted means over the nodes' held-out images;
    per-class accuracy pools the nodes' per-class correct/total counts; ``by_node`` keeps
    every node's own accuracy and test size.
    """
    n = np.asarray([r[1] for r in replies], dtype=np.float64)
    correct = np.zeros(num_classes, np.int64)
    count = np.zeros(num_classes, np.int64)
    for _, _, _, metrics in replies:
        correct += np.asarray(json.loads(str(metrics["class-correct"])), np.int64)
        count += np.asarray(json.loads(str(metrics["class-count"])), np.int64)
    total = n.sum()
    mean = (lambda v: float(np.dot(n, v) / total)) if total else (lambda v: float("nan"))
    return {"accuracy": mean([float(r[3]["accuracy"]) for r in replies]),
            "loss": mean([float(r[2]) for r in replies]),
            "per_class_accuracy": [float(c / k) if k else float("nan")
                                   for c, k in zip(correct, count)],
            "examples": int(total),
            "by_node": {name: {"accuracy": float(m["accuracy"]), "examples": int(k)}
                        for name, k, _, m in replies}}
