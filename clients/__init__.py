"""Thin Flower clients: unpack, call the plain-PyTorch training code in ``fedgen``, pack.

The server names the work of a round in the fit config key ``phase``; the
:class:`PhaseRouter` hands the round to the client registered for that phase.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Mapping

from flwr.client import Client, NumPyClient
from flwr.common import (Code, EvaluateIns, EvaluateRes, FitIns, FitRes, Parameters, Status,
                         ndarrays_to_parameters, parameters_to_ndarrays)

from clients.classifier_client import (TRAINING_SETS, ClassifierClient, DifRCClassifierClient,
                                       ProximalClassifierClient)
from clients.collafuse_client import CollaFuseClient, CollaFuseGenerationClient
from clients.data_client import DataClient
from clients.diffusion_client import DiffusionClient
from clients.local import LocalData, NodeConfigError, SyntheticStore
from clients.sd_client import SDClient
from clients.sdedit_client import SDEditClient
from fedgen.wire import pack, unpack

log = logging.getLogger(__name__)

PHASE_CLIENTS: Mapping[str, type[NumPyClient]] = {
    "diffusion": DiffusionClient,
    "stats": DataClient,
    "generation": DataClient,
    "sdedit": SDEditClient,   # the generation round under generation=sdedit
    "classify": ClassifierClient,
}

NO_ARRAYS = Parameters(tensors=[], tensor_type="numpy.ndarray")
OK = Status(Code.OK, "Success")

# Builds a node's LocalData from the run's class names (sent by the server in every config).
DataLoader = Callable[[tuple[str, ...]], LocalData]


class PhaseRouter(Client):
    """A node's Flower client: hands each round to ``clients[config["phase"]]`` and adds
    the node's identity (partition id or node name) to every reply.

    ``local`` is the node's data, or a loader called once with the run's class names. A
    node whose node config cannot serve the run (missing or empty data-dir, partition id
    out of range, ...) answers every round with a non-OK status whose message names its
    node config, so the server knows which node failed and why. After the run's last
    round (``last-round`` in the fit config) the synthetic-batch store is removed.
    Arrays travel packed into one tensor each way (:mod:`fedgen.wire`).
    """

    def __init__(self, local: LocalData | DataLoader,
                 clients: Mapping[str, type[NumPyClient]] = PHASE_CLIENTS):
        self.local = local if isinstance(local, LocalData) else None
        self._load = None if isinstance(local, LocalData) else local
        self.clients = clients

    def node_data(self, config: Mapping) -> LocalData:
        if self.local is None:
            names = str(config.get("class-names", ""))
            self.local = self._load(tuple(c for c in names.split(",") if c))
        return self.local

    def handler(self, local: LocalData, config: Mapping) -> NumPyClient:
        phase = str(config.get("phase"))
        if phase not in self.clients:
            raise ValueError(f"unknown phase {phase!r}; this client handles: "
                             f"{', '.join(self.clients)}")
        return self.clients[phase](local)

    def fit(self, ins: FitIns) -> FitRes:
        try:
            local = self.node_data(ins.config)
        except NodeConfigError as exc:
            log.error("%s", exc)
            return FitRes(Status(Code.FIT_NOT_IMPLEMENTED, str(exc)), NO_ARRAYS, 0, {})
        if ins.config.get("run-key"):
            local.use_run_key(str(ins.config["run-key"]))
        start = time.perf_counter()
        weights, n, metrics = self.handler(local, ins.config).fit(
            parameters_to_ndarrays(unpack(ins.parameters)), dict(ins.config))
        if ins.config.get("last-round"):
            local.store.clear()
        return FitRes(OK, pack(ndarrays_to_parameters(weights)), n,
                      {**metrics, **local.identity,
                       "client-seconds": time.perf_counter() - start})

    def evaluate(self, ins: EvaluateIns) -> EvaluateRes:
        try:
            local = self.node_data(ins.config)
        except NodeConfigError as exc:
            log.error("%s", exc)
            return EvaluateRes(Status(Code.EVALUATE_NOT_IMPLEMENTED, str(exc)), 0.0, 0, {})
        if ins.config.get("run-key"):
            local.use_run_key(str(ins.config["run-key"]))
        loss, n, metrics = self.handler(local, ins.config).evaluate(
            parameters_to_ndarrays(unpack(ins.parameters)), dict(ins.config))
        return EvaluateRes(OK, float(loss), n, {**metrics, **local.identity})


__all__ = ["PHASE_CLIENTS", "TRAINING_SETS", "ClassifierClient", "CollaFuseClient",
           "CollaFuseGenerationClient", "DataClient", "DifRCClassifierClient",
           "DiffusionClient", "LocalData", "NodeConfigError", "PhaseRouter", "ProximalClassifierClient", "SDClient", "SDEditClient",
           "SyntheticStore"]
