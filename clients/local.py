"""What a client holds locally: its partition of the data and a small on-disk store for
synthetic batches the server ships (kept out of ``context.state``, which travels to the
Ray worker on every call)."""

from __future__ import annotations

import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from fedgen.config import RunConfig
from fedgen.data import DataError, ImageData, load_data, load_site
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


class NodeConfigError(DataError):
    """A SuperNode's node config cannot serve this run; the message names the config."""


NodeKey = int | str  # a partition id, or the node-name of a site with its own folder


@dataclass
class LocalData:
    """One client's view: its training (and held-out test) images and labels, the run's
    shape and classes, a device, a store for synthetic batches."""

    cfg: RunConfig
    node: NodeKey
    images: np.ndarray
    labels: np.ndarray
    data: ImageData
    device: torch.device
    store: SyntheticStore
    test_images: np.ndarray | None = None
    test_labels: np.ndarray | None = None

    @property
    def partition_id(self) -> NodeKey:
        return self.node

    def seed(self, round_seed: int) -> int:
        """This client's seed for a round: the server's round seed and the node's key."""
        return derive_seed(round_seed, self.node)

    @property
    def identity(self) -> dict[str, NodeKey]:
        """What the node reports so the server can order it: its key, never its data."""
        return {"partition-id": self.node} if isinstance(self.node, int) \
            else {"node-name": self.node}

    @property
    def histogram(self) -> np.ndarray:
        return histogram(self.labels, self.data.num_classes)

    @classmethod
    def from_node(cls, cfg: RunConfig, node_config: Mapping, run_id: int,
                  classes: tuple[str, ...] = ()) -> "LocalData":
        """This node's data, from its node config (simulation or ``flower-supernode
        --node-config``): ``partition-id`` + ``num-partitions`` take a partition of the
        run's data set; ``data-dir`` (+ ``node-name``) makes a site folder the node's data,
        labelled in the run's classes (``class-names``, else ``classes`` from the server).
        """
        try:
            return cls._load(cfg, dict(node_config), run_id, classes)
        except DataError as exc:
            raise NodeConfigError(f"node config {_show(node_config)}: {exc}") from None

    @classmethod
    def _load(cls, cfg: RunConfig, node_config: dict, run_id: int,
              classes: tuple[str, ...]) -> "LocalData":
        node, site = node_key(node_config, cfg.num_clients)
        if site:
            run_classes = cfg.class_list or tuple(classes)
            if not run_classes:
                raise DataError("a site folder needs the run's classes: set class-names")
            data = load_site(cfg, site, run_classes)
            x, y = data.train_x, data.train_y
        else:
            num = int(node_config.get("num-partitions", cfg.num_clients))
            if num != cfg.num_clients:
                log.warning("num-partitions=%d from the node overrides num-clients=%d", num,
                            cfg.num_clients)
                cfg = cfg.replace(num_clients=num)
            data = load_data(cfg)
            if not len(data.train_y):
                raise DataError("the run's data set holds no images to partition; give this "
                                "node its own data-dir")
            idx = partition(data.train_y, cfg)[node]
            x, y = data.train_x[idx], data.train_y[idx]
        # a site's own test/ folder, if any; a partition never gets the server's test split
        test_x, test_y = (data.test_x, data.test_y) if site else \
            (data.test_x[:0], data.test_y[:0])
        if cfg.evaluation != "server" and not len(test_y):
            x, y, test_x, test_y = holdout(x, y, cfg.test_fraction,
                                           derive_seed(cfg.seed, "holdout", node))
        tag = f"partition-{node}" if isinstance(node, int) else f"node-{node}"
        return cls(cfg, node, x, y, data, device(), SyntheticStore(cache_root(cfg, run_id) / tag),
                   test_x, test_y)

    def use_run_key(self, key: str) -> None:
        """Keep this node's cache under the server's ``run-key`` (fit config), which a
        resumed run keeps, rather than Flower's run id, which it does not: a node that
        still holds its batches and private models from before the crash finds them."""
        root = cache_root(self.cfg, key) / self.store.root.name
        if root != self.store.root:
            self.store = SyntheticStore(root)


def cache_root(cfg: RunConfig, run: int | str) -> Path:
    """The run's client cache: ``cache-dir``, else a folder per run under the temp dir."""
    return Path(cfg.cache_dir or Path(tempfile.gettempdir()) / "fedgen-cache" / f"run-{run}")


def node_key(node_config: Mapping, num_clients: int) -> tuple[NodeKey, str]:
    """(the node's key, its own data folder or ""), checked against the node config rules."""
    site = str(node_config.get("data-dir", "") or "")
    if "partition-id" in node_config:
        pid = node_config["partition-id"]
        num = int(node_config.get("num-partitions", num_clients))
        if isinstance(pid, bool) or not isinstance(pid, int) or not 0 <= pid < num:
            raise DataError(f"partition-id={pid!r} is outside num-partitions={num} "
                            f"(expected an integer 0..{num - 1})")
        return pid, site
    if site:
        name = str(node_config.get("node-name", "") or "")
        if not name:
            raise DataError("a node with its own data-dir needs node-name (or partition-id) "
                            "as its stable identity")
        return name, site
    raise DataError("give partition-id (and num-partitions) for a partition of the run's "
                    "data set, or data-dir (and node-name) for this site's own folder")


def holdout(x: np.ndarray, y: np.ndarray, fraction: float, seed: int):
    """A seeded held-out share of a node's own data for evaluation where the data is."""
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = min(len(y) - 1, max(1, round(fraction * len(y)))) if len(y) > 1 else 0
    test, train = np.sort(order[:n_test]), np.sort(order[n_test:])
    return x[train], y[train], x[test], y[test]


def _show(node_config: Mapping) -> str:
    return " ".join(f"{k}={v!r}" for k, v in node_config.items()) or "(empty)"
