"""augment-filter: the rows a client adds to its own images are screened by the global
classifier it received; an added row whose label that model finds improbable is left out
of the round."""

import csv
import json

import numpy as np
import pytest
import torch

from clients import ClassifierClient
from clients.local import LocalData
from fedgen.balancing import judge_keep
from fedgen.classifier import evaluate, label_probability, screen_added
from fedgen.config import ConfigError, RunConfig
from fedgen.models import classifier_shell, get_weights, set_weights
from fedgen.server_app import build_strategy
from tests.conftest import run_in_process, tiny_config


class RowLookup(torch.nn.Module):
    """Logits read from a table by the row number written into pixel (0, 0) of each
    image (to_float maps v to v / 127.5 - 1)."""

    def __init__(self, probs: np.ndarray):
        super().__init__()
        self.register_buffer("logp", torch.log(torch.as_tensor(probs, dtype=torch.float32)))

    def forward(self, x):
        rows = torch.round((x[:, 0, 0, 0] + 1) * 127.5).long()
        return self.logp[rows]


def test_added_rows_below_the_threshold_are_left_out_own_rows_never():
    probs = np.array([[0.9, 0.05, 0.05],    # own rows: 0-2
                      [0.1, 0.8, 0.1],
                      [0.3, 0.3, 0.4],
                      [0.2, 0.7, 0.1],      # added rows: 3-6
                      [0.6, 0.3, 0.1],
                      [0.1, 0.1, 0.8],
                      [0.5, 0.25, 0.25]])
    images = np.zeros((7, 1, 4, 4), dtype=np.uint8)
    images[:, 0, 0, 0] = np.arange(7)
    labels = np.array([2, 0, 1, 1, 1, 0, 0])   # own rows' labels improbable: still kept
    model, cpu = RowLookup(probs), torch.device("cpu")
    assert np.allclose(label_probability(model, images, labels, cpu),
                       [0.05, 0.1, 0.3, 0.7, 0.3, 0.1, 0.5])
    keep = screen_added(model, images, labels, num_own=3, threshold=0.4, device=cpu)
    assert keep.tolist() == [True, True, True, True, False, False, True]
    keep = screen_added(model, images, labels, num_own=3, threshold=0.5, device=cpu)
    assert keep.tolist() == [True, True, True, True, False, False, True]   # 0.5 >= 0.5
    keep = screen_added(model, images, labels, num_own=3, threshold=0.51, device=cpu)
    assert keep.tolist() == [True, True, True, True, False, False, False]
    assert screen_added(model, images, labels, 3, 0.0, cpu).all()          # off
    assert screen_added(model, images, labels, 7, 0.99, cpu).all()         # nothing added


def _client_and_config(tmp_path, **changes):
    cfg = tiny_config(tmp_path, arms="real,oversample", **changes)
    strategy = build_strategy(cfg)
    phases = {p.arm: p for p in strategy.phases if p.kind == "classify"}
    local = LocalData.from_node(cfg, {"partition-id": 0}, run_id=0)
    start = get_weights(classifier_shell(cfg, local.data.channels, local.data.num_classes))
    return cfg, strategy, phases, ClassifierClient(local), start


def test_the_client_screens_from_the_configured_round_with_the_weights_it_received(tmp_path):
    cfg, strategy, phases, client, start = _client_and_config(
        tmp_path, augment_filter=1.0, augment_filter_from=2)
    own = len(client.local.labels)
    r1 = strategy.fit_config(phases["oversample"], 1, 3)
    r2 = strategy.fit_config(phases["oversample"], 2, 4)
    assert (r2["augment-filter"], r2["augment-filter-from"]) == (1.0, 2)
    # round 1: nothing screened, the copies train
    _, n1, m1 = client.fit(start, r1)
    assert n1 > own and m1["augment-dropped"] == 0
    # round 2 at threshold 1: every copy left out (no softmax probability reaches 1), so
    # the oversample arm trains exactly what the real arm trains with the same seed
    w2, n2, m2 = client.fit(start, r2)
    assert n2 == own and m2["augment-dropped"] == n1 - own
    real = {**strategy.fit_config(phases["real"], 2, 2), "seed": r2["seed"]}
    w_real, n_real, _ = client.fit(start, real)
    assert n_real == own
    assert all(np.array_equal(a, b) for a, b in zip(w2, w_real))


