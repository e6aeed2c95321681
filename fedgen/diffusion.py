"""DDPM training and class-conditional sampling: plain PyTorch, no Flower.

One training loop with loss hooks; the noise schedule is passed in (the same object
configures every sampler, see :func:`fedgen.models.build_sampler`).
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from fedgen.balancing import oversample
from fedgen.data import to_float, to_uint8
from fedgen.models import autocast, null_class

if TYPE_CHECKING:
    from diffusers import SchedulerMixin, UNet2DModel

    from fedgen.privacy import DPSGD

log = logging.getLogger(__name__)

# A loss hook adds a term to the local objective: hook(model, batch) -> scalar tensor.
# DDPM batches hold "clean", "noisy", "timesteps", "labels", "noise" and "pred".
LossHook = Callable[[torch.nn.Module, dict], torch.Tensor]


def train_ddpm(unet: UNet2DModel, scheduler: SchedulerMixin, images: np.ndarray,
               labels: np.ndarray, *, epochs: int, batch_size: int, lr: float, seed: int,
               device: torch.device, loss_hooks: Sequence[LossHook] = (),
               cfg_dropout: float = 0.0, min_snr_gamma: float = 0.0,
               max_steps: int = 0, t_range: tuple[int, int] | None = None,
               source_t: int | None = None, dp_sgd: "DPSGD | None" = None,
               precision: str = "no") -> dict:
    """Train ``unet`` in place on the denoising loss of the scheduler's prediction type
    (:func:`regression_target`); returns loss and steps.

    ``max_steps`` > 0 trains exactly that many optimiser steps instead of ``epochs``
    passes (epochs repeat as needed), so a small and a large data set get the same budget.

    ``images`` are uint8 (N, C, H, W); ``labels`` int64 (N,). With ``cfg_dropout`` > 0 each
    label is replaced by the null class with that probability, so the same UNet also
    learns the unconditional score that classifier-free guidance needs (Ho & Salimans 2022).
    With ``min_snr_gamma`` > 0 the per-sample loss is weighted by :func:`min_snr_weights`.

    ``t_range`` = (lo, hi) draws timesteps from [lo, hi) instead of [0, T) (CollaFuse's
    split: a client's private model learns t <= its cut, the server's the rest).
    ``source_t``: ``images`` are float arrays ALREADY noised to that timestep (what a
    CollaFuse client sends); they are noised further with q(x_t | x_s) and the loss is
    the weighted denoising score matching of :func:`bridge_noise`, whose minimiser is the
    same noise predictor as with clean images.

    ``dp_sgd`` (:class:`fedgen.privacy.DPSGD`): sample-level DP-SGD (Abadi et al. 2016)
    through opacus: batches are Poisson samples at rate batch_size / N, each example's
    gradient is clipped to ``max_grad_norm`` and Gaussian noise is added to their sum;
    the result adds ``dp_sample_rate`` and ``dp_steps`` for the accountant. Loss hooks
    (a proximal term) have no per-example gradient and are refused.

    ``precision`` "bf16": the UNet's forward pass under :func:`fedgen.models.autocast`;
    its prediction is cast back to float32 before the loss.
    """
    if source_t is not None and scheduler.config.prediction_type != "epsilon":
        raise ValueError("training from noised images (source_t) is derived for epsilon "
                         "prediction")
    gen = torch.Generator().manual_seed(seed)
    x_all = (torch.as_tensor(images).float() if source_t is not None
             else to_float(images)).to(device)
    y_all = torch.as_tensor(labels, dtype=torch.long).to(device)
    opt = torch.optim.AdamW(unet.parameters(), lr=lr)
    net, private = unet, None
    if dp_sgd is not None:
        if loss_hooks:
            raise ValueError("DP-SGD clips per-example gradients of the denoising loss; "
                             "a loss hook (e.g. a proximal term) has none")
        private = dp_sgd.attach(unet, opt, batch_size, device)
        net, opt = private
    T = scheduler.config.num_train_timesteps
    lo, hi = t_range or (0, T)
    unet.to(device).train()
    null = null_class(unet)
    weights = min_snr_weights(scheduler, min_snr_gamma).to(device) if min_snr_gamma > 0 else None
    if max_steps > 0:
        epochs = math.ceil(max_steps / math.ceil(len(x_all) / batch_size))
    losses, steps, drawn = [], 0, 0
    for _ in range(epochs):
        for idx in batches(len(x_all), batch_size, gen, poisson=dp_sgd is not None):
            if 0 < max_steps <= drawn:
                break
            drawn += 1
            if not len(idx):   # an empty Poisson batch: no step
                continue
            clean, y = x_all[idx.to(device)], y_all[idx.to(device)]
            noise = torch.randn(clean.shape, generator=gen).to(device)
            t = torch.randint(lo, hi, (len(idx),), generator=gen).to(device)
            if cfg_dropout > 0:
                drop = (torch.rand(len(idx), generator=gen) < cfg_dropout).to(device)
                y = torch.where(drop, torch.full_like(y, null), y)
            if source_t is None:   # q(x_t | x_0), Ho et al. eq. 4
                noisy, scale = scheduler.add_noise(clean, noise, t), None
            else:
                noisy, scale = bridge_noise(scheduler, clean, noise, t, source_t)
            with autocast(precision, device):
                pred = net(noisy, t, class_labels=y).sample.float()
            if scale is not None:
                pred = pred * scale
            target = noise if source_t is not None else regression_target(
                scheduler, clean, noise, t)
            if weights is None:
                loss = torch.nn.functional.mse_loss(pred, target)  # L_simple, Ho et al. eq. 14
            else:
                per_sample = (pred - target).pow(2).flatten(1).mean(1)
                loss = (weights[t] * per_sample).mean()
            batch = dict(clean=clean, noisy=noisy, timesteps=t, labels=y, noise=noise,
                         pred=pred)
            for hook in loss_hooks:
                loss = loss + hook(unet, batch)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            steps += 1
    stats = {"loss": float(np.mean(losses[-max(1, steps // max(epochs, 1)):])), "steps": steps}
    if private is not None:
        net._close()   # opacus' hooks and per-example gradients off the UNet
        stats.update(dp_sample_rate=min(1.0, batch_size / len(x_all)), dp_steps=drawn)
    return stats


def batches(n: int, batch_size: int, gen: torch.Generator, poisson: bool = False
            ) -> list[torch.Tensor]:
    """One epoch of batch indices: a seeded shuffle cut into ``batch_size`` pieces, or
    (``poisson``, what the DP-SGD accountant assumes) as many batches, each taking every
    example independently with probability batch_size / n."""
    if not poisson:
        return list(torch.randperm(n, generator=gen).split(batch_size))
    rate = min(1.0, batch_size / n)
    return [torch.nonzero(torch.rand(n, generator=gen) < rate).flatten()
            for _ in range(math.ceil(n / batch_size))]


def bridge_noise(scheduler: SchedulerMixin, x_s: torch.Tensor, noise: torch.Tensor,
                 t: torch.Tensor, s: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise ``x_s`` (images at timestep ``s``) on to timesteps ``t`` > s, and the factor
    that turns the epsilon loss into denoising score matching from x_s.

    x_t = sqrt(a) x_s + sqrt(1 - a) noise with a = abar_t / abar_s is q(x_t | x_s). The
    server never sees x_0, so it cannot form the usual target (x_t - sqrt(abar_t) x_0) /
    sqrt(1 - abar_t); but the score of q(x_t) is also E[grad log q(x_t | x_s) | x_t]
    (Vincent 2011: x_0 -> x_s -> x_t is Markov), and for an epsilon predictor that reads
    eps*(x_t) = sqrt(1 - abar_t) / sqrt(1 - a) * E[noise | x_t]. Regressing
    ``pred * scale`` on ``noise`` with scale = sqrt((1 - a) / (1 - abar_t)) has that
    minimiser (the weighting per t changes no per-t optimum and keeps the targets at unit
    variance). At t = s the scale is 0 (no signal): train on t > s.
    """
    abar = scheduler.alphas_cumprod.to(x_s.device)
    a = (abar[t] / abar[s]).view(-1, *([1] * (x_s.dim() - 1)))
    scale = ((1 - a) / (1 - abar[t].view_as(a))).sqrt()
    return a.sqrt() * x_s + (1 - a).sqrt() * noise, scale


