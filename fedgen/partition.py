"""Label partitions of the training set: one list of row indices per client.

The Dirichlet split is flwr-datasets' :class:`DirichletPartitioner` (per class, client
shares drawn from Dirichlet(alpha); re-drawn until every client holds
``min-partition-size`` samples), run over an in-memory table of labels and row indices
so that no data set ever goes through the hub. Every arm of a run uses the same result.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from fedgen.config import ConfigError, RunConfig

log = logging.getLogger(__name__)


def dirichlet_partition(labels: np.ndarray, num_clients: int, alpha: float, seed: int,
                        min_size: int) -> list[np.ndarray]:
    """Row indices per client from flwr-datasets' DirichletPartitioner."""
    from datasets import Dataset
    from flwr_datasets.partitioner import DirichletPartitioner

    table = Dataset.from_dict({"label": labels.tolist(), "idx": list(range(len(labels)))})
    part = DirichletPartitioner(num_partitions=num_clients, partition_by="label",
                                alpha=alpha, min_partition_size=min_size, seed=seed)
    part.dataset = table
    try:
        return [np.sort(np.asarray(part.load_partition(k)["idx"], dtype=np.int64))
                for k in range(num_clients)]
    except ValueError as exc:
        raise ConfigError(f"alpha={alpha}, num-clients={num_clients}, min-partition-size="
                          f"{min_size}: the Dirichlet split failed ({exc}); lower "
                          f"min-partition-size or num-clients") from None


def iid_partition(n: int, num_clients: int, seed: int) -> list[np.ndarray]:
    """A seeded shuffle cut into ``num_clients`` near-equal shards."""
    if num_clients > n:
        raise ConfigError(f"num-clients={num_clients} exceeds the {n} training samples")
    order = np.random.default_rng(seed).permutation(n)
    return [np.sort(s).astype(np.int64) for s in np.array_split(order, num_clients)]


@functools.lru_cache(maxsize=8)
def _partition_cached(labels_key: bytes, scheme: str, num_clients: int, alpha: float,
                      seed: int, min_size: int) -> tuple[np.ndarray, ...]:
    labels = np.frombuffer(labels_key, dtype=np.int64)
    if scheme == "iid":
        return tuple(iid_partition(len(labels), num_clients, seed))
    return tuple(dirichlet_partition(labels, num_clients, alpha, seed, min_size))


def partition(labels: np.ndarray, cfg: RunConfig) -> list[np.ndarray]:
    """The run's partition (cached per process): list of sorted row indices per client."""
    key = np.ascontiguousarray(labels, dtype=np.int64).tobytes()
    return list(_partition_cached(key, cfg.partitioning, cfg.num_clients, cfg.alpha,
                                  cfg.seed, cfg.min_partition_size))


def histogram(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Samples per class, shape (num_classes,)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes)


def histograms(labels: np.ndarray, parts: list[np.ndarray], num_classes: int) -> np.ndarray:
    """Client x class counts, shape (num_clients, num_classes)."""
    return np.stack([histogram(labels[p], num_classes) for p in parts])
