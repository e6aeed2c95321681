"""Which nodes take part in a run, who was asked each round, and who answered.

Node ids are random, so the server orders nodes by the key each one reports in the stats
round: its partition id (a partition of a shared data set) or its ``node-name`` (a site
with its own folder). A node that never reported (it failed the stats round, or joined
later) takes no part in the later phases.
"""

from __future__ import annotations

import json
import logging
import math
from typing import Iterable

import numpy as np
from flwr.server.client_proxy import ClientProxy

log = logging.getLogger(__name__)

NodeKey = int | str


def reported_key(metrics: dict) -> NodeKey:
    """The key a node put in its reply: ``partition-id`` or ``node-name``."""
    if "partition-id" in metrics:
        return int(metrics["partition-id"])
    return str(metrics["node-name"])


def key_order(key: NodeKey) -> tuple[int, int, str]:
    """Partition ids in numeric order first, then node names alphabetically."""
    return (0, key, "") if isinstance(key, int) else (1, 0, key)


def describe(failure) -> str:
    """A client failure as text: an exception, or a result with a non-OK status."""
    if isinstance(failure, tuple):
        return f"status {failure[1].status.code.name}: {failure[1].status.message}"
    return repr(failure)


class Roster:
    """Node keys by Flower cid, label histograms by node key, and per-round accounting."""

    def __init__(self) -> None:
        self.key_of: dict[str, NodeKey] = {}
        self.histograms: dict[NodeKey, np.ndarray] = {}
        self._asked: dict[tuple[str, int], set[str]] = {}

    # ------------------------------------------------------------ membership
    def report(self, cid: str, metrics: dict) -> None:
        """Record a stats-round reply: the node's key and label histogram."""
        key = reported_key(metrics)
        self.key_of[cid] = key
        if "histogram" in metrics:   # (a resumed run's replay under histogram-epsilon: not)
            self.histograms[key] = np.asarray(json.loads(str(metrics["histogram"])), np.int64)

    @property
    def keys(self) -> list[NodeKey]:
        return sorted(self.histograms, key=key_order)

    def order(self, client: ClientProxy) -> tuple:
        """Sort key of a client: its node key (known after the stats round), then cid."""
        key = self.key_of.get(client.cid)
        return (0, *key_order(key), client.cid) if key is not None else (1, 0, 0, "", client.cid)

    def label(self, cid: str) -> str:
        key = self.key_of.get(cid)
        if key is None:
            return f"node {cid}"
        return f"partition {key}" if isinstance(key, int) else str(key)

    def members(self, clients: Iterable[ClientProxy]) -> list[ClientProxy]:
        """The clients that reported in the stats round (all of them before it), ordered."""
        clients = list(clients)
        if self.key_of:
            clients = [c for c in clients if c.cid in self.key_of]
        return sorted(clients, key=self.order)

    # ------------------------------------------------------------ accounting
    def asked(self, kind: str, server_round: int, clients: Iterable[ClientProxy]) -> None:
        self._asked[(kind, server_round)] = {c.cid for c in clients}

    def account(self, kind: str, server_round: int, results: list, failures: list
                ) -> tuple[int, list[dict], list[str]]:
        """(nodes asked, [{node, reason}] of those that did not answer, unattributed errors).

        A non-OK reply names its node; an exception (a time-out, a crashed ClientApp) does
        not, so every asked node without a reply is listed as failed or timed out."""
        asked = self._asked.pop((kind, server_round), set())
        answered = {c.cid for c, _ in results}
        failed = [{"node": self.label(f[0].cid), "reason": f[1].status.message}
                  for f in failures if isinstance(f, tuple)]
        named = {f[0].cid for f in failures if isinstance(f, tuple)}
        errors = [repr(f) for f in failures if not isinstance(f, tuple)]
        silent = sorted(asked - answered - named, key=self.label)
        reason = errors[0] if len(silent) == 1 and len(errors) == 1 else \
            "no reply (failed or timed out)"
        failed += [{"node": self.label(cid), "reason": reason} for cid in silent]
        return len(asked), failed, errors


def needed(asked: int, fraction: float) -> int:
    """Replies a round needs: ``min-fit-fraction`` of the nodes asked, at least one."""
    return max(1, math.ceil(fraction * asked - 1e-9)) if asked else 1
