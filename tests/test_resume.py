"""Checkpoint and resume (issue 11, item 1): a run killed after any round continues from
its checkpoint and ends with the very accuracies of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import fedgen.inprocess
from fedgen import checkpoint
from fedgen.config import ConfigError
from fedgen.server_app import build_strategy, components
from fedgen.simulation import main
from tests.conftest import ROOT, InProcessProxy, run_in_process, tiny_config

# Small, but every kind of state a resumed run needs: a DDPM with server momentum and an
# EMA, shipped synthetic batches, two classifier arms of several rounds.
PRESET = """
num-clients = 3
alpha = 0.5
min-partition-size = 5
diffusion-rounds = 1
diffusion-epochs = 1
unet-channels = "8,16"
sampling-steps = 3
augment-ratio = 0.3
arms = "real,diffusion"
classifier-rounds = 2
batch-size = 128
diffusion-server-opt = "fedavgm"
ema-decay = 0.5
"""


def accuracies(results: dict) -> dict:
    return {arm: [h["accuracy"] for h in e["history"]] for arm, e in results["arms"].items()}


def test_resume_after_sigkill_in_the_classifier_phase_ends_like_an_uninterrupted_run(tmp_path):
    preset = tmp_path / "run.toml"
    preset.write_text(PRESET)
    command = [sys.executable, "run_simulation.py", "--backend", "inprocess",
               "--config", str(preset)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    full = subprocess.run([*command, "--out", str(tmp_path / "full")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert full.returncode == 0, full.stderr[-3000:]
    expected = json.loads((tmp_path / "full" / "results.json").read_text())

    out = tmp_path / "killed"
    proc = subprocess.Popen([*command, "--out", str(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline, state = time.monotonic() + 600, None
        while time.monotonic() < deadline and proc.poll() is None:
            state = checkpoint.peek(out)
            if state and state["phase"] == "classify:real" and state["phase_round"] == 1:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads((out / "results.json").read_text())["status"] == "running"
    done = checkpoint.peek(out)["round"]

    resumed = subprocess.run([*command[:-2], "--resume", str(out)], cwd=ROOT, env=env,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming after round {done}" in resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["status"] == "completed"
    assert results["resumed"][0]["after_round"] == done
    assert accuracies(results) == accuracies(expected)   # exactly, every round
    for arm in expected["arms"]:
        assert results["arms"][arm]["final_accuracy"] == expected["arms"][arm]["final_accuracy"]
    assert results["generation"]["counts"] == expected["generation"]["counts"]
    rows = (out / "rounds.csv").read_text().splitlines()
    assert len(rows) == 1 + sum(len(v) for v in accuracies(expected).values())
    # the finished run cannot be resumed again, and says so in one line
    again = subprocess.run([*command[:-2], "--resume", str(out)], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 2 and "has finished" in again.stderr
    assert "Traceback" not in again.stderr


def untimed(section):
    """A results section without its wall-clock figures."""
    if isinstance(section, dict):
        return {k: untimed(v) for k, v in section.items() if "seconds" not in k}
    if isinstance(section, list):
        return [untimed(v) for v in section]
    return section


def run_until(cfg, rounds: int):
    """Run ``cfg`` in process and stop after server round ``rounds`` (as if killed after
    that round's checkpoint)."""
    strategy = build_strategy(cfg)
    strategy._rounds = strategy._rounds[:rounds]
    proxies = [InProcessProxy(f"node-{k}", cfg, k) for k in range(cfg.num_clients)]
    fedgen.inprocess.run_in_process(strategy, proxies)
    return strategy


@pytest.mark.parametrize("method, stop_after", [
    ("collafuse", 2),       # inside the split rounds: private halves on the nodes' disks
    ("fedddpm-plus", 3),    # inside the diffusion phase: D_aux, stall rule, server state
])
def test_resume_inside_the_generative_phase_matches(tmp_path, method, stop_after):
    # cache-dir empty: the nodes' caches live under the server's run key, which the
    # resumed run (new proxies, a new Flower run) keeps.
    base = dict(method=method, arms="diffusion", diffusion_rounds=2, classifier_rounds=1,
                cache_dir="", local_ddpm_steps=5, aux_size=30)
    ref, _ = run_in_process(tiny_config(tmp_path / "a", **base))
    expected = json.loads((ref.recorder.out / "results.json").read_text())

    cfg = tiny_config(tmp_path / "b", **base)
    first = run_until(cfg, stop_after)
    state = checkpoint.peek(Path(cfg.out_dir))
    assert state["round"] == stop_after and not state["finished"]
    strategy, _ = run_in_process(cfg.replace(resume_from=cfg.out_dir))
    assert strategy.run_key == first.run_key
    assert strategy.flower_rounds == 1 + strategy.num_rounds - stop_after   # stats replayed
    results = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    assert accuracies(results) == accuracies(expected)
    assert untimed(results.get("diffusion")) == untimed(expected.get("diffusion"))
    assert untimed(results["generation"]) == untimed(expected["generation"])
    assert untimed(results.get("collafuse")) == untimed(expected.get("collafuse"))


def make_checkpoint(tmp_path) -> tuple:
    cfg = tiny_config(tmp_path, arms="real", classifier_rounds=2)
    run_until(cfg, 2)
    return cfg, Path(cfg.out_dir)


def test_resume_refuses_another_config_and_touches_nothing(tmp_path, capsys):
    cfg, out = make_checkpoint(tmp_path)
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert main(["--resume", str(out), "--set", "lr=0.5", "--set", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "lr: 0.01 -> 0.5" in err and "seed: 0 -> 3" in err and "Traceback" not in err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # the same through flwr run's key
    with pytest.raises(ConfigError, match="lr: 0.01 -> 0.5"):
        build_strategy(cfg.replace(lr=0.5, resume_from=str(out)))
    # --out with --resume, a folder without a checkpoint, no folder at all
    assert main(["--resume", str(out), "--out", str(tmp_path / "x")]) == 2
    assert "drop --out" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["--resume", str(tmp_path / "empty")]) == 2
    assert "holds no checkpoint" in capsys.readouterr().err
    assert main(["--resume", str(tmp_path / "nowhere")]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_flwr_run_resume_from_key_restores_the_strategy(tmp_path):
    cfg, out = make_checkpoint(tmp_path)
    parts = components(cfg.replace(resume_from=str(out), out_dir=""))
    strategy = parts.strategy
    assert strategy.recorder.out == out.resolve()
    # stats replayed, then the rounds after the checkpoint
    assert parts.config.num_rounds == 1 + strategy.num_rounds - 2
    assert strategy.server_round(1) == 1 and strategy.server_round(2) == 3
    state = checkpoint.peek(out)
    assert strategy.initialize_parameters(None).tensors == state["parameters"].tensors


def test_a_resumed_run_does_not_ask_for_noisy_histograms_again(tmp_path):
    """Under histogram-epsilon the replayed stats round carries no histogram (a second
    noisy copy would cost epsilon again); the plan keeps the checkpoint's noisy counts."""
    cfg = tiny_config(tmp_path, arms="real", classifier_rounds=2, histogram_epsilon=0.5)
    first = run_until(cfg, 2)
    saved = {k: v.copy() for k, v in first.histograms.items()}
    strategy, proxies = run_in_process(cfg.replace(resume_from=cfg.out_dir))
    for proxy in proxies:
        stats = [r for i, r in zip(proxy.received, proxy.replied)
                 if i.config["phase"] == "stats"]
        assert len(stats) == 1 and "histogram" not in stats[0].metrics
        assert stats[0].metrics["partition-id"] in saved
    assert all(np.array_equal(strategy.histograms[k], saved[k]) for k in saved)
    results = json.loads((Path(cfg.out_dir) / "results.json").read_text())
    assert results["status"] == "completed" and results["resumed"][0]["after_round"] == 2
    assert results["privacy"]["histogram_epsilon"] == 0.5
