"""Nodes as in a deployment: own data folders, stable identities, evaluation where the
data is, and nodes that fail, time out or cannot serve the run (in-process Flower loop)."""

import json
import time

import numpy as np
import pytest
from PIL import Image

from conftest import InProcessProxy, run_in_process, tiny_config
from clients import LocalData, NodeConfigError
from fedgen.aggregation import pool_evaluations
from fedgen.config import RunConfig
from fedgen.sites import export_sites

DIGITS = ",".join(str(i) for i in range(10))
SITES = dict(dataset="imagefolder", data_dir="", class_names=DIGITS, image_size=8,
             evaluation="clients")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    """The digits' 3-client partition, written as one ImageFolder per site."""
    out = tmp_path_factory.mktemp("sites")
    return export_sites(RunConfig(num_clients=3, alpha=0.5, min_partition_size=5), out)


def results(tmp_path):
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.mark.parametrize("node_config, words", [
    ({}, ["node config (empty)", "give partition-id", "or data-dir"]),
    ({"partition-id": 5, "num-partitions": 3}, ["partition-id=5", "outside num-partitions=3"]),
    ({"data-dir": "/nonexistent/site"}, ["data-dir='/nonexistent/site'", "needs node-name"]),
    ({"data-dir": "/nonexistent/site", "node-name": "a"}, ["/nonexistent/site",
                                                           "folder not found"]),
])
def test_a_node_config_that_cannot_serve_the_run_is_one_clear_error(tmp_path, node_config,
                                                                     words):
    cfg = tiny_config(tmp_path, **SITES)
    with pytest.raises(NodeConfigError) as err:
        LocalData.from_node(cfg, node_config, 0, ())
    assert str(err.value).startswith("node config ")
    for word in words:
        assert word in str(err.value)


def test_an_empty_site_folder_is_refused(tmp_path):
    (tmp_path / "site" / "3").mkdir(parents=True)
    cfg = tiny_config(tmp_path, **SITES)
    with pytest.raises(NodeConfigError, match="no images found"):
        LocalData.from_node(cfg, {"data-dir": str(tmp_path / "site"), "node-name": "a"}, 0)


def _image_folder(root, names):
    for k, name in enumerate(names):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8), 40 * k + i, np.uint8)).save(root / name / f"{i}.png")


def test_a_site_folder_is_labelled_in_the_run_classes(tmp_path):
    _image_folder(tmp_path / "site", ["3", "7"])
    cfg = tiny_config(tmp_path, **SITES)
    local = LocalData.from_node(cfg, {"data-dir": str(tmp_path / "site"), "node-name": "lab"},
                                0)
    assert local.node == "lab" and local.identity == {"node-name": "lab"}
    both = local.histogram + np.bincount(local.test_labels, minlength=10)
    assert both.tolist() == [0, 0, 0, 3, 0, 0, 0, 3, 0, 0]
    assert len(local.test_labels) == 1 and local.images.shape[1:] == (3, 8, 8)  # 20 % of 6
    # without class-names in the run config, the names the server sends are used
    local = LocalData.from_node(cfg.replace(class_names=""),
                                {"data-dir": str(tmp_path / "site"), "node-name": "lab"},
                                0, tuple(DIGITS.split(",")))
    assert sorted(set(local.labels.tolist()) | set(local.test_labels.tolist())) == [3, 7]


def test_a_class_outside_the_run_list_names_the_folder_and_the_class(tmp_path):
    _image_folder(tmp_path / "site", ["3", "cat"])
    cfg = tiny_config(tmp_path, **SITES)
    with pytest.raises(NodeConfigError) as err:
        LocalData.from_node(cfg, {"data-dir": str(tmp_path / "site"), "node-name": "x"}, 0)
    assert str(tmp_path / "site") in str(err.value) and "'cat'" in str(err.value)


def test_sites_with_their_own_folders_evaluate_where_the_data_is(tmp_path, sites):
    cfg = tiny_config(tmp_path, arms="real,diffusion", **SITES)
    nodes = [{"data-dir": str(site), "node-name": site.name} for site in sites]
    strategy, proxies = run_in_process(cfg, nodes[::-1])  # arrival order must not matter
    res = results(tmp_path)
    assert res["status"] == "completed" and res["failures"] == []
    assert res["partition"]["nodes"] == ["site-1", "site-2", "site-3"]
    sizes = [sum(1 for _ in s.rglob("*.png")) for s in sites]
    held_out = [round(0.2 * n) for n in sizes]
    assert res["partition"]["sizes"] == [n - h for n, h in zip(sizes, held_out)]
    assert res["generation"]["total"] > 0 and res["generation"]["fidelity"] is None
    for arm in ("real", "diffusion"):
        entry = res["arms"][arm]
        by_node = entry["client_accuracy_by_node"]
        assert list(by_node) == ["site-1", "site-2", "site-3"]
        assert [v["examples"] for v in by_node.values()] == held_out
        mean = sum(v["accuracy"] * v["examples"] for v in by_node.values()) / sum(held_out)
        assert entry["final_client_accuracy"] == pytest.approx(mean)
        assert entry["final_accuracy"] == entry["final_client_accuracy"]  # the headline
    # every node evaluated the global model once per classifier round
    evaluations = [i for i in proxies[0].received if i.config.get("evaluate")]
    assert len(evaluations) == 2 * cfg.classifier_rounds


