"""Shared test helpers: tiny configs and an in-process Flower loop (no Ray)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Before torch loads its OpenMP runtime (here and in every subprocess a test starts, which
# inherit the environment): threads that wait for work sleep instead of spinning. The
# suite runs on 2 cores shared with its own subprocesses (Ray workers, SuperNodes,
# ClientApps) and with other jobs; there, spinning OpenMP threads took a tiny DDPM epoch
# from 1.6 s to 78 s of wall time (torch's default 2 threads, load ~9). Thread counts,
# and so every figure a test computes, stay as they were.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest
from flwr.common import FitRes
from flwr.server.client_proxy import ClientProxy

import fedgen.inprocess
from fedgen.config import RunConfig
from fedgen.methods import METHODS
from fedgen.server_app import build_strategy

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(num_clients=3, alpha=0.5, min_partition_size=5, diffusion_rounds=1,
            diffusion_epochs=1, unet_channels="8,16", sampling_steps=3, augment_ratio=0.3,
            classifier_rounds=1, batch_size=128)


def tiny_config(tmp_path: Path, **changes) -> RunConfig:
    values = {**TINY, "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
              **changes}
    return RunConfig(**values)


class InProcessProxy(fedgen.inprocess.InProcessProxy):
    """The in-process proxy of ``run_simulation.py --backend inprocess``, keeping every
    message it carried (``received``, and its fit replies in ``replied``) for the tests."""

    def __init__(self, cid: str, cfg: RunConfig, node: int | dict):
        super().__init__(cid, cfg, node, METHODS[cfg.method].clients)
        self.received: list = []
        self.replied: list = []

    def fit(self, ins, timeout, group_id) -> FitRes:
        self.received.append(ins)
        self.replied.append(super().fit(ins, timeout, group_id))
        return self.replied[-1]

    def evaluate(self, ins, timeout, group_id):
        self.received.append(ins)
        return super().evaluate(ins, timeout, group_id)


def run_in_process(cfg: RunConfig, nodes: list | None = None):
    """Run a whole method through flwr.server.Server with in-process clients: one per
    partition, or one per entry of ``nodes`` (partition ids, node configs or proxies)."""
    strategy = build_strategy(cfg)
    nodes = list(range(cfg.num_clients)) if nodes is None else nodes
    proxies = [n if isinstance(n, ClientProxy) else InProcessProxy(f"node-{k}", cfg, n)
               for k, n in enumerate(nodes)]
    fedgen.inprocess.run_in_process(strategy, proxies)
    return strategy, proxies


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("flwr").setLevel(logging.WARNING)
