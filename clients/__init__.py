"""Thin Flower clients: unpack, call the plain-PyTorch training code in ``fedgen``, pack.

The server names the work of a round in the fit config key ``phase``; the
:class:`PhaseRouter` hands the round to the client registered for that phase.
"""

from __future__ import annotations

import time
from typing import Mapping

from flwr.client import NumPyClient

from clients.classifier_client import TRAINING_SETS, ClassifierClient
from clients.data_client import DataClient
from clients.diffusion_client import DiffusionClient
from clients.local import LocalData, SyntheticStore

PHASE_CLIENTS: Mapping[str, type[NumPyClient]] = {
    "diffusion": DiffusionClient,
    "stats": DataClient,
    "generation": DataClient,
    "classify": ClassifierClient,
}


class PhaseRouter(NumPyClient):
    """Dispatches each round to ``clients[config["phase"]]``; after the run's last round
    (``last-round`` in the fit config) it removes the client's synthetic-batch store."""

    def __init__(self, local: LocalData, clients: Mapping[str, type[NumPyClient]] = PHASE_CLIENTS):
        self.local = local
        self.clients = clients

    def fit(self, parameters, config):
        phase = str(config.get("phase"))
        if phase not in self.clients:
            raise ValueError(f"unknown phase {phase!r}; this client handles: "
                             f"{', '.join(self.clients)}")
        start = time.perf_counter()
        weights, n, metrics = self.clients[phase](self.local).fit(parameters, config)
        if config.get("last-round"):
            self.local.store.clear()
        return weights, n, {**metrics, "client-seconds": time.perf_counter() - start}


__all__ = ["PHASE_CLIENTS", "TRAINING_SETS", "ClassifierClient", "DataClient",
           "DiffusionClient", "LocalData", "PhaseRouter", "SyntheticStore"]