def test_evaluation_both_keeps_the_server_figure_as_headline(tmp_path):
    cfg = tiny_config(tmp_path, arms="real", evaluation="both")
    run_in_process(cfg)
    entry = results(tmp_path)["arms"]["real"]
    assert entry["train_samples_per_round"] < 1437  # the nodes hold out test-fraction
    assert 0 <= entry["final_accuracy"] <= 1 and 0 <= entry["final_client_accuracy"] <= 1
    assert entry["client_test_examples"] == 1437 - entry["train_samples_per_round"]


class SilentProxy(InProcessProxy):
    """A node that stops answering (killed, or past round-timeout) in one phase."""

    def __init__(self, *args, dies_in: str):
        super().__init__(*args)
        self.dies_in = dies_in

    def fit(self, ins, timeout, group_id):
        if ins.config["phase"] == self.dies_in:
            raise TimeoutError("no reply within round-timeout")
        return super().fit(ins, timeout, group_id)


def test_a_silent_node_is_recorded_and_the_run_goes_on(tmp_path):
    cfg = tiny_config(tmp_path, arms="real")
    dead = SilentProxy("node-2", cfg, 2, dies_in="classify")
    run_in_process(cfg, [0, 1, dead])
    res = results(tmp_path)
    assert res["status"] == "completed"
    [failure] = res["failures"]
    assert failure["phase"] == "classify:real" and (failure["asked"], failure["replied"]) == (3, 2)
    assert failure["failed"] == [{"node": "partition 2",
                                  "reason": "TimeoutError('no reply within round-timeout')"}]


def test_too_few_replies_fail_the_run_clearly_and_keep_what_was_written(tmp_path):
    cfg = tiny_config(tmp_path, arms="real,diffusion", min_fit_fraction=0.5)
    dead = [SilentProxy(f"node-{k}", cfg, k, dies_in="diffusion") for k in (1, 2)]
    with pytest.raises(RuntimeError, match=r"1 of 3 node\(s\) replied.*min-fit-fraction=0.5"):
        run_in_process(cfg, [0, *dead])
    res = results(tmp_path)
    assert res["status"] == "failed" and "1 of 3 node(s) replied" in res["error"]
    assert res["partition"]["nodes"] == [0, 1, 2]  # the stats round's record stays


def test_a_node_with_a_bad_node_config_is_named_and_left_out(tmp_path):
    cfg = tiny_config(tmp_path, arms="diffusion")
    strategy, proxies = run_in_process(cfg, [0, 1, {"partition-id": 7, "num-partitions": 3}])
    res = results(tmp_path)
    [failure] = res["failures"]  # the stats round; it is not asked again
    assert failure["phase"] == "stats"
    assert failure["failed"][0]["node"] == "node node-2"
    assert "node config partition-id=7 num-partitions=3" in failure["failed"][0]["reason"]
    assert res["partition"]["nodes"] == [0, 1] and res["status"] == "completed"
    assert [i.config["phase"] for i in proxies[2].received] == ["stats"]  # no batch either


def test_pooled_client_evaluation_against_hand_computed_figures():
    replies = [("a", 10, 1.0, {"accuracy": 0.5, "class-correct": "[5, 0]",
                               "class-count": "[8, 2]"}),
               ("b", 30, 2.0, {"accuracy": 0.9, "class-correct": "[0, 27]",
                               "class-count": "[0, 30]"})]
    pooled = pool_evaluations(replies, 2)
    assert pooled["accuracy"] == pytest.approx((5 + 27) / 40)
    assert pooled["loss"] == pytest.approx((10 * 1.0 + 30 * 2.0) / 40)
    assert pooled["per_class_accuracy"] == pytest.approx([5 / 8, 27 / 32])
    assert pooled["by_node"] == {"a": {"accuracy": 0.5, "examples": 10},
                                 "b": {"accuracy": 0.9, "examples": 30}}


def test_the_first_round_waits_a_bounded_time_then_goes_on_with_the_nodes_connected(tmp_path):
    cfg = tiny_config(tmp_path, arms="real", num_clients=4, node_wait_timeout=1.0)
    start = time.monotonic()
    run_in_process(cfg, [0, 1, 2])  # the fourth SuperNode never comes
    assert time.monotonic() - start < 60
    res = results(tmp_path)
    assert res["status"] == "completed" and res["partition"]["nodes"] == [0, 1, 2]


def test_too_few_connected_nodes_fail_the_run_after_the_wait(tmp_path):
    cfg = tiny_config(tmp_path, arms="real", num_clients=4, node_wait_timeout=1.0)
    with pytest.raises(RuntimeError, match=r"only 1 of num-clients=4 node\(s\) connected "
                                           r"within node-wait-timeout=1 s"):
        run_in_process(cfg, [0])
    assert results(tmp_path)["status"] == "failed"
