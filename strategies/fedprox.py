"""FedProx (Li et al. 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg
whose clients add the drift term mu/2 ||w - w_global||^2 to their classifier loss.

It runs every arm the core runs (its DDPM, generation and classifier phases are
:class:`FedDiffAug`'s), so FedProx + diffusion augmentation is one command; only the
classifier rounds differ: their fit config carries ``proximal-mu`` and the clients'
:class:`clients.classifier_client.ProximalClassifierClient` adds the term as a loss hook.
"""

from __future__ import annotations

from strategies.fed_diff_aug import FedDiffAug
from strategies.phased import Phase


class FedProx(FedDiffAug):
    def fit_config(self, phase: Phase, rnd: int, server_round: int):
        config = super().fit_config(phase, rnd, server_round)
        if phase.kind == "classify":
            config["proximal-mu"] = self.cfg.proximal_mu
        return config
