#!/usr/bin/env python
"""Mixed-precision benchmark: float32 against bf16 autocast (config key mixed-precision)
on this machine, for the three kinds of work a run does.

For each precision: seconds per optimiser step of the UNet and of ResNet-18 (one batch of
the run's batch size, random data), and class-conditional sampling of the given DDPM with
the run's sampler, steps and guidance: samples per second, fidelity (the real-data
reference classifier) and Fréchet distance (the reference network), so a speed-up that
costs sample quality shows.

    python benchmarks/precision.py --config configs/mnist5k-cpu.toml --ddpm outputs/<run>/ddpm
    python benchmarks/precision.py --train-epochs 5       # no run at hand: a central DDPM

Last lines: ``sampling_speedup=X``, ``unet_step_speedup=Y``, ``classifier_step_speedup=Z``
(bf16 over float32) and ``fidelity_change=F`` (bf16 minus float32, points).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedgen.config import ConfigError, load_config  # noqa: E402
from fedgen.data import load_data  # noqa: E402
from fedgen.diffusion import sample  # noqa: E402
from fedgen.fidelity import Judge  # noqa: E402
from fedgen.models import (autocast, build_classifier, build_sampler, build_scheduler,  # noqa: E402
                           build_unet, device)
from sampling import get_unet  # noqa: E402  (the sampler benchmark's: --ddpm, or a central DDPM)

PRECISIONS = ("no", "bf16")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddpm", help="folder written by a run (outputs/<run>/ddpm)")
    p.add_argument("--train-epochs", type=int, default=5,
                   help="central DDPM training epochs when --ddpm is not given")
    p.add_argument("--per-class", type=int, default=200, help="samples per class")
    p.add_argument("--steps", type=int, default=10, help="timed optimiser steps per model")
    p.add_argument("--config", help="preset whose data set and model keys to use")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    return p.parse_args(argv)


def step_seconds(model, loss_of, batch, precision: str, steps: int) -> float:
    """Mean seconds of one forward + backward + optimiser step, after two warm-up steps."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    model.train()
    for i in range(steps + 2):
        if i == 2:
            t0 = time.perf_counter()
        with autocast(precision, device()):
            loss = loss_of(model, batch).float()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return (time.perf_counter() - t0) / steps


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.overrides)
        data = load_data(cfg)  # DataError (a ConfigError) names a missing data folder
        unet = get_unet(args, cfg, data)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    dev, c, s, k = device(), data.channels, data.image_size, data.num_classes
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(cfg.diffusion_batch_size, c, s, s, generator=gen).to(dev)
    t = torch.randint(0, cfg.num_train_timesteps, (len(x),), generator=gen).to(dev)
    y = torch.randint(0, k, (len(x),), generator=gen).to(dev)
    xc = torch.randn(cfg.batch_size, c, s, s, generator=gen).to(dev)
    yc = torch.randint(0, k, (len(xc),), generator=gen).to(dev)
    judge = Judge(data.train_x, data.train_y, k)
    labels = np.repeat(np.arange(k), args.per_class)
    rows = {}
    for precision in PRECISIONS:
        fresh = build_unet(cfg, c, k, s, seed=0).to(dev)
        unet_step = step_seconds(fresh, lambda m, b: (m(b[0], b[1], class_labels=b[2]).sample
                                                      - b[0]).pow(2).mean(),
                                 (x, t, y), precision, args.steps)
        clf = build_classifier(cfg, c, k).to(dev)
        clf_step = step_seconds(clf, lambda m, b: torch.nn.functional.cross_entropy(
            m(b[0]).float(), b[1]), (xc, yc), precision, args.steps)
        t0 = time.perf_counter()
        images = sample(unet, build_sampler(cfg.sampler, build_scheduler(cfg)), labels,
                        steps=cfg.sampling_steps, seed=0, device=dev,
                        batch_size=cfg.generation_batch_size, progress=False,
                        guidance_scale=cfg.guidance_scale, precision=precision)
        rate = len(labels) / (time.perf_counter() - t0)
        rows[precision] = (unet_step, clf_step, rate, judge.fidelity(images, labels),
                           judge.frechet(images))
    print(f"\n{cfg.dataset}, UNet {cfg.unet_channels} (batch {cfg.diffusion_batch_size}), "
          f"ResNet-18 (batch {cfg.batch_size}), {len(labels)} samples "
          f"({cfg.sampler}-{cfg.sampling_steps}, guidance {cfg.guidance_scale:g}), device "
          f"{dev}, {torch.get_num_threads()} threads")
    print("| mixed-precision | UNet step (ms) | ResNet-18 step (ms) | samples/s | "
          "fidelity (%) | Fréchet distance |")
    print("|---|---|---|---|---|---|")
    for precision, (u, r, rate, fid, fd) in rows.items():
        print(f"| {precision} | {1000 * u:.0f} | {1000 * r:.0f} | {rate:.1f} | "
              f"{100 * fid:.1f} | {fd:.2f} |")
    full, half = rows["no"], rows["bf16"]
    print(f"sampling_speedup={half[2] / full[2]:.2f}")
    print(f"unet_step_speedup={full[0] / half[0]:.2f}")
    print(f"classifier_step_speedup={full[1] / half[1]:.2f}")
    print(f"fidelity_change={100 * (half[3] - full[3]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
