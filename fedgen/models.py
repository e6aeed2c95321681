"""Models built from the config: the class-conditional UNet, its ONE noise schedule, the
samplers derived from that schedule, and ResNet-18 with a CIFAR stem.

Weights travel as the full ``state_dict`` (parameters AND buffers) in key order.
BatchNorm policy: running means/variances are averaged like the weights (sample-weighted);
``num_batches_tracked`` is averaged too and cast back to an integer (unused, since
BatchNorm here has a fixed momentum).
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import numpy as np
import torch

from fedgen.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

if TYPE_CHECKING:
    from diffusers import DDPMScheduler, SchedulerMixin, UNet2DModel

# diffusers and torchvision are imported where a model is built, not here: every process
# that imports the package (each ClientApp process of a deployment round, each Ray worker,
# a command that stops at a config error) would otherwise load both when only one or
# neither is needed (``import fedgen.client_app``: 14.8 s before, 4.2 s after, measured
# with ``python -X importtime`` on a loaded 2-core host).

# The diffusers class of each sampler name.
SAMPLER_CLASSES: dict[str, str] = {
    "ddpm": "DDPMScheduler",  # ancestral sampling, Ho et al. 2020 eq. 11
    "ddim": "DDIMScheduler",  # eta = 0, Song et al. 2021 eq. 12
    "dpm-solver": "DPMSolverMultistepScheduler",  # DPM-Solver++ (2M), Lu et al. 2022
}


def _group_norm(channels: int) -> torch.nn.GroupNorm:
    return torch.nn.GroupNorm(min(32, channels // 2), channels)


# BatchNorm's running statistics, averaged by FedAvg, do not match the averaged weights
# when clients' data differ (Hsieh et al., 2020): GroupNorm has no running statistics.
NORM_LAYERS = {"batch": torch.nn.BatchNorm2d, "group": _group_norm}


def device() -> torch.device:
    """CUDA when present, else the CPU; chosen once, never hard-coded."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """The context a forward pass runs in at ``precision`` (config key ``mixed-precision``):
    "bf16" is ``torch.autocast`` to bfloat16 (convolutions and matmuls in bf16, the weights,
    gradients and optimiser states stay float32), "no" changes nothing."""
    if precision == "no":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 units (AVX-512 BF16 or AMX), as torch reports it."""
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def check_precision(precision: str, dev: torch.device) -> None:
    """``mixed-precision`` = bf16 on a GPU without bfloat16 (before Ampere) is refused
    before any work; on a CPU without bfloat16 units (AVX-512 BF16 or AMX) it runs, far
    slower than float32, which the log says."""
    if precision != "bf16":
        return
    if dev.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"mixed-precision=bf16: {torch.cuda.get_device_name(dev)} has no "
                          f"bfloat16 support; use mixed-precision=no")
    if dev.type == "cpu" and not cpu_has_bf16():
        log.warning("mixed-precision=bf16 on a CPU without AVX-512 BF16 or AMX: bfloat16 "
                    "is emulated there, 7-37x slower per step than mixed-precision=no "
                    "(docs/RESULTS.md 3k)")


def unet_config(cfg: RunConfig, channels: int, num_classes: int, image_size: int) -> dict:
    """The UNet2DModel config dict: attention in the ``unet-attention-levels`` lowest
    resolutions, a class embedding for class-conditional sampling with one extra row, the
    null class ``num_classes`` of classifier-free guidance (see :func:`null_class`)."""
    widths = cfg.unet_channel_list
    levels = len(widths)
    attn = [i >= levels - cfg.unet_attention_levels for i in range(levels)]
    down = ["AttnDownBlock2D" if a else "DownBlock2D" for a in attn]
    up = ["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)]
    return dict(sample_size=image_size, in_channels=channels, out_channels=channels,
                block_out_channels=widths, layers_per_block=cfg.unet_layers_per_block,
                down_block_types=tuple(down), up_block_types=tuple(up),
                num_class_embeds=num_classes + 1, norm_num_groups=cfg.unet_norm_groups)


def null_class(unet: UNet2DModel) -> int:
    """The label meaning "no class" (the last row of the class embedding)."""
    return unet.config.num_class_embeds - 1


def build_unet(cfg: RunConfig, channels: int, num_classes: int, image_size: int,
               seed: int = 0) -> UNet2DModel:
    """A fresh UNet (seeded), or the one saved under ``diffusion-init``."""
    if cfg.diffusion_init:
        return load_unet(cfg.diffusion_init, channels, num_classes, image_size)
    from diffusers import UNet2DModel
    torch.manual_seed(seed)
    return UNet2DModel(**unet_config(cfg, channels, num_classes, image_size))


def saved_prediction_type(path: str) -> str | None:
    """The ``prediction_type`` of the schedule saved beside a UNet (a run's ``ddpm/``
    folder holds ``scheduler/scheduler_config.json``); None where none was saved."""
    file = Path(path).expanduser() / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        return None
    return json.loads(file.read_text()).get("prediction_type", "epsilon")


def load_unet(path: str, channels: int, num_classes: int, image_size: int,
              prediction_type: str | None = None) -> UNet2DModel:
    """A saved UNet, checked against the data's shape and (given ``prediction_type``)
    against the prediction type its saved schedule was trained with."""
    root = Path(path).expanduser()
    saved = saved_prediction_type(path)
    if prediction_type and saved and saved != prediction_type:
        raise ConfigError(f"diffusion-init {root}: the UNet was trained with "
                          f"prediction-type={saved}; this run has prediction-type="
                          f"{prediction_type} (set the same)")
    folder = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (folder / "config.json").is_file():
        raise ConfigError(f"diffusion-init {root}: no UNet found; expected a folder written "
                          f"by save_pretrained (config.json + weights), or its parent with unet/")
    from diffusers import UNet2DModel
    unet = UNet2DModel.from_pretrained(folder)
    c = unet.config
    want = (channels, num_classes, image_size)
    have = (c.in_channels, (c.num_class_embeds or 0) - 1, c.sample_size)
    if have != want:
        raise ConfigError(f"diffusion-init {root}: UNet has (channels, classes, size) = "
                          f"{have} (classes + 1 null class embeddings), the data needs {want}")
    return unet


def build_scheduler(cfg: RunConfig) -> DDPMScheduler:
    """The ONE noise schedule: used by ``add_noise`` in training and, through
    ``from_config``, by every sampler."""
    from diffusers import DDPMScheduler
    return DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps,
                         beta_schedule=cfg.beta_schedule, beta_start=cfg.beta_start,
                         beta_end=cfg.beta_end, clip_sample=True,
                         prediction_type=cfg.prediction_type)


