"""Per-site image folders from a data set's partition, for deployment demos and tests.

Each site gets the images of one Dirichlet partition as an ImageFolder
(``<out>/site-<k>/<class name>/<row>.png``), the layout a SuperNode reads from its own
``--node-config 'data-dir="..." node-name="site-<k>"'``::

    python -m fedgen.sites --out /tmp/sites --set num-clients=3
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from fedgen.config import ConfigError, RunConfig, load_config
from fedgen.data import load_data
from fedgen.partition import partition


def export_sites(cfg: RunConfig, out: str | Path) -> list[Path]:
    """Write partition k of ``cfg``'s training set to ``out/site-<k+1>``; returns the
    folders. Grey images are written as grey PNGs (a site folder is read as RGB)."""
    from PIL import Image

    data = load_data(cfg)
    folders = []
    for k, idx in enumerate(partition(data.train_y, cfg)):
        root = Path(out) / f"site-{k + 1}"
        for i in idx:
            img = data.train_x[i]
            folder = root / data.classes[data.train_y[i]]
            folder.mkdir(parents=True, exist_ok=True)
            pixels = img[0] if img.shape[0] == 1 else np.transpose(img, (1, 2, 0))
            Image.fromarray(pixels).save(folder / f"{i:05d}.png")
        folders.append(root)
    return folders


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedgen.sites", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--out", required=True, help="folder to create site-1 ... site-K in")
    p.add_argument("--config", help="preset file (run-config keys)")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE", help="override a run-config key (repeatable)")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        folders = export_sites(cfg, args.out)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for f in folders:
        print(f"{f}: {sum(1 for _ in f.rglob('*.png'))} images")
    print(f"classes: {','.join(load_data(cfg).classes)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
