"""Update sanity (poisoned replies are rejected, not averaged) and communication cost
(bytes per node and round, against the arrays' sizes)."""

import json

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

import fedgen.inprocess
from clients import PHASE_CLIENTS, ClassifierClient
from fedgen.simulation import format_table
from fedgen.aggregation import weighted_average
from fedgen.models import build_classifier, get_weights
from strategies import PhasedFedAvg
from tests.conftest import InProcessProxy, run_in_process, tiny_config


class NaNClient(ClassifierClient):
    def fit(self, parameters, config):
        weights, n, metrics = super().fit(parameters, config)
        weights[0] = np.full_like(weights[0], np.nan)
        return weights, n, metrics


class ShapeClient(ClassifierClient):
    def fit(self, parameters, config):
        weights, n, metrics = super().fit(parameters, config)
        return weights[:-1], n, metrics


class HugeClient(ClassifierClient):
    def fit(self, parameters, config):
        weights, n, metrics = super().fit(parameters, config)
        return [w if w.dtype.kind != "f" else p + 1000 * (w - p)
                for w, p in zip(weights, parameters)], n, metrics


def _nodes(cfg, poisoned: dict):
    return [InProcessProxy(f"node-{k}", cfg, k) if k not in poisoned else
            PoisonedProxy(f"node-{k}", cfg, k, poisoned[k]) for k in range(cfg.num_clients)]


class PoisonedProxy(InProcessProxy):
    def __init__(self, cid, cfg, node, client_class):
        fedgen.inprocess.InProcessProxy.__init__(self, cid, cfg, node,
                                                 {**PHASE_CLIENTS, "classify": client_class})
        self.received, self.replied, self.wire = [], [], []


@pytest.mark.parametrize("bad,words", [(NaNClient, "NaN or Inf"), (ShapeClient, "arrays"),
                                       (HugeClient, "median")])
def test_a_poisoned_update_is_rejected_and_the_rest_are_averaged(tmp_path, monkeypatch,
                                                                 bad, words):
    aggregated = []
    original = PhasedFedAvg.aggregate_classifier

    def spy(self, phase, rnd, results):
        aggregated.append(original(self, phase, rnd, results))
        return aggregated[-1]

    monkeypatch.setattr(PhasedFedAvg, "aggregate_classifier", spy)
    cfg = tiny_config(tmp_path, method="fedavg", arms="real", classifier_rounds=1)
    strategy, proxies = run_in_process(cfg, _nodes(cfg, {1: bad}))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "completed"
    (rejected,) = results["rejected"]
    assert rejected["node"] == "partition 1" and words in rejected["reason"]
    assert rejected["phase"] == "classify:real"
    # the global model is the sample-weighted average of the two honest updates
    honest = [(parameters_to_ndarrays(p.replied[-1].parameters), p.replied[-1].num_examples)
              for k, p in enumerate(proxies) if k != 1]
    want = weighted_average([h[0] for h in honest], [float(h[1]) for h in honest])
    assert results["arms"]["real"]["train_samples_per_round"] == sum(h[1] for h in honest)
    final = parameters_to_ndarrays(aggregated[-1][0])
    assert len(final) == len(want) and all(np.isfinite(a).all() for a in final)
    assert all(np.allclose(a, b) for a, b in zip(final, want))


def test_too_few_surviving_updates_fail_the_round_clearly(tmp_path):
    cfg = tiny_config(tmp_path, method="fedavg", arms="real", classifier_rounds=1)
    with pytest.raises(RuntimeError, match="survived the sanity checks"):
        run_in_process(cfg, _nodes(cfg, {0: NaNClient, 2: ShapeClient}))
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["status"] == "failed" and len(results["rejected"]) == 2
    assert "survived the sanity checks" in results["error"]


def test_bytes_per_node_and_round_match_the_arrays_sizes(tmp_path):
    cfg = tiny_config(tmp_path, arms="diffusion")
    strategy, proxies = run_in_process(cfg)
    comm = json.loads((tmp_path / "out" / "results.json").read_text())["communication"]
    classifier = sum(a.nbytes for a in get_weights(build_classifier(cfg, 1, 10)))
    unet = sum(a.nbytes for a in strategy.unet_weights)
    by = {(r["kind"], r["phase"]): r["nodes"] for r in comm["rounds"]}
    header = 160   # numpy's .npy header per array, at most
    for node, io in by[("fit", "classify:diffusion")].items():
        n_arrays = len(get_weights(build_classifier(cfg, 1, 10)))
        assert 0 < io["down"] - classifier <= header * n_arrays
        assert 0 < io["up"] - classifier <= header * n_arrays
    for node, io in by[("fit", "diffusion")].items():
        assert 0 < io["down"] - unet <= header * len(strategy.unet_weights)
    for node, io in by[("fit", "stats")].items():
        assert io == {"down": 0, "up": 0}
    shipped = {p.client.local.node: p for p in proxies}
    for node, io in by[("fit", "generation:diffusion")].items():
        k = int(node.split()[-1])
        (ins,) = [i for i in shipped[k].received if i.config["phase"] == "generation"]
        images, labels = parameters_to_ndarrays(ins.parameters)
        assert 0 < io["down"] - images.nbytes - labels.nbytes <= 2 * header and io["up"] == 0
    total = sum(v["down"] for r in comm["rounds"] for v in r["nodes"].values())
    assert comm["total"]["down"] == total
    # and the printed table states them, per phase and in total
    table = format_table(json.loads((tmp_path / "out" / "results.json").read_text()))
    per = comm["phases"]["diffusion (fit)"]["per_client_round"]
    assert f"diffusion (fit): {per['down'] / 1e6:.2f} MB / {per['up'] / 1e6:.2f} MB" in table
    assert f"total: {comm['total']['down'] / 1e6:.2f} MB down" in table
