"""The levers of the federated DDPM (issue 8): classifier-free guidance, the server
optimiser and EMA, the drift term, quality metrics, per-round grids, and seed keying."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline
from flwr.common import parameters_to_ndarrays

from fedgen.config import ConfigError, RunConfig
from fedgen.data import load_data
from fedgen.diffusion import (denoising_loss, guided_eps, min_snr_weights,
                              regression_target, train_ddpm)
from fedgen.fidelity import FeatureNet, frechet_distance
from fedgen.losses import proximal
from fedgen.models import (build_sampler, build_scheduler, build_unet, load_unet, null_class,
                           saved_prediction_type)
from fedgen.server_opt import ServerOptimizer, ema_update
from tests.conftest import run_in_process, tiny_config

CPU = torch.device("cpu")
TINY = RunConfig(unet_channels="8,16")


def _seen_labels(cfg_dropout: float, n: int = 400, epochs: int = 2) -> np.ndarray:
    """Labels the UNet was conditioned on during training (read through a loss hook)."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, n)
    seen = []

    def spy(model, batch):
        seen.append(batch["labels"].clone())
        return torch.zeros(())

    unet = build_unet(TINY, 1, 10, 8, seed=0)
    train_ddpm(unet, build_scheduler(TINY), images, labels, epochs=epochs, batch_size=100,
               lr=1e-4, seed=3, device=CPU, loss_hooks=[spy], cfg_dropout=cfg_dropout)
    return torch.cat(seen).numpy()


def test_label_dropout_sends_that_share_to_the_null_class():
    unet = build_unet(TINY, 1, 10, 8)
    assert null_class(unet) == 10 and unet.config.num_class_embeds == 11
    none = _seen_labels(0.0)
    assert len(none) == 800 and (none < 10).all()
    seen = _seen_labels(0.3)
    share = (seen == 10).mean()
    assert abs(share - 0.3) < 0.05, share     # 800 draws: std 0.016
    assert set(np.unique(seen[seen < 10])) == set(range(10))


def test_guidance_arithmetic_on_a_tiny_unet():
    unet = build_unet(TINY, 1, 10, 8, seed=0).eval()
    torch.manual_seed(0)
    x, t = torch.randn(4, 1, 8, 8), torch.tensor(500)
    y = torch.tensor([0, 3, 5, 9])
    with torch.no_grad():
        eps_c = unet(x, t, class_labels=y).sample
        eps_u = unet(x, t, class_labels=torch.full_like(y, 10)).sample
        assert not torch.allclose(eps_c, eps_u)
        assert torch.equal(guided_eps(unet, x, t, y, 1.0), eps_c)
        torch.testing.assert_close(guided_eps(unet, x, t, y, 0.0), eps_u, atol=1e-5, rtol=0)
        torch.testing.assert_close(guided_eps(unet, x, t, y, 3.0),
                                   eps_u + 3.0 * (eps_c - eps_u), atol=1e-5, rtol=0)


def test_min_snr_weights_and_the_weighted_loss():
    sched = build_scheduler(TINY)
    a = sched.alphas_cumprod.double()
    snr = a / (1 - a)
    w = min_snr_weights(sched, 5.0)
    t_hi, t_lo = int((snr > 5).nonzero().max()), int((snr <= 5).nonzero().min())
    assert t_lo == t_hi + 1                                  # SNR falls with t
    assert w[t_hi].item() == pytest.approx(5.0 / snr[t_hi].item(), rel=1e-6)  # down-weighted
    assert (w[t_lo:] == 1).all() and w[0].item() < 0.01      # t = 0: SNR ~ 1e4
    # gamma above every SNR: all weights 1, the loss is L_simple and training is identical
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 64)
    kw = dict(epochs=1, batch_size=32, lr=1e-3, seed=1, device=CPU)
    outs = []
    for gamma in (0.0, 1e9, 5.0):
        unet = build_unet(TINY, 1, 10, 8, seed=0)
        outs.append(train_ddpm(unet, sched, images, labels, min_snr_gamma=gamma, **kw)["loss"])
    assert outs[0] == pytest.approx(outs[1], rel=1e-6)
    assert outs[2] < outs[0]                                 # weights <= 1


