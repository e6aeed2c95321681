"""Pretrained text-to-image Stable Diffusion for Gen-FedSD (methods.md B): plain diffusers,
no Flower.

A pipeline loads from a local folder in diffusers' ``save_pretrained`` layout (nothing is
downloaded); :func:`check_sd_path` names what a folder lacks. :func:`fill_deficits` makes
``counts[c]`` images of every class ``c`` from prompt templates with the class names,
resizes them to the task's resolution and channels, and caches them per image seed, so
a rerun (or the server generating on a client's behalf) makes the very same images
without running the pipeline again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from fedgen.config import ConfigError, RunConfig
from fedgen.seeds import derive_seed

log = logging.getLogger(__name__)

# What a StableDiffusionPipeline folder must hold (diffusers' save_pretrained layout).
REQUIRED = {"model_index.json": "the pipeline index",
            "unet/config.json": "the denoising UNet", "vae/config.json": "the autoencoder",
            "text_encoder/config.json": "the CLIP text encoder",
            "tokenizer": "the CLIP tokenizer", "scheduler/scheduler_config.json": "the scheduler"}


class SDModelError(ConfigError):
    """``sd-model-path`` does not hold a loadable Stable Diffusion pipeline."""


def check_sd_path(path: str | Path, method: str = "gen-fedsd") -> Path:
    """The folder, if it holds every part of a pipeline; else an error naming the parts
    missing (and ``method``, the method that needs it, when none is given)."""
    if not str(path):
        raise SDModelError(f"sd-model-path: method {method} needs a local Stable Diffusion "
                           f"pipeline folder (diffusers save_pretrained layout); nothing is "
                           f"downloaded")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise SDModelError(f"sd-model-path={path}: no such folder (expected a Stable "
                           f"Diffusion pipeline saved with diffusers' save_pretrained)")
    missing = [f"{name} ({what})" for name, what in REQUIRED.items()
               if not (root / name).exists()]
    weights = [p for p in ("unet", "vae", "text_encoder") if (root / p).is_dir() and not any(
        f.suffix in (".safetensors", ".bin") for f in (root / p).iterdir())]
    missing += [f"{p}/ weights (*.safetensors or *.bin)" for p in weights]
    if missing:
        raise SDModelError(f"sd-model-path={path} is not a complete Stable Diffusion "
                           f"pipeline folder: missing {', '.join(missing)}")
    return root


def load_pipeline(path: str | Path, device: torch.device, method: str = "gen-fedsd"):
    """A StableDiffusionPipeline from a checked local folder, on ``device``, quiet."""
    root = check_sd_path(path, method)
    try:
        from diffusers import StableDiffusionPipeline
        pipe = StableDiffusionPipeline.from_pretrained(   # float32, on every device
            root, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    except (OSError, ValueError, ImportError) as exc:
        raise SDModelError(f"sd-model-path={path}: diffusers could not load it: "
                           f"{str(exc).splitlines()[0]}") from None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def prompt(class_name: str, templates: Sequence[str], index: int) -> str:
    """The prompt of a class's ``index``-th image: the templates in turn, for diversity."""
    return templates[index % len(templates)].format(class_name)


def to_task(images: np.ndarray, channels: int, size: int) -> np.ndarray:
    """Pipeline output (N, H, W, 3) floats in [0, 1] -> uint8 (N, C, size, size):
    antialiased resize, then luminance for one channel."""
    x = torch.as_tensor(images, dtype=torch.float32).permute(0, 3, 1, 2)
    if x.shape[-1] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
    if channels == 1:
        x = (x * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1, keepdim=True)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).numpy()


