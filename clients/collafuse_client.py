"""CollaFuse's Flower clients (methods.md D): a PRIVATE denoiser for t <= the client's cut
point, kept on the node's disk between rounds and never sent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flwr.client import NumPyClient

from clients.local import LocalData
from fedgen.collafuse import (client_part, client_range, disclosure_mse, noise_to_cut,
                              train_private)
from fedgen.models import (build_sampler, build_scheduler, build_unet, get_weights,
                           set_weights, unet_shell)
from fedgen.seeds import derive_seed


def private_path(local: LocalData, previous: bool = False) -> Path:
    """Where a node keeps its private UNet: beside its synthetic-batch store, not in it
    (the store is removed after the run; the private model is the node's to keep). The
    ``previous`` round's copy is kept too: a run killed after this node saved round r+1
    but before the server's checkpoint of it resumes at round r+1 from round r's."""
    name = f"{local.store.root.name}-unet{'.previous' if previous else ''}.npz"
    return local.store.root.parent / "private" / name


def _saved_round(path: Path) -> int:
    with np.load(path) as f:
        return int(f["round"]) if "round" in f.files else 0


def load_private(local: LocalData, fresh: bool = False, before: int | None = None):
    """The node's private UNet: a seeded fresh one (``fresh``: the phase's first round),
    else the newest one saved after a round before ``before`` (None: the newest)."""
    cfg, data = local.cfg, local.data
    if fresh:
        return build_unet(cfg, data.channels, data.num_classes, data.image_size,
                          seed=derive_seed(cfg.seed, "private-unet", local.node))
    saved = [(_saved_round(p), p) for p in (private_path(local), private_path(local, True))
             if p.is_file()]
    saved = [(r, p) for r, p in saved if before is None or r < before]
    if not saved:
        raise FileNotFoundError(f"node {local.node}: no private CollaFuse UNet at "
                                f"{private_path(local)}: it took part in no training round "
                                f"of this run (or the folder was removed)")
    path = max(saved, key=lambda s: s[0])[1]
    unet = unet_shell(cfg, data.channels, data.num_classes, data.image_size)
    with np.load(path) as f:
        set_weights(unet, [f[f"arr_{i}"] for i in range(len(f.files) - ("round" in f.files))])
    return unet


def save_private(local: LocalData, unet, rnd: int = 0) -> None:
    """Save the private UNet after round ``rnd``; the copy of an earlier round becomes
    the previous one."""
    path, previous = private_path(local), private_path(local, previous=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_file() and _saved_round(path) < rnd:
        path.replace(previous)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, *get_weights(unet), round=np.int64(rnd))
    tmp.replace(path)


class CollaFuseClient(NumPyClient):
    """Phase ``collafuse``: train the private UNet on t <= ``cut-t`` (fit config), then
    send ONLY the node's images noised to ``cut-t`` and their labels (nothing for a cut of
    T). Metrics: the private loss and the disclosure MSE of what was sent."""

    def __init__(self, local: LocalData):
        self.local = local

    def fit(self, parameters, config):
        loc, cfg = self.local, self.local.cfg
        scheduler = build_scheduler(cfg)
        t_c, seed = int(config["cut-t"]), loc.seed(int(config["seed"]))
        metrics: dict = {"cut-t": t_c}
        if client_range(t_c, cfg.num_train_timesteps) is not None:
            rnd = int(config["round"])
            unet = load_private(loc, fresh=rnd == 1, before=rnd)
            stats = train_private(unet, scheduler, loc.images, loc.labels, t_c,
                                  epochs=int(config["epochs"]),
                                  batch_size=int(config["batch-size"]), lr=float(config["lr"]),
                                  seed=seed, device=loc.device,
                                  cfg_dropout=float(config.get("cfg-dropout", 0.0)),
                                  min_snr_gamma=float(config.get("min-snr-gamma", 0.0)),
                                  precision=cfg.mixed_precision)
            save_private(loc, unet, rnd)
            metrics.update(stats)
        sent = noise_to_cut(scheduler, loc.images, t_c, derive_seed(seed, "cut"))
        mse = disclosure_mse(sent, loc.images)
        if mse is not None:
            metrics["disclosure-mse"] = mse
        return ([sent, loc.labels] if len(sent) else []), len(loc.labels), metrics


class CollaFuseGenerationClient(NumPyClient):
    """Phase ``collafuse-generation``: parameters ``[counts, partial]``, the server's
    partial samples of the node's deficits (labels in class order); the private UNet
    finishes them on t <= ``cut-t``; the batch is kept like a shipped one. Replies with
    counts only."""

    def __init__(self, local: LocalData):
        self.local = local

    def fit(self, parameters, config):
        loc, cfg = self.local, self.local.cfg
        counts, partial = parameters[0], parameters[1]
        t_c = int(config["cut-t"])
        labels = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
        unet = load_private(loc) if t_c > 0 else None
        images = client_part(unet, build_sampler(cfg.sampler, build_scheduler(cfg)), labels,
                             partial, t_c, steps=cfg.sampling_steps,
                             seed=loc.seed(int(config["seed"])), device=loc.device,
                             guidance_scale=cfg.guidance_scale, progress=False,
                             precision=cfg.mixed_precision)
        loc.store.save(str(config["arm"]), images, labels)
        return [], len(loc.labels), {"made": len(labels)}
