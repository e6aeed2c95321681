"""Classifier training and evaluation: plain PyTorch, no Flower.

One local training loop with loss hooks: FedProx-style or feature regularisers add a term
through ``loss_hooks`` instead of copying the loop.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from fedgen.data import to_float
from fedgen.models import autocast, penultimate

# hook(model, batch) -> scalar tensor. Classifier batches hold "images", "labels",
# "logits", "index" (LongTensor, on the training device: the rows of the ``images`` array
# given to train_classifier that make up the batch, so a hook can look up per-sample
# targets) and "features" (the penultimate embedding z, the input of the ResNet's ``fc``,
# in the autograd graph; None for a model without ``fc``).
LossHook = Callable[[torch.nn.Module, dict], torch.Tensor]


def train_classifier(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray, *,
                     epochs: int, batch_size: int, lr: float, momentum: float,
                     weight_decay: float, seed: int, device: torch.device,
                     loss_hooks: Sequence[LossHook] = (), precision: str = "no") -> dict:
    """SGD with cross-entropy on uint8 images; trains ``model`` in place. ``precision``
    "bf16": the forward pass under :func:`fedgen.models.autocast`, logits and features
    cast back to float32 for the loss and its hooks."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x_all = to_float(images).to(device)
    y_all = torch.as_tensor(labels, dtype=torch.long).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum,
                          weight_decay=weight_decay)
    model.to(device).train()
    total, steps = 0.0, 0
    with penultimate(model) as z:
        for _ in range(epochs):
            for idx in torch.randperm(len(x_all), generator=gen).split(batch_size):
                if len(idx) < 2 and len(x_all) >= 2:
                    continue  # BatchNorm cannot train on a batch of one
                idx = idx.to(device)
                x, y = x_all[idx], y_all[idx]
                with autocast(precision, device):
                    logits = model(x).float()
                loss = torch.nn.functional.cross_entropy(logits, y)
                features = None if z.value is None else z.value.float()
                batch = dict(images=x, labels=y, logits=logits, index=idx, features=features)
                for hook in loss_hooks:
                    loss = loss + hook(model, batch)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += loss.item()
                steps += 1
    return {"loss": total / max(steps, 1), "steps": steps}


def batch_logits(model: torch.nn.Module, images: np.ndarray, device: torch.device,
                 batch_size: int):
    """(first row, logits) of ``model`` in eval mode over ``images``, batch by batch."""
    model.to(device).eval()
    for start in range(0, len(images), batch_size):
        yield start, model(to_float(images[start:start + batch_size]).to(device))


@torch.no_grad()
def evaluate(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
             num_classes: int, device: torch.device, batch_size: int = 1000) -> dict:
    """Accuracy, loss and per-class accuracy in eval mode."""
    y_all = torch.as_tensor(labels, dtype=torch.long)
    preds, loss = [], 0.0
    for start, logits in batch_logits(model, images, device, batch_size):
        y = y_all[start:start + batch_size].to(device)
        loss += torch.nn.functional.cross_entropy(logits, y, reduction="sum").item()
        preds.append(logits.argmax(1).cpu())
    pred = torch.cat(preds).numpy()
    y_np = y_all.numpy()
    per_class = [float((pred[y_np == c] == c).mean()) if (y_np == c).any() else float("nan")
                 for c in range(num_classes)]
    return {"accuracy": float((pred == y_np).mean()), "loss": loss / max(len(y_np), 1),
            "per_class_accuracy": per_class}


@torch.no_grad()
def label_probability(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                      device: torch.device, batch_size: int = 1000) -> np.ndarray:
    """The softmax probability ``model`` (in eval mode) gives each row's label."""
    out = []
    for start, logits in batch_logits(model, images, device, batch_size):
        y = torch.as_tensor(labels[start:start + batch_size], dtype=torch.long, device=device)
        prob = torch.softmax(logits.float(), dim=1)
        out.append(prob.gather(1, y[:, None])[:, 0].cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def screen_added(model: torch.nn.Module, images: np.ndarray, labels: np.ndarray,
                 num_own: int, threshold: float, device: torch.device) -> np.ndarray:
    """Keep-mask of a training set whose first ``num_own`` rows are the client's own
    images and the rest added rows (synthetic, copied, noisy): own rows are always kept,
    an added row when ``model`` gives its label a probability of at least ``threshold``.

    The judge is whatever model the caller passes; the classifier client passes the global
    model it just received (federated: no central data), so a generated image that looks
    like another digit than its label says is left out.
    """
    keep = np.ones(len(labels), dtype=bool)
    if threshold > 0 and len(labels) > num_own:
        prob = label_probability(model, images[num_own:], labels[num_own:], device)
        keep[num_own:] = prob >= threshold
    return keep
