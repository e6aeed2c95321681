"""FedDifRC (Wang et al., ICCV 2025, "FedDifRC: Unlocking the Potential of Text-to-Image
Diffusion Models in Heterogeneous Federated Learning"; methods.md E): FedAvg whose clients
add two terms on the classifier's penultimate embedding, against features of a pretrained
Stable Diffusion UNet's decoder: NDCR (a KL pull toward the denoising features of the
noised image under its class prompt) and TDCL (InfoNCE toward the features under its own
class prompt, away from other classes' prompts).

Like :class:`strategies.fedprox.FedProx`, it runs every arm the core runs (its DDPM,
generation and classifier phases are :class:`FedDiffAug`'s), so FedDifRC + diffusion
augmentation is one command and ``arms=real`` is plain FedDifRC; only the classifier
rounds differ: their fit config carries the FedDifRC settings, and the clients'
:class:`clients.classifier_client.DifRCClassifierClient` adds the terms as loss hooks.
"""

from __future__ import annotations

from fedgen.config import RunConfig
from fedgen.stable_diffusion import check_sd_path
from strategies.fed_diff_aug import FedDiffAug
from strategies.phased import Phase


class FedDifRC(FedDiffAug):
    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        check_sd_path(cfg.sd_model_path, "feddifrc")   # before any work

    def fit_config(self, phase: Phase, rnd: int, server_round: int):
        config = super().fit_config(phase, rnd, server_round)
        if phase.kind == "classify":
            config.update({"difrc-ndcr-weight": self.cfg.difrc_ndcr_weight,
                           "difrc-tdcl-weight": self.cfg.difrc_tdcl_weight,
                           "difrc-tau": self.cfg.difrc_tau,
                           "difrc-tdcl-form": self.cfg.difrc_tdcl_form})
        return config
