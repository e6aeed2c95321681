#!/usr/bin/env python
"""Quality of the SDEdit batches (``generation=sdedit``) a run's clients made.

    python benchmarks/sdedit.py --run outputs/<run>
    python benchmarks/sdedit.py --run outputs/<run> --t 100 200 400

Under ``generation=sdedit`` the images never leave the clients, so the run cannot score
them. This script rebuilds, from the run's config and DDPM (``<run>/ddpm``, or the
``diffusion-init`` a run with diffusion-rounds = 0 used), what each
client made: the same partition, deficits, sources and seeds (``sdedit-t`` as configured, or
each of ``--t``), then prints the fidelity and Fréchet distance of all clients' batches
together, as results.json reports them for class-conditional sampling. It also works on a
``generation=sample`` run: then it shows what SDEdit would have made with the same DDPM.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from clients.local import holdout  # noqa: E402
from fedgen.balancing import fill_to_max  # noqa: E402
from fedgen.config import ConfigError, RunConfig  # noqa: E402
from fedgen.data import load_data  # noqa: E402
from fedgen.diffusion import sdedit_fill  # noqa: E402
from fedgen.fidelity import Judge  # noqa: E402
from fedgen.models import build_sampler, build_scheduler, device, load_unet  # noqa: E402
from fedgen.partition import partition  # noqa: E402
from fedgen.seeds import derive_seed  # noqa: E402


def client_batches(cfg: RunConfig, unet, data, t_start: int):
    """Every client's SDEdit batch, exactly as ``clients.sdedit_client`` makes it, and the
    number of samples the fill-to-max plan asks for (class sampling fills all of them;
    SDEdit only the classes a client holds)."""
    round_seed = derive_seed(cfg.seed, "sdedit:diffusion", 1)   # the phase's fit-config seed
    xs, ys, gaps = [], [], 0
    for node, idx in enumerate(partition(data.train_y, cfg)):
        x, y = data.train_x[idx], data.train_y[idx]
        if cfg.evaluation != "server":   # the node's own held-out share, as it splits it
            x, y, _, _ = holdout(x, y, cfg.test_fraction, derive_seed(cfg.seed, "holdout", node))
        deficits = fill_to_max(np.bincount(y, minlength=data.num_classes), cfg.augment_ratio)
        gaps += int(deficits.sum())
        ex, ey = sdedit_fill(unet, build_sampler(cfg.sampler, build_scheduler(cfg)), x, y,
                             deficits, t_start=t_start, steps=cfg.sampling_steps,
                             seed=derive_seed(round_seed, node), device=device(),
                             guidance_scale=cfg.guidance_scale)
        xs.append(ex)
        ys.append(ey)
    return np.concatenate(xs), np.concatenate(ys), gaps


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a run's output folder (results.json, ddpm/)")
    p.add_argument("--t", type=int, nargs="+", help="sdedit-t values (default: the run's)")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        if not (run / "results.json").is_file():
            raise ConfigError(f"{run}: no results.json (give a run's output folder)")
        cfg = RunConfig.from_mapping(json.loads((run / "results.json").read_text())["config"])
        data = load_data(cfg)
        # the run's DDPM: saved after its diffusion phase, else the diffusion-init it used
        ddpm = run / "ddpm" if (run / "ddpm").is_dir() or not cfg.diffusion_init \
            else Path(cfg.diffusion_init)
        unet = load_unet(str(ddpm), data.channels, data.num_classes, data.image_size)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    judge = Judge(data.train_x, data.train_y, data.num_classes, seed=cfg.seed)
    print(f"{run}: {cfg.dataset}, alpha {cfg.alpha:g}, seed {cfg.seed}, {cfg.sampler}, "
          f"guidance {cfg.guidance_scale:g}")
    print("| sdedit-t | samples | of the class gaps (%) | fidelity (%) | Fréchet dist. | seconds |")
    print("|---|---|---|---|---|---|")
    for t in args.t or [cfg.sdedit_t]:
        t0 = time.perf_counter()
        images, labels, gaps = client_batches(cfg, unet, data, t)
        seconds = time.perf_counter() - t0
        print(f"| {t} | {len(labels)} | {100 * len(labels) / max(gaps, 1):.0f} | "
              f"{100 * judge.fidelity(images, labels):.1f} | {judge.frechet(images):.1f} | "
              f"{seconds:.1f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
