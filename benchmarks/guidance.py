#!/usr/bin/env python
"""Guidance sweep: fidelity and Fréchet distance of a saved DDPM per DDIM steps x guidance.

    python benchmarks/guidance.py --ddpm outputs/<run>/ddpm
    python benchmarks/guidance.py --config configs/mnist5k-cpu.toml --ddpm DIR --scales 3 5

Samples ``--per-class`` images per class (seed 1) for every (steps, guidance-scale) pair and
prints one row each: fidelity (the reference classifier's accuracy on them), the Fréchet
distance to the real training images on the reference CNN's features (fedgen.fidelity),
and the fidelity of each class (0, 1, ...). The prediction type is read from the schedule
saved beside the UNet (``ddpm/scheduler/``).
Guidance > 1 needs a UNet trained with cfg-dropout > 0 (it has a null class).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedgen.config import ConfigError, load_config  # noqa: E402
from fedgen.data import load_data  # noqa: E402
from fedgen.diffusion import sample  # noqa: E402
from fedgen.fidelity import Judge  # noqa: E402
from fedgen.models import (build_sampler, build_scheduler, device, load_unet,  # noqa: E402
                           saved_prediction_type)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ddpm", required=True, help="folder written by a run (outputs/<run>/ddpm)")
    p.add_argument("--config", help="preset whose data set to use")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--steps", type=int, nargs="+", default=[5, 10])
    p.add_argument("--scales", type=float, nargs="+", default=[1.0, 3.0, 5.0])
    p.add_argument("--per-class", type=int, default=50)
    args = p.parse_args(argv)
    try:
        saved = saved_prediction_type(args.ddpm)   # sample as the UNet was trained
        if saved and not any(o.startswith("prediction-type=") for o in args.overrides):
            args.overrides.append(f"prediction-type={saved}")
        cfg = load_config(args.config, args.overrides)
        data = load_data(cfg)
        # the loader runs use: both folder layouts, the shape checked against the data
        unet = load_unet(args.ddpm, data.channels, data.num_classes, data.image_size,
                         prediction_type=cfg.prediction_type)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    judge = Judge(data.train_x, data.train_y, data.num_classes, seed=cfg.seed)
    labels = np.repeat(np.arange(data.num_classes), args.per_class)
    print(f"{len(labels)} samples per row, DDIM, device {device()}")
    print("| steps | guidance | fidelity (%) | Fréchet dist. | seconds | per-class fidelity (%) |")
    print("|---|---|---|---|---|---|")
    for steps in args.steps:
        for w in args.scales:
            t0 = time.perf_counter()
            images = sample(unet, build_sampler("ddim", build_scheduler(cfg)), labels,
                            steps=steps, seed=1, device=device(), progress=False,
                            guidance_scale=w)
            seconds = time.perf_counter() - t0
            per_class = " ".join(f"{100 * f:.0f}" for f in judge.per_class(images, labels))
            print(f"| {steps} | {w:g} | {100 * judge.fidelity(images, labels):.1f} | "
                  f"{judge.frechet(images):.1f} | {seconds:.1f} | {per_class} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