class SDCache:
    """Generated images per (settings, class, seed), as ``<root>/<hash>.npy``; a request
    for more images than cached generates only the rest."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
        return self.root / f"{digest}.npy"

    def load(self, key: dict) -> np.ndarray | None:
        p = self.path(key)
        return np.load(p) if p.is_file() else None

    def save(self, key: dict, images: np.ndarray) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        p = self.path(key)
        tmp = p.with_suffix(".tmp.npy")
        np.save(tmp, images)
        os.replace(tmp, p)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedgen" / "gen-fedsd"


def fill_deficits(model_path: str | Path, counts: np.ndarray, class_names: Sequence[str], *,
                  templates: Sequence[str], seed: int, steps: int, guidance_scale: float,
                  resolution: int, channels: int, image_size: int, batch_size: int,
                  device: torch.device, cache: SDCache | None = None, pipe=None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``counts[c]`` images of each class ``c`` (uint8, task shape) and their labels.

    Image ``i`` of class ``c`` comes from prompt ``i`` of the class and its own generator
    seeded (``seed``, c, i): the same image whatever the batch size, whoever generates it.
    The pipeline at ``model_path`` is loaded only if the cache falls short (``pipe``: one
    already loaded from there).
    """
    images, labels = [], []
    for c, n in enumerate(np.asarray(counts, dtype=np.int64)):
        if n <= 0:
            continue
        key = {"model": str(Path(model_path).expanduser().resolve()), "class": class_names[c], "templates": list(templates), "seed": seed,
               "steps": steps, "guidance": guidance_scale, "resolution": resolution,
               "channels": channels, "size": image_size}
        have = cache.load(key) if cache else None
        have = have if have is not None else np.zeros((0, channels, image_size, image_size),
                                                      np.uint8)
        if len(have) < n:
            if pipe is None:
                pipe = load_pipeline(model_path, device)
            new = [have]
            for start in range(len(have), int(n), batch_size):
                idx = range(start, min(int(n), start + batch_size))
                gens = [torch.Generator().manual_seed(derive_seed(seed, c, i)) for i in idx]
                size = resolution or None
                out = pipe([prompt(class_names[c], templates, i) for i in idx],
                           num_inference_steps=steps, guidance_scale=guidance_scale,
                           height=size, width=size, generator=gens, output_type="np")
                new.append(to_task(out.images, channels, image_size))
            have = np.concatenate(new)
            if cache:
                cache.save(key, have)
        images.append(have[:n])
        labels.append(np.full(int(n), c, dtype=np.int64))
    if not images:
        return np.zeros((0, channels, image_size, image_size), np.uint8), np.zeros(0, np.int64)
    return np.concatenate(images), np.concatenate(labels)


def sd_seed(cfg: RunConfig, node) -> int:
    """The image seed of one client's batch, the same whoever generates it."""
    return derive_seed(cfg.seed, "gen-fedsd", node)


def sd_cache(cfg: RunConfig) -> SDCache:
    return SDCache(Path(cfg.sd_cache_dir).expanduser() if cfg.sd_cache_dir
                   else default_cache_dir())


def sd_batch(cfg: RunConfig, node, counts: np.ndarray, classes, channels: int,
             image_size: int, device, pipe=None) -> tuple[np.ndarray, np.ndarray]:
    """One client's Stable Diffusion batch (client side and server side alike)."""
    return fill_deficits(cfg.sd_model_path, counts, classes, templates=cfg.sd_prompt_list,
                         seed=sd_seed(cfg, node), steps=cfg.sd_steps,
                         guidance_scale=cfg.sd_guidance_scale, resolution=cfg.sd_resolution,
                         channels=channels, image_size=image_size,
                         batch_size=cfg.sd_batch_size, device=device, cache=sd_cache(cfg),
                         pipe=pipe)


def build_tiny_pipeline(path: str | Path, seed: int = 0,
                        unet_channels: Sequence[int] = (32, 64)) -> Path:
    """A complete, randomly initialised, tiny Stable Diffusion pipeline saved at ``path``
    (4-6 MB; UNet2DConditionModel with cross-attention 32, a 2-block VAE, a 2-layer CLIP
    text encoder, a character-level CLIP tokenizer, DDIM): to try the plumbing with no
    weights at hand, and for the tests. Its images are noise. ``unet_channels``: the
    UNet's block widths (multiples of 32), one level per entry, cross-attention in all
    but the highest resolution (four levels give FedDifRC's up-blocks 1-3 as SD has)."""
    import string

    from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    out = Path(path)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in (c for c in string.printable if not c.isspace()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    tok = out / ".tokenizer-source"
    tok.mkdir(parents=True, exist_ok=True)
    (tok / "vocab.json").write_text(json.dumps(vocab))
    (tok / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(tok / "vocab.json"), str(tok / "merges.txt"),
                              model_max_length=77)
    torch.manual_seed(seed)
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
        num_attention_heads=4, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
        pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=tuple(unet_channels),
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (len(unet_channels) - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (len(unet_channels) - 1) + ("UpBlock2D",),
        cross_attention_dim=32, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4,
                        block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=32,
                        sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(steps_offset=1, clip_sample=False),
                                   safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    for f in tok.iterdir():
        f.unlink()
    tok.rmdir()
    return out


if __name__ == "__main__":   # python -m fedgen.stable_diffusion --tiny DIR
    import argparse
    import sys

    parser = argparse.ArgumentParser(description="write a tiny random Stable Diffusion "
                                     "pipeline (to try gen-fedsd without real weights)")
    parser.add_argument("--tiny", required=True, metavar="DIR")
    target = Path(parser.parse_args().tiny)
    if target.exists() and any(target.iterdir()):
        print(f"error: {target} exists and is not empty", file=sys.stderr)
        sys.exit(2)
    print(f"tiny random pipeline written to {build_tiny_pipeline(target)}")
