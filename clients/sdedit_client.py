"""Flower client of the generation round under ``generation=sdedit``: it makes its own
synthetic batch from its own images with the global DDPM; no image leaves the node."""

from __future__ import annotations

from flwr.client import NumPyClient

from clients.local import LocalData
from fedgen.diffusion import sdedit_fill
from fedgen.models import build_sampler, build_scheduler, set_weights, unet_shell


class SDEditClient(NumPyClient):
    """Parameters: ``[deficits int64 (num_classes,), *global UNet weights]``; the SDEdit
    batch is kept in the node's store under the fit config's ``arm``, like a shipped one.
    Replies with no arrays, only counts."""

    def __init__(self, local: LocalData):
        self.local = local

    def fit(self, parameters, config):
        loc, cfg = self.local, self.local.cfg
        deficits, weights = parameters[0], parameters[1:]
        unet = unet_shell(cfg, loc.data.channels, loc.data.num_classes, loc.data.image_size)
        set_weights(unet, weights)
        images, labels = sdedit_fill(
            unet, build_sampler(cfg.sampler, build_scheduler(cfg)), loc.images, loc.labels,
            deficits, t_start=cfg.sdedit_t, steps=cfg.sampling_steps,
            seed=loc.seed(int(config["seed"])), device=loc.device,
            guidance_scale=cfg.guidance_scale, precision=cfg.mixed_precision)
        loc.store.save(str(config["arm"]), images, labels)
        return [], len(loc.labels), {"made": len(labels)}