def test_the_client_leaves_out_exactly_the_rows_below_the_threshold(tmp_path):
    cfg, strategy, phases, client, start = _client_and_config(tmp_path)
    local = client.local
    images, labels = client.training_sets["oversample"](local, "oversample")
    model = classifier_shell(cfg, local.data.channels, local.data.num_classes)
    set_weights(model, start)
    prob = label_probability(model, images[len(local.labels):], labels[len(local.labels):],
                             local.device)
    threshold = float(np.median(prob))
    below = int((prob < threshold).sum())
    assert 0 < below < len(prob)
    config = {**strategy.fit_config(phases["oversample"], 2, 4), "augment-filter": threshold}
    _, n, metrics = client.fit(start, config)
    assert metrics["augment-dropped"] == below and n == len(labels) - below
    # off (0), or a round before augment-filter-from: every row trains
    for off in ({"augment-filter": 0.0}, {"augment-filter-from": 3}):
        _, n, metrics = client.fit(start, {**config, **off})
        assert n == len(labels) and metrics["augment-dropped"] == 0


def test_a_run_records_the_rows_left_out_per_round(tmp_path):
    cfg = tiny_config(tmp_path, arms="oversample", classifier_rounds=2,
                      augment_filter=1.0)
    run_in_process(cfg)
    rows = list(csv.DictReader(open(tmp_path / "out" / "rounds.csv")))
    assert [int(r["augment_dropped"]) for r in rows][0] == 0
    dropped = int(rows[1]["augment_dropped"])
    assert dropped > 0
    history = json.loads((tmp_path / "out" / "results.json").read_text())["arms"]["oversample"]
    assert [h["augment_dropped"] for h in history["history"]] == [0, dropped]
    # every copy left out in round 2: only the clients' own images trained
    assert history["history"][1]["train_samples"] == history["history"][0]["train_samples"] - dropped


@pytest.mark.parametrize("key, value", [("augment-filter", 1.5), ("augment-filter", -0.1),
                                        ("augment-filter-from", 0)])
def test_bad_filter_settings_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=key):
        RunConfig.from_mapping({key: value})


# ----------------------------------------------------------- synthetic-judge (server side)

@pytest.mark.parametrize("changes, message", [
    ({"arms": "real,diffusion", "synthetic_judge": "noise"}, "before diffusion"),
    ({"arms": "diffusion,noise", "synthetic_judge": "noise"}, "before diffusion"),
    ({"arms": "noise,diffusion", "synthetic_judge": "noise", "generation": "sdedit"},
     "sdedit"),
    ({"arms": "noise,diffusion", "synthetic_judge_pool": 2}, "set synthetic-judge too")])
def test_a_judge_that_cannot_run_first_is_a_config_error(tmp_path, changes, message):
    from fedgen.methods import method_for
    with pytest.raises(ConfigError, match=message):
        method_for(tiny_config(tmp_path, **changes))


def test_the_server_screens_the_synthetic_rows_with_the_judge_arms_final_model(tmp_path):
    cfg = tiny_config(tmp_path, arms="noise,diffusion", synthetic_judge="noise",
                      synthetic_judge_threshold=0.5, classifier_rounds=2)
    strategy, proxies = run_in_process(cfg)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    # the judge is the noise arm's last global model: it scores the recorded accuracy
    judge = classifier_shell(cfg, strategy.data.channels, strategy.data.num_classes)
    set_weights(judge, strategy.judge_weights)
    scored = evaluate(judge, strategy.data.test_x, strategy.data.test_y,
                      strategy.data.num_classes, torch.device("cpu"))
    assert scored["accuracy"] == res["arms"]["noise"]["final_accuracy"]
    # each batch's mask is the judge's probability of its labels against the threshold
    for pid, (images, labels) in strategy.synthetic.items():
        prob = label_probability(judge, images, labels, torch.device("cpu"))
        assert np.array_equal(strategy.synthetic_keep[pid], prob >= 0.5)
    kept = sum(int(k.sum()) for k in strategy.synthetic_keep.values())
    total = sum(len(k) for k in strategy.synthetic_keep.values())
    assert 0 < kept < total     # the check below needs rows on both sides
    screen = res["synthetic_screen"]
    assert (screen["kept"], screen["total"], screen["judge"]) == (kept, total, "noise")
    # every client trains its own images plus the kept rows in every diffusion round; the
    # noise arm gets no mask
    for proxy in proxies:
        pid = strategy.partition_of[proxy.cid]
        own = int(strategy.histograms[pid].sum())
        by_arm = {}
        for ins, rep in proxy.wire:    # every fit message and its reply
            if ins.config.get("phase") == "classify":
                by_arm.setdefault(ins.config["arm"], []).append((ins.config, rep))
        assert len(by_arm["diffusion"]) == len(by_arm["noise"]) == 2
        for config, rep in by_arm["diffusion"]:
            mask = strategy.synthetic_keep[pid]
            assert rep.num_examples == own + int(mask.sum())
            assert rep.metrics["augment-dropped"] == len(mask) - int(mask.sum())
        assert all("synthetic-keep" not in c for c, _ in by_arm["noise"])
    assert [h["augment_dropped"] for h in res["arms"]["diffusion"]["history"]] == \
        [total - kept] * 2


