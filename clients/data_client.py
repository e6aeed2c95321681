"""Flower client for the data rounds: it reports its label histogram (the stats round)
and keeps the synthetic batch the server ships it (the generation round)."""

from __future__ import annotations

import json

from flwr.client import NumPyClient

from clients.local import LocalData


class DataClient(NumPyClient):
    """Fit config: ``arm`` names the batch being shipped (generation round only).

    Parameters, when present, are ``[images uint8 (N, C, H, W), labels int64 (N,)]``; the
    batch stays on the client (it is never sent back).
    """

    def __init__(self, local: LocalData):
        self.local = local

    def fit(self, parameters, config):
        received = 0
        if config.get("phase") == "generation":   # keep the batch, an empty one too
            images, labels = parameters if parameters else \
                (self.local.images[:0], self.local.labels[:0])
            self.local.store.save(str(config["arm"]), images, labels)
            received = len(labels)
        metrics = {"histogram": json.dumps(self.local.histogram.tolist()),
                   "received": received}
        return [], len(self.local.labels), metrics
