"""FedDifRC's diffusion targets (Wang et al., ICCV 2025; methods.md E): plain PyTorch and
diffusers, no Flower.

For every training image of a node, two kinds of targets from the decoder of a Stable
Diffusion UNet (the outputs of ``unet.up_blocks[1..3]``, caught with forward hooks):

* ``r_d`` (NDCR, paper eq. 9): the image's VAE latent noised to ``feature-t`` (150) with a
  seeded draw, under the prompt of its own class (``difrc-prompt``, "a photo of a {}");
* ``r_c`` (TDCL, eq. 7): the clean latent at t = 0 (the paper: "since we do not add
  noise"; the released code still calls ``add_noise`` at t = 0) under 1 + K prompts:
  slot 0 the image's own class, slots 1..K other classes, ``difrc-negatives`` of them
  (all other classes when there are no more; a seeded choice per image otherwise).

Fusion (eq. 8; the released code's ``get_noise_fea``): every layer's feature map is
read as one channel vector per pixel, projected on a PCA basis to 256 / 128 / 128
components (layers 1 / 2 / 3), and each component is pooled over space by its L2 norm
(the released code's order: PCA per pixel, then ``norm`` over the spatial axis; the
result is non-negative, and it grows with the map's size); the three parts concatenate
to 512-d. A layer with fewer channels than its width (the tiny test pipeline), or
missing (a UNet with fewer than four up-blocks), keeps what exists and is zero-padded,
so the fused vector is always 512-d. The released code fits its PCA per batch (faiss)
and reads layer 2 twice (``s3 = nsd_fea2...``); here each layer's basis is fitted ONCE,
with scikit-learn's ``PCA`` (centred, like faiss' ``PCAMatrix``), on a seeded sample of
``difrc-pca-sample`` images of the data set the node loaded (the run's data set; a site
node's own folder), on about :data:`PCA_ROWS` pixel vectors in all; one basis per target
kind (noisy ``t = feature-t`` features for ``r_d``, clean ``t = 0`` features for
``r_c``: their statistics differ).

``difrc-feature-source=ddpm`` (:class:`DDPMFeaturizer`) puts the run's own federated
class-conditional DDPM in the pipeline's place (pixels instead of VAE latents, the class
label instead of the prompt), with the same fusion, cache and losses, so the method runs
where no Stable Diffusion weights exist.

Bases and targets are cached under ``difrc-cache-dir`` (default
``~/.cache/fedgen/difrc``), each file written atomically (temporary file + rename) under a
file lock, so nodes starting at once compute a basis once:

* ``basis-<digest>.npz``: the PCA means and components, keyed by the pipeline folder, the
  feature settings, the seed and the digest of the sample images and labels;
* ``targets-<digest>.npz``: one node's targets ``r_d`` (N, 512), ``r_c`` (N, 1+K, 512)
  and ``slots`` (N, 1+K), the class index of each slot's prompt (slot 0 = its own), for
  its images in the order it holds them, keyed by the basis key and the digest of the
  node's images and labels. A node's targets are its own images' (no positions in a
  shared array to keep in step); a rerun reads them without loading the pipeline.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from filelock import FileLock

from fedgen.config import RunConfig
from fedgen.seeds import derive_seed
from fedgen.stable_diffusion import load_pipeline

log = logging.getLogger(__name__)

LAYERS = (1, 2, 3)          # up-blocks read (paper: layer 0's resolution is too low)
WIDTHS = (256, 128, 128)    # PCA components kept per layer
FUSED = sum(WIDTHS)         # 512, the ResNet-18 embedding's width
PCA_ROWS = 65536            # pixel vectors a basis is fitted on (about)
VERSION = 1                 # bump when the features change, so old caches are not read
# diffusers' from_pretrained is not thread-safe (its empty-weights init patches torch
# globally; two loads at once fail on meta tensors): one load at a time per process.
_LOAD_LOCK = threading.Lock()


@dataclass(frozen=True)
class Settings:
    """What the targets depend on (the cache key, with the images)."""

    model_path: str
    resolution: int
    feature_t: int
    negatives: int
    pca_sample: int
    prompt: str
    seed: int
    source: str = "sd"          # "sd" (sd-model-path) or "ddpm" (the run's saved DDPM)
    model_digest: str = ""      # of the DDPM's weights: one folder name, many runs

    @classmethod
    def from_config(cls, cfg: RunConfig, ddpm_path: str = "") -> "Settings":
        """The run's settings; ``ddpm_path``: the saved DDPM (difrc-feature-source=ddpm)."""
        source = cfg.difrc_feature_source
        path = ddpm_path if source == "ddpm" else cfg.sd_model_path
        root = Path(path).expanduser().resolve()
        digest = _folder_digest(root / "unet") if source == "ddpm" else ""
        return cls(str(root), cfg.difrc_resolution, cfg.feature_t, cfg.difrc_negatives,
                   cfg.difrc_pca_sample, cfg.difrc_prompt, cfg.seed, source, digest)

    def featurizer(self, classes: Sequence[str], device: torch.device) -> "Featurizer":
        if self.source == "ddpm":
            return DDPMFeaturizer(self.model_path, classes, device)
        return SDFeaturizer(self.model_path, classes, self.prompt, self.resolution, device)


