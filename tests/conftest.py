"""Shared test helpers: tiny configs and an in-process Flower loop (no Ray)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from flwr.common import (Code, FitRes, GetParametersRes, GetPropertiesRes,
                         Status)
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from clients import LocalData, PhaseRouter
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


class InProcessProxy(ClientProxy):
    """A ClientProxy that calls a client directly: the real Flower Server loop, no Ray."""

    def __init__(self, cid: str, cfg: RunConfig, node: int | dict):
        """``node``: a partition id, or a whole node config (loaded at the first round,
        as a SuperNode does)."""
        super().__init__(cid)
        if isinstance(node, int):
            local = LocalData.from_node(cfg, {"partition-id": node,
                                              "num-partitions": cfg.num_clients}, run_id=0)
        else:
            def local(classes, node_config=dict(node)):
                return LocalData.from_node(cfg, node_config, 0, classes)
        self.client = PhaseRouter(local, METHODS[cfg.method].clients)
        self.received: list = []

    def fit(self, ins, timeout, group_id) -> FitRes:
        self.received.append(ins)
        return self.client.fit(ins)

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(Status(Code.OK, ""), {})

    def get_parameters(self, ins, timeout, group_id):
        return GetParametersRes(Status(Code.OK, ""), None)

    def evaluate(self, ins, timeout, group_id):
        self.received.append(ins)
        return self.client.evaluate(ins)

    def reconnect(self, ins, timeout, group_id):
        return None


def run_in_process(cfg: RunConfig, nodes: list | None = None):
    """Run a whole method through flwr.server.Server with in-process clients: one per
    partition, or one per entry of ``nodes`` (partition ids, node configs or proxies)."""
    strategy = build_strategy(cfg)
    manager = SimpleClientManager()
    nodes = list(range(cfg.num_clients)) if nodes is None else nodes
    proxies = [n if isinstance(n, ClientProxy) else InProcessProxy(f"node-{k}", cfg, n)
               for k, n in enumerate(nodes)]
    for proxy in proxies:
        manager.register(proxy)
    Server(client_manager=manager, strategy=strategy).fit(strategy.num_rounds, timeout=None)
    return strategy, proxies


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("flwr").setLevel(logging.WARNING)