def test_v_prediction_target_weights_and_sampler():
    """prediction-type=v_prediction: the target v = sqrt(abar) noise - sqrt(1 - abar) x_0,
    Min-SNR's v weights min(SNR, gamma) / (SNR + 1), the samplers inherit the type, and a
    UNet trained on v denoises a step better than one trained on epsilon read as v."""
    cfg = dataclasses.replace(TINY, prediction_type="v_prediction")
    sched = build_scheduler(cfg)
    assert build_sampler("ddim", sched).config.prediction_type == "v_prediction"
    a = sched.alphas_cumprod.double()
    torch.manual_seed(0)
    x0, noise, t = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4), torch.tensor([0, 500, 999])
    ab = a[t].float().view(-1, 1, 1, 1)
    torch.testing.assert_close(regression_target(sched, x0, noise, t),
                               ab.sqrt() * noise - (1 - ab).sqrt() * x0, atol=1e-6, rtol=0)
    assert torch.equal(regression_target(build_scheduler(TINY), x0, noise, t), noise)
    snr = a / (1 - a)
    w = min_snr_weights(sched, 5.0)
    for k in (0, 300, 999):
        assert w[k].item() == pytest.approx(min(snr[k].item(), 5.0) / (snr[k].item() + 1),
                                            rel=1e-6)
    # the epsilon weights times (SNR + 1) / SNR: the same x_0-loss weighting
    np.testing.assert_allclose(w.double() * (snr + 1) / snr, min_snr_weights(
        build_scheduler(TINY), 5.0).double(), rtol=1e-5)
    # training follows the type: the v loss of a v-trained UNet beats an epsilon-trained one
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (64, 1, 8, 8), dtype=np.uint8), rng.integers(0, 10, 64)
    kw = dict(epochs=8, batch_size=16, lr=2e-3, seed=1, device=CPU)
    losses = {}
    for kind in ("epsilon", "v_prediction"):
        unet = build_unet(TINY, 1, 10, 8, seed=0)
        train_ddpm(unet, build_scheduler(dataclasses.replace(TINY, prediction_type=kind)),
                   images, labels, **kw)
        losses[kind] = denoising_loss(unet, sched, images, labels, seed=2, device=CPU)
    assert losses["v_prediction"] < losses["epsilon"]


def test_a_saved_ddpm_keeps_its_prediction_type(tmp_path):
    cfg = dataclasses.replace(TINY, prediction_type="v_prediction")
    DDPMPipeline(unet=build_unet(cfg, 1, 10, 8, seed=0),
                 scheduler=build_scheduler(cfg)).save_pretrained(tmp_path / "ddpm")
    assert saved_prediction_type(str(tmp_path / "ddpm")) == "v_prediction"
    assert saved_prediction_type(str(tmp_path)) is None
    load_unet(str(tmp_path / "ddpm"), 1, 10, 8, prediction_type="v_prediction")
    with pytest.raises(ConfigError, match="trained with prediction-type=v_prediction"):
        load_unet(str(tmp_path / "ddpm"), 1, 10, 8, prediction_type="epsilon")


def _arrays(*values):
    return [np.array(values, dtype=np.float32), np.array([7], dtype=np.int64)]


def test_server_optimisers_on_hand_computed_arrays():
    x0, avg1 = _arrays(1.0, 2.0), _arrays(2.0, 0.0)      # delta = (+1, -2)
    out = ServerOptimizer("fedavg").step(x0, avg1)
    assert np.array_equal(out[0], avg1[0]) and out[1] is not avg1[1]
    np.testing.assert_allclose(ServerOptimizer("fedavg", lr=0.5).step(x0, avg1)[0], [1.5, 1.0])

    m = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    x1 = m.step(x0, avg1)                                  # m = d = (1, -2)
    np.testing.assert_allclose(x1[0], [2.0, 0.0])
    x2 = m.step(x1, _arrays(3.0, 0.0))                     # d = (1, 0); m = (1.5, -1)
    np.testing.assert_allclose(x2[0], [3.5, -1.0])
    assert x2[1].dtype == np.int64 and x2[1][0] == 7

    a = ServerOptimizer("fedadam", lr=0.1, momentum=0.9, beta_2=0.99, tau=1e-3)
    y1 = a.step(x0, avg1)
    # m = 0.1 d, v = 0.01 d^2 -> step = 0.1 d / (0.1 |d| + 1e-3)
    d = np.array([1.0, -2.0])
    np.testing.assert_allclose(y1[0], [1.0, 2.0] + 0.1 * 0.1 * d / (0.1 * abs(d) + 1e-3),
                               rtol=1e-6)
    y2 = a.step(y1, [y1[0] + 1.0, y1[1]])                  # d2 = (1, 1)
    m2 = 0.9 * 0.1 * d + 0.1 * 1.0
    v2 = 0.99 * 0.01 * d ** 2 + 0.01 * 1.0
    np.testing.assert_allclose(y2[0], y1[0] + 0.1 * m2 / (np.sqrt(v2) + 1e-3), rtol=1e-5)


def test_ema_on_hand_computed_arrays():
    e = ema_update(None, _arrays(1.0, 1.0), 0.9)
    np.testing.assert_allclose(e[0], [1.0, 1.0])
    e = ema_update(e, _arrays(11.0, -9.0), 0.9)
    np.testing.assert_allclose(e[0], [2.0, 0.0], atol=1e-6)
    assert e[0].dtype == np.float32 and e[1][0] == 7


def test_proximal_term_value_and_gradient():
    lin = torch.nn.Linear(2, 1)
    hook = proximal(lin, mu=0.4)
    start = [p.detach().clone() for p in lin.parameters()]
    assert hook(lin, {}).item() == 0.0
    with torch.no_grad():
        for p in lin.parameters():
            p.add_(0.5)
    value = hook(lin, {})
    assert value.item() == pytest.approx(0.5 * 0.4 * 3 * 0.25)
    value.backward()
    for p, s in zip(lin.parameters(), start):
        torch.testing.assert_close(p.grad, 0.4 * (p.detach() - s))


