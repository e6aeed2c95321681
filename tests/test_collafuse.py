"""CollaFuse (methods.md D): split-learning diffusion as Flower rounds. What crosses the
wire is checked message by message."""

import json
import sys

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays

from clients.collafuse_client import private_path
from clients.local import LocalData
from fedgen.collafuse import client_part, noise_to_cut, server_part, train_server
from fedgen.config import ConfigError, RunConfig
from fedgen.data import load_data
from fedgen.diffusion import bridge_noise, sample, train_ddpm
from fedgen.models import build_sampler, build_scheduler, build_unet, get_weights
from tests.conftest import ROOT, run_in_process, tiny_config

CPU = torch.device("cpu")


def test_split_sampling_hands_over_at_the_cut_and_equals_one_model_sampling():
    """Server down to the cut, client from there: with one UNet on both sides the result
    is exactly the unsplit sampler's, for each cut (0: server only, T: client only)."""
    cfg = RunConfig(unet_channels="8,16")
    unet = build_unet(cfg, 1, 10, 8, seed=3)
    sampler = build_sampler("ddim", build_scheduler(cfg))
    labels = np.arange(10)
    whole = sample(unet, sampler, labels, steps=5, seed=7, device=CPU, progress=False)
    for t_c in (0, 200, 500, 1000):
        partial = server_part(unet, sampler, labels, t_c, steps=5, seed=7, device=CPU,
                              progress=False)
        assert partial.dtype == np.float32 and len(partial) == (0 if t_c == 1000 else 10)
        if t_c == 1000:   # the client starts from pure noise with the same seed
            done = client_part(unet, sampler, labels, partial, t_c, steps=5, seed=7,
                               device=CPU, progress=False)
        else:
            done = client_part(unet, sampler, labels, partial, t_c, steps=5, seed=0,
                               device=CPU, progress=False)
        assert np.array_equal(done, whole), t_c
    # the handover point really splits the work: the server's half alone is not finished
    half = server_part(unet, sampler, labels, 500, steps=5, seed=7, device=CPU,
                       progress=False)
    assert not np.allclose(half, sample(unet, sampler, labels, steps=5, seed=7, device=CPU,
                                        progress=False, raw=True))


def test_bridge_noise_continues_the_forward_process_with_the_score_matching_scale():
    sched = build_scheduler(RunConfig())
    abar = sched.alphas_cumprod.double()
    x_s = torch.full((2, 1, 2, 2), 0.5)
    noise = torch.ones_like(x_s)
    t = torch.tensor([300, 900])
    noisy, scale = bridge_noise(sched, x_s, noise, t, 200)
    for i, ti in enumerate((300, 900)):
        a = abar[ti] / abar[200]
        want = a.sqrt() * 0.5 + (1 - a).sqrt()
        assert torch.allclose(noisy[i], torch.full((1, 2, 2), float(want)), atol=1e-6)
        assert abs(float(scale[i].flatten()[0]) - float(((1 - a) / (1 - abar[ti])).sqrt())) < 1e-6
    # composed with q(x_s | x_0) it has the marginal variance of q(x_t | x_0) (Markov chain)
    a = abar[900] / abar[200]
    var = a * (1 - abar[200]) + (1 - a)
    assert abs(float(var) - float(1 - abar[900])) < 1e-9


def test_server_half_with_cut_zero_is_the_plain_ddpm_loop():
    """Cut 0 (server only): the server trains on the clean images exactly as a client of
    fed-diff-aug would."""
    cfg = RunConfig(unet_channels="8,16")
    data = load_data(cfg)
    x, y = data.train_x[:64], data.train_y[:64]
    sched = build_scheduler(cfg)
    a, b = build_unet(cfg, 1, 10, 8, seed=1), build_unet(cfg, 1, 10, 8, seed=1)
    kw = dict(epochs=1, batch_size=32, lr=1e-3, seed=4, device=CPU)
    train_server(a, sched, noise_to_cut(sched, x, 0, seed=0), y, 0, **kw)
    train_ddpm(b, sched, x, y, **kw)
    assert all(np.array_equal(p, q) for p, q in zip(get_weights(a), get_weights(b)))


def test_collafuse_rounds_send_only_noised_images_up_and_partial_samples_down(tmp_path, capsys):
    cfg = tiny_config(tmp_path, method="collafuse", arms="diffusion", cut_ratio="0.2,0.5,1")
    strategy, proxies = run_in_process(cfg)
    assert [p.name for p in strategy.phases] == [
        "stats", "collafuse", "collafuse-generation:diffusion", "classify:diffusion"]
    sched = build_scheduler(cfg)
    abar = sched.alphas_cumprod.numpy().astype(np.float64)
    cuts = {0: 200, 1: 500, 2: 1000}
    for k, proxy in enumerate(proxies):
        local = LocalData.from_node(cfg, {"partition-id": k}, run_id=0)
        x0 = local.images.astype(np.float64) / 127.5 - 1
        with np.load(private_path(proxy.client.local)) as f:   # every cut here > 0
            private = [f[name] for name in f.files if name != "round"]
        assert len(private) == len(get_weights(build_unet(cfg, 1, 10, 8)))
        for ins, res in zip(proxy.received, proxy.replied):
            phase = ins.config["phase"]
            down = parameters_to_ndarrays(ins.parameters)
            up = parameters_to_ndarrays(res.parameters)
            if phase in ("collafuse", "collafuse-generation"):
                assert ins.config["cut-t"] == cuts[k]
            for arr in (*down, *up):   # no private weight ever travels, either way
                assert not any(arr.shape == p.shape and np.allclose(arr, p) for p in private)
            if phase == "collafuse":
                assert not down   # nothing comes down in a training round
                if cuts[k] == 1000:
                    assert not up   # client only: nothing leaves
                    continue
                sent, labels = up
                assert sent.shape == local.images.shape and sent.dtype == np.float32
                assert np.array_equal(labels, local.labels)
                # noised to exactly the cut: the residual of q(x_c | x_0) has unit variance
                # (an image noised to t_c / 2 would leave a residual std near 0.6)
                a = abar[cuts[k]]
                residual = (sent - np.sqrt(a) * x0) / np.sqrt(1 - a)
                assert abs(residual.std() - 1) < 0.03 and abs(residual.mean()) < 0.03
                assert abs(res.metrics["disclosure-mse"] - ((sent - x0) ** 2).mean()) < 1e-4
            if phase == "collafuse-generation":
                counts, partial = down
                assert len(partial) == (0 if cuts[k] == 1000 else counts.sum())
                assert not up and res.metrics["made"] == counts.sum()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = results["collafuse"]["clients"]
    assert [r["cut_t"] for r in rows] == [200, 500, 1000]
    assert rows[0]["disclosure_mse"] < rows[1]["disclosure_mse"]   # more noise, less disclosed
    assert rows[2]["sent"] == 0 and rows[2]["disclosure_mse"] is None
    assert results["status"] == "completed"

    # benchmarks/collafuse.py scores each client's finished samples from the two halves
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import collafuse as bench
    assert bench.main(["--run", str(tmp_path / "out"), "--per-class", "2"]) == 0
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert [line.split(" | ")[1] for line in table[1:4]] == ["200", "500", "1000"]


@pytest.mark.parametrize("value,words", [("0.2,1.5", "[0, 1]"), ("0.1,0.2", "one per client"),
                                         ("a", "numbers")])
def test_cut_ratio_is_checked_before_any_work(value, words):
    with pytest.raises(ConfigError, match="cut-ratio") as err:
        RunConfig.from_mapping({"cut-ratio": value, "num-clients": 3})
    assert words in str(err.value)
