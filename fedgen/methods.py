"""The algorithm registry: config key ``method`` -> server strategy + client handlers.

A new method lands here as one entry: a strategy subclass, and, where its clients differ,
a client class registered for the phase it changes (for example a ClassifierClient
subclass with a loss hook).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

from flwr.client import NumPyClient

from clients import PHASE_CLIENTS, DiffusionClient
from fedgen.config import ConfigError, RunConfig
from strategies import FedAvgReal, FedDDPM, FedDDPMPlus, FedDiffAug, PhasedFedAvg

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
}


def method_for(cfg: RunConfig) -> Method:
    """The registry entry of ``cfg.method``; an unknown name is a ConfigError naming the
    registered ones (the registry, not the config schema, knows which exist)."""
    if cfg.method not in METHODS:
        raise ConfigError(f"method: unknown value {cfg.method!r}; allowed: "
                          f"{', '.join(METHODS)}")
    return METHODS[cfg.method]
