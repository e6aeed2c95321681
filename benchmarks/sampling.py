#!/usr/bin/env python
"""Sampler benchmark: 1000-step DDPM ancestral sampling against DDIM and DPM-Solver++.

Loads a trained global DDPM (the ``ddpm/`` folder of a run) or trains one centrally on the
default data, then for every sampler and step count measures samples per second and
fidelity (accuracy of the real-data reference classifier on class-conditional samples).

    python benchmarks/sampling.py --ddpm outputs/<run>/ddpm
    python benchmarks/sampling.py --train-epochs 20          # no run at hand
    python benchmarks/sampling.py --config configs/mnist5k-cpu.toml --train-epochs 10

Last lines: ``speedup=X`` (samples/s of the fastest sampler whose fidelity is within 3
points of the 1000-step DDPM, over the DDPM's) and ``fidelity_drop=Y`` (its loss in points).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedgen.config import ConfigError, RunConfig, load_config  # noqa: E402
from fedgen.data import load_data  # noqa: E402
from fedgen.diffusion import sample, train_ddpm  # noqa: E402
from fedgen.fidelity import ReferenceClassifier  # noqa: E402
from fedgen.models import build_sampler, build_scheduler, build_unet, device, load_unet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddpm", help="folder written by a run (outputs/<run>/ddpm)")
    p.add_argument("--train-epochs", type=int, default=20,
                   help="central DDPM training epochs when --ddpm is not given")
    p.add_argument("--per-class", type=int, default=50, help="samples per class per sampler")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10, 20, 50])
    p.add_argument("--config", help="preset whose data set and UNet/schedule keys to use")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    return p.parse_args(argv)


def get_unet(args, cfg: RunConfig, data):
    if args.ddpm:
        return load_unet(args.ddpm, data.channels, data.num_classes, data.image_size)
    unet = build_unet(cfg, data.channels, data.num_classes, data.image_size, seed=0)
    t0 = time.perf_counter()
    train_ddpm(unet, build_scheduler(cfg), data.train_x, data.train_y,
               epochs=args.train_epochs, batch_size=cfg.diffusion_batch_size,
               lr=cfg.diffusion_lr, seed=0, device=device(), cfg_dropout=cfg.cfg_dropout)
    print(f"trained the DDPM centrally: {args.train_epochs} epochs in "
          f"{time.perf_counter() - t0:.0f} s")
    return unet


def measure(unet, sampler_name, steps, labels, ref, cfg):
    sampler = build_sampler(sampler_name, build_scheduler(cfg))
    t0 = time.perf_counter()
    images = sample(unet, sampler, labels, steps=steps, seed=0, device=device(),
                    batch_size=len(labels), progress=False, guidance_scale=cfg.guidance_scale)
    seconds = time.perf_counter() - t0
    return len(labels) / seconds, ref.accuracy(images, labels)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        cfg = load_config(args.config, args.overrides)
        data = load_data(cfg)  # DataError (a ConfigError) names a missing data folder
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    ref = ReferenceClassifier(data.train_x, data.train_y)
    unet = get_unet(args, cfg, data)
    labels = np.repeat(np.arange(data.num_classes), args.per_class)
    rows = [("ddpm", 1000, *measure(unet, "ddpm", 1000, labels, ref, cfg))]
    for name in ("ddim", "dpm-solver"):
        for steps in args.steps:
            rows.append((name, steps, *measure(unet, name, steps, labels, ref, cfg)))
    base_speed, base_fid = rows[0][2], rows[0][3]
    print(f"\n{len(labels)} class-conditional samples per row, guidance-scale "
          f"{cfg.guidance_scale:g}, device {device()}")
    print("| sampler | steps | samples/s | fidelity (%) | speed-up |")
    print("|---|---|---|---|---|")
    for name, steps, speed, fid in rows:
        print(f"| {name} | {steps} | {speed:.1f} | {100 * fid:.1f} | {speed / base_speed:.1f}x |")
    ok = [r for r in rows[1:] if r[3] >= base_fid - 0.03]
    if not ok:
        near = max(rows[1:], key=lambda r: (r[3], r[2]))
        print(f"no fast sampler within 3 points of the 1000-step DDPM; closest: "
              f"{near[0]}-{near[1]}, {near[2] / base_speed:.1f}x faster, "
              f"{100 * (base_fid - near[3]):.1f} points lower")
        print("speedup=nan\nfidelity_drop=nan")
        return 0
    best = max(ok, key=lambda r: r[2])
    print(f"best: {best[0]}-{best[1]}")
    print(f"speedup={best[2] / base_speed:.1f}")
    print(f"fidelity_drop={100 * (base_fid - best[3]):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
