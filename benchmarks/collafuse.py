#!/usr/bin/env python
"""Per-client sample quality and disclosure of a CollaFuse run (``method=collafuse``).

    python benchmarks/collafuse.py --run outputs/<run>
    python benchmarks/collafuse.py --run outputs/<run> --per-class 20 --cache DIR

The finished CollaFuse samples never leave the clients, so the run cannot score them. This
script loads the server's half (``<run>/ddpm``) and each client's PRIVATE half from the
clients' cache folder (the run's ``cache-dir``, or ``--cache``: ``private/partition-K-unet.npz``,
where the clients keep it), lets the server denoise ``--per-class`` samples of every class
down to each client's cut and that client finish them, and prints per client: its cut,
the fidelity of its samples on the classes it holds and on those it does not, the
Fréchet distance of all of them, and, from results.json, the disclosure of its last
training round (MSE between what it sent and its real images; the reference classifier's
accuracy on what the server received).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedgen.collafuse import client_part, cut_timesteps, server_part  # noqa: E402
from fedgen.config import ConfigError, RunConfig  # noqa: E402
from fedgen.data import load_data  # noqa: E402
from fedgen.fidelity import Judge  # noqa: E402
from fedgen.models import (build_sampler, build_scheduler, device, load_unet,  # noqa: E402
                           set_weights, unet_shell)
from fedgen.seeds import derive_seed  # noqa: E402


def private_unet(cfg: RunConfig, data, path: Path):
    unet = unet_shell(cfg, data.channels, data.num_classes, data.image_size)
    with np.load(path) as f:
        set_weights(unet, [f[f"arr_{i}"] for i in range(len(f.files) - ("round" in f.files))])
    return unet


def fmt(x, scale=100.0, digits=1) -> str:
    return "-" if x is None or (isinstance(x, float) and np.isnan(x)) else f"{scale * x:.{digits}f}"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", required=True, help="a collafuse run's output folder")
    p.add_argument("--cache", help="the clients' cache-dir (default: the run's cache-dir)")
    p.add_argument("--per-class", type=int, default=20, help="samples per class per client")
    args = p.parse_args(argv)
    run = Path(args.run)
    try:
        if not (run / "results.json").is_file():
            raise ConfigError(f"{run}: no results.json (give a run's output folder)")
        results = json.loads((run / "results.json").read_text())
        cfg = RunConfig.from_mapping(results["config"])
        if cfg.method != "collafuse" or "collafuse" not in results:
            raise ConfigError(f"{run}: not a finished collafuse run")
        cache = Path(args.cache or cfg.cache_dir)
        if not str(args.cache or cfg.cache_dir):
            raise ConfigError("the run used a temporary cache-dir; give --cache")
        data = load_data(cfg)
        rows = results["collafuse"]["clients"]
        cuts = cut_timesteps(cfg.cut_ratio_list, cfg.num_clients, cfg.num_train_timesteps)
        server = load_unet(str(run / "ddpm"), data.channels, data.num_classes,
                           data.image_size) if (run / "ddpm").is_dir() else None
        privates = {r["node"]: cache / "private" / f"partition-{r['node']}-unet.npz"
                    for r in rows}
        missing = [str(path) for path in privates.values() if not path.is_file()]
        if missing and any(c > 0 for c in cuts):
            raise ConfigError(f"no private UNet at {missing[0]} (give the run's --cache)")
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    judge = Judge(data.train_x, data.train_y, data.num_classes, seed=cfg.seed)
    sampler = build_sampler(cfg.sampler, build_scheduler(cfg))
    hist = {k: np.array(h) for k, h in zip(results["partition"]["nodes"],
                                            results["partition"]["histograms"])}
    labels = np.repeat(np.arange(data.num_classes), args.per_class)
    print(f"{run}: {cfg.dataset}, alpha {cfg.alpha:g}, seed {cfg.seed}, cut-ratio "
          f"{cfg.cut_ratio}, {cfg.sampler}-{cfg.sampling_steps}, {args.per_class} per class")
    print("| node | cut t_c | classes held | fidelity held / absent / all (%) | Fréchet "
          "dist. | disclosure MSE | reference acc. on what was sent (%) |")
    print("|---|---|---|---|---|---|---|")
    summary = []
    for i, row in enumerate(rows):
        node, t_c = row["node"], row["cut_t"]
        kw = dict(steps=cfg.sampling_steps, device=device(), progress=False,
                  guidance_scale=cfg.guidance_scale)
        partial = server_part(server, sampler, labels, t_c,
                              seed=derive_seed(cfg.seed, "bench-collafuse", node), **kw)
        private = private_unet(cfg, data, privates[node]) if t_c > 0 else None
        images = client_part(private, sampler, labels, partial, t_c,
                             seed=derive_seed(cfg.seed, "bench-collafuse-client", node), **kw)
        held = hist[node][labels] > 0
        fid = [judge.fidelity(images[m], labels[m]) for m in (held, ~held)]
        every = judge.fidelity(images, labels)
        fd = judge.frechet(images)
        summary.append((fid[0], fid[1], every, fd, row["disclosure_mse"], row["sent_accuracy"]))
        print(f"| {node} | {t_c} | {int((hist[node] > 0).sum())} | {fmt(fid[0])} / "
              f"{fmt(fid[1])} / {fmt(every)} | {fd:.1f} | {fmt(row['disclosure_mse'], 1, 3)} | "
              f"{fmt(row['sent_accuracy'])} |", flush=True)
    values = [[np.nan if v is None else float(v) for v in col] for col in zip(*summary)]
    mean = [float(np.nanmean(col)) if not np.isnan(col).all() else None for col in values]
    print(f"| mean | {cuts[0] if len(set(cuts)) == 1 else 'mixed'} | | {fmt(mean[0])} / "
          f"{fmt(mean[1])} / {fmt(mean[2])} | {fmt(mean[3], 1)} | {fmt(mean[4], 1, 3)} | "
          f"{fmt(mean[5])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
