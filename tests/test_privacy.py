"""Differential privacy: the central-DP clip and noise on hand-made updates (against
Flower's functions applied by hand), per-model settings, the histogram noise, DP-SGD in
the DDPM loop, the accountant, and one run with DP on."""

import json
import math

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays
from flwr.supercore.differential_privacy import (
    add_gaussian_noise_inplace,
    compute_clip_model_update,
    compute_stdv,
    get_norm,
)

from fedgen.config import ConfigError, RunConfig
from fedgen.diffusion import train_ddpm
from fedgen.methods import method_for
from fedgen.models import build_scheduler, build_unet
from fedgen.privacy import (
    DPSGD,
    CentralDP,
    clip_update,
    noise_rng,
    noisy_histogram,
    private_mean,
    rdp_epsilon,
    summary_line,
)
from fedgen.seeds import derive_seed
from strategies import PhasedFedAvg
from tests.conftest import run_in_process, tiny_config


def _model(update: np.ndarray, counter: int = 7) -> list[np.ndarray]:
    """A 'model' of two float arrays (the update split over them) and an int counter."""
    return [update[:6].reshape(2, 3).astype(np.float32), update[6:].astype(np.float32),
            np.array(counter, dtype=np.int64)]


SENT = _model(np.zeros(10), counter=5)


def _direction(norm: float, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=10)
    return norm * v / np.linalg.norm(v)


# --------------------------------------------------------------------- clipping
def test_a_large_update_is_clipped_to_the_norm_and_a_small_one_is_left_alone():
    big, small = _model(_direction(10.0, 0)), _model(_direction(0.5, 1))
    clipped, norm = clip_update(big, SENT, clipping_norm=2.0)
    assert norm == pytest.approx(10.0, rel=1e-5)
    assert get_norm([c - s for c, s in zip(clipped[:2], SENT[:2])]) == pytest.approx(2.0, rel=1e-5)
    # same direction, shorter
    assert np.allclose(clipped[0] / 2.0, big[0] / 10.0, atol=1e-6)
    kept, norm = clip_update(small, SENT, clipping_norm=2.0)
    assert norm == pytest.approx(0.5, rel=1e-5)
    assert all(np.array_equal(k, s) for k, s in zip(kept, small))
    assert clipped[2] == 7 and clipped[2].dtype == np.int64   # counters untouched
    # exactly Flower's function on the floating-point arrays
    by_hand = [a.copy() for a in big[:2]]
    compute_clip_model_update(by_hand, SENT[:2], 2.0)
    assert all(np.array_equal(a, b) for a, b in zip(clipped[:2], by_hand))


def test_a_zero_update_passes_without_dividing_by_zero():
    out, norm = clip_update(SENT, SENT, clipping_norm=1.0)
    assert norm == 0.0 and all(np.array_equal(a, b) for a, b in zip(out, SENT))


def test_the_private_mean_is_flowers_clip_mean_and_noise_applied_by_hand():
    replies = [_model(_direction(10.0, 0), 6), _model(_direction(0.5, 1), 8)]
    dp = CentralDP(clipping_norm=2.0, noise_multiplier=0.7)
    state = np.random.get_state()
    mean, figures = private_mean(replies, SENT, dp, seed=123)
    assert np.array_equal(np.random.get_state()[1], state[1])   # global RNG put back
    clipped = []
    for r in replies:
        floats = [a.copy() for a in r[:2]]
        compute_clip_model_update(floats, SENT[:2], 2.0)
        clipped.append(floats)
    want = [(a + b) / 2 for a, b in zip(*clipped)]
    np.random.seed(123)
    add_gaussian_noise_inplace(want, compute_stdv(0.7, 2.0, 2))
    np.random.set_state(state)
    assert all(np.allclose(m, w, atol=1e-6) for m, w in zip(mean[:2], want))
    assert mean[2] == 7   # the counters' plain mean, not noised
    assert figures == {"updates": 2, "clipped": 1, "noise_std": pytest.approx(0.7),
                       "median_update_norm": pytest.approx(5.25, rel=1e-5)}


