"""The entry points ``flwr run`` and SuperNodes load, driven the way Flower drives them."""

import importlib
import json
import tomllib

from flwr.client import ClientApp
from flwr.common import Context, FitIns, Parameters, RecordDict
from flwr.server import ServerApp

from conftest import ROOT
from fedgen.client_app import client_fn
from fedgen.server_app import server_fn

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_components_are_the_apps():
    components = PYPROJECT["tool"]["flwr"]["app"]["components"]
    for key, kind in (("serverapp", ServerApp), ("clientapp", ClientApp)):
        module, _, attr = components[key].partition(":")
        assert isinstance(getattr(importlib.import_module(module), attr), kind)


def _run_config(tmp_path, **changes):
    # what Flower hands the apps: every key of [tool.flwr.app.config], overrides applied
    return {**PYPROJECT["tool"]["flwr"]["app"]["config"], "out-dir": str(tmp_path / "o"),
            "cache-dir": str(tmp_path / "c"), **changes}


def test_server_fn_builds_the_phased_strategy_from_the_run_config(tmp_path):
    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config=_run_config(tmp_path, **{"arms": "diffusion", "diffusion-rounds": 2}))
    components = server_fn(ctx)
    # stats + 2 diffusion rounds + generation + classifier rounds (pyproject default)
    rounds = PYPROJECT["tool"]["flwr"]["app"]["config"]["classifier-rounds"]
    assert components.config.num_rounds == 1 + 2 + 1 + rounds
    assert [p.kind for p in components.strategy.phases] == [
        "stats", "diffusion", "generation", "classify"]


def test_client_fn_finds_its_partition_from_the_node_config(tmp_path):
    ctx = Context(run_id=1, node_id=7, node_config={"partition-id": 3, "num-partitions": 10},
                  state=RecordDict(), run_config=_run_config(tmp_path))
    client = client_fn(ctx)
    empty = Parameters(tensors=[], tensor_type="numpy.ndarray")
    res = client.fit(FitIns(empty, {"phase": "stats", "arm": "", "round": 1,
                                    "server-round": 1, "last-round": False, "seed": 0}))
    assert res.metrics["partition-id"] == 3
    assert sum(json.loads(res.metrics["histogram"])) == res.num_examples > 0


def test_aggregation_does_not_depend_on_the_order_results_arrive_in(tmp_path):
    import numpy as np
    from flwr.common import Code, FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays

    ctx = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(),
                  run_config=_run_config(tmp_path, **{"num-clients": 6}))
    strategy = server_fn(ctx).strategy

    class Proxy:
        def __init__(self, cid):
            self.cid = cid

    ok = Status(Code.OK, "")
    proxies = [Proxy(f"node-{9 - k}") for k in range(6)]  # cids sort against partition order
    stats = [(p, FitRes(ok, ndarrays_to_parameters([]), 10,
                        {"partition-id": k, "histogram": json.dumps([1] * 10)}))
             for k, p in enumerate(proxies)]
    strategy.aggregate_fit(1, stats, [])
    rng = np.random.default_rng(0)
    results = [(p, FitRes(ok, ndarrays_to_parameters(
        [rng.standard_normal(4096).astype(np.float32) * 10.0 ** k]), 7 + 13 * k, {}))
        for k, p in enumerate(proxies)]
    last = strategy.num_rounds  # a classifier round
    forward = parameters_to_ndarrays(strategy.aggregate_fit(last, results, [])[0])[0]
    backward = parameters_to_ndarrays(strategy.aggregate_fit(last, results[::-1], [])[0])[0]
    assert np.array_equal(forward, backward)
