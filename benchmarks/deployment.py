#!/usr/bin/env python
"""Per-round wall time of one preset in a real deployment vs in the Ray simulation.

The deployment is the one the tests use (``tests/deployment.py``): the commands of
``docker/compose.yml`` as plain processes on loopback, a SuperLink with TLS and SuperNode
authentication, one SuperNode + SuperExec per client (``--isolation process``: a fresh
ClientApp process per message). The simulation is ``run_simulation.py``. Both run the
same preset, seed and partition; the table gives each round's seconds from
``results.json`` (``diffusion.history`` and ``arms.*.history``) and the whole run.

    python benchmarks/deployment.py                        # the smoke preset, 3 nodes
    python benchmarks/deployment.py --set classifier-rounds=2
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

sys.path.insert(0, str(ROOT))

from deployment import Deployment  # noqa: E402
from fedgen.config import RunConfig, load_config  # noqa: E402


def round_seconds(results: dict) -> list[tuple[str, float]]:
    rows = [(f"diffusion {h['round']}", h["seconds"])
            for h in results.get("diffusion", {}).get("history", [])]
    for arm, entry in results["arms"].items():
        rows += [(f"classify:{arm} {h['round']}", h["seconds"]) for h in entry["history"]]
    return rows


def simulate(args: argparse.Namespace, out: Path) -> tuple[dict, float]:
    cmd = [sys.executable, str(ROOT / "run_simulation.py"), "--out", str(out),
           "--config", args.config]
    for pair in args.overrides:
        cmd += ["--set", pair]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return json.loads((out / "results.json").read_text()), time.perf_counter() - t0


def deploy(values: dict, work: Path) -> tuple[dict, float]:
    n = int(values["num-clients"])
    nodes = [{"partition-id": k, "num-partitions": n} for k in range(n)]
    with Deployment(work / "dep", nodes) as dep:
        t0 = time.perf_counter()
        run_id = dep.run({**values, "out-dir": str(work / "deploy")})
        status = dep.wait(run_id, timeout=3600)
        wall = time.perf_counter() - t0
    if status != "finished:completed":
        raise SystemExit(f"deployment run ended {status}")
    return json.loads((work / "deploy" / "results.json").read_text()), wall


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "smoke.toml"))
    p.add_argument("--set", dest="overrides", action="append", default=[],
                   metavar="KEY=VALUE")
    args = p.parse_args(argv)
    cfg, defaults = load_config(args.config, args.overrides), RunConfig().to_mapping()
    values = {k: v for k, v in cfg.to_mapping().items() if v != defaults[k]}  # typed
    with tempfile.TemporaryDirectory() as tmp:
        sim, sim_wall = simulate(args, Path(tmp) / "sim")
        dep, dep_wall = deploy(values, Path(tmp))
    print("| round | simulation s | deployment s |\n|---|---|---|")
    for (name, s), (_, d) in zip(round_seconds(sim), round_seconds(dep)):
        print(f"| {name} | {s:.1f} | {d:.1f} |")
    for label, res, wall in (("simulation", sim, sim_wall), ("deployment", dep, dep_wall)):
        per = [s for _, s in round_seconds(res)]
        print(f"{label}: whole command {wall:.0f} s, phases {res['timings']['total']:.0f} s, "
              f"mean round {sum(per) / len(per):.1f} s")
    ratio = sum(s for _, s in round_seconds(dep)) / sum(s for _, s in round_seconds(sim))
    print(f"ratio={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
