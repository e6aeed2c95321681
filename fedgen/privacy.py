"""Differential privacy: local noise on label histograms, central DP of averaged weight
updates, and the accountant. Plain NumPy around Flower's own DP functions, no strategy.

Central DP follows Flower's ``DifferentialPrivacyServerSideFixedClipping`` (McMahan et al.
2018, "Learning differentially private recurrent language models"; Andrew et al. 2019):
each client's update ``reply - sent`` is clipped to L2 norm C, the clipped updates are
averaged uniformly, and Gaussian noise of std z C / n is added to the mean of n updates.
The clipping, the noise and the std are Flower's functions
(``flwr.supercore.differential_privacy``); only their composition per model is here.
Two deliberate differences from Flower's wrapper: n is the number of updates actually
averaged (Flower divides by the number sampled, which under-noises a round in which
nodes dropped out), and integer arrays (counters such as BatchNorm's
``num_batches_tracked``) are averaged as they are, neither clipped nor noised.

The guarantee is client-level (adding or removing one client's whole data) for the
sequence of global models of one model kind, against everyone who sees those models,
assuming an honest server: the server itself sees every raw update.
"""

from __future__ import annotations

import logging
import math
import secrets
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
from flwr.supercore.differential_privacy import (add_gaussian_noise_inplace,
                                                 compute_clip_model_update, compute_stdv,
                                                 get_norm)

from fedgen.aggregation import weighted_average
from fedgen.config import ConfigError, RunConfig
from fedgen.seeds import derive_seed

log = logging.getLogger(__name__)

Arrays = list[np.ndarray]
# Renyi orders of the accountant (opacus' defaults)
ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))


# ------------------------------------------------------------------ local DP, histograms
def noisy_histogram(counts: np.ndarray, epsilon: float, rng: np.random.Generator
                    ) -> np.ndarray:
    """``counts`` + Laplace(1 / epsilon) per class, rounded to integers, clipped at 0.

    Adding or removing one image changes one count by 1 (L1 sensitivity 1), so the
    release is epsilon-DP for each image of the client (2 epsilon if an image may instead
    change its label); rounding and clipping are post-processing. ``epsilon`` = 0: the
    exact counts."""
    counts = np.asarray(counts, dtype=np.int64)
    if epsilon == 0:
        return counts.copy()
    noisy = counts + rng.laplace(0.0, 1.0 / epsilon, size=counts.shape)
    return np.clip(np.rint(noisy), 0, None).astype(np.int64)


def noise_rng(cfg: RunConfig, *parts: object) -> np.random.Generator:
    """The generator DP noise is drawn from: fresh OS entropy, or (``dp-seeded-noise``,
    for measurements; the guarantee is then void) one derived from the run seed."""
    if cfg.dp_seeded_noise:
        return np.random.default_rng(derive_seed(cfg.seed, "dp-noise", *parts))
    return np.random.default_rng(secrets.randbits(128))


# ------------------------------------------------------------------ central DP, updates
@dataclass(frozen=True)
class CentralDP:
    """Fixed clipping of client updates to ``clipping_norm`` and Gaussian noise of std
    ``noise_multiplier`` x ``clipping_norm`` / n on the mean of n clipped updates."""

    clipping_norm: float
    noise_multiplier: float


def clip_update(reply: Arrays, sent: Arrays, clipping_norm: float) -> tuple[Arrays, float]:
    """``sent`` + the update ``reply - sent`` scaled to L2 norm at most ``clipping_norm``
    over the floating-point arrays (Flower's ``compute_clip_model_update``), and the
    update's norm before clipping. Integer arrays are returned as they are."""
    floats = [i for i, s in enumerate(sent) if s.dtype.kind == "f"]
    params = [np.array(reply[i], dtype=sent[i].dtype, copy=True) for i in floats]
    base = [sent[i] for i in floats]
    norm = get_norm([p - b for p, b in zip(params, base)])
    if norm > 0:   # Flower's clip divides by the norm
        compute_clip_model_update(params, base, clipping_norm)
    out = list(reply)
    for k, i in enumerate(floats):
        out[i] = params[k]
    return out, norm


