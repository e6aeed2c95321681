"""CollaFuse (methods.md D; seed 003: Allmendinger et al. 2024, "Distributed Collaborative
Diffusion Models"): split-learning diffusion as Flower rounds, then class balancing.

Not FedAvg: no UNet weight travels. Each round of phase ``collafuse`` the clients train
their private denoisers (t <= cut point, :class:`clients.collafuse_client.CollaFuseClient`)
and send up their images noised to the cut point; the server trains the ONE shared
denoiser (t > cut point) on them, all clients of one cut point together. In the generation round
the server denoises each client's class-balancing deficits from pure noise down to the
client's cut point and sends the partial samples down; the client finishes them with its
private model and keeps the batch (the finished images never leave it). Classification
then runs as in :class:`FedDiffAug`.

What leaves a client: its label histogram (stats round), its images noised to its cut
point with their labels (every training round; the raw images for cut 0, nothing for
cut 1), counts. results.json ``collafuse`` reports per client the cut, the disclosure
(MSE between what was sent and the real images, measured on the client) and the
reference classifier's accuracy on what the server received.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from flwr.common import parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from fedgen.collafuse import cut_timesteps, server_part, train_server
from fedgen.config import ConfigError, RunConfig
from fedgen.data import to_uint8
from fedgen.models import build_sampler, get_weights
from fedgen.seeds import derive_seed
from strategies.fed_diff_aug import FedDiffAug
from strategies.phased import Aggregated, Phase, PhasedFedAvg, Results

log = logging.getLogger(__name__)


class CollaFuse(FedDiffAug):
    """Hooks: :meth:`cut_of` (a client's cut timestep), :meth:`train_shared` (the server's
    half of a round, per cut), :meth:`client_payload` (what a client gets to finish)."""

    checkpoint_attrs = ("clients_report", "server_seconds")

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if "diffusion" in cfg.arm_list and cfg.diffusion_rounds < 1:
            raise ConfigError("method collafuse trains its split DDPM in diffusion-rounds "
                              "rounds; set diffusion-rounds >= 1")
        if "diffusion" in cfg.arm_list and "diffusion" in cfg.central_dp:
            raise ConfigError("central DP (dp-clipping-norm) covers averaged weight updates; "
                              "collafuse's clients upload images noised to their cut point "
                              "instead, which it cannot protect: name the classifier only "
                              "(dp-clipping-norm=classify=...)")
        if "diffusion" in cfg.arm_list and cfg.dp_sgd_noise_multiplier > 0:
            raise ConfigError("dp-sgd-noise-multiplier protects DDPM weights a client "
                              "uploads; collafuse's clients upload noised images instead")

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.cuts = cut_timesteps(self.cfg.cut_ratio_list, self.cfg.num_clients,
                                  self.cfg.num_train_timesteps)
        self.clients_report: dict = {}
        self.server_seconds = 0.0

    def plan(self) -> list[Phase]:
        stats, *classify = PhasedFedAvg.plan(self)
        if self.generative_arm not in self.arms:
            return [stats, *classify]
        return [stats, Phase("collafuse", self.cfg.diffusion_rounds),
                self.generation_phase(), *classify]

    def generation_kind(self) -> str:
        return "collafuse-generation"

    def privacy_notes(self) -> list[str]:
        notes = super().privacy_notes()
        if self.generative_arm in self.arms:
            notes.append("collafuse: each client's images noised to its cut point, with "
                         "their labels, every round (clean images at cut 0)")
        return notes

    def aggregators(self):
        return {**super().aggregators(), "collafuse": self.aggregate_split,
                "collafuse-generation": self.aggregate_client_made}

    def start_phase(self, phase: Phase):
        start = super().start_phase(phase)
        if phase.kind == "collafuse":   # the shared server denoiser
            self.unet_weights = get_weights(self.build_unet())
        return start

    def fit_config(self, phase: Phase, rnd: int, server_round: int):
        config = super().fit_config(phase, rnd, server_round)
        if phase.kind == "collafuse":
            config.update({**self.ddpm_settings(), "epochs": self.cfg.diffusion_epochs})
        return config

    def config_for(self, phase: Phase, client: ClientProxy, config: dict) -> dict:
        config = super().config_for(phase, client, config)
        if phase.kind in ("collafuse", "collafuse-generation"):
            config["cut-t"] = self.cut_of(self.partition_of[client.cid])
        return config

    def cut_of(self, key) -> int:
        """Client ``key``'s cut timestep: its place in node order picks its cut-ratio."""
        return self.cuts[self.roster.keys.index(key)]

    # ------------------------------------------------------------------ training
    def aggregate_split(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        """Train the server's half on what came up: the union of the images of all clients
        cut at the same timestep, shuffled together (one call per distinct cut, in
        increasing order), so no client's data comes last and wins."""
        t0 = time.perf_counter()
        unet = self.unet_with(self.unet_weights)
        judge = self.judge()
        rows, groups = [], {}
        for client, res in results:
            key = self.partition_of[client.cid]
            arrays = parameters_to_ndarrays(res.parameters)
            t_c = self.cut_of(key)
            row = {"node": key, "cut_t": t_c, "sent": 0, "client_loss": res.metrics.get("loss"),
                   "disclosure_mse": res.metrics.get("disclosure-mse"), "sent_accuracy": None}
            if arrays:
                sent, labels = arrays
                groups.setdefault(t_c, []).append((sent, labels))
                row.update(sent=len(labels), sent_accuracy=judge.fidelity(
                    to_uint8(torch.as_tensor(sent)), labels) if judge else None)
            rows.append(row)
        losses = {}
        for t_c in sorted(groups):
            sent = np.concatenate([g[0] for g in groups[t_c]])
            labels = np.concatenate([g[1] for g in groups[t_c]])
            stats = self.train_shared(unet, sent, labels, t_c, rnd)
            if stats["steps"]:
                losses[t_c] = stats["loss"]
        self.unet_weights = get_weights(unet)
        seconds = time.perf_counter() - t0
        self.server_seconds += seconds
        server_loss = float(np.mean(list(losses.values()))) if losses else None
        self.recorder.log_diffusion_round(
            rnd, self._train_metrics, server_loss=server_loss,
            server_seconds=round(seconds, 3), clients=rows)
        log.info("[collafuse] round %d/%d  client loss %.4f  server loss %s  (%d images "
                 "noised to their cut came up)", rnd, phase.rounds,
                 self._train_metrics.get("loss", float("nan")),
                 "-" if server_loss is None else f"{server_loss:.4f}",
                 sum(r["sent"] for r in rows))
        if rnd == phase.rounds:
            self.recorder.set_section("collafuse", {
                "cut_ratio": self.cfg.cut_ratio, "T": self.cfg.num_train_timesteps,
                "clients": rows, "server_seconds": round(self.server_seconds, 3)})
            self.save_unet()   # the server's half only: it denoises t > each cut point
        return None, self._train_metrics

    def train_shared(self, unet, sent: np.ndarray, labels: np.ndarray, t_c: int,
                     rnd: int) -> dict:
        """The server's half for the images cut at ``t_c``: the DDPM loop on t > t_c."""
        return train_server(unet, self.scheduler, sent, labels, t_c,
                            epochs=self.cfg.diffusion_epochs,
                            batch_size=self.cfg.diffusion_batch_size, lr=self.cfg.diffusion_lr,
                            seed=derive_seed(self.cfg.seed, "collafuse-server", rnd, t_c),
                            device=self.device, cfg_dropout=self.cfg.cfg_dropout,
                            min_snr_gamma=self.cfg.min_snr_gamma,
                            precision=self.cfg.mixed_precision)

    # ---------------------------------------------------------------- generation
    def client_deficits(self, plan: dict) -> dict:
        """The server half is conditioned on every class, so every deficit is asked for."""
        return plan

    def client_payload(self, counts: np.ndarray, key) -> list[np.ndarray]:
        """The client's counts and its deficits denoised from pure noise down to its cut."""
        labels = np.repeat(np.arange(len(counts)), counts)
        partial = server_part(self.unet_with(self.unet_weights),
                              build_sampler(self.cfg.sampler, self.scheduler), labels,
                              self.cut_of(key), steps=self.cfg.sampling_steps,
                              seed=derive_seed(self.cfg.seed, "collafuse-generate", key),
                              device=self.device, guidance_scale=self.cfg.guidance_scale,
                              progress=False, precision=self.cfg.mixed_precision)
        return [counts, partial]
