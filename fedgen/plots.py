"""Figures of a run: accuracy curves, a sample grid per class, client x class balance."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pyplot():
    """matplotlib's pyplot on the Agg backend, imported at the first figure: a ClientApp,
    a fresh process per message in a deployment, draws none and spent 0.4 s importing it."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def accuracy_curves(arms: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, entry in arms.items():
        hist = entry["history"]
        ax.plot([h["round"] for h in hist], [100 * h["accuracy"] for h in hist],
                marker="o", label=arm)
    ax.set(xlabel="classifier round", ylabel="test accuracy (%)",
           title="Global ResNet-18, centralised test set")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def samples_grid(images: np.ndarray, labels: np.ndarray, classes: tuple[str, ...],
                 path: Path, per_class: int = 10, title: str = "") -> None:
    """Rows = classes, columns = the first ``per_class`` samples of that class: one
    mosaic, drawn once (cheap enough to write every diffusion round)."""
    n, c, h, w = images.shape if len(images) else (0, 1, 8, 8)
    pad = 1
    mosaic = np.full((len(classes) * (h + pad), per_class * (w + pad), c), 255, np.uint8)
    for k in range(len(classes)):
        for j, i in enumerate(np.flatnonzero(labels == k)[:per_class]):
            y, x = k * (h + pad), j * (w + pad)
            mosaic[y:y + h, x:x + w] = images[i].transpose(1, 2, 0)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.0, per_class * 0.5), max(3.0, len(classes) * 0.5)))
    ax.imshow(mosaic.squeeze(-1) if c == 1 else mosaic, cmap="gray", vmin=0, vmax=255,
              interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([k * (h + pad) + h / 2 for k in range(len(classes))], classes, fontsize=7)
    ax.set_title(title or "Synthetic samples per class (global DDPM)", fontsize=9)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def class_balance(before: np.ndarray, after: np.ndarray, path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 0.4 * len(before) + 1.5))
    vmax = max(before.max(), after.max(), 1)
    for ax, data, title in ((axes[0], before, "real only"),
                            (axes[1], after, "real + synthetic")):
        im = ax.imshow(data, cmap="viridis", vmin=0, vmax=vmax, aspect="auto")
        ax.set(xlabel="class", ylabel="client", title=title)
        ax.set_xticks(range(data.shape[1]))
        ax.set_yticks(range(data.shape[0]))
    fig.colorbar(im, ax=axes, label="samples")
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def study_bars(means: dict[str, dict[str, tuple[float, float]]], path: Path) -> None:
    """Grouped bars: one group per setting, one bar per arm, mean final accuracy ± std."""
    settings = list(means)
    arms = list(dict.fromkeys(a for s in settings for a in means[s]))
    width = 0.8 / max(len(arms), 1)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(settings)), 3.8))
    for i, arm in enumerate(arms):
        xs = [k + (i - (len(arms) - 1) / 2) * width for k in range(len(settings))]
        vals = [means[s].get(arm, (np.nan, 0)) for s in settings]
        ax.bar(xs, [100 * v[0] for v in vals], width, yerr=[100 * v[1] for v in vals],
               capsize=3, label=arm)
    ax.set_xticks(range(len(settings)))
    ax.set_xticklabels(settings)
    ax.set(ylabel="final test accuracy (%)", ylim=(0, 100))
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, ncol=len(arms))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