@contextmanager
def numpy_global_seed(seed: int | None) -> Iterator[None]:
    """Flower's noise is drawn from NumPy's global generator: seed it for the block
    (None: fresh OS entropy) and put the previous state back afterwards."""
    state = np.random.get_state()
    np.random.seed(seed if seed is not None else secrets.randbits(32))
    try:
        yield
    finally:
        np.random.set_state(state)


def private_mean(replies: Sequence[Arrays], sent: Arrays, dp: CentralDP,
                 seed: int | None = None) -> tuple[Arrays, dict]:
    """The uniform mean of the clipped replies plus Gaussian noise of std
    ``compute_stdv(z, C, n)`` on every floating-point entry (Flower's
    ``add_gaussian_noise_inplace``); ``seed`` None = OS entropy. Returns the new global
    arrays and the round's figures (n, how many updates were clipped, their median norm
    before clipping, the noise std)."""
    clipped, norms = zip(*(clip_update(r, sent, dp.clipping_norm) for r in replies))
    mean = weighted_average(clipped, [1.0] * len(clipped))
    std = compute_stdv(dp.noise_multiplier, dp.clipping_norm, len(clipped))
    if std > 0:
        with numpy_global_seed(seed):
            add_gaussian_noise_inplace([a for a in mean if a.dtype.kind == "f"], std)
    return mean, {"updates": len(clipped),
                  "clipped": int(sum(n > dp.clipping_norm for n in norms)),
                  "median_update_norm": float(np.median(norms)), "noise_std": std}


# ------------------------------------------------------------- DP-SGD, client DDPMs
@dataclass(frozen=True)
class DPSGD:
    """Sample-level DP-SGD of a client's DDPM training (opacus): per-example gradients
    clipped to ``max_grad_norm``, Gaussian noise of std ``noise_multiplier`` x
    ``max_grad_norm`` on their sum; ``noise_seed`` None = OS entropy."""

    noise_multiplier: float
    max_grad_norm: float
    noise_seed: int | None = None

    def attach(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
               batch_size: int, device: torch.device):
        """(opacus' GradSampleModule around ``module``, DPOptimizer around
        ``optimizer``); call ``_close()`` on the first when training ends."""
        try:
            from opacus import GradSampleModule
            from opacus.optimizers import DPOptimizer
        except ImportError:
            raise ImportError("DP-SGD needs opacus: pip install opacus (a dependency of fedgen)") from None
        # opacus' per-example hooks are full backward hooks; the noised images need no
        # gradient, so torch warns on every backward: expected here, not the user's doing
        warnings.filterwarnings("ignore", message="Full backward hook is firing",
                                category=UserWarning)
        seed = self.noise_seed if self.noise_seed is not None else secrets.randbits(63)
        generator = torch.Generator(device=device).manual_seed(seed)
        private = DPOptimizer(optimizer, noise_multiplier=self.noise_multiplier,
                              max_grad_norm=self.max_grad_norm,
                              expected_batch_size=batch_size, generator=generator)
        return GradSampleModule(module), private


def dp_sgd_for(cfg: RunConfig, seed: int) -> DPSGD | None:
    """The DP-SGD settings of a client's DDPM training (None when off)."""
    if cfg.dp_sgd_noise_multiplier == 0:
        return None
    return DPSGD(cfg.dp_sgd_noise_multiplier, cfg.dp_sgd_max_grad_norm,
                 derive_seed(seed, "dp-sgd") if cfg.dp_seeded_noise else None)


# ------------------------------------------------------------------------- accounting
def accountant_available() -> bool:
    try:
        import opacus.accountants.analysis.rdp  # noqa: F401
    except ImportError:
        return False
    return True


