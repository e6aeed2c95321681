"""Federated DDPM + class-balancing augmentation (methods.md A; seed 000).

Phases: a stats round (clients report their label histograms and partition ids),
``diffusion-rounds`` of FedAvg over a class-conditional UNet, a generation round in which
the server samples with the global UNet and ships every client its own class-balancing
batch, then one classifier phase per arm.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

import numpy as np
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.server.client_proxy import ClientProxy

from fedgen import plots
from fedgen.aggregation import rowwise_average
from fedgen.balancing import fill_to_max, judge_keep, present_only
from fedgen.classifier import label_probability
from fedgen.config import ConfigError
from fedgen.diffusion import sample
from fedgen.fidelity import Judge
from fedgen.models import (build_sampler, build_scheduler, build_unet, get_weights,
                           set_weights, unet_shell)
from fedgen.partition import histogram
from fedgen.seeds import derive_seed
from fedgen.server_opt import ServerOptimizer, ema_update
from strategies.phased import EMPTY, Aggregated, Phase, PhasedFedAvg, Results

if TYPE_CHECKING:
    from diffusers import UNet2DModel

log = logging.getLogger(__name__)

Batch = tuple[np.ndarray, np.ndarray]  # uint8 images (N, C, H, W), int64 labels (N,)


class FedDiffAug(PhasedFedAvg):
    """Federated DDPM, then class-balancing synthetic data for FedAvg classification.

    Hooks a researcher overrides: :meth:`deficit_plan` (which classes get how many
    samples), :meth:`generate` (how they are produced), :meth:`aggregate_diffusion` (how
    UNet weights are combined; by default the clients' average, passed through the
    ``diffusion-server-opt`` update and tracked by an ``ema-decay`` EMA for sampling),
    :meth:`correct` (server-side work on the new global UNet after each aggregation;
    none here, FedDDPM's correction on D_aux in :class:`strategies.fedddpm.FedDDPM`),
    :meth:`screen_synthetic` (which synthetic rows the generative arm trains on; all of
    them unless ``synthetic-judge`` names an earlier arm whose final model screens them).
    """

    GRID_PER_CLASS = 10  # samples per class in the per-round grid (samples-every)

    supported_arms = ("real", "oversample", "noise", "diffusion")
    generative_arm = "diffusion"
    # (Not the quality judge: refitted from its seed it gives the same figures; a pickled
    # copy's feature network moved a Fréchet distance in the 4th digit.)
    checkpoint_attrs = ("unet_weights", "ema_weights", "synthetic", "client_plan",
                        "edit_weights", "server_opt", "judge_weights", "synthetic_keep")

    def __init__(self, *args, **kwargs):
        self.unet_weights: list[np.ndarray] | None = None   # the global UNet
        self.ema_weights: list[np.ndarray] | None = None    # its EMA (ema-decay > 0)
        self.synthetic: dict[int, Batch] = {}
        self.client_plan: dict[int, np.ndarray] = {}  # counts clients make themselves
        self.edit_weights: list[np.ndarray] = []
        self.judge_weights: list[np.ndarray] | None = None   # synthetic-judge's classifier
        self.synthetic_keep: dict[int, np.ndarray] = {}      # its keep-mask per batch
        super().__init__(*args, **kwargs)
        self.scheduler = build_scheduler(self.cfg)
        self.server_opt = ServerOptimizer(self.cfg.diffusion_server_opt,
                                          self.cfg.diffusion_server_lr,
                                          self.cfg.diffusion_server_momentum)
        self._judge: Judge | None = None

    @classmethod
    def check_config(cls, cfg) -> None:
        """``synthetic-judge`` needs its arm to run before the generative one, and
        batches the server made (it screens them)."""
        judge, arms = cfg.synthetic_judge, cfg.arm_list
        if cls.generative_arm not in arms:
            return
        if cfg.synthetic_judge_pool > 1 and not judge:
            raise ConfigError(f"synthetic-judge-pool={cfg.synthetic_judge_pool} generates "
                              f"more rows than the deficits for synthetic-judge to choose "
                              f"from; set synthetic-judge too")
        if not judge:
            return
        if judge not in arms or arms.index(judge) > arms.index(cls.generative_arm):
            raise ConfigError(f"synthetic-judge={judge}: arms must run {judge} before "
                              f"{cls.generative_arm} (arms={','.join(arms)})")
        if cfg.generation == "sdedit":
            raise ConfigError("synthetic-judge screens batches the server made; under "
                              "generation=sdedit the clients make their own")

    def plan(self) -> list[Phase]:
        if self.generative_arm not in self.arms:
            return super().plan()
        head = [Phase("diffusion", self.cfg.diffusion_rounds, sends_weights=True)] \
            if self.cfg.diffusion_rounds > 0 else []
        stats, *classify = super().plan()
        return [stats, *head, self.generation_phase(), *classify]

    def generation_phase(self) -> Phase:
        """The one round that gives every client its batch of the generative arm (all
        clients; replayed by a resumed run, which may run on nodes that lost theirs)."""
        return Phase(self.generation_kind(), 1, arm=self.generative_arm, all_clients=True,
                     replay=True)

    def generation_kind(self) -> str:
        """The generation round's phase: ``generation`` (the server makes every batch and
        ships it) or a phase in which each client makes its own (``sdedit``)."""
        return "sdedit" if self.cfg.generation == "sdedit" else "generation"

    def aggregators(self):
        return {**super().aggregators(), "diffusion": self.aggregate_diffusion,
                "generation": lambda phase, rnd, results: (None, {}),
                "sdedit": self.aggregate_client_made}

    # -------------------------------------------------------------- phases
    def start_phase(self, phase: Phase):
        start = super().start_phase(phase)
        if phase.kind == "diffusion":
            self.unet_weights = get_weights(self.build_unet())
            return self.unet_weights
        if phase.kind == "generation" and not self.synthetic:   # (resumed: re-ship them)
            pool = self.cfg.synthetic_judge_pool   # > 1 only with synthetic-judge
            self.synthetic = self.generate({k: pool * d for k, d in
                                            self.deficit_plan(self.histograms).items()})
        elif phase.kind == self.generation_kind():   # each client makes its own batch
            self.client_plan = self.client_deficits(self.deficit_plan(self.histograms))
            self._t0 = time.perf_counter()
        elif phase.kind == "classify" and phase.arm == self.generative_arm \
                and self.cfg.synthetic_judge:
            self.synthetic_keep = self.screen_synthetic()
        return start

    def aggregate_classifier(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        """FedAvg; the ``synthetic-judge`` arm's last global model is kept as the judge."""
        parameters, metrics = super().aggregate_classifier(phase, rnd, results)
        if phase.arm == self.cfg.synthetic_judge and rnd == phase.rounds:
            self.judge_weights = parameters_to_ndarrays(parameters)
        return parameters, metrics

    def screen_synthetic(self) -> dict[int, np.ndarray]:
        """Keep-masks of the synthetic batches the server shipped: a row is kept when the
        final global classifier of arm ``synthetic-judge`` (federated: FedAvg over the
        clients' own data) gives its label a probability of at least
        ``synthetic-judge-threshold``, per client and class at most the deficit (the best
        rows of a ``synthetic-judge-pool``) and at least ``synthetic-judge-floor`` of it
        (:func:`fedgen.balancing.judge_keep`). The clients apply them (fit config
        ``synthetic-keep``); results.json ``synthetic_screen`` records what was kept and
        the reference classifier's fidelity of the kept and the left-out rows."""
        if self.judge_weights is None:
            self.fail(f"synthetic-judge={self.cfg.synthetic_judge}: that arm's classifier "
                      f"is missing (did its phase run?)")
        if not self.synthetic:
            log.warning("synthetic-judge: the server holds no synthetic batches (the "
                        "clients made their own); nothing screened")
            return {}
        model = self._classifier()
        set_weights(model, self.judge_weights)
        quota = self.deficit_plan(self.histograms)
        keep = {pid: judge_keep(label_probability(model, images, labels, self.device), labels,
                                quota[pid], self.cfg.synthetic_judge_threshold,
                                self.cfg.synthetic_judge_floor)
                for pid, (images, labels) in self.synthetic.items()}
        images = np.concatenate([b[0] for b in self.synthetic.values()])
        labels = np.concatenate([b[1] for b in self.synthetic.values()])
        mask = np.concatenate(list(keep.values()))
        reference = self.judge()

        def fidelity(rows):
            return reference.fidelity(images[rows], labels[rows]) \
                if reference is not None and rows.any() else None

        section = {"judge": self.cfg.synthetic_judge,
                   "threshold": self.cfg.synthetic_judge_threshold,
                   "floor": self.cfg.synthetic_judge_floor,
                   "pool": self.cfg.synthetic_judge_pool,
                   "total": int(len(mask)), "kept": int(mask.sum()),
                   "kept_by_node": {str(k): int(v.sum()) for k, v in keep.items()},
                   "kept_by_class": histogram(labels[mask], self.data.num_classes).tolist(),
                   "total_by_class": histogram(labels, self.data.num_classes).tolist(),
                   "fidelity_kept": fidelity(mask), "fidelity_left_out": fidelity(~mask)}
        self.recorder.set_section("synthetic_screen", section)
        log.info("synthetic-judge (%s): kept %d of %d synthetic rows; reference fidelity "
                 "%s kept, %s left out", section["judge"], section["kept"], section["total"],
                 *("n/a" if f is None else f"{100 * f:.1f}%"
                   for f in (section["fidelity_kept"], section["fidelity_left_out"])))
        return keep

    def config_for(self, phase: Phase, client: ClientProxy, config: dict) -> dict:
        """In the generative arm's classify rounds, the client's ``synthetic-keep`` mask
        (packed bits, one per row of its batch) when ``synthetic-judge`` screened it."""
        config = super().config_for(phase, client, config)
        pid = self.partition_of.get(client.cid)
        if phase.kind == "classify" and phase.arm == self.generative_arm \
                and pid in self.synthetic_keep:
            config["synthetic-keep"] = np.packbits(self.synthetic_keep[pid]).tobytes()
        return config

    def fit_config(self, phase: Phase, rnd: int, server_round: int):
        config = super().fit_config(phase, rnd, server_round)
        if phase.kind == "diffusion":
            config.update({**self.ddpm_settings(), "epochs": self.cfg.diffusion_epochs,
                           "proximal-mu": self.cfg.diffusion_proximal_mu})
        return config

    def ddpm_settings(self) -> dict:
        """The DDPM training settings every phase that trains a UNet on clients sends."""
        return {"batch-size": self.cfg.diffusion_batch_size, "lr": self.cfg.diffusion_lr,
                "cfg-dropout": self.cfg.cfg_dropout, "min-snr-gamma": self.cfg.min_snr_gamma}

    def payload_for(self, phase: Phase, client: ClientProxy, parameters: Parameters):
        """In the generation round each client gets a FRESH payload: its own batch, or,
        where clients make their own, :meth:`client_payload` of its counts."""
        if phase.kind != "generation" and phase.kind == self.generation_kind():
            pid = self.partition_of.get(client.cid)
            counts = self.client_plan.get(pid, np.zeros(self.data.num_classes, np.int64))
            return ndarrays_to_parameters(self.client_payload(counts, pid))
        if phase.kind != "generation":
            return parameters
        pid = self.partition_of.get(client.cid)
        if pid is None or pid not in self.synthetic:
            return EMPTY
        images, labels = self.synthetic[pid]
        return ndarrays_to_parameters([images, labels])

    def client_deficits(self, plan: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """What each client is asked to make itself: SDEdit edits its own images, so only
        the classes it holds."""
        return {k: present_only(d, self.histograms[k]) for k, d in plan.items()}

    def client_payload(self, counts: np.ndarray, key) -> list[np.ndarray]:
        """What client ``key`` receives when it makes its own batch: its counts and
        (SDEdit) the sampling weights of the global UNet."""
        if not self.edit_weights:
            self.edit_weights = get_weights(self.global_unet())
        return [counts, *self.edit_weights]

    def aggregate_client_made(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        """A round in which the clients made their own batches: only counts come back."""
        none = np.zeros(self.data.num_classes, np.int64)
        counts = np.stack([self.client_plan.get(k, none) for k in self.roster.keys])
        made = int(sum(int(r.metrics.get("made", 0)) for _, r in results))
        seconds = time.perf_counter() - self._t0
        self.recorder.set_section("generation", {
            "counts": counts.tolist(), "total": made, "where": f"clients ({phase.kind})",
            "fidelity": None, "frechet_distance": None, "seconds": round(seconds, 3)})
        log.info("%s: the clients made %d samples themselves in %.1f s (their images stay "
                 "with them)", phase.kind, made, seconds)
        return None, {}

    # ---------------------------------------------------------------- hooks
    def aggregate_diffusion(self, phase: Phase, rnd: int, results: Results) -> Aggregated:
        """The clients' UNets averaged (sample-weighted, or uniform: the original's compat),
        then the server update (``diffusion-server-opt``) and the EMA (``ema-decay``)."""
        uniform = self.cfg.diffusion_aggregation == "uniform"
        models = [parameters_to_ndarrays(r.parameters) for _, r in results]
        average = self.aggregate_weights(results, uniform=uniform, models=models)
        if self.cfg.label_embedding_aggregation == "class-counts":
            average = self.aggregate_label_rows(average, results, uniform, models)
        self.unet_weights = self.server_opt.step(self.unet_weights, average)
        extra = self.correct(phase, rnd)
        if self.cfg.ema_decay > 0:
            self.ema_weights = ema_update(self.ema_weights, self.unet_weights,
                                          self.cfg.ema_decay)
        loss = self._train_metrics.get("loss", float("nan"))
        quality = self.sample_grid(rnd, last=rnd == phase.rounds)
        self.recorder.log_diffusion_round(rnd, {**self._train_metrics, **quality}, **extra)
        log.info("[diffusion] round %d/%d  denoising loss %.4f%s", rnd, phase.rounds, loss,
                 f"  grid fidelity {100 * quality['fidelity']:.1f}%"
                 if quality.get("fidelity") is not None else "")
        if rnd == phase.rounds:
            self.save_unet()
        return ndarrays_to_parameters(self.unet_weights), self._train_metrics

    def aggregate_label_rows(self, average: list[np.ndarray], results: Results,
                             uniform: bool, models: list[list[np.ndarray]]
                             ) -> list[np.ndarray]:
        """``label-embedding-aggregation=class-counts``: the class-embedding table of the
        average re-mixed row by row, row c weighted by each client's count of class c (its
        stats-round histogram), the null row like every other weight. ``models``: the
        replies' arrays, in the order of ``results``."""
        keys = list(unet_shell(self.cfg, self.data.channels, self.data.num_classes,
                               self.data.image_size).state_dict())
        at = keys.index("class_embedding.weight")
        none = np.zeros(self.data.num_classes)
        rows = [np.append(np.clip(self.histograms.get(self.partition_of.get(c.cid), none),
                                  0, None), 1.0 if uniform else float(r.num_examples))
                for c, r in results]
        tables = [arrays[at] for arrays in models]
        average[at] = rowwise_average(tables, np.stack(rows), average[at])
        return average

    def correct(self, phase: Phase, rnd: int) -> dict:
        """Server-side work on ``self.unet_weights`` after the aggregation of diffusion
        round ``rnd``, before the EMA and the grid; returns figures for the round's log."""
        return {}

    def deficit_plan(self, histograms: dict[int, np.ndarray]) -> dict[int, np.ndarray]:
        """Synthetic samples per class for each client: fill-to-max scaled by
        ``augment-ratio`` (methods.md, shared vocabulary)."""
        return {pid: fill_to_max(h, self.cfg.augment_ratio) for pid, h in histograms.items()}

    def generate(self, plan: dict[int, np.ndarray]) -> dict[int, Batch]:
        """Sample every client's deficits class-conditionally with the global UNet, in one
        seeded pass, and cut the result into per-client batches."""
        t0 = time.perf_counter()
        pids = sorted(plan)
        labels = [np.repeat(np.arange(len(plan[p])), plan[p]) for p in pids]
        all_labels = np.concatenate(labels) if labels else np.zeros(0, np.int64)
        log.info("generation: %d samples for %d clients (%s, %d steps)", len(all_labels),
                 len(pids), self.cfg.sampler, self.cfg.sampling_steps)
        unet = self.global_unet()
        images = sample(unet, build_sampler(self.cfg.sampler, self.scheduler), all_labels,
                        steps=self.cfg.sampling_steps, seed=derive_seed(self.cfg.seed, "generate"),
                        device=self.device, batch_size=self.cfg.generation_batch_size,
                        guidance_scale=self.cfg.guidance_scale,
                        precision=self.cfg.mixed_precision)
        cuts = np.cumsum([len(x) for x in labels])[:-1]
        batches = {p: (im, lab.astype(np.int64)) for p, im, lab in
                   zip(pids, np.split(images, cuts), labels)}
        self.record_generation(plan, images, all_labels, time.perf_counter() - t0)
        return batches

    # -------------------------------------------------------------- helpers
    def build_unet(self):
        return build_unet(self.cfg, self.data.channels, self.data.num_classes,
                          self.data.image_size, seed=derive_seed(self.cfg.seed, "unet-init"))

    def global_unet(self) -> UNet2DModel:
        """A UNet holding the weights sampling uses: the EMA when ``ema-decay`` > 0, else
        the current global weights (``diffusion-init`` as is, with diffusion-rounds = 0)."""
        if self.unet_weights is None:
            self.unet_weights = get_weights(self.build_unet())
        return self.unet_with(self.ema_weights if self.ema_weights is not None
                              else self.unet_weights)

    def unet_with(self, weights: list[np.ndarray]) -> UNet2DModel:
        """The run's UNet architecture holding ``weights``."""
        unet = unet_shell(self.cfg, self.data.channels, self.data.num_classes,
                          self.data.image_size)
        set_weights(unet, weights)
        return unet

    def judge(self) -> Judge | None:
        """The quality oracle on the server's real training images (None without)."""
        if self._judge is None and len(self.data.train_y):
            self._judge = Judge(self.data.train_x, self.data.train_y, self.data.num_classes,
                                seed=self.cfg.seed)
        return self._judge

    def sample_grid(self, rnd: int, last: bool) -> dict:
        """Every ``samples-every`` rounds and after the last: GRID_PER_CLASS samples per
        class from the current sampling weights (one fixed seed, so rounds compare) to
        ``samples/round-NNN.png``, and their fidelity."""
        every = self.cfg.samples_every
        if not every or (rnd % every and not last):
            return {}
        labels = np.repeat(np.arange(self.data.num_classes), self.GRID_PER_CLASS)
        images = sample(self.global_unet(), build_sampler(self.cfg.sampler, self.scheduler),
                        labels, steps=self.cfg.sampling_steps, progress=False,
                        seed=derive_seed(self.cfg.seed, "grid"), device=self.device,
                        guidance_scale=self.cfg.guidance_scale,
                        precision=self.cfg.mixed_precision)
        folder = self.recorder.out / "samples"
        folder.mkdir(exist_ok=True)
        plots.samples_grid(images, labels, self.data.classes, folder / f"round-{rnd:03d}.png",
                           per_class=self.GRID_PER_CLASS, title=f"global DDPM, diffusion round {rnd}")
        judge = self.judge()
        return {"fidelity": judge.fidelity(images, labels) if judge else None}

    def record_generation(self, plan, images, labels, seconds: float) -> None:
        """Counts per node, samples, fidelity (overall and per class) and the Fréchet
        distance to the real training images (None where the server holds no images)."""
        fidelity, per_class, fid = None, [None] * self.data.num_classes, None
        judge = self.judge()
        if judge is not None:
            fidelity, per_class, fid = judge.report(images, labels).values()
        none = np.zeros(self.data.num_classes, np.int64)
        counts = np.stack([plan.get(k, none) for k in self.roster.keys]) if plan \
            else np.zeros((0, self.data.num_classes), np.int64)
        self.recorder.set_generation(counts, labels, images, fidelity, per_class, seconds,
                                     frechet_distance=fid)
        log.info("generation: %d samples in %.1f s, fidelity %s, Fréchet distance %s",
                 len(labels), seconds, "n/a" if fidelity is None else f"{100 * fidelity:.1f}%",
                 "n/a" if fid is None or np.isnan(fid) else f"{fid:.2f}")

    def save_unet(self) -> None:
        """The global DDPM, loadable by stock diffusers (``DDPMPipeline.from_pretrained``)."""
        from diffusers import DDPMPipeline
        unet = self.global_unet()
        path = self.recorder.out / "ddpm"
        DDPMPipeline(unet=unet, scheduler=self.scheduler).save_pretrained(path)
        self.recorder.set_checkpoint(path)
