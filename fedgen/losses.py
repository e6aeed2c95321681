"""Loss hooks shared by the training loops (``train_ddpm`` and ``train_classifier`` take
``loss_hooks``: ``hook(model, batch) -> scalar``)."""

from __future__ import annotations

import torch


def proximal(model: torch.nn.Module, mu: float):
    """FedProx's drift term mu/2 ||w - w_global||^2 (Li et al., 2020, eq. 2), with
    ``w_global`` the model's weights at the time of the call (the global model the client
    just received)."""
    anchor = [p.detach().clone() for p in model.parameters()]

    def hook(m: torch.nn.Module, batch: dict) -> torch.Tensor:
        return 0.5 * mu * sum(((p - a) ** 2).sum() for p, a in zip(m.parameters(), anchor))

    return hook
