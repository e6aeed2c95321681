"""The whole method through Flower's real Server loop, clients in-process (no Ray)."""

import json
import re

import numpy as np
import pytest

from conftest import ROOT, run_in_process, tiny_config
from flwr.common import parameters_to_ndarrays

from fedgen.balancing import fill_to_max
from fedgen.methods import METHODS
from fedgen.server_app import build_strategy


def test_each_client_gets_its_own_class_balancing_batch(tmp_path):
    # the default arms: a classify phase each, after the generative ones
    kinds = [p.kind for p in build_strategy(tiny_config(tmp_path / "all")).phases]
    assert kinds == ["stats", "diffusion", "generation", *["classify"] * 4]
    # what the generation round ships needs only the arm that uses it
    cfg = tiny_config(tmp_path, arms="diffusion")
    strategy, proxies = run_in_process(cfg)
    assert [p.kind for p in strategy.phases] == ["stats", "diffusion", "generation", "classify"]
    gen_round = 1 + cfg.diffusion_rounds + 1
    payloads = {}
    for proxy in proxies:
        ins = proxy.received[gen_round - 1]
        assert ins.config["phase"] == "generation"
        images, labels = parameters_to_ndarrays(ins.parameters)
        pid = proxy.client.local.node
        expected = fill_to_max(strategy.histograms[pid], cfg.augment_ratio)
        assert images.dtype == np.uint8 and images.shape[1:] == (1, 8, 8)
        assert np.bincount(labels, minlength=10).tolist() == expected.tolist()
        payloads[pid] = images
    # distinct payloads, each packed into one tensor on the wire (fedgen.wire)
    assert len({p.tobytes() for p in payloads.values()}) == len(payloads)
    assert all(len(p.wire[gen_round - 1][0].parameters.tensors) == 1 for p in proxies)
    # the stats round carried no weights; diffusion rounds carried the UNet
    assert proxies[0].received[0].config["phase"] == "stats"
    assert proxies[0].received[0].parameters.tensors == []
    assert proxies[0].received[1].config["phase"] == "diffusion"
    assert len(proxies[0].received[1].parameters.tensors) > 0
    # the UNet every client gets is packed once: one packed copy, not one per client
    assert len({id(p.wire[1][0].parameters) for p in proxies}) == 1
    assert len({id(p.wire[gen_round - 1][0].parameters) for p in proxies}) == len(proxies)


def test_run_writes_results_plots_and_checkpoint(tmp_path):
    cfg = tiny_config(tmp_path, arms="real,diffusion")
    strategy, _ = run_in_process(cfg)
    out = tmp_path / "out"
    res = json.loads((out / "results.json").read_text())
    for arm in ("real", "diffusion"):
        entry = res["arms"][arm]
        assert 0 <= entry["final_accuracy"] <= 1 and entry["best_accuracy"] >= entry["final_accuracy"]
        assert len(entry["history"]) == cfg.classifier_rounds
    assert res["arms"]["diffusion"]["train_samples_per_round"] > res["arms"]["real"]["train_samples_per_round"]
    assert len(res["partition"]["histograms"]) == cfg.num_clients
    assert sum(res["partition"]["sizes"]) == 1437
    gen = res["generation"]
    assert gen["total"] == int(np.asarray(gen["counts"]).sum()) > 0
    assert 0 <= gen["fidelity"] <= 1
    assert {"diffusion", "stats", "generation:diffusion", "classify:real", "total"} <= set(res["timings"])
    for name in ("rounds.csv", "accuracy.png", "samples.png", "class_balance.png",
                 "ddpm/model_index.json", "ddpm/unet/config.json"):
        assert (out / name).is_file(), name
    lines = (out / "rounds.csv").read_text().splitlines()
    assert lines[0].startswith("arm,round") and len(lines) == 1 + 2 * cfg.classifier_rounds
    # the client store is cleaned after the last round
    assert not any((tmp_path / "cache").rglob("*.npz"))