@dataclass
class Targets:
    r_d: np.ndarray     # (N, 512) float32
    r_c: np.ndarray     # (N, 1 + K, 512) float32, slot 0 = positive
    slots: np.ndarray   # (N, 1 + K) int64: the class whose prompt made each slot


# ---------------------------------------------------------------------- the UNet
class Featurizer:
    """Up-block features of a representation model (a UNet and its noise schedule),
    loaded on first use. Subclasses say how images become the UNet's input
    (:meth:`encode`) and how a class conditions it (:meth:`condition`)."""

    def __init__(self, classes: Sequence[str], device: torch.device):
        self.classes, self.device = list(classes), device
        self.unet_calls = 0

    @property
    def unet(self) -> torch.nn.Module:
        raise NotImplementedError

    @property
    def scheduler(self):
        raise NotImplementedError

    def encode(self, images: np.ndarray) -> torch.Tensor:
        raise NotImplementedError

    def condition(self, classes: torch.Tensor) -> dict:
        raise NotImplementedError

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @torch.no_grad()
    def layers(self, latents: torch.Tensor, classes: np.ndarray, t: int,
               noise: torch.Tensor | None = None) -> dict[int, torch.Tensor]:
        """Up-block outputs {layer: (B, C, h, w)} for inputs noised to ``t`` (with
        ``noise``; none at t = 0) under the conditions of ``classes`` (one per row)."""
        unet = self.unet
        steps = torch.full((len(latents),), t, dtype=torch.long, device=self.device)
        if noise is not None and t > 0:
            latents = self.scheduler.add_noise(latents, noise.to(latents), steps)
        cond = self.condition(torch.as_tensor(classes, device=self.device))
        return _hooked(unet, lambda: unet(latents, steps, **cond), self)


