"""Shared test helpers: tiny configs and an in-process Flower loop (no Ray)."""

from __future__ import annotations

import logging
import os
from pathlib import Path

# Before torch loads its OpenMP runtime (here and in every subprocess a test starts, which
# inherit the environment): threads that wait for work sleep instead of spinning. The
# suite runs on 2 cores shared with its own subprocesses (Ray workers, SuperNodes,
# ClientApps) and with other jobs; there, spinning OpenMP threads took a tiny DDPM epoch
# from 1.6 s to 78 s of wall time (torch's default 2 threads, load ~9). Thread counts,
# and so every figure a test computes, stay as they were.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import pytest
import torch
from flwr.common import EvaluateIns, FitIns, FitRes, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

import fedgen.inprocess
from fedgen.config import RunConfig
from fedgen.methods import METHODS
from fedgen.server_app import build_strategy
from fedgen.wire import unpack

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(num_clients=3, alpha=0.5, min_partition_size=5, diffusion_rounds=1,
            diffusion_epochs=1, unet_channels="8,16", sampling_steps=3, augment_ratio=0.3,
            classifier_rounds=1, batch_size=128)


def tiny_config(tmp_path: Path, **changes) -> RunConfig:
    values = {**TINY, "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
              **changes}
    return RunConfig(**values)


class InProcessProxy(fedgen.inprocess.InProcessProxy):
    """The in-process proxy of ``run_simulation.py --backend inprocess``, keeping every
    message it carried (``received``, and its fit replies in ``replied``) for the tests,
    with their arrays unpacked (:mod:`fedgen.wire`): the arrays as the two sides' code
    sees them. ``wire`` keeps each fit message and reply as it travelled."""

    def __init__(self, cid: str, cfg: RunConfig, node: int | dict):
        super().__init__(cid, cfg, node, METHODS[cfg.method].clients)
        self.received: list = []
        self.replied: list = []
        self.wire: list = []

    def fit(self, ins, timeout, group_id) -> FitRes:
        res = super().fit(ins, timeout, group_id)
        self.wire.append((ins, res))
        self.received.append(FitIns(unpack(ins.parameters), ins.config))
        self.replied.append(FitRes(res.status, unpack(res.parameters), res.num_examples,
                                   res.metrics))
        return res

    def evaluate(self, ins, timeout, group_id):
        self.received.append(EvaluateIns(unpack(ins.parameters), ins.config))
        return super().evaluate(ins, timeout, group_id)


def run_in_process(cfg: RunConfig, nodes: list | None = None):
    """Run a whole method through flwr.server.Server with in-process clients: one per
    partition, or one per entry of ``nodes`` (partition ids, node configs or proxies).

    Every run is also a privacy check: no array any client sent back may be one of its
    own training images or a resized copy (:func:`assert_no_image_left`), except under
    CollaFuse's cut-ratio 0, whose clients send their clean images by design."""
    strategy = build_strategy(cfg)
    nodes = list(range(cfg.num_clients)) if nodes is None else nodes
    proxies = [n if isinstance(n, ClientProxy) else InProcessProxy(f"node-{k}", cfg, n)
               for k, n in enumerate(nodes)]
    try:
        fedgen.inprocess.run_in_process(strategy, proxies)
    finally:
        if not (cfg.method == "collafuse" and 0.0 in cfg.cut_ratio_list):
            for proxy in proxies:
                assert_no_image_left(proxy)
    return strategy, proxies


def leaked_images(arrays: list[np.ndarray], images: np.ndarray, tol: float = 0.02) -> int:
    """How many images in ``arrays`` are one of ``images`` (uint8 N x C x H x W) or a
    resized copy: image-shaped arrays (4-D, the same channels, at least 4 x 4 pixels;
    uint8 read as [0, 255], floats as [-1, 1]) are compared at the smaller of the two
    sizes (the larger averaged down) and count when their mean squared error to one of the
    images is below ``tol`` in [0, 1] units (a resize round trip costs ~0.012; CollaFuse's
    images noised to the default cut are ~0.09 away)."""
    if not len(images):
        return 0
    pool = torch.nn.functional.adaptive_avg_pool2d
    own = torch.as_tensor(images, dtype=torch.float32).div(255)
    found = 0
    for arr in arrays:
        if arr.ndim != 4 or arr.shape[1] != images.shape[1] or min(arr.shape[2:]) < 4 \
                or not len(arr):
            continue
        x = torch.as_tensor(arr, dtype=torch.float32)
        x = x / 255 if arr.dtype == np.uint8 else (x + 1) / 2
        size = min(tuple(x.shape[2:]), tuple(images.shape[2:]))   # compare at the smaller
        x = pool(x, size).flatten(1) if tuple(x.shape[2:]) != size else x.flatten(1)
        ref = (pool(own, size) if tuple(own.shape[2:]) != size else own).flatten(1)
        for chunk in x.split(256):
            d = torch.cdist(chunk, ref).pow(2) / ref.shape[1]
            found += int((d.min(1).values < tol).sum())
    return found


def assert_no_image_left(proxy) -> None:
    """No reply of this in-process node carries one of its training images."""
    local = getattr(proxy, "client", None) and proxy.client.local
    if not hasattr(local, "images"):
        return   # the node never loaded its data (it never got a round)
    for reply in getattr(proxy, "replied", []):
        arrays = parameters_to_ndarrays(reply.parameters)
        n = leaked_images(arrays, local.images)
        assert n == 0, f"node {local.node}: {n} of its images left it in a reply"


@pytest.fixture(autouse=True)
def _quiet_logs():
    logging.getLogger("flwr").setLevel(logging.WARNING)
