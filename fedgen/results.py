"""Results of a run as files: ``results.json`` (rewritten atomically after every round, so
an interrupted run keeps what it measured), ``rounds.csv`` (one row per round) and the
plots of :mod:`fedgen.plots`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from fedgen import plots
from fedgen.config import RunConfig

log = logging.getLogger(__name__)

CSV_FIELDS = ("arm", "round", "server_round", "accuracy", "loss", "client_accuracy",
              "train_loss", "steps", "train_samples", "seconds", "client_seconds",
              "augment_dropped")


def _clean(value: Any) -> Any:
    """JSON-safe copy: numpy to Python, NaN to None."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, np.ndarray):
        return _clean(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


class Recorder:
    """Collects what a run measures and writes it under ``out_dir``."""

    def __init__(self, out_dir: str | Path, cfg: RunConfig, classes: tuple[str, ...],
                 resuming: bool = False):
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.classes = classes
        self.results: dict[str, Any] = {
            "status": "running", "error": None, "config": cfg.to_mapping(),
            "classes": list(classes), "partition": {}, "arms": {}, "generation": {},
            "failures": [], "timings": {}, "checkpoint": None}
        self._phase: tuple[str, float] | None = None
        self._round_start = time.perf_counter()
        self._csv = self.out / "rounds.csv"
        self._held = resuming   # a resumed run's results.json stays as it is until resume()
        if not resuming:   # a resumed run rewrites it from the checkpoint (resume)
            with open(self._csv, "w", newline="") as fh:
                csv.writer(fh).writerow(CSV_FIELDS)
        self._samples: tuple[np.ndarray, np.ndarray] | None = None

    def resume(self, results: dict[str, Any], after_round: int) -> None:
        """Go on with the results of a checkpoint (a resumed run): rounds.csv is written
        again from them, the resumption is noted in ``resumed``."""
        self.results, self._held = results, False
        self.results.update(status="running", error=None)
        self.results.setdefault("resumed", []).append(
            {"after_round": after_round, "at": time.strftime("%Y-%m-%d %H:%M:%S")})
        rows = sorted(((arm, h) for arm, e in results["arms"].items() for h in e["history"]),
                      key=lambda r: r[1]["server_round"])
        tmp = self._csv.with_suffix(".csv.tmp")
        with open(tmp, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(CSV_FIELDS)
            for arm, h in rows:
                writer.writerow([arm if k == "arm" else h.get(k) for k in CSV_FIELDS])
        os.replace(tmp, self._csv)
        self.save()

    # ------------------------------------------------------------ timing
    def start_phase(self, name: str) -> None:
        self.end_phase()
        self._phase = (name, time.perf_counter())

    def end_phase(self) -> None:
        if self._phase is not None:
            name, t0 = self._phase
            timings = self.results["timings"]
            timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - t0, 3)
            self._phase = None

    def start_round(self) -> None:
        self._round_start = time.perf_counter()

    # ------------------------------------------------------------ content
    def set_partition(self, nodes: list, hist: np.ndarray) -> None:
        """The nodes (partition ids or node names, in node order) and their histograms."""
        self.results["partition"] = {"nodes": list(nodes), "sizes": hist.sum(1).tolist(),
                                     "histograms": hist.tolist()}
        self.save()

    def log_failures(self, kind: str, phase: str, rnd: int, server_round: int, asked: int,
                     replied: int, failed: list[dict], errors: list[str]) -> None:
        """Which nodes failed or timed out in a round, and why."""
        self.results["failures"].append({
            "server_round": server_round, "phase": phase, "round": rnd, "kind": kind,
            "asked": asked, "replied": replied, "failed": failed, "errors": errors})
        self.save()

    def fail(self, message: str) -> None:
        """The run stops: say why in results.json; what was measured stays."""
        self.end_phase()
        self.results.update(status="failed", error=message)
        self.save()

    def set_generation(self, counts: np.ndarray, labels: np.ndarray, images: np.ndarray,
                       fidelity: float, per_class: list[float], seconds: float,
                       frechet_distance: float | None = None) -> None:
        self.results["generation"] = {
            "counts": counts.tolist(), "total": int(counts.sum()),
            "fidelity": fidelity, "per_class_fidelity": per_class,
            "frechet_distance": frechet_distance, "seconds": round(seconds, 3)}
        self._samples = (images, labels)
        plots.samples_grid(images, labels, self.classes, self.out / "samples.png")
        self.save()

    def set_checkpoint(self, path: Path) -> None:
        self.results["checkpoint"] = str(path)
        self.save()

    def log_diffusion_round(self, rnd: int, train: dict, **extra: Any) -> None:
        """One diffusion round: clients' loss, grid fidelity, times, and what a method
        adds (``extra``, e.g. FedDDPM's held-out loss and correction)."""
        hist = self.results.setdefault("diffusion", {"history": []})["history"]
        hist.append({"round": rnd, "train_loss": train.get("loss"),
                     "grid_fidelity": train.get("fidelity"),
                     "seconds": round(time.perf_counter() - self._round_start, 3),
                     "client_seconds": round(train.get("client_seconds", 0.0), 3), **extra})
        self.save()

    def log_rejection(self, phase: str, rnd: int, server_round: int, node: str,
                      reason: str) -> None:
        """A client update left out of the aggregate by the sanity checks."""
        self.results.setdefault("rejected", []).append({
            "phase": phase, "round": rnd, "server_round": server_round, "node": node,
            "reason": reason})
        self.save()

    def log_traffic(self, kind: str, phase: str, rnd: int, server_round: int,
                    nodes: dict[str, tuple[int, int]]) -> None:
        """Bytes of arrays sent to (down) and back from (up) each node in one round, and
        the running totals per phase (results.json ``communication``)."""
        comm = self.results.setdefault("communication", {
            "unit": "bytes of the arrays in the messages (serialised numpy; configs and "
                    "Flower's framing not counted)", "rounds": [], "phases": {},
            "total": {"down": 0, "up": 0}})
        comm["rounds"].append({"kind": kind, "phase": phase, "round": rnd,
                               "server_round": server_round,
                               "nodes": {n: {"down": d, "up": u} for n, (d, u) in nodes.items()}})
        down, up = sum(d for d, _ in nodes.values()), sum(u for _, u in nodes.values())
        entry = comm["phases"].setdefault(f"{phase} ({kind})", {
            "rounds": 0, "messages": 0, "down": 0, "up": 0})
        entry["rounds"] += 1
        entry["messages"] += len(nodes)
        entry["down"] += down
        entry["up"] += up
        entry["per_client_round"] = {"down": round(entry["down"] / max(entry["messages"], 1)),
                                     "up": round(entry["up"] / max(entry["messages"], 1))}
        comm["total"]["down"] += down
        comm["total"]["up"] += up

    def set_section(self, name: str, value: dict) -> None:
        """A method's own section of results.json (e.g. FedDDPM's ``auxiliary``)."""
        self.results[name] = value
        self.save()

    def log_round(self, arm: str, rnd: int, server_round: int, test: dict,
                  train: dict, clients: dict | None = None) -> None:
        """One classifier round of ``arm``: the headline test metrics (server's, or the
        clients' pooled ones under evaluation=clients), client training, and the clients'
        own evaluation (``clients``, evaluation=clients/both)."""
        seconds = round(time.perf_counter() - self._round_start, 3)
        row = {"arm": arm, "round": rnd, "server_round": server_round,
               "accuracy": test["accuracy"], "loss": test["loss"],
               "client_accuracy": clients["accuracy"] if clients else None,
               "train_loss": train.get("loss"), "steps": train.get("steps"),
               "train_samples": train.get("samples"), "seconds": seconds,
               "client_seconds": round(train.get("client_seconds", 0.0), 3),
               "augment_dropped": train.get("augment_dropped", 0)}
        with open(self._csv, "a", newline="") as fh:
            csv.writer(fh).writerow([row[k] for k in CSV_FIELDS])
        entry = self.results["arms"].setdefault(arm, {"history": [], "steps": 0})
        entry["history"].append({k: row[k] for k in CSV_FIELDS if k != "arm"})
        if clients:
            entry["history"][-1]["client_accuracy_by_node"] = clients["by_node"]
            client_accs = [h["client_accuracy"] for h in entry["history"]]
            entry.update(final_client_accuracy=client_accs[-1],
                         best_client_accuracy=max(client_accs),
                         client_accuracy_by_node=clients["by_node"],
                         client_test_examples=clients["examples"])
        entry["steps"] += int(train.get("steps") or 0)
        entry["train_samples_per_round"] = train.get("samples")
        accs = [h["accuracy"] for h in entry["history"]]
        entry.update(final_accuracy=accs[-1], best_accuracy=max(accs),
                     first_round_accuracy=accs[0],
                     per_class_accuracy=test["per_class_accuracy"])
        self.save()

    # ------------------------------------------------------------ output
    def save(self) -> None:
        if self._held:
            return
        tmp = self.out / "results.json.tmp"
        tmp.write_text(json.dumps(_clean(self.results), indent=2))
        os.replace(tmp, self.out / "results.json")

    def finish(self) -> None:
        """Close timings, write the final JSON and the plots."""
        self.end_phase()
        self.results["status"] = "completed"
        self.results["timings"]["total"] = round(
            sum(v for k, v in self.results["timings"].items() if k != "total"), 3)
        self.save()
        plots.accuracy_curves(self.results["arms"], self.out / "accuracy.png")
        part = self.results.get("partition", {})
        if part.get("histograms"):
            before = np.asarray(part["histograms"])
            counts = self.results["generation"].get("counts")
            after = before + np.asarray(counts) if counts else before
            plots.class_balance(before, after, self.out / "class_balance.png")
        log.info("results written to %s", self.out)
