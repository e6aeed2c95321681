#!/usr/bin/env python
"""Privacy sweep: accuracy and fidelity against epsilon, as a table.

One ``run_simulation.py`` run per setting, each in its own folder under ``--out`` (a
folder holding a completed results.json is reused, so a sweep can be resumed): a run
without DP, then one per central-DP noise multiplier (``--noise``, clipping norms from
``--clip``), per label-histogram epsilon (``--hist-eps``) and per DDPM DP-SGD noise
multiplier (``--sgd-noise``). ``--set`` goes to every run (the budget).

    python benchmarks/privacy.py --out outputs/privacy --noise 0.5 1 2 \
        --clip "diffusion=0.05,classify=5" --hist-eps 1 0.1 --sgd-noise 1

Epsilons are the runs' own (results.json ``privacy``, delta = dp-delta); accuracy is the
final (and best) test accuracy of each arm, fidelity that of the synthetic samples.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fedgen.config import ConfigError, RunConfig, parse_overrides  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="sweep folder")
    p.add_argument("--noise", type=float, nargs="*", default=[],
                   help="central-DP noise multipliers (for the models named in --clip)")
    p.add_argument("--clip", default="diffusion=0.05,classify=5",
                   help="dp-clipping-norm of the --noise runs (default %(default)s)")
    p.add_argument("--hist-eps", type=float, nargs="*", default=[],
                   help="histogram-epsilon values")
    p.add_argument("--sgd-noise", type=float, nargs="*", default=[],
                   help="dp-sgd-noise-multiplier values")
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   help="key=value passed to every run (repeatable)")
    p.add_argument("--backend", choices=("ray", "inprocess"), default="inprocess")
    return p.parse_args(argv)


def settings(args) -> dict[str, dict[str, str]]:
    """Row name -> the keys that row sets (on top of ``--set``)."""
    models = list(RunConfig(dp_clipping_norm=args.clip).central_dp)
    bare = "=" not in args.clip
    rows: dict[str, dict[str, str]] = {"no DP": {}}
    for z in args.noise:
        noise = f"{z:g}" if bare else ",".join(f"{m}={z:g}" for m in models)
        rows[f"central z={z:g}"] = {"dp-clipping-norm": args.clip, "dp-noise-multiplier": noise}
    for eps in args.hist_eps:
        rows[f"histogram eps={eps:g}"] = {"histogram-epsilon": f"{eps:g}"}
    for z in args.sgd_noise:
        rows[f"DP-SGD z={z:g}"] = {"dp-sgd-noise-multiplier": f"{z:g}"}
    return rows


def run(name: str, keys: dict[str, str], args, folder: Path) -> dict:
    path = folder / "results.json"
    if path.is_file() and json.loads(path.read_text()).get("status") == "completed":
        return json.loads(path.read_text())
    sets = [f"{k}={v}" for k, v in {**parse_overrides(args.overrides), **keys}.items()]
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--out", str(folder),
           "--backend", args.backend, *[x for s in sets for x in ("--set", s)]]
    print(f"[{name}] {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise RuntimeError(f"[{name}] failed:\n{proc.stderr[-2000:]}")
    return json.loads(path.read_text())


def epsilon(value) -> str:
    return "-" if value is None else "inf" if math.isinf(value) else f"{value:.3g}"


def row(name: str, res: dict) -> str:
    privacy = res.get("privacy") or {}
    models = ((privacy.get("central") or {}).get("models") or {})
    eps = [epsilon((models.get(m) or {}).get("epsilon")) for m in ("diffusion", "classify")]
    sgd = (privacy.get("dp_sgd") or {}).get("max_epsilon")
    fid = (res.get("generation") or {}).get("fidelity")
    arms = " ".join(f"{arm} {100 * e['final_accuracy']:.1f}/{100 * e['best_accuracy']:.1f}"
                    for arm, e in res["arms"].items())
    return (f"| {name} | {eps[0]} | {eps[1]} | {epsilon(privacy.get('histogram_epsilon'))} | "
            f"{epsilon(sgd)} | {'-' if fid is None else f'{100 * fid:.1f}'} | {arms} |")


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        rows = settings(args)
        for keys in rows.values():   # every setting is checked before the first run
            RunConfig.from_mapping({**parse_overrides(args.overrides), **keys})
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    lines = ["| setting | eps diffusion | eps classify | eps histograms | eps DP-SGD "
             "(worst client) | fidelity % | final/best accuracy % per arm |",
             "|---|---|---|---|---|---|---|"]
    for name, keys in rows.items():
        folder = out / name.replace(" ", "-").replace("=", "")
        lines.append(row(name, run(name, keys, args, folder)))
    delta = RunConfig.from_mapping(parse_overrides(args.overrides)).dp_delta
    print("\n".join(lines))
    print(f"\nepsilon at delta={delta:g}; '-' = not applied")
    return 0


if __name__ == "__main__":
    sys.exit(main())
