"""Server strategies: small subclasses of Flower's FedAvg, one per file."""

from strategies.collafuse import CollaFuse
from strategies.fed_diff_aug import FedDiffAug
from strategies.fedavg import FedAvgReal
from strategies.fedddpm import FedDDPM, FedDDPMPlus
from strategies.feddifrc import FedDifRC
from strategies.fedprox import FedProx
from strategies.gen_fedsd import GenFedSD
from strategies.phased import Phase, PhasedFedAvg

__all__ = ["CollaFuse", "FedAvgReal", "FedDDPM", "FedDDPMPlus", "FedDiffAug", "FedDifRC",
           "FedProx", "GenFedSD", "Phase", "PhasedFedAvg"]