def rdp_epsilon(events: Sequence[tuple[float, float, int]], delta: float) -> float | None:
    """Epsilon at ``delta`` of the composition of ``(noise multiplier, sampling rate,
    steps)`` sampled-Gaussian events (RDP, Mironov 2017; opacus' analysis, which treats
    the sampling as Poisson); inf when any event has no noise; None without opacus."""
    events = [e for e in events if e[2] > 0]
    if not events:
        return 0.0
    if any(z == 0 for z, _, _ in events):
        return math.inf
    try:
        from opacus.accountants.analysis import rdp
    except ImportError:
        return None
    total = sum(np.asarray(rdp.compute_rdp(q=q, noise_multiplier=z, steps=s, orders=ORDERS))
                for z, q, s in events)
    return float(rdp.get_privacy_spent(orders=ORDERS, rdp=total, delta=delta)[0])


def check(cfg: RunConfig) -> None:
    """Settings no method can run with (before any work starts)."""
    noisy = any(z > 0 for _, z in cfg.central_dp.values())
    if (noisy or cfg.dp_sgd_noise_multiplier > 0) and not accountant_available():
        raise ConfigError(f"{'dp-noise-multiplier' if noisy else 'dp-sgd-noise-multiplier'} "
                          f"needs opacus (the accountant, and DP-SGD): "
                          f"pip install opacus (a dependency of fedgen)")
    if cfg.dp_sgd_noise_multiplier > 0 and cfg.diffusion_proximal_mu > 0:
        raise ConfigError("dp-sgd-noise-multiplier: DP-SGD clips per-example gradients; "
                          "the diffusion-proximal-mu drift term has none: set one to 0")


