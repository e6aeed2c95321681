"""A real deployment on loopback: the docker/compose.yml commands as plain processes.

SuperLink with TLS, SuperNode authentication and a database file; four SuperNodes with
registered ECDSA keys, each with its own SuperExec (``--isolation process``, as in compose).
A SuperNode whose key was never registered is refused. The smoke preset, submitted with
``flwr run``, goes through every phase kind (stats, diffusion, generation, classify) while
two nodes fail: the fourth has a node config that cannot serve the run (its data-dir does
not exist), and one healthy node is killed with SIGKILL during the classifier phase. The
run must still end ``finished:completed`` (judged by ``flwr list``: ``flwr run`` exits 0
even when a run fails), and ``results.json`` must say which node failed, in which round,
and why.

One deployment and one run for all of it: every round costs a fresh ClientApp process per
node (Flower starts one per message), 19-27 s per one-round phase on a 2-core host alone
(``benchmarks/deployment.py``; this test took 156 s in a suite run alone), so the refusal,
the failures and the phases share one start-up and one run.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from deployment import Deployment, missing_binaries, preset

pytestmark = pytest.mark.skipif(bool(missing_binaries()),
                                reason=f"not installed: {missing_binaries()}")

HEALTHY = 3
KILLED = 2          # partition id of the node killed after the first classifier round
# The diffusion arm covers every phase kind; the real-only arm's classify rounds would add
# nothing the diffusion arm's do not.
ARM = "diffusion"


def _rounds_done(path, arm: str) -> int:
    try:
        return len(json.loads(path.read_text())["arms"][arm]["history"])
    except (OSError, ValueError, KeyError):
        return 0


def test_tls_deployment_runs_every_phase_and_records_dead_and_broken_nodes(tmp_path):
    broken = {"data-dir": str(tmp_path / "no-such-site"), "node-name": "site-x"}
    node_configs = [*({"partition-id": i, "num-partitions": HEALTHY} for i in range(HEALTHY)),
                    broken]
    out = tmp_path / "out"
    with Deployment(tmp_path / "dep", node_configs) as dep:
        assert sum(n["status"] == "online" for n in dep.supernodes()) == len(node_configs)

        # A SuperNode with a key nobody registered: refused, it exits by itself.
        stranger = tmp_path / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "",
                        "-f", str(stranger)], check=True)
        proc = dep.start_unlisted_node(stranger, {"partition-id": 0,
                                                  "num-partitions": HEALTHY})
        try:
            proc.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode with an unregistered key kept running:\n" + proc.tail())
        assert proc.popen.returncode != 0
        assert "Failed to activate SuperNode" in proc.log.read_text(), proc.tail()
        assert sum(n["status"] == "online" for n in dep.supernodes()) == len(node_configs)

        t0 = time.monotonic()
        run_id = dep.run(preset("configs/smoke.toml", num_clients=len(node_configs),
                                arms=ARM, classifier_rounds=2, round_timeout=120.0,
                                min_fit_fraction=0.5, batch_size=128, out_dir=str(out),
                                cache_dir=str(tmp_path / "cache")))
        deadline = time.monotonic() + 720
        while _rounds_done(out / "results.json", ARM) < 1:  # mid-phase: round 1 done
            assert time.monotonic() < deadline, dep.report()
            time.sleep(1)
        dep.kill_node(KILLED)
        status = dep.wait(run_id, timeout=540)
        elapsed = time.monotonic() - t0
        assert status == "finished:completed", dep.report()

    res = json.loads((out / "results.json").read_text())
    assert res["status"] == "completed"
    assert list(res["arms"]) == [ARM]
    assert res["partition"]["nodes"] == [0, 1, 2]  # the broken node never joined
    assert res["generation"]["total"] > 0
    history = res["arms"][ARM]["history"]
    assert len(history) == 2 and all(0.0 <= h["accuracy"] <= 1.0 for h in history)

    stats = [f for f in res["failures"] if f["phase"] == "stats"]
    assert len(stats) == 1 and len(stats[0]["failed"]) == 1
    reason = stats[0]["failed"][0]["reason"]
    assert reason.startswith("node config ") and "data-dir=" in reason, reason
    assert "no-such-site: folder not found" in reason, reason
    killed = [f for f in res["failures"] if f["phase"] == f"classify:{ARM}"]
    assert killed, res["failures"]
    assert all(f["failed"] == [{"node": f"partition {KILLED}",
                                "reason": f["failed"][0]["reason"]}] for f in killed)
    assert all(f["replied"] == HEALTHY - 1 for f in killed)
    # before the kill every healthy node answered every phase
    assert not [f for f in res["failures"] if f["phase"] not in ("stats", f"classify:{ARM}")]
    print(f"deployment start {dep.timings['start']:.1f} s, run {elapsed:.1f} s, "
          f"phases {res.get('timings')}")
