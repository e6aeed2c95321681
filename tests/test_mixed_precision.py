"""mixed-precision = bf16: the forward passes of both training loops and of sampling run
under torch.autocast in bfloat16; weights, optimiser states, losses and the sampler's
arithmetic stay float32; the run config reaches every loop."""

import sys

import numpy as np
import pytest
import torch

import fedgen.classifier
import fedgen.diffusion
import fedgen.models
from fedgen.classifier import train_classifier
from fedgen.config import ConfigError, RunConfig
from fedgen.diffusion import guided_eps, sample, train_ddpm
from fedgen.models import (autocast, build_classifier, build_sampler, build_scheduler,
                           build_unet, check_precision)
from tests.conftest import run_in_process, tiny_config

CPU = torch.device("cpu")
TINY = RunConfig(unet_channels="8,16")


def _digits(n: int, size: int = 8, seed: int = 0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 1, size, size), dtype=np.uint8), rng.integers(0, 10, n)


def test_autocast_runs_convolutions_in_bfloat16_only_when_asked():
    conv, x = torch.nn.Conv2d(1, 4, 3), torch.randn(2, 1, 8, 8)
    with autocast("no", CPU):
        assert conv(x).dtype == torch.float32
    with autocast("bf16", CPU):
        assert conv(x).dtype == torch.bfloat16
    assert conv(x).dtype == torch.float32   # nothing leaks out of the context
    with pytest.raises(ConfigError, match="mixed-precision"):
        RunConfig.from_mapping({"mixed-precision": "fp16"})


def _train_unet(precision: str, seen: list) -> tuple[torch.nn.Module, dict]:
    images, labels = _digits(200)
    unet = build_unet(TINY, 1, 10, 8, seed=0)

    def spy(model, batch):
        seen.append(batch["pred"].dtype)
        return torch.zeros(())

    stats = train_ddpm(unet, build_scheduler(TINY), images, labels, epochs=2, batch_size=50,
                       lr=1e-3, seed=1, device=CPU, cfg_dropout=0.1, loss_hooks=[spy],
                       precision=precision)
    return unet, stats


def test_bf16_ddpm_training_keeps_float32_state_and_differs_from_float32():
    seen32, seen16 = [], []
    full, s32 = _train_unet("no", seen32)
    half, s16 = _train_unet("bf16", seen16)
    assert s32["steps"] == s16["steps"] == 8
    # the loss and its hooks see a float32 prediction; the weights stay float32
    assert set(seen32) == set(seen16) == {torch.float32}
    assert all(p.dtype == torch.float32 for p in half.parameters())
    # the same seeded steps in bf16: a different, nearby result
    assert np.isfinite(s16["loss"]) and abs(s16["loss"] - s32["loss"]) < 0.1 * s32["loss"]
    diffs = [(a - b).abs().max().item() for a, b in zip(full.parameters(), half.parameters())]
    assert max(diffs) > 0
    again, _ = _train_unet("bf16", [])
    assert all(torch.equal(a, b) for a, b in zip(half.parameters(), again.parameters()))


def test_bf16_sampling_is_close_to_float32_and_seeded():
    unet, _ = _train_unet("no", [])
    labels = np.repeat(np.arange(10), 4)
    kw = dict(steps=5, seed=3, device=CPU, guidance_scale=3.0, progress=False)
    sampler = build_sampler("ddim", build_scheduler(TINY))
    full = sample(unet, sampler, labels, precision="no", **kw).astype(int)
    half = sample(unet, sampler, labels, precision="bf16", **kw).astype(int)
    assert full.shape == half.shape == (40, 1, 8, 8)
    assert not np.array_equal(full, half)
    # bf16 moves the pixels far less than another seed does
    other = sample(unet, sampler, labels, precision="no", **{**kw, "seed": 4}).astype(int)
    assert np.abs(full - half).mean() < 0.2 * np.abs(full - other).mean()
    assert np.array_equal(half, sample(unet, sampler, labels, precision="bf16", **kw))
    # the guidance arithmetic gets float32 predictions from a bf16 forward pass
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor(500), torch.tensor([0, 3, 5, 9])
    with torch.no_grad(), autocast("bf16", CPU):
        assert guided_eps(unet.eval(), x, t, y, 3.0).dtype == torch.float32


def test_bf16_classifier_training_hooks_see_float32():
    images, labels = _digits(64)
    seen = []

    def spy(model, batch):
        seen.append((batch["logits"].dtype, batch["features"].dtype))
        return torch.zeros(())

    models = {}
    for precision in ("no", "bf16"):
        torch.manual_seed(0)
        model = build_classifier(TINY, 1, 10)
        stats = train_classifier(model, images, labels, epochs=1, batch_size=32, lr=0.01,
                                 momentum=0.9, weight_decay=0.0, seed=0, device=CPU,
                                 loss_hooks=[spy], precision=precision)
        assert stats["steps"] == 2 and np.isfinite(stats["loss"])
        assert all(p.dtype == torch.float32 for p in model.parameters())
        models[precision] = model
    assert set(seen) == {(torch.float32, torch.float32)}
    assert any(not torch.equal(a, b) for a, b in
               zip(models["no"].parameters(), models["bf16"].parameters()))


def test_the_run_config_reaches_every_loop(tmp_path, monkeypatch):
    """One tiny run with mixed-precision = bf16: the clients' DDPM and classifier training
    and the server's sampling (grids, generation round) each ask for a bf16 context. (The
    spy runs them in float32: on a CPU without bfloat16 units, emulated bf16 makes this run
    about 60x slower; the tests above check what bf16 does.)"""
    entered = []

    def spy(precision, device):
        entered.append((sys._getframe(1).f_code.co_name, precision))
        return autocast("no", device)

    monkeypatch.setattr(fedgen.diffusion, "autocast", spy)
    monkeypatch.setattr(fedgen.classifier, "autocast", spy)
    cfg = tiny_config(tmp_path, arms="diffusion", diffusion_rounds=1, classifier_rounds=1,
                      mixed_precision="bf16")
    run_in_process(cfg)
    assert {name for name, _ in entered} == {"train_ddpm", "sample", "train_classifier"}
    assert {precision for _, precision in entered} == {"bf16"}


def test_bf16_on_a_gpu_without_it_is_refused_before_work(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    with pytest.raises(ConfigError, match="Tesla T4 has no bfloat16"):
        check_precision("bf16", torch.device("cuda"))
    check_precision("no", torch.device("cuda"))


def test_bf16_on_a_cpu_without_bf16_units_warns(monkeypatch):
    said = []   # the logger itself: other tests reconfigure logging (caplog may miss it)
    monkeypatch.setattr(fedgen.models, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(fedgen.models.log, "warning", lambda msg, *args: said.append(msg))
    check_precision("bf16", CPU)
    check_precision("no", CPU)
    assert said == [
        "mixed-precision=bf16 on a CPU without AVX-512 BF16 or AMX: bfloat16 is emulated "
        "there, 7-37x slower per step than mixed-precision=no (docs/RESULTS.md 3k)"]
