"""A real deployment on loopback: the docker/compose.yml commands as plain processes.

SuperLink with TLS, SuperNode authentication and a database file; three SuperNodes with
registered ECDSA keys, each with its own SuperExec (``--isolation process``, as in compose);
the smoke preset submitted with ``flwr run`` and judged by ``flwr list`` (``flwr run``
exits 0 even when a run fails). A SuperNode whose key was never registered is refused.
"""

from __future__ import annotations

import json
import subprocess
import time

import pytest

from deployment import Deployment, missing_binaries, preset

pytestmark = pytest.mark.skipif(bool(missing_binaries()),
                                reason=f"not installed: {missing_binaries()}")

NUM_NODES = 3
# Every phase kind (stats, diffusion, generation, classify) at the least rounds: each
# round costs a fresh ClientApp process per node here (~1 min on 2 shared cores). The
# real-only arm's classify round would add nothing the diffusion arm's does not cover.
ARMS = ("diffusion",)


def test_tls_node_auth_deployment_runs_smoke_preset(tmp_path):
    node_configs = [{"partition-id": i, "num-partitions": NUM_NODES} for i in range(NUM_NODES)]
    out = tmp_path / "out"
    with Deployment(tmp_path / "dep", node_configs) as dep:
        nodes = dep.supernodes()
        assert sum(n["status"] == "online" for n in nodes) == NUM_NODES

        # A SuperNode with a key nobody registered: refused, it exits by itself.
        stranger = tmp_path / "stranger"
        subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "",
                        "-f", str(stranger)], check=True)
        proc = dep.start_unlisted_node(stranger, {"partition-id": 0,
                                                  "num-partitions": NUM_NODES})
        try:
            proc.popen.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("a SuperNode with an unregistered key kept running:\n" + proc.tail())
        assert proc.popen.returncode != 0
        assert "Failed to activate SuperNode" in proc.log.read_text(), proc.tail()
        assert sum(n["status"] == "online" for n in dep.supernodes()) == NUM_NODES

        t0 = time.monotonic()
        run_id = dep.run(preset("configs/smoke.toml", out_dir=str(out),
                                cache_dir=str(tmp_path / "cache"), batch_size=128,
                                arms=",".join(ARMS)))
        status = dep.wait(run_id, timeout=540)
        elapsed = time.monotonic() - t0
        assert status == "finished:completed", dep.report()

    results = json.loads((out / "results.json").read_text())
    assert list(results["arms"]) == list(ARMS)
    for arm in ARMS:
        assert 0.0 <= results["arms"][arm]["final_accuracy"] <= 1.0
    print(f"deployment start {dep.timings['start']:.1f} s, smoke run {elapsed:.1f} s, "
          f"phases {results.get('timings')}")