def test_a_mask_for_another_batch_is_refused(tmp_path):
    cfg, strategy, phases, client, start = _client_and_config(tmp_path)
    own = len(client.local.labels)
    images = np.zeros((own + 20, 1, 8, 8), np.uint8)
    labels = np.zeros(own + 20, np.int64)
    ok = {"synthetic-keep": np.packbits(np.arange(20) % 2 == 0).tobytes()}
    _, kept, dropped = client.screen(None, images, labels, ok)
    assert (len(kept), dropped) == (own + 10, 10)
    with pytest.raises(ValueError, match="holds 20 added rows"):
        client.screen(None, images, labels,
                      {"synthetic-keep": np.packbits(np.ones(30, bool)).tobytes()})


def test_judge_keep_takes_each_class_best_rows_between_floor_and_quota():
    prob = np.array([0.9, 0.2, 0.6, 0.05, 0.4,     # class 0
                     0.3, 0.7, 0.7, 0.1])          # class 1
    labels = np.array([0, 0, 0, 0, 0, 1, 1, 1, 1])
    quota = np.array([5, 4])
    # the threshold alone: every row at or above it
    assert np.array_equal(judge_keep(prob, labels, quota, 0.5), prob >= 0.5)
    # a floor of half the quota: class 0 keeps its best 3 (ceil 2.5), class 1 its best 2
    keep = judge_keep(prob, labels, quota, 0.5, floor=0.5)
    assert np.flatnonzero(keep).tolist() == [0, 2, 4, 6, 7]
    # a full floor keeps everything; a floor of 0.3 x 5 = 1.5 -> 2 rows, not 3
    assert judge_keep(prob, labels, quota, 0.99, floor=1.0).all()
    assert np.flatnonzero(judge_keep(prob, labels, quota, 0.99, floor=0.3)).tolist() == \
        [0, 2, 6, 7]
    # a pool (more rows than the quota): the best rows up to the quota, ties to the earlier
    keep = judge_keep(prob, labels, np.array([2, 1]), 0.0)
    assert np.flatnonzero(keep).tolist() == [0, 2, 6]
    # a class with no rows in the batch, or a quota of 0, keeps nothing of it
    assert not judge_keep(prob, labels, np.array([0, 0]), 0.0, floor=1.0).any()


def test_a_pool_is_generated_and_screened_down_to_the_deficits(tmp_path):
    cfg = tiny_config(tmp_path, arms="noise,diffusion", synthetic_judge="noise",
                      synthetic_judge_threshold=0.5, synthetic_judge_floor=0.5,
                      synthetic_judge_pool=2, classifier_rounds=1)
    strategy, _ = run_in_process(cfg)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    judge = classifier_shell(cfg, strategy.data.channels, strategy.data.num_classes)
    set_weights(judge, strategy.judge_weights)
    quota = strategy.deficit_plan(strategy.histograms)
    classes = np.arange(strategy.data.num_classes)
    kept_by_class, floored = np.zeros(len(classes), np.int64), 0
    for pid, (images, labels) in strategy.synthetic.items():
        # twice each class's deficit generated; the mask keeps between half and all of it
        assert np.array_equal(np.bincount(labels, minlength=len(classes)), 2 * quota[pid])
        keep = strategy.synthetic_keep[pid]
        kept = np.bincount(labels[keep], minlength=len(classes))
        assert (kept <= quota[pid]).all() and (kept >= np.ceil(0.5 * quota[pid])).all()
        # and they are the best-scored rows of their class
        prob = label_probability(judge, images, labels, torch.device("cpu"))
        for c in classes[kept > 0]:
            assert prob[keep & (labels == c)].min() >= prob[~keep & (labels == c)].max()
        above = np.bincount(labels[prob >= 0.5], minlength=len(classes))
        assert np.array_equal(kept, np.minimum(np.maximum(above, np.ceil(0.5 * quota[pid])),
                                               quota[pid]))
        floored += int((above < np.ceil(0.5 * quota[pid])).sum())
        kept_by_class += kept
    assert floored > 0      # the floor kept rows the threshold alone would have left out
    screen = res["synthetic_screen"]
    assert (screen["pool"], screen["floor"]) == (2, 0.5)
    assert screen["kept_by_class"] == kept_by_class.tolist()
    assert screen["total"] == 2 * sum(int(q.sum()) for q in quota.values())
