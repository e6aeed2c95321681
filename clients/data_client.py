"""Flower client for the data rounds: it reports its label histogram (the stats round;
noised under ``histogram-epsilon``) and keeps the synthetic batch the server ships it (the
generation round)."""

from __future__ import annotations

import json

from flwr.client import NumPyClient

from clients.local import LocalData
from fedgen.privacy import noise_rng, noisy_histogram


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
        metrics = {"received": received}
        # Once per run: a second noisy copy would cost epsilon again (a resumed run's replay
        # of the stats round keeps the counts it saved).
        if config.get("phase") == "stats" and not (config.get("replay")
                                                   and self.local.cfg.histogram_epsilon > 0):
            metrics["histogram"] = json.dumps(self.reported_histogram().tolist())
        return [], len(self.local.labels), metrics

    def reported_histogram(self):
        """The label counts as they leave the node: with ``histogram-epsilon`` > 0, local
        DP noise (:func:`fedgen.privacy.noisy_histogram`), drawn here, so the server
        never sees the exact counts."""
        cfg = self.local.cfg
        return noisy_histogram(self.local.histogram, cfg.histogram_epsilon,
                               noise_rng(cfg, "histogram", self.local.node))
