#!/usr/bin/env python
"""Flower overhead: the same local training through Flower (the Ray simulation, and the
in-process backend) and in a plain loop.

All sides run the same clients, rounds, epochs, models and data: ``diffusion-rounds`` of
DDPM FedAvg and ``classifier-rounds`` of ResNet-18 FedAvg (``augment-ratio=0``, so the
classifier trains on real data only). The plain side calls the very same client classes'
``fit`` in one process, one client after another with all cores, and averages with the
same function: no messages, no serialisation, no Ray.

    python benchmarks/overhead.py                 # prints per-phase times, last line ratio=X
    python benchmarks/overhead.py --backends ray  # only the Ray simulation
    python benchmarks/overhead.py --set diffusion-rounds=2 --set classifier-rounds=2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from clients import PHASE_CLIENTS, LocalData  # noqa: E402
from fedgen.aggregation import weighted_average  # noqa: E402
from fedgen.classifier import evaluate  # noqa: E402
from fedgen.config import RunConfig, load_config  # noqa: E402
from fedgen.models import (build_classifier, build_unet, classifier_shell, device,  # noqa: E402
                           get_weights, set_weights)
from fedgen.seeds import derive_seed  # noqa: E402

# samples-every=0: the plain loop draws no per-round sample grids either
BENCH = ["arms=diffusion", "augment-ratio=0", "diffusion-rounds=4", "classifier-rounds=3",
         "samples-every=0"]


def flower_side(overrides: list[str], out: Path, backend: str) -> tuple[dict, float]:
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--out", str(out),
           "--backend", backend]
    for pair in overrides:
        cmd += ["--set", pair]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    return json.loads((out / "results.json").read_text())["timings"], wall


def plain_rounds(cfg: RunConfig, locals_: list[LocalData], phase: str, weights, rounds: int,
                 extra: dict, first: int = 1) -> list:
    client_cls = PHASE_CLIENTS[phase]
    for rnd in range(first, first + rounds):
        config = {"phase": phase, "arm": "real", "round": rnd, "seed": derive_seed(cfg.seed, rnd),
                  **extra}
        results = [client_cls(loc).fit(weights, config) for loc in locals_]
        weights = weighted_average([r[0] for r in results], [r[1] for r in results])
    return weights


def plain_side(cfg: RunConfig, cache: Path) -> dict:
    times = {}
    t0 = time.perf_counter()
    locals_ = [LocalData.from_node(cfg.replace(cache_dir=str(cache)),
                                   {"partition-id": k, "num-partitions": cfg.num_clients}, 0)
               for k in range(cfg.num_clients)]
    data = locals_[0].data
    times["data"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    unet = build_unet(cfg, data.channels, data.num_classes, data.image_size, seed=0)
    plain_rounds(cfg, locals_, "diffusion", get_weights(unet), cfg.diffusion_rounds,
                 {"epochs": cfg.diffusion_epochs, "batch-size": cfg.diffusion_batch_size,
                  "lr": cfg.diffusion_lr, "cfg-dropout": cfg.cfg_dropout})
    times["diffusion"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    weights = get_weights(build_classifier(cfg, data.channels, data.num_classes, seed=0))
    extra = {"epochs": cfg.local_epochs, "batch-size": cfg.batch_size, "lr": cfg.lr}
    for rnd in range(1, cfg.classifier_rounds + 1):  # evaluate every round, as the server does
        weights = plain_rounds(cfg, locals_, "classify", weights, 1, extra, first=rnd)
        model = classifier_shell(cfg, data.channels, data.num_classes)
        set_weights(model, weights)
        evaluate(model, data.test_x, data.test_y, data.num_classes, device())
    times["classify"] = time.perf_counter() - t0
    return times


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--backends", default="ray,inprocess",
                   help="comma-separated run_simulation.py backends to time")
    args = p.parse_args(argv)
    overrides = BENCH + args.overrides
    cfg = load_config(None, overrides)
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    flower = {}
    with tempfile.TemporaryDirectory() as tmp:
        for b in backends:
            flower[b] = flower_side(overrides, Path(tmp) / f"flower-{b}", b)
        t0 = time.perf_counter()
        plain = plain_side(cfg, Path(tmp) / "cache")
        plain_wall = time.perf_counter() - t0
    print(f"{cfg.num_clients} clients, {cfg.diffusion_rounds} DDPM rounds x "
          f"{cfg.diffusion_epochs} epochs, {cfg.classifier_rounds} classifier rounds x "
          f"{cfg.local_epochs} epoch, {torch.get_num_threads()} torch threads on the plain side")
    print("| phase | " + " | ".join(f"Flower {b} (s)" for b in backends) + " | plain (s) |")
    print("|---" * (len(backends) + 2) + "|")

    def row(name, key, plain_value):
        cells = " | ".join(f"{flower[b][0].get(key, 0.0):.1f}" for b in backends)
        print(f"| {name} | {cells} | {plain_value:.1f} |")

    row("start-up (Ray, actors, stats round / data)", "stats", plain["data"])
    row("diffusion", "diffusion", plain["diffusion"])
    row("classify", "classify:diffusion", plain["classify"])
    print("| whole command (incl. imports) | "
          + " | ".join(f"{flower[b][1]:.1f}" for b in backends) + f" | {plain_wall:.1f} |")
    train_p = plain["diffusion"] + plain["classify"]
    for b in backends:
        train_f = flower[b][0]["diffusion"] + flower[b][0]["classify:diffusion"]
        print(f"{b}: training phases only: ratio={train_f / train_p:.2f}; whole command "
              f"ratio={flower[b][1] / plain_wall:.2f}")
    print(f"ratio={min(flower[b][1] for b in backends) / plain_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
