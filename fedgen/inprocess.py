"""An in-process federation: Flower's ``Server`` loop calls every node's client directly.

No Ray: nothing to start (Ray's start-up is ~13 s of a short run on a 2-core machine) and
no actor transfers, for one machine where that is all overhead, for a machine without Ray
(a lent GPU box), and for the tests. The strategy, the clients and every message
(``FitIns``/``FitRes`` with serialised ``Parameters``) are the very ones of the Ray
simulation and of a deployment; only the transport differs. ``run_simulation.py --backend
inprocess`` selects it.
"""

from __future__ import annotations

import secrets
from typing import Mapping

from flwr.client import NumPyClient
from flwr.common import Code, GetParametersRes, GetPropertiesRes, Status
from flwr.server import Server
from flwr.server.client_manager import SimpleClientManager
from flwr.server.client_proxy import ClientProxy

from clients import LocalData, PhaseRouter
from fedgen.config import RunConfig


class InProcessProxy(ClientProxy):
    """A ClientProxy that calls a node's client (a :class:`clients.PhaseRouter`) directly."""

    def __init__(self, cid: str, cfg: RunConfig, node: int | dict,
                 handlers: Mapping[str, type[NumPyClient]] | None = None,
                 run_id: int | None = None):
        """``node``: a partition id, or a whole node config (loaded at the first round,
        as a SuperNode does). ``run_id`` names the clients' synthetic-batch cache folder
        (when cache-dir is empty) as Flower's run id does; pass one per run: two runs at
        once must not share it. None = a fresh random id."""
        super().__init__(cid)
        if handlers is None:
            from fedgen.methods import method_for
            handlers = method_for(cfg).clients
        run_id = new_run_id() if run_id is None else run_id
        if isinstance(node, int):
            local = LocalData.from_node(cfg, {"partition-id": node,
                                              "num-partitions": cfg.num_clients}, run_id)
        else:
            def local(classes, node_config=dict(node)):
                return LocalData.from_node(cfg, node_config, run_id, classes)
        self.client = PhaseRouter(local, handlers)

    def fit(self, ins, timeout, group_id):
        return self.client.fit(ins)

    def evaluate(self, ins, timeout, group_id):
        return self.client.evaluate(ins)

    def get_properties(self, ins, timeout, group_id):
        return GetPropertiesRes(Status(Code.OK, ""), {})

    def get_parameters(self, ins, timeout, group_id):
        return GetParametersRes(Status(Code.OK, ""), None)

    def reconnect(self, ins, timeout, group_id):
        return None


def new_run_id() -> int:
    """A random 63-bit run id, like the ones Flower's SuperLink assigns."""
    return secrets.randbits(63)


def run_in_process(strategy, proxies: list[ClientProxy], round_timeout: float | None = None):
    """Run ``strategy`` to its last round with ``proxies`` as the connected nodes."""
    manager = SimpleClientManager()
    for proxy in proxies:
        manager.register(proxy)
    server = Server(client_manager=manager, strategy=strategy)
    # One client at a time: each uses all the cores through torch, and concurrent Python
    # threads tripped a CPython 3.11 parser bug in one run ("AST constructor recursion
    # depth mismatch", a client lost for a round); sequential order is also reproducible.
    server.set_max_workers(1)
    server.fit(strategy.flower_rounds, timeout=round_timeout)
    return strategy
