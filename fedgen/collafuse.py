"""CollaFuse (methods.md D; seed 003: Allmendinger et al. 2024): split-learning diffusion.
Plain PyTorch, no Flower.

A client's PRIVATE denoiser learns the low-noise timesteps t <= t_c (its cut point) and
never leaves it; ONE shared server denoiser learns t > t_c from what the clients send:
their images noised to t_c (x_c; the raw images never leave). Sampling runs the other way:
the server denoises pure noise down to t_c, the client finishes with its private model.

The cut timestep t_c = round(c * T) itself belongs to the client (the server's loss has no
signal at the very timestep its data come from, see :func:`fedgen.diffusion.bridge_noise`).
c = 0: no private model; the client sends its clean images and the server learns every
timestep. c = 1: the client learns every timestep alone and sends nothing.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from fedgen.data import to_float, to_uint8
from fedgen.diffusion import sample, train_ddpm

if TYPE_CHECKING:
    from diffusers import SchedulerMixin, UNet2DModel


def cut_timesteps(ratios: tuple[float, ...], num_clients: int, T: int) -> list[int]:
    """t_c per client (in node order): one ratio for all, or one per client."""
    if len(ratios) == 1:
        ratios = ratios * num_clients
    if len(ratios) != num_clients:
        raise ValueError(f"cut-ratio: {len(ratios)} values for {num_clients} clients; give "
                         f"one, or one per client")
    return [int(round(c * T)) for c in ratios]


def client_range(t_c: int, T: int) -> tuple[int, int] | None:
    """Timesteps [lo, hi) the private model trains on (None: no private model, c = 0)."""
    return None if t_c == 0 else (0, min(t_c + 1, T))


def server_range(t_c: int, T: int) -> tuple[int, int] | None:
    """Timesteps [lo, hi) the server model trains on for a client cut at ``t_c``."""
    return None if t_c >= T else ((t_c + 1, T) if t_c > 0 else (0, T))


def noise_to_cut(scheduler: SchedulerMixin, images: np.ndarray, t_c: int,
                 seed: int) -> np.ndarray:
    """What a client sends: its uint8 images noised to ``t_c`` as float32 (q(x_t | x_0),
    a fresh seeded draw), the clean images in [-1, 1] for t_c = 0, nothing for t_c >= T."""
    T = scheduler.config.num_train_timesteps
    x0 = to_float(images)
    if t_c >= T:
        return np.zeros((0, *images.shape[1:]), np.float32)
    if t_c == 0:
        return x0.numpy().astype(np.float32)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    x = scheduler.add_noise(x0, noise, torch.full((len(x0),), t_c, dtype=torch.long))
    return x.numpy().astype(np.float32)


def disclosure_mse(sent: np.ndarray, images: np.ndarray) -> float | None:
    """Mean squared error, in [-1, 1] units, between what was sent and the real images
    (0 = the images themselves; None when nothing was sent)."""
    if not len(sent):
        return None
    return float(((sent - to_float(images).numpy()) ** 2).mean())


def train_private(unet: UNet2DModel, scheduler: SchedulerMixin, images: np.ndarray,
                  labels: np.ndarray, t_c: int, **train) -> dict:
    """The client's half: the same DDPM loop on its timesteps t <= t_c."""
    T = scheduler.config.num_train_timesteps
    window = client_range(t_c, T)
    if window is None:
        return {"loss": float("nan"), "steps": 0}
    return train_ddpm(unet, scheduler, images, labels, t_range=window, **train)


def train_server(unet: UNet2DModel, scheduler: SchedulerMixin, sent: np.ndarray,
                 labels: np.ndarray, t_c: int, **train) -> dict:
    """The server's half, on one client's x_c: the same loop on t > t_c, noising on from
    x_c (clean images when t_c = 0)."""
    T = scheduler.config.num_train_timesteps
    window = server_range(t_c, T)
    if window is None or not len(sent):
        return {"loss": float("nan"), "steps": 0}
    if t_c == 0:   # clean images in [-1, 1]: back to uint8 for the plain loop
        return train_ddpm(unet, scheduler, to_uint8(torch.as_tensor(sent)), labels,
                          t_range=window, **train)
    return train_ddpm(unet, scheduler, sent, labels, t_range=window, source_t=t_c, **train)


def server_part(unet: UNet2DModel | None, sampler: SchedulerMixin, labels: np.ndarray,
                t_c: int, **kw) -> np.ndarray:
    """The server's half of sampling: pure noise denoised down to just below t_c (float;
    finished images for t_c = 0; nothing for t_c >= T, the client starts from noise)."""
    T = sampler.config.num_train_timesteps
    if t_c >= T or unet is None:
        return np.zeros((0,), np.float32)
    return sample(unet, sampler, labels, window=(t_c, T) if t_c > 0 else None, raw=True,
                  **kw)


def client_part(unet: UNet2DModel | None, sampler: SchedulerMixin, labels: np.ndarray,
                partial: np.ndarray, t_c: int, **kw) -> np.ndarray:
    """The client's half: finish the server's partial samples on t <= t_c with the private
    model (from pure noise when nothing came, t_c >= T); uint8 images."""
    if t_c == 0:
        return to_uint8(torch.as_tensor(partial))
    start = partial if len(partial) else None
    return sample(unet, sampler, labels, window=(-1, t_c), start=start, **kw)
