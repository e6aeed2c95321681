"""``run_simulation.py``: validate everything, run Flower's Ray simulation (or, with
``--backend inprocess``, Flower's Server loop with in-process clients), print the table.

Every user mistake (unknown key, bad value, missing file or data, an output folder that
already holds results) is reported in one line with exit code 2 before Ray starts.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from fedgen import checkpoint, logs
from fedgen.config import ConfigError, RunConfig, load_config

# torch, Flower and the method registry are imported where they are first needed, so
# --help and every mistake in the arguments or config keys answer at once, not after
# ~10 s of imports.

log = logging.getLogger("fedgen")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="run_simulation.py",
        description="Run a fedgen comparison in Flower's Ray simulation and print the table.",
        epilog="Config keys: see the README or pyproject.toml [tool.flwr.app.config]. "
               "Example: python run_simulation.py --config configs/smoke.toml --set alpha=0.5")
    p.add_argument("--config", metavar="FILE", help="preset file (TOML or YAML) of run-config keys")
    p.add_argument("--set", dest="overrides", metavar="KEY=VALUE", action="append", default=[],
                   help="override one config key (repeatable)")
    p.add_argument("--out", metavar="DIR", help="output folder (default: a new folder under outputs/)")
    p.add_argument("--backend", choices=("ray", "inprocess"), default="ray",
                   help="ray: Flower's simulation engine, one actor per CPU (default); "
                        "inprocess: the clients run one after another in this process "
                        "(no Ray start-up; see fedgen/inprocess.py)")
    p.add_argument("--resume", metavar="DIR",
                   help="continue the interrupted run in DIR (its output folder) from its "
                        "last checkpoint, with its saved config; --config/--set, if given, "
                        "must match it")
    p.add_argument("--verbose", action="store_true", help="also show Flower's own round logs")
    return p.parse_args(argv)


def prepare(args: argparse.Namespace) -> RunConfig:
    """Parse and check the config, the data, the partition and the output folder."""
    given = load_config(args.config, args.overrides)
    from fedgen.methods import method_for

    method_for(given)  # an unknown method fails here, before any work
    if args.resume:
        if args.out:
            raise ConfigError("--resume DIR writes into DIR; drop --out")
        cfg, _ = checkpoint.resume_config(
            args.resume, given if args.config or args.overrides else None)
        return check_run(cfg)
    cfg = given
    if args.out:
        cfg = cfg.replace(out_dir=args.out)
    if not cfg.out_dir:
        from fedgen.server_app import default_out_dir
        cfg = cfg.replace(out_dir=str(default_out_dir(cfg)))
    out = Path(cfg.out_dir).resolve()
    if cfg.resume_from:
        raise ConfigError("resume-from is the flwr run way; run_simulation.py takes "
                          "--resume DIR")
    if (out / "results.json").exists():
        raise ConfigError(f"output folder {out} already holds results.json; choose another "
                          f"--out (nothing was overwritten)")
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} exists and is not a folder")
    return check_run(cfg.replace(out_dir=str(out)))


def check_run(cfg: RunConfig) -> RunConfig:
    """The data, the partition and the initial UNet a run needs, checked before work."""
    from fedgen.data import load_data
    from fedgen.partition import partition
    from fedgen.server_app import check_server_data

    data = load_data(cfg)
    if not len(data.train_y):
        raise ConfigError("the simulation partitions the server's data set among its "
                          "clients, and it holds no images: set data-dir (sites with their "
                          "own folders are a deployment: see the README's Deploy section)")
    check_server_data(cfg, data)
    partition(data.train_y, cfg)
    if cfg.diffusion_init:
        from fedgen.models import load_unet
        load_unet(cfg.diffusion_init, data.channels, data.num_classes, data.image_size,
                  prediction_type=cfg.prediction_type)
    return cfg


def simulate(cfg: RunConfig, verbose: bool = False, backend: str = "ray") -> dict:
    """Run the method's ServerApp and ClientApp in Flower's Ray simulation, or its
    strategy and clients in this process (``backend="inprocess"``)."""
    flwr_log = logging.getLogger("flwr")
    flwr_log.setLevel(logging.INFO if verbose else logging.WARNING)
    # run_simulation / Server are the in-process entry points on purpose; their notices
    # are noise here.
    flwr_log.addFilter(lambda record: "DEPRECATED FEATURE" not in record.getMessage())
    if backend == "inprocess":
        return simulate_in_process(cfg)
    import torch
    from flwr.simulation import run_simulation

    from fedgen.client_app import make_client_app
    from fedgen.server_app import make_server_app

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    gpus = 0.5 if torch.cuda.is_available() else 0.0
    backend = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
               "init_args": {"include_dashboard": False, "num_cpus": os.cpu_count() or 1}}
    run_simulation(server_app=make_server_app(cfg), client_app=make_client_app(cfg),
                   num_supernodes=cfg.num_clients, backend_config=backend)
    path = Path(cfg.out_dir) / "results.json"
    if not path.is_file():
        raise RuntimeError(f"the run wrote no {path}; see the log above")
    return json.loads(path.read_text())


def simulate_in_process(cfg: RunConfig) -> dict:
    from fedgen.inprocess import InProcessProxy, new_run_id, run_in_process
    from fedgen.methods import method_for
    from fedgen.server_app import build_strategy

    strategy = build_strategy(cfg)
    handlers = method_for(cfg).clients
    run_id = new_run_id()   # its own cache folder: runs side by side must not share one
    proxies = [InProcessProxy(f"partition-{p}", cfg, p, handlers, run_id)
               for p in range(cfg.num_clients)]
    run_in_process(strategy, proxies, round_timeout=cfg.round_timeout or None)
    return json.loads((Path(cfg.out_dir) / "results.json").read_text())


def format_table(results: dict) -> str:
    """The comparison table, one row per arm (accuracies in %)."""
    from fedgen.privacy import summary_line

    rows = ["| arm | final acc | best acc | round-1 acc | train samples/round | steps |",
            "|---|---|---|---|---|---|"]
    for arm, e in results["arms"].items():
        rows.append(f"| {arm} | {100 * e['final_accuracy']:.1f} | {100 * e['best_accuracy']:.1f}"
                    f" | {100 * e['first_round_accuracy']:.1f} | {e['train_samples_per_round']}"
                    f" | {e['steps']} |")
    client_rows = [(arm, e) for arm, e in results["arms"].items()
                   if e.get("client_accuracy_by_node")]
    if client_rows:
        rows.append("\nclients' own held-out images (final round, sample-weighted mean "
                    "and per node):")
        for arm, e in client_rows:
            nodes = ", ".join(f"{k} {100 * v['accuracy']:.1f}"
                              for k, v in e["client_accuracy_by_node"].items())
            rows.append(f"{arm}: {100 * e['final_client_accuracy']:.1f} ({nodes})")
    if results.get("failures"):
        rows.append(f"\nrounds with failed or timed-out nodes: {len(results['failures'])} "
                    f"(see failures in results.json)")
    privacy = summary_line(results.get("privacy"))
    if privacy:
        rows.append(f"\n{privacy}")
    gen = results.get("generation") or {}
    if gen:
        fid, fd = gen.get("fidelity"), gen.get("frechet_distance")
        rows.append(f"\nsynthetic samples: {gen['total']}, fidelity "
                    f"{'n/a' if fid is None else f'{100 * fid:.1f}%'} (reference classifier), "
                    f"Fréchet distance {'n/a' if fd is None else f'{fd:.2f}'} "
                    f"(reference network)")
    rows += communication_rows(results.get("communication"))
    return "\n".join(rows)


def _mb(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e4 else f"{n:.0f} B"


def communication_rows(comm: dict | None) -> list[str]:
    """results.json ``communication`` as table lines: per phase, the mean bytes one client
    was sent and sent back per round, and the run's totals."""
    if not comm or not comm.get("phases"):
        return []
    rows = ["\ncommunication (arrays in the messages; per client per round, down / up):"]
    for phase, e in comm["phases"].items():
        per = e["per_client_round"]
        rows.append(f"  {phase}: {_mb(per['down'])} / {_mb(per['up'])} "
                    f"({e['messages']} messages in {e['rounds']} rounds)")
    total = comm["total"]
    rows.append(f"  total: {_mb(total['down'])} down, {_mb(total['up'])} up")
    return rows


def main(argv: list[str] | None = None) -> int:
    logs.setup()
    args = parse_args(argv)
    try:
        cfg = prepare(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from fedgen.methods import method_for

    log.info("method %s (%s), arms %s, %s with %d clients, alpha=%g, seed %d",
             cfg.method, method_for(cfg).summary, cfg.arms, cfg.dataset,
             cfg.num_clients, cfg.alpha, cfg.seed)
    t0 = time.perf_counter()
    results = simulate(cfg, verbose=args.verbose, backend=args.backend)
    print(format_table(results))
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s; results in {cfg.out_dir}")
    return 0