def _to_rgb_at(images: np.ndarray, size: int, channels: int, device) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float in [-1, 1] with ``channels`` (grayscale repeated to 3),
    resized to ``size`` (antialiased bilinear)."""
    x = torch.as_tensor(images, dtype=torch.float32, device=device) / 255.0
    if x.shape[1] != channels:
        x = x.repeat(1, 3, 1, 1) if x.shape[1] == 1 and channels == 3 else \
            x.mean(1, keepdim=True)
    if x.shape[-1] != size or x.shape[-2] != size:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear",
                                            antialias=True, align_corners=False)
    return x * 2 - 1


class SDFeaturizer(Featurizer):
    """A local Stable Diffusion pipeline: VAE latents, the class's prompt as condition."""

    def __init__(self, model_path: str, classes: Sequence[str], prompt: str, resolution: int,
                 device: torch.device):
        super().__init__(classes, device)
        self.model_path, self.prompt, self.resolution = model_path, prompt, resolution
        self._pipe, self._embeds = None, None

    @property
    def pipe(self):
        if self._pipe is None:
            with _LOAD_LOCK:
                self._pipe = load_pipeline(self.model_path, self.device, method="feddifrc")
        return self._pipe

    @property
    def unet(self):
        return self.pipe.unet

    @property
    def scheduler(self):
        return self.pipe.scheduler

    @torch.no_grad()
    def encode(self, images: np.ndarray) -> torch.Tensor:
        """uint8 (N, C, H, W) -> scaled VAE latents of the images in RGB at ``resolution``;
        the posterior mean (not a sample: no random draw)."""
        vae = self.pipe.vae
        x = _to_rgb_at(images, self.resolution, 3, self.device)
        return vae.encode(x).latent_dist.mean * vae.config.scaling_factor

    def condition(self, classes: torch.Tensor) -> dict:
        if self._embeds is None:   # every class's prompt embedding (C, 77, D), once
            prompts = [self.prompt.format(c) for c in self.classes]
            with torch.no_grad():
                self._embeds = self.pipe.encode_prompt(prompts, self.device, 1, False)[0]
        return {"encoder_hidden_states": self._embeds[classes]}


class DDPMFeaturizer(Featurizer):
    """The run's own class-conditional DDPM (``difrc-feature-source=ddpm``): a diffusers
    ``UNet2DModel`` + scheduler saved by the server after the diffusion phase
    (``<out>/ddpm``). Pixels are its input (no VAE), at its own size and channels; the
    class label replaces the prompt. Its UNet has as many up-blocks as ``unet-channels``
    has entries: with the default two, only layer 1 exists (the rest is zero-padded)."""

    def __init__(self, model_path: str, classes: Sequence[str], device: torch.device):
        super().__init__(classes, device)
        self.model_path = model_path
        self._unet, self._scheduler = None, None

    def _load(self) -> None:
        from diffusers import DDPMScheduler, UNet2DModel

        root = Path(self.model_path)
        if not (root / "unet" / "config.json").is_file():
            raise FileNotFoundError(
                f"difrc-feature-source=ddpm: no saved DDPM at {root} (the server writes "
                f"<out>/ddpm after the diffusion phase; nodes must see that folder)")
        with _LOAD_LOCK:
            self._unet = UNet2DModel.from_pretrained(root / "unet").to(self.device).eval()
            self._scheduler = DDPMScheduler.from_pretrained(root / "scheduler")

    @property
    def unet(self):
        if self._unet is None:
            self._load()
        return self._unet

    @property
    def scheduler(self):
        if self._scheduler is None:
            self._load()
        return self._scheduler

    def encode(self, images: np.ndarray) -> torch.Tensor:
        c = self.unet.config
        return _to_rgb_at(images, int(c.sample_size), int(c.in_channels), self.device)

    def condition(self, classes: torch.Tensor) -> dict:
        return {"class_labels": classes}


def _hooked(unet, forward, counter) -> dict[int, torch.Tensor]:
    """Run ``forward`` with hooks on ``unet.up_blocks[LAYERS]`` (those that exist)."""
    out: dict[int, torch.Tensor] = {}
    handles = [unet.up_blocks[i].register_forward_hook(
        lambda m, a, o, i=i: out.__setitem__(i, o[0] if isinstance(o, tuple) else o))
        for i in LAYERS if i < len(unet.up_blocks)]
    try:
        forward()
        counter.unet_calls += 1
    finally:
        for h in handles:
            h.remove()
    return {i: v.float() for i, v in out.items()}


# ---------------------------------------------------------------------- fusion
Basis = dict[str, np.ndarray]   # "<kind>/<layer>/mean" (C,), ".../components" (k, C)


