"""Dead and broken SuperNodes in a real deployment (TLS, node auth, plain processes).

Four SuperNodes and ``num-clients=4``: three hold partitions, the fourth has a node config
that cannot serve the run (its data-dir does not exist). During the classifier phase one
of the healthy SuperNodes is killed with SIGKILL. The run must still finish as
``finished:completed`` (``flwr list``), and ``results.json`` must say which node failed,
in which round, and why.
"""

from __future__ import annotations

import json
import time

import pytest

from deployment import Deployment, missing_binaries, preset

pytestmark = pytest.mark.skipif(bool(missing_binaries()),
                                reason=f"not installed: {missing_binaries()}")


def _rounds_done(path, arm: str) -> int:
    try:
        return len(json.loads(path.read_text())["arms"][arm]["history"])
    except (OSError, ValueError, KeyError):
        return 0


def test_killed_and_misconfigured_supernodes_are_recorded_and_the_run_completes(tmp_path):
    broken = {"data-dir": str(tmp_path / "no-such-site"), "node-name": "site-x"}
    node_configs = [*({"partition-id": i, "num-partitions": 3} for i in range(3)), broken]
    out = tmp_path / "out"
    with Deployment(tmp_path / "dep", node_configs) as dep:
        run_id = dep.run(preset("configs/smoke.toml", num_clients=4, arms="real",
                                classifier_rounds=2, round_timeout=120.0,
                                min_fit_fraction=0.5, batch_size=128, out_dir=str(out),
                                cache_dir=str(tmp_path / "cache")))
        deadline = time.monotonic() + 420
        while _rounds_done(out / "results.json", "real") < 1:  # mid-phase: round 1 done
            assert time.monotonic() < deadline, dep.report()
            time.sleep(1)
        dep.kill_node(2)
        status = dep.wait(run_id, timeout=540)
        assert status == "finished:completed", dep.report()

    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed"
    assert res["partition"]["nodes"] == [0, 1, 2]  # the broken node never joined
    assert len(res["arms"]["real"]["history"]) == 2
    stats = [f for f in res["failures"] if f["phase"] == "stats"]
    assert len(stats) == 1 and len(stats[0]["failed"]) == 1
    reason = stats[0]["failed"][0]["reason"]
    assert reason.startswith("node config ") and "data-dir=" in reason, reason
    assert "no-such-site: folder not found" in reason, reason
    killed = [f for f in res["failures"] if f["phase"] == "classify:real"]
    assert killed, res["failures"]
    assert all(f["failed"] == [{"node": "partition 2", "reason": f["failed"][0]["reason"]}]
               for f in killed)
    assert all(f["replied"] == 2 for f in killed)
