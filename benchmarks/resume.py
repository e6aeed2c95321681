#!/usr/bin/env python
"""Kill a run with SIGKILL, resume it, and compare with an uninterrupted run of the same
config and seed: every round's accuracy of every arm, side by side.

    python benchmarks/resume.py --config configs/smoke.toml --kill-in classify:real \
        --out outputs/resume-check [--set KEY=VALUE ...] [--backend inprocess]

Three runs under ``--out``: ``full`` (uninterrupted), ``killed`` (SIGKILL once its
checkpoint says the first round of phase ``--kill-in`` finished, then ``--resume``d).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))   # the checkpoint holds fedgen objects

from fedgen import checkpoint  # noqa: E402


def history(out: Path) -> dict:
    results = json.loads((out / "results.json").read_text())
    return {arm: [h["accuracy"] for h in e["history"]] for arm, e in results["arms"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--backend", default="inprocess", choices=("ray", "inprocess"))
    p.add_argument("--kill-in", default="classify:real",
                   help="phase during which to kill the run (after its first round)")
    args = p.parse_args(argv)
    out = Path(args.out)
    if out.exists():
        print(f"error: {out} exists; choose a new --out", file=sys.stderr)
        return 2
    base = [sys.executable, str(ROOT / "run_simulation.py"), "--backend", args.backend]
    config = (["--config", args.config] if args.config else []) + \
        [a for kv in args.overrides for a in ("--set", kv)]
    t0 = time.perf_counter()
    subprocess.run([*base, *config, "--out", str(out / "full")], check=True,
                   stdout=subprocess.DEVNULL)
    full_s = time.perf_counter() - t0
    proc = subprocess.Popen([*base, *config, "--out", str(out / "killed")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    state = None
    try:
        while proc.poll() is None:
            state = checkpoint.peek(out / "killed")
            if state and state["phase"] == args.kill_in and state["phase_round"] >= 1:
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
    finally:
        if proc.poll() is None:
            proc.kill()   # SIGKILL too: a second one after the loop's is harmless, and
                          # if this script failed, no run is left behind
        proc.wait()
    if proc.returncode != -signal.SIGKILL:
        print(f"error: the run ended (rc {proc.returncode}) before phase {args.kill_in} "
              f"could be interrupted", file=sys.stderr)
        return 1
    print(f"killed (SIGKILL) after round {state['round']} of {state['rounds']} "
          f"({state['phase']} round {state['phase_round']})")
    t0 = time.perf_counter()
    subprocess.run([*base, "--resume", str(out / "killed")], check=True,
                   stdout=subprocess.DEVNULL)
    resume_s = time.perf_counter() - t0
    full, resumed = history(out / "full"), history(out / "killed")
    print("| arm | round | uninterrupted acc (%) | killed + resumed acc (%) |")
    print("|---|---|---|---|")
    for arm, accs in full.items():
        for i, a in enumerate(accs):
            b = resumed[arm][i] if i < len(resumed.get(arm, [])) else None
            print(f"| {arm} | {i + 1} | {100 * a:.2f} | "
                  f"{'-' if b is None else f'{100 * b:.2f}'} |")
    same = full == resumed
    print(f"\nevery round identical: {same}; uninterrupted run {full_s:.0f} s, "
          f"resumption {resume_s:.0f} s")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
