"""Pretrain the UNet centrally on a public data set, for federated fine-tuning.

Seed 000's recipe: train the class-conditional DDPM on public data first, then fine-tune
it with FedAvg on the clients' data. The checkpoint this writes is what ``diffusion-init``
reads::

    python -m fedgen.pretrain --set dataset=mnist5k --set image-size=8 --epochs 15 \\
        --out outputs/pretrained/mnist5k-8px
    python run_simulation.py --set diffusion-init=outputs/pretrained/mnist5k-8px

The run-config keys choose the source data (``dataset``, ``data-dir``, ``image-size``) and
the model and its training (``unet-*``, ``num-train-timesteps``, ``beta-*``,
``diffusion-lr``, ``diffusion-batch-size``, ``cfg-dropout``, ``min-snr-gamma``, ``seed``);
they must describe the same UNet as the runs that start from it (channels, classes and
image size are checked when a run loads it). Training is :func:`fedgen.diffusion.train_ddpm`,
the loop the clients run, one epoch per call. The folder holds a stock diffusers
``DDPMPipeline`` (``unet/``, ``scheduler/``) and ``pretrain.json``: the config, the loss
per epoch, fidelity and Fréchet distance of guided samples against the source data, and
the seconds spent.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
from diffusers import DDPMPipeline

from fedgen import logs
from fedgen.config import ConfigError, RunConfig, load_config
from fedgen.data import ImageData, load_data
from fedgen.diffusion import sample, train_ddpm
from fedgen.fidelity import Judge
from fedgen.models import build_sampler, build_scheduler, build_unet, device
from fedgen.seeds import derive_seed

log = logging.getLogger("fedgen.pretrain")  # also under python -m (__name__ == "__main__")


def check_out(out: Path) -> None:
    """Refuse a folder that already holds a checkpoint (nothing is overwritten)."""
    if (out / "pretrain.json").exists() or (out / "unet").exists():
        raise ConfigError(f"--out {out} already holds a checkpoint; choose another folder "
                          f"(nothing was overwritten)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")


def evaluate_unet(unet, cfg: RunConfig, data: ImageData, per_class: int) -> dict:
    """Fidelity and Fréchet distance of ``per_class`` guided samples per class (the
    run's sampler settings) against the real training images."""
    labels = np.repeat(np.arange(data.num_classes), per_class)
    images = sample(unet, build_sampler(cfg.sampler, build_scheduler(cfg)), labels,
                    steps=cfg.sampling_steps, seed=cfg.seed, device=device(),
                    batch_size=cfg.generation_batch_size, progress=False,
                    guidance_scale=cfg.guidance_scale, precision=cfg.mixed_precision)
    judge = Judge(data.train_x, data.train_y, data.num_classes, seed=cfg.seed)
    return {"fidelity": judge.fidelity(images, labels),
            "frechet_distance": judge.frechet(images)}


def pretrain(cfg: RunConfig, epochs: int, out: Path, per_class: int = 50) -> dict:
    """Train a fresh UNet on ``cfg``'s data set for ``epochs`` epochs and save it in
    ``out``; returns what ``pretrain.json`` holds."""
    check_out(out)
    data = load_data(cfg)
    if not len(data.train_y):
        raise ConfigError(f"dataset={cfg.dataset}: no training images to pretrain on")
    unet = build_unet(cfg.replace(diffusion_init=""), data.channels, data.num_classes,
                      data.image_size, seed=cfg.seed)
    scheduler = build_scheduler(cfg)
    log.info("pretraining on %s: %d images, %d classes, %d px, %d epochs",
             cfg.dataset, len(data.train_y), data.num_classes, data.image_size, epochs)
    t0, history = time.perf_counter(), []
    for epoch in range(1, epochs + 1):
        res = train_ddpm(unet, scheduler, data.train_x, data.train_y, epochs=1,
                         batch_size=cfg.diffusion_batch_size, lr=cfg.diffusion_lr,
                         seed=derive_seed(cfg.seed, "pretrain", epoch), device=device(),
                         cfg_dropout=cfg.cfg_dropout, min_snr_gamma=cfg.min_snr_gamma,
                         precision=cfg.mixed_precision)
        history.append({"epoch": epoch, "loss": res["loss"],
                        "seconds": round(time.perf_counter() - t0, 3)})
        log.info("epoch %d/%d  loss %.4f  (%.0f s)", epoch, epochs, res["loss"],
                 time.perf_counter() - t0)
    train_seconds = time.perf_counter() - t0
    quality = evaluate_unet(unet, cfg, data, per_class) if per_class else {}
    out.mkdir(parents=True, exist_ok=True)
    DDPMPipeline(unet=unet.cpu(), scheduler=scheduler).save_pretrained(out)
    info = {"config": cfg.to_mapping(), "epochs": epochs, "images": int(len(data.train_y)),
            "history": history, "train_seconds": round(train_seconds, 3),
            "samples_per_class": per_class, **quality}
    (out / "pretrain.json").write_text(json.dumps(info, indent=1))
    return info


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedgen.pretrain",
                                description=__doc__.splitlines()[0])
    p.add_argument("--config", help="preset file (TOML/YAML) with run-config keys")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="run-config override (repeatable)")
    p.add_argument("--epochs", type=int, default=15, help="central training epochs")
    p.add_argument("--per-class", type=int, default=50,
                   help="samples per class for the fidelity/Fréchet check (0 = skip)")
    p.add_argument("--out", required=True, help="folder for the checkpoint (must be new)")
    args = p.parse_args(argv)
    logs.setup()
    try:
        if args.epochs < 1:
            raise ConfigError(f"--epochs must be >= 1, got {args.epochs}")
        if args.per_class < 0:
            raise ConfigError(f"--per-class must be >= 0, got {args.per_class}")
        cfg = load_config(args.config, args.overrides)
        if cfg.diffusion_init:
            raise ConfigError("diffusion-init: pretraining starts from a fresh UNet; "
                              "leave diffusion-init empty")
        out = Path(args.out)
        check_out(out)
        load_data(cfg)   # a missing data folder is reported before any training
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    info = pretrain(cfg, args.epochs, out, args.per_class)
    quality = (f"; fidelity {100 * info['fidelity']:.1f} %, Fréchet distance "
               f"{info['frechet_distance']:.2f}" if "fidelity" in info else "")
    print(f"pretrained {args.epochs} epochs on {cfg.dataset} in {info['train_seconds']:.0f} s"
          f"{quality}; checkpoint in {out} (use --set diffusion-init={out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