def fuse(layers: dict[int, torch.Tensor], basis: Basis, kind: str, batch: int) -> torch.Tensor:
    """(B, 512): per layer, PCA of each pixel's channel vector, L2 norm of every component
    over space, zero-padded to the layer's width; the layers concatenated."""
    parts = []
    for layer, width in zip(LAYERS, WIDTHS):
        part = torch.zeros(batch, width)
        key = f"{kind}/{layer}"
        if layer in layers and f"{key}/mean" in basis:
            feats = layers[layer].flatten(2).transpose(1, 2).cpu()        # (B, hw, C)
            mean = torch.as_tensor(basis[f"{key}/mean"])
            comps = torch.as_tensor(basis[f"{key}/components"])           # (k, C)
            proj = (feats - mean) @ comps.T                               # (B, hw, k)
            part[:, :comps.shape[0]] = proj.norm(dim=1)
        parts.append(part)
    return torch.cat(parts, dim=1)


def fit_pca(rows: np.ndarray, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(mean, components) of at most ``width`` principal components (scikit-learn)."""
    from sklearn.decomposition import PCA

    k = min(width, rows.shape[1], rows.shape[0])
    pca = PCA(n_components=k, random_state=seed).fit(rows)
    return pca.mean_.astype(np.float32), pca.components_.astype(np.float32)


def fit_basis(feat: Featurizer, images: np.ndarray, labels: np.ndarray, s: Settings,
              batch_size: int) -> Basis:
    """Per kind and layer, the PCA of the pixel vectors of ``images`` (the sample): at most
    ``PCA_ROWS / len(images)`` seeded pixel positions of each image and layer."""
    rng = np.random.default_rng(derive_seed(s.seed, "difrc-pca-rows"))
    per_image = max(1, -(-PCA_ROWS // max(len(images), 1)))
    rows: dict[str, list[np.ndarray]] = {}
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        lat = feat.encode(images[sl])
        noise = _noise(lat.shape, s, "pca", range(start, start + len(lat)))
        for kind, t, nz in (("noise", s.feature_t, noise), ("text", 0, None)):
            for layer, f in feat.layers(lat, labels[sl], t, nz).items():
                px = f.flatten(2).transpose(1, 2).cpu().numpy()          # (B, hw, C)
                take = min(per_image, px.shape[1])
                for img in px:
                    pick = rng.choice(px.shape[1], take, replace=False)
                    rows.setdefault(f"{kind}/{layer}", []).append(img[pick])
    basis: Basis = {}
    for key, chunks in rows.items():
        width = WIDTHS[LAYERS.index(int(key.split("/")[1]))]
        basis[f"{key}/mean"], basis[f"{key}/components"] = fit_pca(
            np.concatenate(chunks), width, s.seed)
    return basis


def _noise(shape, s: Settings, tag: str, rows) -> torch.Tensor:
    """Seeded noise, one draw per image (the same whatever the batch size)."""
    return torch.stack([torch.randn(tuple(shape[1:]), generator=torch.Generator().manual_seed(
        derive_seed(s.seed, "difrc-noise", tag, i))) for i in rows])


# ---------------------------------------------------------------------- targets
def negatives(labels: np.ndarray, num_classes: int, k: int, seed: int) -> np.ndarray:
    """(N, 1 + K') prompt classes: each image's own class, then K' = min(k, C - 1) others
    (all others when C - 1 <= k, else a seeded choice per image, in its order)."""
    k = min(k, num_classes - 1)
    rng = np.random.default_rng(seed)
    slots = np.empty((len(labels), 1 + k), np.int64)
    for i, y in enumerate(labels):
        others = np.array([c for c in range(num_classes) if c != y], np.int64)
        slots[i, 0] = y
        slots[i, 1:] = others if len(others) <= k else rng.choice(others, k, replace=False)
    return slots


def compute_targets(feat: Featurizer, basis: Basis, images: np.ndarray, labels: np.ndarray,
                    s: Settings, tag: str, batch_size: int) -> Targets:
    slots = negatives(labels, len(feat.classes), s.negatives,
                      derive_seed(s.seed, "difrc-negatives", tag))
    r_d, r_c = [], []
    for start in range(0, len(images), batch_size):
        sl = slice(start, start + batch_size)
        lat = feat.encode(images[sl])
        noise = _noise(lat.shape, s, tag, range(start, start + len(lat)))
        r_d.append(fuse(feat.layers(lat, slots[sl, 0], s.feature_t, noise), basis, "noise",
                        len(lat)))
        r_c.append(torch.stack([fuse(feat.layers(lat, slots[sl, j], 0), basis, "text", len(lat))
                                for j in range(slots.shape[1])], dim=1))
    if not r_d:
        return Targets(np.zeros((0, FUSED), np.float32),
                       np.zeros((0, slots.shape[1], FUSED), np.float32), slots)
    return Targets(torch.cat(r_d).numpy(), torch.cat(r_c).numpy(), slots)


def node_targets(s: Settings, images: np.ndarray, labels: np.ndarray, *,
                 reference: tuple[np.ndarray, np.ndarray], classes: Sequence[str],
                 device: torch.device, cache_dir: str | Path = "", batch_size: int = 32,
                 featurizer: Featurizer | None = None) -> Targets:
    """This node's targets for ``images`` (in their order), from the cache when there.

    ``reference``: the data set the PCA sample is drawn from (the run's, or a site's own
    images and labels). The pipeline is loaded only if something is not cached.
    """
    root = Path(cache_dir).expanduser() if str(cache_dir) else default_cache_dir()
    root.mkdir(parents=True, exist_ok=True)
    feat = featurizer or s.featurizer(classes, device)
    sample = _pca_sample(reference, s)
    bkey = {"version": VERSION, **asdict(s), "classes": list(classes),
            "sample": _digest(*sample)}
    tkey = {"basis": bkey, "images": _digest(images, labels)}
    path = root / f"targets-{_hash(tkey)}.npz"
    with FileLock(str(path) + ".lock"):
        cached = _load(path)
        if cached is not None:
            return Targets(cached["r_d"], cached["r_c"], cached["slots"])
        _check_t(feat, s)
        basis = _basis(root, bkey, feat, sample, s, batch_size)
        t0 = time.perf_counter()
        out = compute_targets(feat, basis, images, labels, s, tkey["images"], batch_size)
        _save(path, {**asdict(out), "key": np.array(json.dumps(tkey))})
        log.info("FedDifRC targets of %d images in %.1f s -> %s", len(images),
                 time.perf_counter() - t0, path)
        return out


def _basis(root: Path, key: dict, feat: Featurizer, sample, s: Settings,
           batch_size: int) -> Basis:
    path = root / f"basis-{_hash(key)}.npz"
    with FileLock(str(path) + ".lock"):
        cached = _load(path)
        if cached is not None:
            return {k: v for k, v in cached.items() if k != "key"}
        t0 = time.perf_counter()
        basis = fit_basis(feat, *sample, s, batch_size)
        _save(path, {**basis, "key": np.array(json.dumps(key))})
        log.info("FedDifRC PCA basis from %d images in %.1f s -> %s", len(sample[0]),
                 time.perf_counter() - t0, path)
        return basis


def _check_t(feat: Featurizer, s: Settings) -> None:
    if s.feature_t >= feat.num_train_timesteps:
        raise ValueError(f"feature-t={s.feature_t} must be below the pipeline's "
                         f"num_train_timesteps ({feat.num_train_timesteps})")


def _pca_sample(reference: tuple[np.ndarray, np.ndarray], s: Settings):
    x, y = reference
    n = min(s.pca_sample, len(y))
    idx = np.sort(np.random.default_rng(derive_seed(s.seed, "difrc-pca")).choice(
        len(y), n, replace=False))
    return x[idx], np.asarray(y)[idx]


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fedgen" / "difrc"


def _digest(*arrays: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()[:24]


def _folder_digest(folder: Path) -> str:
    """Digest of a saved model's weight files ("" when there are none yet)."""
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        h.update(f.read_bytes())
    return h.hexdigest()[:24] if folder.is_dir() else ""


def _hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]


def _load(path: Path) -> dict[str, np.ndarray] | None:
    if not path.is_file():
        return None
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, path)
