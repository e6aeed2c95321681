"""Class balancing: the fill-to-max deficit rule and the non-generative fillers.

Deficit rule (methods.md, shared by every generative method): client ``k`` receives
``s[k][c] = round(r * (M[k] - n[k][c]))`` samples of class ``c`` with ``M[k] = max_c n[k][c]``;
absent classes are included and so get ``round(r * M[k])``.
"""

from __future__ import annotations

import numpy as np


def fill_to_max(counts: np.ndarray, ratio: float) -> np.ndarray:
    """Synthetic samples per class for one client (1-D) or per client (2-D, row-wise)."""
    counts = np.asarray(counts, dtype=np.int64)
    top = counts.max(axis=-1, keepdims=True)
    return np.rint(ratio * (top - counts)).astype(np.int64)


def present_only(deficits: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """The deficits a client can fill from its own images (absent classes stay absent)."""
    return np.where(np.asarray(counts) > 0, deficits, 0)


def oversample(images: np.ndarray, labels: np.ndarray, deficits: np.ndarray,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Extra copies, drawn with replacement, of the client's own images per class
    (the original's ``self_supplement``)."""
    picks = [rng.choice(np.flatnonzero(labels == c), size=int(k), replace=True)
             for c, k in enumerate(present_only(deficits, np.bincount(labels, minlength=len(deficits))))
             if k > 0]
    idx = np.concatenate(picks) if picks else np.zeros(0, dtype=np.int64)
    return images[idx], labels[idx]


def noise_fill(images: np.ndarray, labels: np.ndarray, deficits: np.ndarray, sigma: float,
               rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`oversample`, plus Gaussian pixel noise of ``sigma`` in [-1, 1] units."""
    x, y = oversample(images, labels, deficits, rng)
    noisy = x.astype(np.float32) + rng.normal(0.0, sigma * 127.5, size=x.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8), y


def judge_keep(prob: np.ndarray, labels: np.ndarray, quota: np.ndarray, threshold: float,
               floor: float = 0.0) -> np.ndarray:
    """Which rows of one synthetic batch to keep, class by class: the best-scored rows of
    class ``c`` (``prob``: a judge's probability of each row's label), as many as score at
    least ``threshold`` but at most ``quota[c]``, and at least ``ceil(floor * quota[c])`` of
    them whatever they score (as far as the batch holds them). With one row generated per
    quota slot and ``floor`` 0 that is every row at or above the threshold; a batch generated
    larger than its quota (a pool) keeps its best rows up to the quota."""
    prob, labels = np.asarray(prob), np.asarray(labels)
    keep = np.zeros(len(labels), dtype=bool)
    for c in np.unique(labels):
        rows = np.flatnonzero(labels == c)
        best = rows[np.argsort(-prob[rows], kind="stable")]   # ties: the earlier row first
        q = int(quota[c])
        n = max(int((prob[rows] >= threshold).sum()), int(np.ceil(round(floor * q, 9))))
        keep[best[:min(n, q)]] = True
    return keep


def proportional_counts(weights: np.ndarray, total: int) -> np.ndarray:
    """``total`` split in proportion to ``weights`` (largest remainder: the parts are
    integers, sum to ``total`` exactly, and a zero weight gets nothing)."""
    w = np.asarray(weights, dtype=np.float64)
    if total <= 0 or w.sum() <= 0:
        return np.zeros(len(w), dtype=np.int64)
    exact = total * w / w.sum()
    counts = np.floor(exact).astype(np.int64)
    rest = total - int(counts.sum())
    order = np.argsort(-(exact - counts), kind="stable")   # ties: the lower index first
    counts[order[:rest]] += 1
    return counts
