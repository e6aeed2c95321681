"""FedDDPM and FedDDPM+ (methods.md C; seed 002: Shen et al. 2025, "Federated Learning for
Diffusion Models"): the federated DDPM corrected on the server with an auxiliary set.

Before FL every client trains a local DDPM and uploads it once (phase ``local-ddpm``); the
server samples the auxiliary set D_aux from those models, each client's share in
proportion to its size and in its own class mix, then drops the models. After each
aggregation of the diffusion phase the server trains the global UNet on D_aux with the
same denoising loss (FedDDPM), or only when its held-out loss on D_aux stalls (FedDDPM+).
Generation and classification then run as in :class:`FedDiffAug`.

Privacy cost: the server holds every client's local DDPM once, long enough to sample it;
a local DDPM trained for ``local-ddpm-steps`` on a few hundred images can reproduce them.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from flwr.common import parameters_to_ndarrays

from fedgen.balancing import proportional_counts
from fedgen.config import ConfigError, RunConfig
from fedgen.diffusion import denoising_loss, sample, train_ddpm
from fedgen.models import build_sampler, get_weights
from fedgen.seeds import derive_seed
from strategies.fed_diff_aug import Batch, FedDiffAug
from strategies.phased import Aggregated, Phase, Results

log = logging.getLogger(__name__)


def auxiliary_shares(histograms: dict, total: int) -> dict:
    """Images per class that each client's local DDPM contributes to D_aux: ``total``
    split across clients in proportion to their sizes, then across each client's classes
    in proportion to its label histogram (so D_aux follows the global label mix)."""
    keys = list(histograms)
    sizes = np.array([histograms[k].sum() for k in keys])
    per_client = proportional_counts(sizes, total)
    return {k: proportional_counts(histograms[k], int(n)) for k, n in zip(keys, per_client)}


class StallRule:
    """FedDDPM+'s trigger: a round stalls when the monitored loss improves on the previous
    round's by less than ``delta`` (relative); ``patience`` stalls in a row fire once, and
    the count starts again."""

    def __init__(self, delta: float, patience: int):
        self.delta, self.patience = delta, patience
        self.previous: float | None = None
        self.stalled = 0

    def update(self, loss: float) -> bool:
        previous, self.previous = self.previous, loss
        if previous is None:
            return False
        improvement = (previous - loss) / previous if previous > 0 else 0.0
        self.stalled = self.stalled + 1 if improvement < self.delta else 0
        if self.stalled >= self.patience:
            self.stalled = 0
            return True
        return False


class FedDDPM(FedDiffAug):
    """FedDiffAug with a local-DDPM phase, D_aux, and a server correction after every
    aggregation. Hooks: :meth:`should_correct` (when), :meth:`correction` (what)."""

    checkpoint_attrs = ("aux_train", "aux_val", "server_seconds", "corrections")

    def __init__(self, *args, **kwargs):
        self.aux_train: Batch | None = None
        self.aux_val: Batch | None = None
        self.server_seconds = 0.0
        self.corrections = 0
        super().__init__(*args, **kwargs)

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if "diffusion" in cfg.arm_list and "diffusion" in cfg.central_dp:
            raise ConfigError(f"central DP (dp-clipping-norm) covers averaged weight "
                              f"updates; {cfg.method} first uploads each client's whole "
                              f"local DDPM (phase local-ddpm), which it cannot protect: name "
                              f"the classifier only (dp-clipping-norm=classify=...)")

    def privacy_notes(self) -> list[str]:
        notes = super().privacy_notes()
        if any(p.kind == "local-ddpm" for p in self.phases):
            notes.append("local-ddpm: each client's whole local DDPM, once" +
                         (" (sample-level: DP-SGD)" if self.cfg.dp_sgd_noise_multiplier else ""))
        return notes

    def plan(self) -> list[Phase]:
        phases = super().plan()
        kinds = [p.kind for p in phases]
        if "diffusion" not in kinds:   # no federated DDPM to correct
            return phases
        i = kinds.index("diffusion")
        return [*phases[:i], Phase("local-ddpm", 1, sends_weights=True, all_clients=True),
                *phases[i:]]

    def aggregators(self):
        return {**super().aggregators(), "local-ddpm": self.build_auxiliary}

    def start_phase(self, phase: Phase):
        start = super().start_phase(phase)
        if phase.kind == "local-ddpm":   # every local DDPM starts from the global init
            return get_weights(self.build_unet())
        return start

    def fit_config(self, phase: Phase, rnd: int, server_round: int):
        config = super().fit_config(phase, rnd, server_round)
        if phase.kind == "local-ddpm":
            config.update({**self.ddpm_settings(), "epochs": 1,
                           "steps": self.cfg.local_ddpm_steps})
        return config

    # ------------------------------------------------------------------ D_aux
    def build_auxiliary(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        """Sample D_aux from the uploaded local DDPMs (then forget them); hold out
        ``aux-holdout`` of it for monitoring."""
        t0 = time.perf_counter()
        shares = auxiliary_shares({k: self.histograms[k] for k in self.roster.keys},
                                  self.cfg.aux_size)
        images, labels = [], []
        for client, res in results:
            key = self.partition_of[client.cid]
            y = np.repeat(np.arange(self.data.num_classes), shares[key])
            unet = self.unet_with(parameters_to_ndarrays(res.parameters))
            images.append(sample(unet, build_sampler(self.cfg.sampler, self.scheduler), y,
                                 steps=self.cfg.sampling_steps, progress=False,
                                 seed=derive_seed(self.cfg.seed, "aux", key),
                                 device=self.device, guidance_scale=self.cfg.guidance_scale,
                                 precision=self.cfg.mixed_precision))
            labels.append(y)
        x, y = np.concatenate(images), np.concatenate(labels).astype(np.int64)
        order = np.random.default_rng(derive_seed(self.cfg.seed, "aux-split")).permutation(len(y))
        n_val = max(1, round(self.cfg.aux_holdout * len(y)))
        val, train = np.sort(order[:n_val]), np.sort(order[n_val:])
        self.aux_val, self.aux_train = (x[val], y[val]), (x[train], y[train])
        seconds = time.perf_counter() - t0
        self.server_seconds += seconds
        judge = self.judge()
        fidelity = judge.fidelity(x, y) if judge else None
        fid = judge.frechet(x) if judge else None
        self.recorder.set_section("auxiliary", {
            "size": len(y), "train": len(train), "holdout": n_val,
            "shares": {str(k): v.tolist() for k, v in shares.items()},
            "fidelity": fidelity, "frechet_distance": fid,
            "sampling_seconds": round(seconds, 3), "local_models_held": len(results)})
        log.info("D_aux: %d images from %d local DDPMs in %.1f s (fidelity %s); the local "
                 "models are dropped", len(y), len(results), seconds,
                 "n/a" if fidelity is None else f"{100 * fidelity:.1f}%")
        return None, {}

    # ------------------------------------------------------------- correction
    def correct(self, phase: Phase, rnd: int) -> dict:
        """Monitor the held-out D_aux loss; correct when :meth:`should_correct` says so."""
        if self.aux_train is None:
            return {}
        loss = self.aux_loss()
        figures = {"aux_loss": loss, "corrected": False}
        if self.should_correct(rnd, loss):
            t0 = time.perf_counter()
            steps = self.correction()
            seconds = time.perf_counter() - t0
            self.server_seconds += seconds
            self.corrections += 1
            figures.update(corrected=True, correction_steps=steps,
                           correction_seconds=round(seconds, 3),
                           aux_loss_after=self.aux_loss())
            log.info("[diffusion] round %d: server correction on D_aux, %d steps in %.1f s, "
                     "held-out loss %.4f -> %.4f", rnd, steps, seconds, loss,
                     figures["aux_loss_after"])
        if rnd == phase.rounds:
            section = self.recorder.results.get("auxiliary", {})
            self.recorder.set_section("auxiliary", {
                **section, "corrections": self.corrections,
                "server_seconds": round(self.server_seconds, 3)})
        return figures

    def should_correct(self, rnd: int, loss: float) -> bool:
        """FedDDPM corrects after every aggregation."""
        return True

    def correction(self) -> int:
        """``correction-steps`` of the denoising loss on D_aux (the same loop and settings
        as the clients'); returns the steps run."""
        unet = self.unet_with(self.unet_weights)
        images, labels = self.aux_train
        stats = train_ddpm(unet, self.scheduler, images, labels, epochs=1,
                           max_steps=self.cfg.correction_steps,
                           batch_size=self.cfg.diffusion_batch_size, lr=self.cfg.correction_lr,
                           seed=derive_seed(self.cfg.seed, "correction", self.corrections),
                           device=self.device, cfg_dropout=self.cfg.cfg_dropout,
                           min_snr_gamma=self.cfg.min_snr_gamma,
                           precision=self.cfg.mixed_precision)
        self.unet_weights = get_weights(unet)
        return stats["steps"]

    def aux_loss(self) -> float:
        """The global UNet's denoising loss on the held-out slice of D_aux (fixed draw)."""
        unet = self.unet_with(self.unet_weights)
        images, labels = self.aux_val
        return denoising_loss(unet, self.scheduler, images, labels,
                              seed=derive_seed(self.cfg.seed, "aux-loss"), device=self.device)


class FedDDPMPlus(FedDDPM):
    """FedDDPM+: one correction only when the held-out D_aux loss stalls
    (``stall-delta``, ``stall-patience``), to spend less server compute."""

    checkpoint_attrs = ("stall",)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.stall = StallRule(self.cfg.stall_delta, self.cfg.stall_patience)

    def should_correct(self, rnd: int, loss: float) -> bool:
        return self.stall.update(loss)
