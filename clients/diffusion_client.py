"""Flower client that trains the shared class-conditional UNet on local images."""

from __future__ import annotations

from flwr.client import NumPyClient

from clients.local import LocalData
from fedgen.diffusion import LossHook, train_ddpm
from fedgen.losses import proximal
from fedgen.models import build_scheduler, get_weights, set_weights, unet_shell
from fedgen.privacy import dp_sgd_for


class DiffusionClient(NumPyClient):
    """Unpack the global UNet, run the local DDPM loop, pack the result.

    Fit config: ``epochs`` (or ``steps``: that many optimiser steps, as FedDDPM's
    local-DDPM phase asks), ``batch-size``, ``lr``, ``seed``, ``cfg-dropout`` (label
    dropout to the null class), ``proximal-mu`` (FedProx drift term; 0 = off) and
    ``min-snr-gamma`` (loss weighting; 0 = off). Under ``dp-sgd-noise-multiplier``
    (the node's own run config) the loop runs DP-SGD and the reply says how many steps
    at what sampling rate, for the server's accountant.
    """

    def __init__(self, local: LocalData):
        self.local = local

    def loss_hooks(self, unet, config: dict) -> list[LossHook]:
        """Extra terms for the local denoising loss of ``unet`` (which holds the global
        weights when this is called): the drift term when ``proximal-mu`` > 0; methods
        override this to add theirs."""
        mu = float(config.get("proximal-mu", 0.0))
        return [proximal(unet, mu)] if mu > 0 else []

    def fit(self, parameters, config):
        loc, data = self.local, self.local.data
        unet = unet_shell(loc.cfg, data.channels, data.num_classes, data.image_size)
        set_weights(unet, parameters)
        stats = train_ddpm(unet, build_scheduler(loc.cfg), loc.images, loc.labels,
                           epochs=int(config["epochs"]), batch_size=int(config["batch-size"]),
                           lr=float(config["lr"]), seed=loc.seed(int(config["seed"])),
                           device=loc.device, loss_hooks=self.loss_hooks(unet, config),
                           cfg_dropout=float(config.get("cfg-dropout", 0.0)),
                           min_snr_gamma=float(config.get("min-snr-gamma", 0.0)),
                           max_steps=int(config.get("steps", 0)),
                           dp_sgd=dp_sgd_for(loc.cfg, loc.seed(int(config["seed"]))),
                           precision=loc.cfg.mixed_precision)
        if "dp_steps" in stats:   # what the server's accountant needs
            stats["dp-sgd-steps"] = stats.pop("dp_steps")
            stats["dp-sgd-sample-rate"] = stats.pop("dp_sample_rate")
        return get_weights(unet), len(loc.labels), stats
