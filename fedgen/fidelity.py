"""Sample fidelity: how often a classifier trained on REAL images labels a synthetic
image with the class it was generated for.

The reference is scikit-learn's logistic regression on raw pixels, trained on (at most
``max_train`` of) the real training images on the server. It is an evaluation oracle
only: nothing it learns reaches the clients.
"""

from __future__ import annotations

import numpy as np
from sklearn.linear_model import LogisticRegression


class ReferenceClassifier:
    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0,
                 max_train: int = 5000):
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(labels))[:max_train]
        # No feature scaling: border pixels that are (almost) constant in real images would
        # turn tiny synthetic deviations into huge z-scores and fail good samples.
        self.model = LogisticRegression(max_iter=2000)
        self.model.fit(self._flat(images[idx]), labels[idx])

    @staticmethod
    def _flat(images: np.ndarray) -> np.ndarray:
        return images.reshape(len(images), -1).astype(np.float32) / 255.0

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        """Share of ``images`` the reference labels as ``labels`` (NaN when empty)."""
        if len(labels) == 0:
            return float("nan")
        return float((self.model.predict(self._flat(images)) == labels).mean())