@torch.no_grad()
def denoising_loss(unet: UNet2DModel, scheduler: SchedulerMixin, images: np.ndarray,
                   labels: np.ndarray, *, seed: int, device: torch.device,
                   batch_size: int = 256) -> float:
    """The conditional denoising MSE (:func:`regression_target`) of ``unet`` on ``images``
    with noise and timesteps fixed by ``seed``: the same draw every call, so values compare
    across rounds (a held-out loss for monitoring; nothing is trained)."""
    gen = torch.Generator().manual_seed(seed)
    T = scheduler.config.num_train_timesteps
    unet.to(device).eval()
    total, n = 0.0, 0
    for start in range(0, len(labels), batch_size):
        clean = to_float(images[start:start + batch_size]).to(device)
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long).to(device)
        noise = torch.randn(clean.shape, generator=gen).to(device)
        t = torch.randint(0, T, (len(y),), generator=gen).to(device)
        pred = unet(scheduler.add_noise(clean, noise, t), t, class_labels=y).sample
        target = regression_target(scheduler, clean, noise, t)
        total += torch.nn.functional.mse_loss(pred, target, reduction="sum").item()
        n += noise.numel()
    return total / max(n, 1)


def regression_target(scheduler: SchedulerMixin, clean: torch.Tensor, noise: torch.Tensor,
                      t: torch.Tensor) -> torch.Tensor:
    """What the UNet regresses on: the noise (``prediction_type`` epsilon) or the velocity
    v = sqrt(abar_t) noise - sqrt(1 - abar_t) x_0 (v_prediction, Salimans & Ho 2022)."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(clean, noise, t)
    raise ValueError(f"prediction_type {kind!r}: fedgen trains epsilon or v_prediction")


def min_snr_weights(scheduler: SchedulerMixin, gamma: float) -> torch.Tensor:
    """Per-timestep loss weights for the schedule's prediction type, with SNR_t =
    alpha_bar_t / (1 - alpha_bar_t) (Hang et al. 2023, "Efficient Diffusion Training via
    Min-SNR Weighting Strategy", section 3.4): min(SNR_t, gamma) / SNR_t on the epsilon
    loss, min(SNR_t, gamma) / (SNR_t + 1) on the v loss; both equal min(SNR_t, gamma)
    times the x_0 loss."""
    alpha_bar = scheduler.alphas_cumprod.double()
    snr = alpha_bar / (1 - alpha_bar)
    below = snr + 1 if scheduler.config.prediction_type == "v_prediction" else snr
    return (snr.clamp(max=gamma) / below).float()


@torch.no_grad()
def sample(unet: UNet2DModel, sampler: SchedulerMixin, labels: np.ndarray, *, steps: int,
           seed: int, device: torch.device, batch_size: int = 500,
           progress: bool = True, guidance_scale: float = 1.0,
           window: tuple[int, int] | None = None, start: np.ndarray | None = None,
           raw: bool = False, precision: str = "no") -> np.ndarray:
    """Class-conditional samples for ``labels`` as uint8 (N, C, H, W); seeded.

    ``guidance_scale`` w != 1: classifier-free guidance, eps = eps_u + w (eps_c - eps_u),
    with eps_u the prediction for the null class (one batched pass of twice the size).

    Split sampling (CollaFuse): ``window`` = (lo, hi) runs only the sampler's timesteps t
    with lo < t <= hi; ``start`` (float, N x C x H x W) replaces the pure noise it starts
    from; ``raw`` returns the float array where it stopped instead of uint8 images.

    ``precision`` "bf16": each UNet pass under :func:`fedgen.models.autocast`; the
    guidance and the sampler's step stay float32.
    """
    gen = torch.Generator().manual_seed(seed)
    c, s = unet.config.in_channels, unet.config.sample_size
    unet.to(device).eval()
    labels_t = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(labels_t) == 0:
        return np.zeros((0, c, s, s), dtype=np.float32 if raw else np.uint8)
    out = []
    chunks = labels_t.split(batch_size)
    # disable=None: a bar on a terminal, nothing in logs and pipes
    bar = tqdm(total=len(chunks) * steps, desc="sampling", unit="step",
               disable=None if progress else True, leave=False)
    first = 0
    for y in chunks:
        sampler.set_timesteps(steps)  # also resets multistep solvers' history
        x = torch.randn((len(y), c, s, s), generator=gen).to(device) if start is None else \
            torch.as_tensor(start[first:first + len(y)]).float().to(device)
        first += len(y)
        y = y.to(device)
        for t in sampler.timesteps:
            if window is None or window[0] < int(t) <= window[1]:
                with autocast(precision, device):
                    eps = guided_eps(unet, x, t, y, guidance_scale)
                x = sampler.step(eps, t, x, generator=gen).prev_sample
            bar.update()
        out.append(x.cpu().numpy().astype(np.float32) if raw else to_uint8(x))
    bar.close()
    return np.concatenate(out)


@torch.no_grad()
def sdedit(unet: UNet2DModel, sampler: SchedulerMixin, images: np.ndarray,
           labels: np.ndarray, *, t_start: int, steps: int, seed: int, device: torch.device,
           batch_size: int = 500, guidance_scale: float = 1.0, precision: str = "no"
           ) -> np.ndarray:
    """SDEdit (Meng et al. 2022): noise ``images`` to timestep ``t_start`` with q(x_t | x_0)
    and denoise them class-conditionally with their own ``labels``; uint8 out, seeded.

    The sampler's grid is chosen so that about ``steps`` of its steps fall in
    [0, t_start] (``steps`` over the whole range would leave one or two at t = 200).
    """
    if len(labels) == 0:
        return images[:0].copy()
    T = sampler.config.num_train_timesteps
    sampler.set_timesteps(min(T, math.ceil(steps * T / max(t_start, 1))))
    timesteps = [t for t in sampler.timesteps if int(t) <= t_start]
    gen = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(labels), batch_size):
        clean = to_float(images[start:start + batch_size]).to(device)
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long).to(device)
        noise = torch.randn(clean.shape, generator=gen).to(device)
        x = sampler.add_noise(clean, noise, torch.full((len(y),), int(timesteps[0])))
        unet.to(device).eval()
        for t in timesteps:
            with autocast(precision, device):
                eps = guided_eps(unet, x, t, y, guidance_scale)
            x = sampler.step(eps, t, x, generator=gen).prev_sample
        out.append(to_uint8(x))
    return np.concatenate(out)


def sdedit_fill(unet: UNet2DModel, sampler: SchedulerMixin, images: np.ndarray,
                labels: np.ndarray, deficits: np.ndarray, *, t_start: int, steps: int,
                seed: int, device: torch.device, guidance_scale: float = 1.0,
                precision: str = "no") -> tuple[np.ndarray, np.ndarray]:
    """A client's deficits filled by SDEdit of its own images: sources drawn per class
    with replacement as the oversample arm draws them (so only classes it holds), each
    noised to ``t_start`` and denoised under its own label."""
    src_x, src_y = oversample(images, labels, deficits, np.random.default_rng(seed))
    return sdedit(unet, sampler, src_x, src_y, t_start=t_start, steps=steps, seed=seed,
                  device=device, guidance_scale=guidance_scale, precision=precision), src_y


def guided_eps(unet: UNet2DModel, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor,
               guidance_scale: float) -> torch.Tensor:
    """The UNet's prediction at guidance ``w``: eps_c at w = 1, else eps_u + w (eps_c - eps_u).
    (The same line for a v-predicting UNet: v is affine in eps at a given x_t and t.)
    Float32 out, also from a UNet run under autocast."""
    if guidance_scale == 1.0:
        return unet(x, t, class_labels=labels).sample.float()
    null = torch.full_like(labels, null_class(unet))
    both = unet(torch.cat([x, x]), t, class_labels=torch.cat([labels, null])).sample.float()
    eps_c, eps_u = both.chunk(2)
    return eps_u + guidance_scale * (eps_c - eps_u)
