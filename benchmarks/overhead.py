#!/usr/bin/env python
"""Flower overhead: the same local training through the Ray simulation and in a plain loop.

Both sides run the same clients, rounds, epochs, models and data: ``diffusion-rounds`` of
DDPM FedAvg and ``classifier-rounds`` of ResNet-18 FedAvg (``augment-ratio=0``, so the
classifier trains on real data only). The plain side calls the very same client classes'
``fit`` in one process, one client after another with all cores, and averages with the
same function: no messages, no serialisation, no Ray.

    python benchmarks/overhead.py                 # prints per-phase times, last line ratio=X
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

BENCH = ["arms=diffusion", "augment-ratio=0", "diffusion-rounds=4", "classifier-rounds=3"]


def flower_side(overrides: list[str], out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--out", str(out)]
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
                  "lr": cfg.diffusion_lr})
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
    args = p.parse_args(argv)
    overrides = BENCH + args.overrides
    cfg = load_config(None, overrides)
    with tempfile.TemporaryDirectory() as tmp:
        flower, flower_wall = flower_side(overrides, Path(tmp) / "flower")
        t0 = time.perf_counter()
        plain = plain_side(cfg, Path(tmp) / "cache")
        plain_wall = time.perf_counter() - t0
    print(f"{cfg.num_clients} clients, {cfg.diffusion_rounds} DDPM rounds x "
          f"{cfg.diffusion_epochs} epochs, {cfg.classifier_rounds} classifier rounds x "
          f"{cfg.local_epochs} epoch, {torch.get_num_threads()} torch threads on the plain side")
    print("| phase | Flower (s) | plain (s) |")
    print("|---|---|---|")
    startup = flower.get("stats", 0.0)
    print(f"| start-up (Ray, actors, stats round / data) | {startup:.1f} | {plain['data']:.1f} |")
    print(f"| diffusion | {flower['diffusion']:.1f} | {plain['diffusion']:.1f} |")
    print(f"| classify | {flower['classify:diffusion']:.1f} | {plain['classify']:.1f} |")
    print(f"| whole command (incl. imports) | {flower_wall:.1f} | {plain_wall:.1f} |")
    train_f = flower["diffusion"] + flower["classify:diffusion"]
    train_p = plain["diffusion"] + plain["classify"]
    print(f"training phases only: ratio={train_f / train_p:.2f}")
    print(f"ratio={flower_wall / plain_wall:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
