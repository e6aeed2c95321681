"""FedDDPM / FedDDPM+ (methods.md C): D_aux shares, the server correction, the stall rule,
and both methods end to end through Flower's Server loop."""

import json

import numpy as np
import torch

from fedgen.balancing import proportional_counts
from fedgen.config import RunConfig
from fedgen.diffusion import denoising_loss, train_ddpm
from fedgen.models import build_scheduler, build_unet
from strategies.fedddpm import StallRule, auxiliary_shares
from tests.conftest import run_in_process, tiny_config

CPU = torch.device("cpu")


def test_proportional_counts_are_exact_integers():
    assert proportional_counts([1, 1, 2], 8).tolist() == [2, 2, 4]
    assert proportional_counts([1, 1, 1], 10).tolist() == [4, 3, 3]   # remainder to the first
    assert proportional_counts([0, 3, 0, 1], 5).tolist() == [0, 4, 0, 1]
    assert proportional_counts([0, 0], 5).tolist() == [0, 0]


def test_aux_shares_follow_client_size_and_class_mix():
    hist = {0: np.array([30, 0, 10]), 1: np.array([0, 20, 0]), 2: np.array([0, 0, 140])}
    shares = auxiliary_shares(hist, 100)
    # sizes 40 / 20 / 140 of 200 -> 20 / 10 / 70 images
    assert {k: int(v.sum()) for k, v in shares.items()} == {0: 20, 1: 10, 2: 70}
    # within a client, its own class mix; a class it lacks gets nothing from its model
    assert shares[0].tolist() == [15, 0, 5]
    assert shares[1].tolist() == [0, 10, 0] and shares[2].tolist() == [0, 0, 70]
    # so D_aux follows the global label mix (30/20/150 of 200)
    assert sum(shares.values()).tolist() == [15, 10, 75]


def test_stall_rule_on_a_scripted_loss_sequence():
    rule = StallRule(delta=0.05, patience=2)
    losses = [1.0, 0.5, 0.49, 0.489, 0.3, 0.299, 0.2985, 0.2984, 0.2983]
    fired = [rule.update(x) for x in losses]
    # stalls (improvement < 5 %) at 0.49, 0.489 -> fire; 0.299, 0.2985 -> fire; then the
    # count restarts: 0.2984 is one stall, 0.2983 the second -> fire again
    assert fired == [False, False, False, True, False, False, True, False, True]
    # a loss that gets worse is a stall too
    rule = StallRule(delta=0.0, patience=1)
    assert [rule.update(x) for x in (1.0, 0.9, 1.1)] == [False, False, True]


def test_train_ddpm_max_steps_runs_exactly_that_many_steps():
    cfg = RunConfig(unet_channels="8,16")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (19, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 19)
    unet = build_unet(cfg, 1, 10, 8, seed=0)
    stats = train_ddpm(unet, build_scheduler(cfg), images, labels, epochs=1, batch_size=8,
                       lr=1e-3, seed=0, device=CPU, max_steps=7)   # 3 batches per epoch
    assert stats["steps"] == 7
    # the monitoring loss is a fixed draw: the same value twice, another after training
    sched = build_scheduler(cfg)
    a = denoising_loss(unet, sched, images, labels, seed=1, device=CPU)
    assert a == denoising_loss(unet, sched, images, labels, seed=1, device=CPU)
    train_ddpm(unet, sched, images, labels, epochs=1, batch_size=8, lr=1e-3, seed=0,
               device=CPU, max_steps=20)
    assert denoising_loss(unet, sched, images, labels, seed=1, device=CPU) < a


def test_fedddpm_end_to_end_corrects_after_every_round(tmp_path):
    cfg = tiny_config(tmp_path, method="fedddpm", arms="diffusion", diffusion_rounds=2,
                      local_ddpm_steps=6, aux_size=300, correction_steps=5)
    strategy, proxies = run_in_process(cfg)
    assert [p.kind for p in strategy.phases] == \
        ["stats", "local-ddpm", "diffusion", "generation", "classify"]
    # the local-DDPM round: every client got the init UNet and a step budget, and
    # uploaded a UNet of the same shape
    local = proxies[0].received[1]
    assert local.config["phase"] == "local-ddpm" and local.config["steps"] == 6
    assert len(local.parameters.tensors) == len(strategy.unet_weights)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    aux = res["auxiliary"]
    assert aux["size"] == 300 and aux["train"] + aux["holdout"] == 300
    assert aux["local_models_held"] == cfg.num_clients
    sizes = np.array(res["partition"]["sizes"])
    got = [sum(aux["shares"][str(k)]) for k in range(cfg.num_clients)]
    assert got == proportional_counts(sizes, 300).tolist()
    hist = res["diffusion"]["history"]
    assert [h["corrected"] for h in hist] == [True, True]
    assert all(h["correction_steps"] == 5 and h["aux_loss"] > 0 for h in hist)
    assert aux["corrections"] == 2 and aux["server_seconds"] > 0
    assert res["status"] == "completed" and "diffusion" in res["arms"]


def test_fedddpm_plus_corrects_only_on_a_stall(tmp_path, monkeypatch):
    """With a loss sequence that improves, then stalls twice, exactly one correction runs,
    in the round the rule fires; the weights change only there."""
    from strategies import fedddpm
    scripted = iter([1.0, 0.5, 0.499, 0.498, 0.1])
    monkeypatch.setattr(fedddpm.FedDDPM, "aux_loss", lambda self: next(scripted))
    cfg = tiny_config(tmp_path, method="fedddpm-plus", arms="diffusion", diffusion_rounds=4,
                      local_ddpm_steps=3, aux_size=200, correction_steps=4,
                      stall_delta=0.01, stall_patience=2, samples_every=0)
    strategy, _ = run_in_process(cfg)
    hist = strategy.recorder.results["diffusion"]["history"]
    assert [h["corrected"] for h in hist] == [False, False, False, True]
    assert strategy.corrections == 1
    assert hist[3]["aux_loss_after"] == 0.1
