"""The algorithm registry: config key ``method`` -> server strategy + client handlers.

A new method lands here as one entry: a strategy subclass, and, where its clients differ,
a client class registered for the phase it changes (for example a ClassifierClient
subclass with a loss hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from flwr.client import NumPyClient

from clients import (PHASE_CLIENTS, CollaFuseClient, CollaFuseGenerationClient,
                     DiffusionClient, DifRCClassifierClient, ProximalClassifierClient,
                     SDClient)
from fedgen import privacy
from fedgen.config import ConfigError, RunConfig
from strategies import (CollaFuse, FedAvgReal, FedDDPM, FedDDPMPlus, FedDiffAug, FedDifRC,
                        FedProx, GenFedSD, PhasedFedAvg)

# FedDDPM's extra phase: each client trains its local DDPM once (the same client class).
LOCAL_DDPM_CLIENTS = {**PHASE_CLIENTS, "local-ddpm": DiffusionClient}


@dataclass(frozen=True)
class Method:
    strategy: type[PhasedFedAvg]
    summary: str
    clients: Mapping[str, type[NumPyClient]] = field(default_factory=lambda: PHASE_CLIENTS)


METHODS: dict[str, Method] = {
    "fed-diff-aug": Method(FedDiffAug, "federated DDPM + class-balancing augmentation "
                                       "(methods.md A)"),
    "fedavg": Method(FedAvgReal, "FedAvg on real data only"),
    "fedddpm": Method(FedDDPM, "federated DDPM corrected on the server with D_aux sampled "
                               "from the clients' local DDPMs after every round (methods.md C)",
                      LOCAL_DDPM_CLIENTS),
    "fedddpm-plus": Method(FedDDPMPlus, "FedDDPM+: the D_aux correction only when the "
                                        "held-out loss stalls (methods.md C)",
                           LOCAL_DDPM_CLIENTS),
    "gen-fedsd": Method(GenFedSD, "a pretrained Stable Diffusion (sd-model-path) fills each "
                                  "client's class gaps from prompts, one-shot (methods.md B)",
                        {**PHASE_CLIENTS, "sd-generation": SDClient}),
    "fedprox": Method(FedProx, "FedProx: every arm of fed-diff-aug with the drift term "
                               "proximal-mu on the classifier's local loss (Li et al. 2020)",
                      {**PHASE_CLIENTS, "classify": ProximalClassifierClient}),
    "collafuse": Method(CollaFuse, "CollaFuse: split-learning DDPM, a private client "
                                   "denoiser below cut-ratio and one shared server denoiser "
                                   "above it; clients finish their own deficits (methods.md D)",
                        {**PHASE_CLIENTS, "collafuse": CollaFuseClient,
                         "collafuse-generation": CollaFuseGenerationClient}),
    "feddifrc": Method(FedDifRC, "FedDifRC: every arm of fed-diff-aug with NDCR + TDCL on the "
                                 "classifier's embedding, toward Stable Diffusion decoder "
                                 "features from sd-model-path (methods.md E)",
                       {**PHASE_CLIENTS, "classify": DifRCClassifierClient}),
}


def method_for(cfg: RunConfig) -> Method:
    """The registry entry of ``cfg.method``; an unknown name is a ConfigError naming the
    registered ones (the registry, not the config schema, knows which exist), and so are
    settings the method cannot run with (its strategy's ``check_config``)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: unknown value {cfg.method!r}; allowed: "
                          f"{', '.join(METHODS)}")
    METHODS[cfg.method].strategy.check_config(cfg)
    privacy.check(cfg)
    return METHODS[cfg.method]