def test_arms_share_one_partition_and_one_classifier_init(tmp_path):
    cfg = tiny_config(tmp_path, arms="real,oversample")
    strategy, proxies = run_in_process(cfg)
    first = {ins.config["arm"]: parameters_to_ndarrays(ins.parameters)
             for ins in proxies[0].received if ins.config.get("round") == 1
             and ins.config["phase"] == "classify"}
    assert all(np.array_equal(a, b) for a, b in zip(first["real"], first["oversample"]))
    assert strategy.phases[0].kind == "stats"  # no DDPM without the diffusion arm


def test_fedavg_method_runs_real_only(tmp_path):
    cfg = tiny_config(tmp_path, method="fedavg")
    strategy, _ = run_in_process(cfg)
    assert strategy.arms == ("real",)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(res["arms"]) == ["real"] and res["generation"] == {}


def test_readme_custom_strategy_runs(tmp_path):
    readme = (ROOT / "README.md").read_text()
    code = re.search(r"```python\n(# custom_strategy\.py.*?)```", readme, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "README custom strategy", "exec"), namespace)
    try:
        cfg = tiny_config(tmp_path, method="half-gap", arms="real,diffusion")
        strategy, proxies = run_in_process(cfg)
        assert type(strategy).__name__ == "HalfGap"
        full = {pid: fill_to_max(h, cfg.augment_ratio) for pid, h in strategy.histograms.items()}
        res = json.loads((tmp_path / "out" / "results.json").read_text())
        counts = np.asarray(res["generation"]["counts"])
        expected = np.stack([full[k] // 2 for k in range(cfg.num_clients)])
        assert np.array_equal(counts, expected)
    finally:
        METHODS.pop("half-gap", None)


def test_fraction_fit_sampling_is_seeded(tmp_path):
    cfg = tiny_config(tmp_path, arms="real", num_clients=4, fraction_fit=0.5,
                      classifier_rounds=3)
    def picked():
        strategy, proxies = run_in_process(cfg)
        rounds = {}
        for proxy in proxies:
            pid = proxy.client.local.node
            for ins in proxy.received:
                if ins.config["phase"] == "classify":
                    rounds.setdefault(ins.config["round"], set()).add(pid)
        return rounds
    first, again = picked(), picked()
    assert first == again
    assert all(len(pids) == 2 for pids in first.values())
    assert len({frozenset(p) for p in first.values()}) > 1  # not the same pair every round


def test_augment_ratio_zero_ships_empty_batches(tmp_path):
    cfg = tiny_config(tmp_path, arms="diffusion", augment_ratio=0.0)
    strategy, proxies = run_in_process(cfg)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["generation"]["total"] == 0 and res["generation"]["fidelity"] is None
    assert res["arms"]["diffusion"]["train_samples_per_round"] == 1437


def test_a_missing_synthetic_batch_is_an_error_not_real_only(tmp_path):
    from clients.classifier_client import MissingBatchError, with_received
    from clients.local import LocalData
    cfg = tiny_config(tmp_path)
    local = LocalData.from_node(cfg, {"partition-id": 0, "num-partitions": cfg.num_clients}, 1)
    with pytest.raises(MissingBatchError, match="no synthetic batch for arm 'diffusion'"):
        with_received(local, "diffusion")
    local.store.save("diffusion", local.images[:0], local.labels[:0])   # an empty batch
    assert len(with_received(local, "diffusion")[1]) == len(local.labels)


def test_in_process_runs_side_by_side_use_their_own_cache_folders(tmp_path):
    import fedgen.inprocess
    cfg = tiny_config(tmp_path, cache_dir="")
    one, two = (fedgen.inprocess.InProcessProxy("p0", cfg, 0) for _ in range(2))
    same = fedgen.inprocess.InProcessProxy("p1", cfg, 1, run_id=7)
    roots = [p.client.local.store.root for p in (one, two, same)]
    assert roots[0] != roots[1]                    # two runs: two folders
    assert roots[2].parent.name == "run-7" and roots[2].name == "partition-1"
