"""generation=sdedit (methods.md A.3, seed 000's original generator): each client edits
its OWN images with the global DDPM; no image travels either way."""

import sys

import numpy as np
import torch
from flwr.common import parameters_to_ndarrays

from clients.local import SyntheticStore
from fedgen.balancing import fill_to_max, present_only
from fedgen.config import ConfigError, RunConfig
from fedgen.data import load_data
from fedgen.diffusion import sdedit
from fedgen.models import build_sampler, build_scheduler, build_unet
from tests.conftest import ROOT, run_in_process, tiny_config

CPU = torch.device("cpu")


def test_sdedit_keeps_labels_and_stays_near_the_source_at_small_t():
    cfg = RunConfig(unet_channels="8,16")
    data = load_data(cfg)
    x, y = data.train_x[:40], data.train_y[:40]
    unet = build_unet(cfg, 1, 10, 8, seed=0)
    sampler = build_sampler("ddim", build_scheduler(cfg))
    near = sdedit(unet, sampler, x, y, t_start=5, steps=5, seed=1, device=CPU)
    far = sdedit(unet, sampler, x, y, t_start=600, steps=5, seed=1, device=CPU)
    assert near.dtype == np.uint8 and near.shape == x.shape
    d_near = np.abs(near.astype(int) - x).mean()
    assert d_near < 10 < np.abs(far.astype(int) - x).mean()
    assert np.array_equal(near, sdedit(unet, sampler, x, y, t_start=5, steps=5, seed=1,
                                       device=CPU))
    assert RunConfig(sdedit_t=999).sdedit_t == 999
    try:
        RunConfig.from_mapping({"sdedit-t": 1000})
    except ConfigError as exc:
        assert "sdedit-t" in str(exc)
    else:
        raise AssertionError("sdedit-t = T accepted")


def test_sdedit_sends_no_image_and_fills_only_held_classes(tmp_path, monkeypatch):
    saved = {}
    save = SyntheticStore.save

    def spy(self, name, images, labels):
        saved[self.root.name] = (images.copy(), labels.copy())
        save(self, name, images, labels)

    monkeypatch.setattr(SyntheticStore, "save", spy)
    cfg = tiny_config(tmp_path, arms="diffusion", generation="sdedit", augment_ratio=0.5)
    strategy, proxies = run_in_process(cfg)
    assert [p.kind for p in strategy.phases] == ["stats", "diffusion", "sdedit", "classify"]
    shapes = [w.shape for w in strategy.unet_weights]
    for proxy in proxies:
        (ins,) = [i for i in proxy.received if i.config["phase"] == "sdedit"]
        counts, *weights = parameters_to_ndarrays(ins.parameters)
        # down: the client's counts and the UNet, nothing image-shaped
        node = proxy.client.local.node
        hist = strategy.histograms[node]
        assert counts.tolist() == present_only(fill_to_max(hist, 0.5), hist).tolist()
        assert [w.shape for w in weights] == shapes
        assert all(w.dtype == np.float32 for w in weights)
        # up: no arrays at all
        (res,) = [r for r, i in zip(proxy.replied, proxy.received) if i is ins]
        assert res.parameters.tensors == [] and res.metrics["made"] == counts.sum()
        # the batch the client kept: its own held classes only, in the asked counts
        images, labels = saved[f"partition-{node}"]
        assert np.bincount(labels, minlength=10).tolist() == counts.tolist()
        assert images.dtype == np.uint8 and images.shape[1:] == (1, 8, 8)
    gen = strategy.recorder.results["generation"]
    assert gen["where"] == "clients (sdedit)" and gen["fidelity"] is None
    assert gen["total"] == sum(int(c.sum()) for c in strategy.client_plan.values()) > 0
    assert strategy.recorder.results["arms"]["diffusion"]["train_samples_per_round"] == \
        1437 + gen["total"]

    # benchmarks/sdedit.py rebuilds exactly those batches from the saved DDPM
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import sdedit as bench
    from fedgen.models import load_unet
    data = load_data(cfg)
    unet = load_unet(str(tmp_path / "out" / "ddpm"), 1, 10, 8)
    images, labels, gaps = bench.client_batches(cfg, unet, data, cfg.sdedit_t)
    assert gaps == sum(int(fill_to_max(h, 0.5).sum()) for h in strategy.histograms.values())
    mine = [saved[f"partition-{k}"] for k in range(cfg.num_clients)]
    assert np.array_equal(labels, np.concatenate([m[1] for m in mine]))
    assert np.array_equal(images, np.concatenate([m[0] for m in mine]))