def test_the_noise_std_is_z_times_c_over_n():
    sent = [np.zeros(200_000, np.float32)]
    dp = CentralDP(clipping_norm=0.5, noise_multiplier=3.0)
    mean, figures = private_mean([sent, sent, sent], sent, dp, seed=1)
    assert figures["noise_std"] == pytest.approx(3.0 * 0.5 / 3)
    assert mean[0].std() == pytest.approx(0.5, rel=0.01) and abs(mean[0].mean()) < 0.005
    again, _ = private_mean([sent, sent, sent], sent, dp, seed=1)
    assert np.array_equal(again[0], mean[0])            # seeded: repeats
    fresh, _ = private_mean([sent, sent, sent], sent, dp)
    other, _ = private_mean([sent, sent, sent], sent, dp)
    assert not np.array_equal(fresh[0], other[0])       # OS entropy: never the same


# --------------------------------------------------------------------- settings
def test_per_model_settings_are_parsed():
    cfg = RunConfig(dp_clipping_norm="diffusion=0.05, classify=5", dp_noise_multiplier="1.1")
    assert cfg.central_dp == {"classify": (5.0, 1.1), "diffusion": (0.05, 1.1)}
    cfg = RunConfig.from_mapping({"dp-clipping-norm": 3, "dp-noise-multiplier": "classify=2"})
    assert cfg.central_dp == {"classify": (3.0, 2.0), "diffusion": (3.0, 0.0)}
    assert RunConfig(dp_clipping_norm="0").central_dp == {} == RunConfig().central_dp


@pytest.mark.parametrize("values,words", [
    ({"dp-clipping-norm": "unet=1"}, "unknown model 'unet'"),
    ({"dp-clipping-norm": "5,classify=1"}, "give one number"),
    ({"dp-clipping-norm": "classify=1,classify=2"}, "give one number"),
    ({"dp-clipping-norm": "classify=abc"}, "expected a number for classify"),
    ({"dp-clipping-norm": "-1"}, "finite and >= 0"),
    ({"dp-noise-multiplier": "1"}, "no dp-clipping-norm"),
    ({"dp-clipping-norm": "classify=1", "dp-noise-multiplier": "1"}, "model diffusion"),
    ({"dp-delta": 0}, "dp-delta must be > 0"),
])
def test_bad_dp_settings_are_one_clear_config_error(values, words):
    with pytest.raises(ConfigError, match=words):
        RunConfig.from_mapping(values)


@pytest.mark.parametrize("method", ["fedddpm", "fedddpm-plus", "collafuse"])
def test_methods_whose_uploads_are_not_averaged_updates_refuse_central_dp_on_them(method):
    with pytest.raises(ConfigError, match="cannot protect"):
        method_for(RunConfig(method=method, dp_clipping_norm="1", dp_noise_multiplier="1"))
    method_for(RunConfig(method=method, dp_clipping_norm="classify=1",
                         dp_noise_multiplier="classify=1"))   # the classifier alone is fine


def test_dp_sgd_refuses_the_proximal_term_and_collafuse():
    with pytest.raises(ConfigError, match="diffusion-proximal-mu"):
        method_for(RunConfig(dp_sgd_noise_multiplier=1.0, diffusion_proximal_mu=0.1))
    with pytest.raises(ConfigError, match="noised images"):
        method_for(RunConfig(method="collafuse", dp_sgd_noise_multiplier=1.0))


# ------------------------------------------------------------------- histograms
def test_histogram_noise_is_seeded_non_negative_and_exact_at_epsilon_zero():
    counts = np.array([0, 3, 50, 1, 0, 7, 0, 0, 2, 9])
    rng = lambda: np.random.default_rng(5)   # noqa: E731
    noisy = noisy_histogram(counts, 0.1, rng())
    assert noisy.dtype == np.int64 and noisy.shape == counts.shape and (noisy >= 0).all()
    assert not np.array_equal(noisy, counts)
    assert np.array_equal(noisy_histogram(counts, 0.1, rng()), noisy)
    assert np.array_equal(noisy_histogram(counts, 0.0, rng()), counts)
    # Laplace(1/eps): mean absolute noise 1/eps (here on counts far from the 0 clip)
    many = noisy_histogram(np.full(20_000, 1000), 0.5, rng())
    assert np.abs(many - 1000).mean() == pytest.approx(2.0, rel=0.05)


