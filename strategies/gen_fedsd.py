"""Gen-FedSD (methods.md B; seed 001): a pretrained text-to-image Stable Diffusion fills
each client's class gaps before FedAvg, one-shot.

No federated DDPM: after the stats round every client gets its fill-to-max deficits and
generates them itself from prompts with the class names (``sd-where=clients``, as in the
paper: only counts and names travel), or the server generates them on the clients' behalf
and ships the batches (``sd-where=server``; then the run also reports their fidelity and
Fréchet distance). Classification then runs as in :class:`FedDiffAug`, the synthetic arm
under the name ``diffusion``.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from fedgen.config import RunConfig
from fedgen.stable_diffusion import check_sd_path, load_pipeline, sd_batch
from strategies.fed_diff_aug import Batch, FedDiffAug
from strategies.phased import Phase, PhasedFedAvg

log = logging.getLogger(__name__)


class GenFedSD(FedDiffAug):
    """Stats round, one generation round (no DDPM phase), then the classifier arms."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        check_sd_path(cfg.sd_model_path)   # a missing or incomplete folder, before any work

    def plan(self) -> list[Phase]:
        stats, *classify = PhasedFedAvg.plan(self)
        if self.generative_arm not in self.arms:
            return [stats, *classify]
        return [stats, self.generation_phase(), *classify]

    def generation_kind(self) -> str:
        return "sd-generation" if self.cfg.sd_where == "clients" else "generation"

    def aggregators(self):
        return {**super().aggregators(), "sd-generation": self.aggregate_client_made}

    def client_deficits(self, plan: dict) -> dict:
        """A text-to-image model can make every class, absent ones included."""
        return plan

    def client_payload(self, counts: np.ndarray, key) -> list[np.ndarray]:
        return [counts]   # with the class names of the fit config: all a client needs

    def generate(self, plan: dict) -> dict[int, Batch]:
        """sd-where=server: every client's batch, made here with the client's own seed."""
        t0 = time.perf_counter()
        pipe = load_pipeline(self.cfg.sd_model_path, self.device)
        batches = {k: sd_batch(self.cfg, k, plan[k], self.data.classes, self.data.channels,
                               self.data.image_size, self.device, pipe=pipe)
                   for k in self.roster.keys if k in plan}
        images = np.concatenate([b[0] for b in batches.values()])
        labels = np.concatenate([b[1] for b in batches.values()])
        self.record_generation(plan, images, labels, time.perf_counter() - t0)
        return batches