@dataclass
class Ledger:
    """What the run spent: per model the central-DP settings, rounds and epsilon; the
    histogram noise; what leaves the clients unprotected (results.json ``privacy``)."""

    cfg: RunConfig
    models: tuple[str, ...]                 # the averaged models of this run
    not_covered: list[str] = field(default_factory=list)
    history: dict[str, list[dict]] = field(default_factory=dict)
    dp_sgd: dict[str, list[tuple[float, int]]] = field(default_factory=dict)

    def mechanism(self, model: str) -> CentralDP | None:
        if model not in self.models or model not in self.cfg.central_dp:
            return None
        return CentralDP(*self.cfg.central_dp[model])

    def aggregate(self, model: str, replies: Sequence[Arrays], sent: Arrays,
                  sample_rate: float, server_round: int) -> Arrays:
        """One round of central DP for ``model``: the noisy mean; the round is logged."""
        dp = self.mechanism(model)
        seed = derive_seed(self.cfg.seed, "dp-noise", model, server_round) \
            if self.cfg.dp_seeded_noise else None
        mean, figures = private_mean(replies, sent, dp, seed)
        self.history.setdefault(model, []).append(
            {"server_round": server_round, "sample_rate": sample_rate, **figures})
        log.info("[%s] central DP: %d update(s), %d clipped to %g (median norm %.3g), noise "
                 "std %.3g", model, figures["updates"], figures["clipped"], dp.clipping_norm,
                 figures["median_update_norm"], figures["noise_std"])
        return mean

    def record_dp_sgd(self, server_round: int, replies: dict[str, dict]) -> bool:
        """Note each node's DP-SGD steps and sampling rate of this round (from the
        metrics ``dp-sgd-steps``, ``dp-sgd-sample-rate`` of its reply); True if any."""
        seen = False
        for node, metrics in replies.items():
            if "dp-sgd-steps" in metrics:
                self.dp_sgd.setdefault(node, []).append(
                    (float(metrics["dp-sgd-sample-rate"]), int(metrics["dp-sgd-steps"])))
                seen = True
        return seen

    def dp_sgd_section(self) -> dict | None:
        cfg = self.cfg
        if cfg.dp_sgd_noise_multiplier == 0:
            return None
        z = cfg.dp_sgd_noise_multiplier
        eps = {node: rdp_epsilon([(z, q, n) for q, n in runs], cfg.dp_delta)
               for node, runs in self.dp_sgd.items()}
        known = [e for e in eps.values() if e is not None]
        return {"noise_multiplier": z, "max_grad_norm": cfg.dp_sgd_max_grad_norm,
                "delta": cfg.dp_delta, "epsilon_by_node": eps,
                "steps_by_node": {k: sum(n for _, n in v) for k, v in self.dp_sgd.items()},
                "max_epsilon": max(known) if known else None,
                "unit": "sample-level: add or remove one training image of a client, for "
                        "everything its DDPM training released (each round's UNet)",
                "accountant": "RDP (opacus), Poisson batches at rate batch-size / the "
                              "client's images, composed over all its DDPM steps; the "
                              "client-sampling amplification is not counted"}

    def epsilon(self, model: str) -> float | None:
        dp = self.mechanism(model)
        return rdp_epsilon([(dp.noise_multiplier, h["sample_rate"], 1)
                            for h in self.history.get(model, [])], self.cfg.dp_delta)

    def section(self) -> dict:
        cfg = self.cfg
        central = {}
        for model in self.models:
            dp = self.mechanism(model)
            if dp is None:
                central[model] = None
                continue
            rounds = self.history.get(model, [])
            central[model] = {"clipping_norm": dp.clipping_norm,
                              "noise_multiplier": dp.noise_multiplier,
                              "rounds": len(rounds), "epsilon": self.epsilon(model),
                              "history": rounds}
        on = [m for m in self.models if central.get(m)]
        events = [(central[m]["noise_multiplier"], h["sample_rate"], 1)
                  for m in on for h in self.history.get(m, [])]
        return {
            "histogram_epsilon": cfg.histogram_epsilon or None,
            "central": {"models": central, "delta": cfg.dp_delta,
                        "epsilon_all_models": rdp_epsilon(events, cfg.dp_delta) if on else None,
                        "unit": "client-level: add or remove one client's data; for the "
                                "sequence of global models, against all but the server",
                        "accountant": "RDP of the sampled Gaussian (opacus), Poisson "
                                      "sampling at rate = nodes asked / nodes, composed "
                                      "over the model's rounds (all arms)",
                        "aggregation": "uniform mean of the clipped updates"} if on else None,
            "dp_sgd": self.dp_sgd_section(),
            "noise": "run seed (reproducible; the guarantee is VOID)" if cfg.dp_seeded_noise
                     else "OS entropy",
            "not_covered": self.not_covered,
        }

    def summary(self) -> str:
        """One line for the table ('' when no DP is on)."""
        return summary_line(self.section())


def summary_line(section: dict | None) -> str:
    """The privacy line of ``run_simulation.py``'s table, from results.json ``privacy``."""
    if not section:
        return ""
    parts = []
    if section.get("histogram_epsilon"):
        parts.append(f"label histograms local DP epsilon={section['histogram_epsilon']:g}")
    central = section.get("central") or {}
    for model, m in (central.get("models") or {}).items():
        if m:
            eps = m["epsilon"]
            shown = "n/a" if eps is None else "inf" if math.isinf(eps) else f"{eps:.3g}"
            parts.append(f"{model}: clip {m['clipping_norm']:g}, z={m['noise_multiplier']:g}"
                         f", {m['rounds']} rounds -> epsilon={shown}")
    if central:
        parts.append(f"delta={central['delta']:g}")
    sgd = section.get("dp_sgd")
    if sgd:
        eps = sgd.get("max_epsilon")
        parts.append(f"DDPM DP-SGD z={sgd['noise_multiplier']:g}, max grad norm "
                     f"{sgd['max_grad_norm']:g} -> sample-level epsilon "
                     f"{'n/a' if eps is None else f'{eps:.3g}'} (worst client)")
    if not parts:
        return ""
    seeded = " [noise from the run seed: NOT private]" if "VOID" in section.get("noise", "") \
        else ""
    return "privacy: " + "; ".join(parts) + seeded
