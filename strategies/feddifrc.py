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

from fedgen.config import ConfigError, RunConfig
from fedgen.stable_diffusion import check_sd_path
from strategies.fed_diff_aug import FedDiffAug
from strategies.phased import Phase


class FedDifRC(FedDiffAug):
    """With ``difrc-feature-source=ddpm`` the run's own federated DDPM stands in for Stable
    Diffusion: the diffusion phase then runs even without the diffusion arm, and the
    classify rounds also carry the folder the DDPM was saved to (``difrc-ddpm``)."""

    @classmethod
    def check_config(cls, cfg: RunConfig) -> None:
        super().check_config(cfg)
        if cfg.difrc_feature_source == "sd":
            check_sd_path(cfg.sd_model_path, "feddifrc")   # before any work
        elif cfg.diffusion_rounds == 0 and not cfg.diffusion_init:
            raise ConfigError("difrc-feature-source=ddpm needs a DDPM: diffusion-rounds > 0 "
                              "or diffusion-init")

    def plan(self) -> list[Phase]:
        phases = super().plan()
        if self.cfg.difrc_feature_source == "ddpm" and self.cfg.diffusion_rounds > 0 \
                and all(p.kind != "diffusion" for p in phases):
            stats, *rest = phases
            phases = [stats, Phase("diffusion", self.cfg.diffusion_rounds,
                                   sends_weights=True), *rest]
        return phases

    def fit_config(self, phase: Phase, rnd: int, server_round: int):
        config = super().fit_config(phase, rnd, server_round)
        if phase.kind == "classify":
            config.update({"difrc-ndcr-weight": self.cfg.difrc_ndcr_weight,
                           "difrc-tdcl-weight": self.cfg.difrc_tdcl_weight,
                           "difrc-tau": self.cfg.difrc_tau,
                           "difrc-tdcl-form": self.cfg.difrc_tdcl_form})
            if self.cfg.difrc_feature_source == "ddpm":
                config["difrc-ddpm"] = self.saved_ddpm()
        return config

    def saved_ddpm(self) -> str:
        """The absolute folder of the global DDPM (saved after the diffusion phase; here
        first if that phase did not run: diffusion-init as is)."""
        path = (self.recorder.out / "ddpm").resolve()
        if not (path / "unet" / "config.json").is_file():
            self.save_unet()
        return str(path)
