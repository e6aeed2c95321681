"""Plain FedAvg on real data only: the baseline every method is compared with."""

from __future__ import annotations

from strategies.phased import PhasedFedAvg


class FedAvgReal(PhasedFedAvg):
    """FedAvg of ResNet-18 on each client's real images (McMahan et al., 2017)."""

    supported_arms = ("real",)