def build_sampler(name: str, train_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A sampler sharing the training schedule's betas."""
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; allowed: {', '.join(SAMPLER_CLASSES)}")
    import diffusers
    return getattr(diffusers, SAMPLER_CLASSES[name]).from_config(train_scheduler.config)


def build_classifier(cfg: RunConfig, channels: int, num_classes: int,
                     seed: int = 0) -> torch.nn.Module:
    """torchvision ResNet-18 with ``classifier-norm`` layers; the CIFAR stem is a 3x3
    stride-1 conv without max-pool."""
    import torchvision
    torch.manual_seed(seed)
    model = torchvision.models.resnet18(num_classes=num_classes,
                                        norm_layer=NORM_LAYERS[cfg.classifier_norm])
    if cfg.classifier_stem == "cifar":
        model.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1,
                                      bias=False)
        model.maxpool = torch.nn.Identity()
    else:
        model.conv1 = torch.nn.Conv2d(channels, 64, kernel_size=7, stride=2, padding=3,
                                      bias=False)
    return model


class Captured:
    """What :func:`penultimate` captured in the latest forward pass (``value``)."""

    value: torch.Tensor | None = None


@contextlib.contextmanager
def penultimate(model: torch.nn.Module) -> Iterator[Captured]:
    """Capture the penultimate embedding z (the input of ``model.fc``) of every forward
    pass while the context is open, through a forward pre-hook on ``fc`` (removed on
    exit); z stays in the autograd graph, so losses on it train the feature extractor.

    ResNet-18's z is already 512-d (its global-average-pooled last stage), the width of
    FedDifRC's fused diffusion targets, so no projection layer is needed for 512-d targets.
    A model without an ``fc`` layer captures nothing (``value`` stays None).
    """
    captured = Captured()
    fc = getattr(model, "fc", None)
    if not isinstance(fc, torch.nn.Module):
        yield captured
        return

    def grab(module: torch.nn.Module, inputs: tuple) -> None:
        captured.value = torch.flatten(inputs[0], 1)

    handle = fc.register_forward_pre_hook(grab)
    try:
        yield captured
    finally:
        handle.remove()


_SHELLS = threading.local()


def reusable(key: tuple, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """One model instance per architecture and thread, for callers that overwrite ALL its
    weights with :func:`set_weights` before use: a fresh ResNet-18 costs ~0.3 s of random
    initialisation per client per round on a CPU, for weights that are thrown away.
    Per thread, because Flower's legacy Server calls in-process clients from a pool."""
    cache = _SHELLS.__dict__.setdefault("models", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def classifier_shell(cfg: RunConfig, channels: int, num_classes: int) -> torch.nn.Module:
    key = ("resnet18", cfg.classifier_stem, cfg.classifier_norm, channels, num_classes)
    return reusable(key, lambda: build_classifier(cfg, channels, num_classes))


def unet_shell(cfg: RunConfig, channels: int, num_classes: int, image_size: int) -> UNet2DModel:
    conf = unet_config(cfg, channels, num_classes, image_size)
    key = ("unet", *sorted((k, str(v)) for k, v in conf.items()))
    from diffusers import UNet2DModel
    return reusable(key, lambda: UNet2DModel(**conf))


def get_weights(model: torch.nn.Module) -> list[np.ndarray]:
    """Parameters and buffers, in ``state_dict`` order, as copies (on the CPU a bare
    ``.numpy()`` would alias the live tensors, which the next training step changes)."""
    return [v.detach().cpu().numpy().copy() for v in model.state_dict().values()]


def set_weights(model: torch.nn.Module, arrays: list[np.ndarray]) -> None:
    """Load arrays from :func:`get_weights` (each cast to the tensor's dtype)."""
    state = model.state_dict()
    if len(arrays) != len(state):
        raise ValueError(f"expected {len(state)} arrays for {type(model).__name__}, "
                         f"got {len(arrays)}")
    new = {}
    for (key, ref), arr in zip(state.items(), arrays):
        t = torch.from_numpy(np.asarray(arr))
        if t.shape != ref.shape:
            raise ValueError(f"{key}: shape {tuple(t.shape)} != {tuple(ref.shape)}")
        new[key] = t.round().to(ref.dtype) if not ref.is_floating_point() else t.to(ref.dtype)
    model.load_state_dict(new)
