"""Sample quality. Fidelity: how often a classifier trained on REAL images labels a
synthetic image with the class it was generated for. Fréchet distance: between real and
synthetic images on the features of a reference network (:class:`FeatureNet`).

The reference is scikit-learn's logistic regression on raw pixels, trained on (at most
``max_train`` of) the real training images on the server. It is an evaluation oracle
only: nothing it learns reaches the clients.
"""

from __future__ import annotations

import numpy as np
import torch

# scikit-learn and torchmetrics load where a figure is computed (on the server): this
# module is imported wherever the strategies are, ClientApp processes included.


class ReferenceClassifier:
    def __init__(self, images: np.ndarray, labels: np.ndarray, seed: int = 0,
                 max_train: int = 5000):
        rng = np.random.default_rng(seed)
        idx = rng.permutation(len(labels))[:max_train]
        # No feature scaling: border pixels that are (almost) constant in real images would
        # turn tiny synthetic deviations into huge z-scores and fail good samples.
        from sklearn.linear_model import LogisticRegression
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


class FeatureNet(torch.nn.Module):
    """The reference NETWORK whose penultimate features the Fréchet distance compares: a
    small CNN trained on the server's real training images (nothing is downloaded, so
    no Inception weights). It takes uint8 images (N, C, H, W), as torchmetrics' FID feeds
    them, and returns ``num_features`` features per image."""

    num_features = 128

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Conv2d(channels, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(),
            torch.nn.Linear(64 * 16, self.num_features), torch.nn.ReLU())
        self.head = torch.nn.Linear(self.num_features, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)

    @classmethod
    def fit(cls, images: np.ndarray, labels: np.ndarray, num_classes: int, seed: int = 0,
            epochs: int = 4, max_train: int = 5000) -> "FeatureNet":
        """Train on (at most ``max_train`` of) the real images; seeded, on the CPU."""
        gen = torch.Generator().manual_seed(seed)
        torch.manual_seed(seed)
        net = cls(images.shape[1], num_classes)
        idx = torch.randperm(len(labels), generator=gen)[:max_train]
        x = torch.as_tensor(images)[idx]
        y = torch.as_tensor(labels, dtype=torch.long)[idx]
        opt = torch.optim.Adam(net.parameters(), lr=2e-3)
        for _ in range(epochs):
            for b in torch.randperm(len(y), generator=gen).split(64):
                loss = torch.nn.functional.cross_entropy(net.head(net(x[b])), y[b])
                opt.zero_grad()
                loss.backward()
                opt.step()
        return net.eval()

    @torch.no_grad()
    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        logits = self.head(self(torch.as_tensor(images)))
        return float((logits.argmax(1).numpy() == labels).mean())


@torch.no_grad()
def frechet_distance(net: FeatureNet, real: np.ndarray, fake: np.ndarray) -> float:
    """FID (Heusel et al., 2017) between two uint8 image sets on ``net``'s features,
    computed by torchmetrics' FrechetInceptionDistance with ``net`` as the extractor. Needs
    more images per set than ``net.num_features`` (NaN otherwise)."""
    if min(len(real), len(fake)) <= net.num_features:
        return float("nan")
    from torchmetrics.image.fid import FrechetInceptionDistance
    fid = FrechetInceptionDistance(feature=net, normalize=False)
    for chunk in np.array_split(real, max(1, len(real) // 1000)):
        fid.update(torch.as_tensor(chunk), real=True)
    for chunk in np.array_split(fake, max(1, len(fake) // 1000)):
        fid.update(torch.as_tensor(chunk), real=False)
    return float(fid.compute())


class Judge:
    """Every quality figure of synthetic images against one real set: fidelity, per-class
    fidelity (:class:`ReferenceClassifier`) and the Fréchet distance (:class:`FeatureNet`),
    each reference fitted once, on first use. The one place runs, ``fedgen.pretrain`` and
    the benchmarks get their quality figures from."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int,
                 seed: int = 0):
        self.images, self.labels, self.num_classes, self.seed = images, labels, num_classes, seed
        self._reference: ReferenceClassifier | None = None
        self._feature_net: FeatureNet | None = None

    @property
    def reference(self) -> ReferenceClassifier:
        if self._reference is None:
            self._reference = ReferenceClassifier(self.images, self.labels, seed=self.seed)
        return self._reference

    def fidelity(self, images: np.ndarray, labels: np.ndarray) -> float:
        return self.reference.accuracy(images, labels)

    def per_class(self, images: np.ndarray, labels: np.ndarray) -> list[float]:
        """Fidelity per class (NaN for a class without samples)."""
        return [self.fidelity(images[labels == c], labels[labels == c])
                for c in range(self.num_classes)]

    def frechet(self, images: np.ndarray) -> float:
        """Fréchet distance to the real images (NaN for too few samples)."""
        if len(images) <= FeatureNet.num_features:   # too few for a covariance estimate
            return float("nan")
        if self._feature_net is None:
            self._feature_net = FeatureNet.fit(self.images, self.labels, self.num_classes,
                                               seed=self.seed)
        return frechet_distance(self._feature_net, self.images, images)

    def report(self, images: np.ndarray, labels: np.ndarray) -> dict:
        return {"fidelity": self.fidelity(images, labels),
                "per_class_fidelity": self.per_class(images, labels),
                "frechet_distance": self.frechet(images)}