def test_histogram_noise_comes_from_the_os_unless_seeded_noise_is_asked_for():
    cfg = RunConfig(histogram_epsilon=1.0)
    draws = [noise_rng(cfg, "histogram", 0).laplace(size=4) for _ in range(2)]
    assert not np.array_equal(*draws)
    seeded = cfg.replace(dp_seeded_noise=True)
    draws = [noise_rng(seeded, "histogram", 0).laplace(size=4) for _ in range(2)]
    assert np.array_equal(*draws)


# --------------------------------------------------------------------- DP-SGD, RDP
def test_dp_sgd_runs_in_the_one_ddpm_loop_with_poisson_batches():
    cfg = RunConfig(unet_channels="8,16")
    unet = build_unet(cfg, 1, 10, 8, seed=0)
    images = np.random.default_rng(0).integers(0, 255, (40, 1, 8, 8), dtype=np.uint8)
    labels = np.arange(40) % 10
    kwargs = dict(epochs=2, batch_size=10, lr=1e-3, seed=0, device=torch.device("cpu"))
    before = [p.detach().clone() for p in unet.parameters()]
    stats = train_ddpm(unet, build_scheduler(cfg), images, labels,
                       dp_sgd=DPSGD(1.0, 1.0, noise_seed=3), **kwargs)
    assert stats["dp_steps"] == 8 and stats["dp_sample_rate"] == 0.25
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters()))
    assert all(getattr(p, "grad_sample", None) is None for p in unet.parameters())
    with pytest.raises(ValueError, match="loss hook"):
        train_ddpm(unet, build_scheduler(cfg), images, labels, dp_sgd=DPSGD(1.0, 1.0),
                   loss_hooks=[lambda m, b: torch.zeros(())], **kwargs)


def test_the_accountant():
    one = rdp_epsilon([(1.0, 1.0, 8)], 1e-5)
    assert rdp_epsilon([(1.0, 1.0, 4), (1.0, 1.0, 4)], 1e-5) == pytest.approx(one)
    assert rdp_epsilon([(2.0, 1.0, 8)], 1e-5) < one                 # more noise, less spent
    assert rdp_epsilon([(1.0, 0.1, 8)], 1e-5) < one                 # sampling amplifies
    assert math.isinf(rdp_epsilon([(0.0, 1.0, 1)], 1e-5))           # clipping only
    assert rdp_epsilon([], 1e-5) == 0.0


# ----------------------------------------------------------------- a whole run
def test_a_run_with_dp_on_states_its_privacy_and_aggregates_privately(tmp_path, monkeypatch):
    aggregated = []
    original = PhasedFedAvg.aggregate_classifier

    def spy(self, phase, rnd, results):
        aggregated.append((original(self, phase, rnd, results), self._sent_weights))
        return aggregated[-1][0]

    monkeypatch.setattr(PhasedFedAvg, "aggregate_classifier", spy)
    cfg = tiny_config(tmp_path, method="fedavg", arms="real", histogram_epsilon=0.5,
                      dp_clipping_norm="classify=5", dp_noise_multiplier="classify=0.8",
                      dp_seeded_noise=True)
    strategy, proxies = run_in_process(cfg)
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res["status"] == "completed"
    privacy = res["privacy"]
    classify = privacy["central"]["models"]["classify"]
    assert (classify["clipping_norm"], classify["noise_multiplier"], classify["rounds"]) == \
        (5.0, 0.8, 1)
    assert classify["epsilon"] == pytest.approx(rdp_epsilon([(0.8, 1.0, 1)], 1e-5))
    assert privacy["histogram_epsilon"] == 0.5 and "VOID" in privacy["noise"]
    assert "privacy: label histograms local DP epsilon=0.5; classify: clip 5, z=0.8" in \
        summary_line(privacy)
    # the server only ever saw noisy histograms
    true = {p.client.local.node: p.client.local.histogram for p in proxies}
    assert any(not np.array_equal(strategy.histograms[k], h) for k, h in true.items())
    # the new global model is the clipped, noised uniform mean of the replies
    (params, _), sent = aggregated[-1]
    replies = [parameters_to_ndarrays(p.replied[-1].parameters) for p in proxies]
    want, _ = private_mean(replies, sent, CentralDP(5.0, 0.8),
                           seed=derive_seed(cfg.seed, "dp-noise", "classify", 2))
    assert all(np.allclose(a, b, atol=1e-6)
               for a, b in zip(parameters_to_ndarrays(params), want))