def test_frechet_distance_separates_real_from_noise():
    data = load_data(RunConfig())
    net = FeatureNet.fit(data.train_x, data.train_y, data.num_classes, epochs=2)
    assert net.accuracy(data.test_x, data.test_y) > 0.8
    same = frechet_distance(net, data.train_x, data.train_x)
    held_out = frechet_distance(net, data.train_x, data.test_x)
    noise = np.random.default_rng(0).integers(0, 256, data.test_x.shape).astype(np.uint8)
    assert abs(same) < 1e-3 < held_out < frechet_distance(net, data.train_x, noise) / 10
    assert np.isnan(frechet_distance(net, data.train_x, data.test_x[:50]))


def test_grids_quality_and_levers_reach_the_results(tmp_path):
    cfg = tiny_config(tmp_path, arms="real,diffusion", diffusion_rounds=2, samples_every=1,
                      ema_decay=0.5, diffusion_server_opt="fedavgm",
                      diffusion_server_lr=0.5, diffusion_proximal_mu=0.01)
    strategy, proxies = run_in_process(cfg)
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "samples").iterdir()) == \
        ["round-001.png", "round-002.png"]
    res = json.loads((out / "results.json").read_text())
    hist = res["diffusion"]["history"]
    assert [h["round"] for h in hist] == [1, 2]
    assert all(0.0 <= h["grid_fidelity"] <= 1.0 for h in hist)
    gen = res["generation"]
    assert gen["frechet_distance"] > 0 and len(gen["per_class_fidelity"]) == 10
    # the clients got the DDPM settings; the server sampled from the EMA, not the last
    # global weights
    fit = [ins for ins in proxies[0].received if ins.config["phase"] == "diffusion"][0]
    assert fit.config["cfg-dropout"] == cfg.cfg_dropout
    assert fit.config["proximal-mu"] == 0.01
    assert strategy.ema_weights is not None
    assert any(not np.array_equal(e, w) for e, w in
               zip(strategy.ema_weights, strategy.unet_weights))


def test_class_count_aggregation_of_the_label_embedding(tmp_path):
    """label-embedding-aggregation=class-counts: row c of the global class embedding is
    the clients' rows c weighted by their counts of class c, the null row and every other
    weight stay the sample-weighted average."""
    cfg = tiny_config(tmp_path, arms="diffusion", alpha=0.1, num_clients=4,
                      label_embedding_aggregation="class-counts")
    strategy, proxies = run_in_process(cfg)
    keys = list(strategy.unet_with(strategy.unet_weights).state_dict())
    at = keys.index("class_embedding.weight")
    replies = [[r for i, r in zip(p.received, p.replied) if i.config["phase"] == "diffusion"][-1]
               for p in proxies]
    tables = [parameters_to_ndarrays(r.parameters) for r in replies]
    n = np.array([r.num_examples for r in replies], np.float64)
    hist = np.stack([strategy.histograms[strategy.partition_of[p.cid]] for p in proxies])
    assert (hist == 0).any(), "the split should leave some class out of some client"
    table, classes = strategy.unet_weights[at], hist.shape[1]
    for c in range(classes):
        if hist[:, c].sum():
            want = sum(h * t[at][c] for h, t in zip(hist[:, c], tables)) / hist[:, c].sum()
            np.testing.assert_allclose(table[c], want, rtol=1e-5, atol=1e-7)
    plain = sum(k * t[at] for k, t in zip(n, tables)) / n.sum()
    np.testing.assert_allclose(table[classes], plain[classes], rtol=1e-5, atol=1e-7)
    assert not np.allclose(table[:classes], plain[:classes])
    other = at + 1
    np.testing.assert_allclose(strategy.unet_weights[other],
                               sum(k * t[other] for k, t in zip(n, tables)) / n.sum(),
                               rtol=1e-5, atol=1e-6)


def test_an_arm_trains_the_same_under_every_method(tmp_path):
    """Client seeds are keyed to (seed, phase, round within the phase, partition), not to
    the server round: the real arm of fed-diff-aug (after stats, diffusion and generation
    rounds) equals fedavg's real arm (right after the stats round)."""
    alone, _ = run_in_process(tiny_config(tmp_path / "a", method="fedavg", arms="real",
                                          classifier_rounds=2))
    mixed, _ = run_in_process(tiny_config(tmp_path / "b", arms="real,diffusion",
                                          classifier_rounds=2))
    first = alone.recorder.results["arms"]["real"]["history"]
    second = mixed.recorder.results["arms"]["real"]["history"]
    assert [h["server_round"] for h in first] != [h["server_round"] for h in second]
    for a, b in zip(first, second, strict=True):
        assert a["accuracy"] == b["accuracy"] and a["train_loss"] == b["train_loss"]
