"""Flower client of Gen-FedSD's generation round (``sd-where=clients``): it generates its
own deficits with the local Stable Diffusion pipeline from the class names; only counts
travel, and no image leaves the node."""

from __future__ import annotations

from flwr.client import NumPyClient

from clients.local import LocalData
from fedgen.stable_diffusion import sd_batch


class SDClient(NumPyClient):
    """Parameters: ``[deficits int64 (num_classes,)]``; the batch is kept in the node's
    store under the fit config's ``arm``, like a shipped one. Replies with counts only."""

    def __init__(self, local: LocalData):
        self.local = local

    def fit(self, parameters, config):
        loc = self.local
        images, labels = sd_batch(loc.cfg, loc.node, parameters[0], loc.data.classes,
                                  loc.data.channels, loc.data.image_size, loc.device)
        loc.store.save(str(config["arm"]), images, labels)
        return [], len(loc.labels), {"made": len(labels)}
