"""What a client holds locally: its partition of the data and a small on-disk store for
synthetic batches the server ships (kept out of ``context.state``, which travels to the
Ray worker on every call)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from fedgen.config import RunConfig
from fedgen.data import ImageData, load_data
from fedgen.models import device
from fedgen.partition import histogram, partition
from fedgen.seeds import derive_seed

log = logging.getLogger(__name__)


class SyntheticStore:
    """Synthetic batches by name (the arm), as ``<root>/<name>.npz``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def save(self, name: str, images: np.ndarray, labels: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = self.root / f"{name}.tmp.npz"
        np.savez(tmp, images=images, labels=labels)
        tmp.replace(self.root / f"{name}.npz")

    def load(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        path = self.root / f"{name}.npz"
        if not path.is_file():
            return None
        with np.load(path) as f:
            return f["images"], f["labels"]

    def clear(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)


@dataclass
class LocalData:
    """One client's view: its images and labels, the data set's shape, a device, a store."""

    cfg: RunConfig
    partition_id: int
    images: np.ndarray
    labels: np.ndarray
    data: ImageData
    device: torch.device
    store: SyntheticStore

    def seed(self, round_seed: int) -> int:
        """This client's seed for a round: the server's round seed and the partition id."""
        return derive_seed(round_seed, self.partition_id)

    @property
    def histogram(self) -> np.ndarray:
        return histogram(self.labels, self.data.num_classes)

    @classmethod
    def from_node(cls, cfg: RunConfig, node_config: dict, run_id: int) -> "LocalData":
        """Find this node's partition from ``partition-id`` and ``num-partitions``, as set
        by the simulation engine or by ``flower-supernode --node-config``."""
        pid = int(node_config["partition-id"])
        num = int(node_config.get("num-partitions", cfg.num_clients))
        if num != cfg.num_clients:
            log.warning("num-partitions=%d from the node overrides num-clients=%d", num,
                        cfg.num_clients)
            cfg = cfg.replace(num_clients=num)
        data = load_data(cfg)
        idx = partition(data.train_y, cfg)[pid]
        root = Path(cfg.cache_dir or Path(tempfile.gettempdir()) / "fedgen-cache" /
                    f"run-{run_id}") / f"partition-{pid}"
        return cls(cfg, pid, data.train_x[idx], data.train_y[idx], data, device(),
                   SyntheticStore(root))
