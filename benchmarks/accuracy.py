#!/usr/bin/env python
"""Accuracy study: the same comparison over several seeds (and settings), as a table.

Each (setting, seed) is one ``run_simulation.py`` run in its own process and folder;
runs whose folder holds a completed results.json are reused, so the study can be resumed.

    python benchmarks/accuracy.py --seeds 0 1 2 --out outputs/study-alpha0.1
    python benchmarks/accuracy.py --seeds 0 1 2 --grid alpha=0.05,0.1,0.5 --out outputs/alpha
    python benchmarks/accuracy.py --seeds 0 --row "plain: cfg-dropout=0 guidance-scale=1" \
        --row "guidance: cfg-dropout=0.1 guidance-scale=3" --out outputs/ablation

``--row`` names one setting of several keys (an ablation row); ``--grid`` crosses values.

``{seed}`` in a ``--set`` value is replaced by the run's seed, e.g. to reuse each seed's
trained DDPM: ``--set diffusion-init=outputs/study/default/seed{seed}/ddpm``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedgen import plots  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--config", help="preset passed to every run")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key=value passed to every run (repeatable; {seed} = the run's seed)")
    p.add_argument("--grid", action="append", default=[],
                   help="key=v1,v2,... : one setting per value (repeatable: cross product)")
    p.add_argument("--row", action="append", default=[],
                   help="'NAME: key=value key=value ...' : one named setting (repeatable)")
    p.add_argument("--backend", choices=("ray", "inprocess"), default="ray",
                   help="passed to run_simulation.py")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (default 1)")
    p.add_argument("--out", required=True, help="study folder")
    return p.parse_args(argv)


def named_rows(rows: list[str]) -> dict[str, dict[str, str]]:
    out = {}
    for spec in rows:
        name, sep, pairs = spec.partition(":")
        if not sep or not name.strip():
            raise SystemExit(f"--row expects 'NAME: key=value ...', got {spec!r}")
        out[name.strip()] = dict(p.split("=", 1) for p in pairs.split())
    return out


def settings(grid: list[str]) -> list[dict[str, str]]:
    axes = []
    for spec in grid:
        key, _, values = spec.partition("=")
        axes.append([(key, v) for v in values.split(",")])
    return [dict(combo) for combo in itertools.product(*axes)] or [{}]


def completed(folder: Path) -> bool:
    """A finished run (results.json is written from the first round on)."""
    path = folder / "results.json"
    return path.is_file() and json.loads(path.read_text()).get("status") == "completed"


def run_one(args, setting: dict, seed: int, folder: Path) -> dict:
    if not completed(folder):
        if (folder / "results.json").is_file():   # an interrupted run: start it afresh
            (folder / "results.json").unlink()
        cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--out", str(folder),
               "--backend", args.backend, "--set", f"seed={seed}"]
        if args.config:
            cmd += ["--config", args.config]
        for pair in [*args.overrides, *(f"{k}={v}" for k, v in setting.items())]:
            cmd += ["--set", pair.replace("{seed}", str(seed))]
        print("$", " ".join(cmd[1:]), flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
    return json.loads((folder / "results.json").read_text())


def mean_std(values: list[float]) -> str:
    v = 100 * np.asarray(values, dtype=float)
    return f"{v.mean():.1f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.1f}"


def table(rows: dict[str, list[dict]], label: str) -> str:
    lines = [f"| {label} | arm | final acc (%) | best acc (%) | round-1 acc (%) | fidelity (%) "
             f"| Fréchet dist. | s/run | n |", "|---|---|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        gens = [r.get("generation") or {} for r in results]
        fid = [g["fidelity"] for g in gens if g.get("fidelity") is not None]
        fd = [g["frechet_distance"] for g in gens if g.get("frechet_distance") is not None]
        secs = np.mean([r["timings"].get("total", np.nan) for r in results])
        for arm in results[0]["arms"]:
            per = [r["arms"][arm] for r in results]
            gen_cols = (f"{mean_std(fid) if fid else ''} | "
                        f"{plain_mean_std(fd) if fd else ''} | {secs:.0f}"
                        if arm == "diffusion" else " | | ")
            lines.append(
                f"| {name} | {arm} | {mean_std([p['final_accuracy'] for p in per])} | "
                f"{mean_std([p['best_accuracy'] for p in per])} | "
                f"{mean_std([p['first_round_accuracy'] for p in per])} | "
                f"{gen_cols} | {len(per)} |")
    return "\n".join(lines)


def ddpm_table(rows: dict[str, list[dict]], label: str) -> str:
    """The federated DDPM per setting: the last round's grid fidelity, and for FedDDPM-style
    methods the held-out D_aux loss, the corrections and the server's seconds on D_aux
    (sampling it + corrections); phase times are contended wall clock."""
    def col(values, fmt):
        v = [x for x in values if x is not None]
        return fmt(v) if v else ""

    lines = [f"| {label} | last-round grid fidelity (%) | held-out D_aux loss | "
             f"corrections | server s on D_aux | local-DDPM phase s | diffusion phase s | n |",
             "|---|---|---|---|---|---|---|---|"]
    for name, results in rows.items():
        hist = [(r.get("diffusion") or {}).get("history") or [{}] for r in results]
        aux = [r.get("auxiliary") or {} for r in results]
        last = [h[-1] for h in hist]
        lines.append(
            f"| {name} | {col([h.get('grid_fidelity') for h in last], mean_std)} | "
            f"{col([h.get('aux_loss_after', h.get('aux_loss')) for h in last], plain_mean_std)}"
            f" | {col([a.get('corrections') for a in aux], lambda v: f'{np.mean(v):.1f}')} | "
            f"{col([a.get('server_seconds') for a in aux], lambda v: f'{np.mean(v):.0f}')} | "
            f"{col([r['timings'].get('local-ddpm') for r in results], lambda v: f'{np.mean(v):.0f}')} | "
            f"{col([r['timings'].get('diffusion') for r in results], lambda v: f'{np.mean(v):.0f}')} | "
            f"{len(results)} |")
    return "\n".join(lines)


def plain_mean_std(values: list[float]) -> str:
    v = np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std(ddof=1) if len(v) > 1 else 0.0:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    t0 = time.perf_counter()
    named = named_rows(args.row) or {
        ",".join(f"{k}={v}" for k, v in s.items()) or "default": s for s in settings(args.grid)}
    jobs = [(name, setting, seed) for name, setting in named.items() for seed in args.seeds]

    def job(item):
        name, setting, seed = item
        folder = out / name.replace("=", "").replace(" ", "_") / f"seed{seed}"
        return run_one(args, setting, seed, folder)

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        done = list(pool.map(job, jobs))
    rows: dict[str, list[dict]] = {}
    for (name, _, _), res in zip(jobs, done):
        rows.setdefault(name, []).append(res)
    text = table(rows, "setting")
    if any(r.get("diffusion") for results in rows.values() for r in results):
        text += "\n\n" + ddpm_table(rows, "setting")
    (out / "table.md").write_text(text + "\n")
    finals = {name: {arm: (np.mean([r["arms"][arm]["final_accuracy"] for r in results]),
                           np.std([r["arms"][arm]["final_accuracy"] for r in results], ddof=1)
                           if len(results) > 1 else 0.0)
                     for arm in results[0]["arms"]} for name, results in rows.items()}
    plots.study_bars(finals, out / "summary.png")
    print(text)
    print(f"\n{len(rows) * len(args.seeds)} runs, {time.perf_counter() - t0:.0f} s; table in "
          f"{out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
