"""Flower client that trains the global ResNet-18 on the local training set of one arm."""

from __future__ import annotations

import json
import logging
from typing import Callable

import numpy as np
import torch
from flwr.client import NumPyClient

from clients.local import LocalData
from fedgen.balancing import fill_to_max, noise_fill, oversample
from fedgen.classifier import LossHook, evaluate, screen_added, train_classifier
from fedgen.difrc import Settings, Targets, node_targets
from fedgen.losses import augment_weight, ndcr_hook, proximal, tdcl_hook
from fedgen.models import classifier_shell, get_weights, set_weights
from fedgen.seeds import derive_seed

log = logging.getLogger(__name__)

Arrays = tuple[np.ndarray, np.ndarray]


def real_only(local: LocalData, arm: str) -> Arrays:
    return local.images, local.labels


def _with_extra(local: LocalData, extra: Arrays) -> Arrays:
    return (np.concatenate([local.images, extra[0]]),
            np.concatenate([local.labels, extra[1]]))


def _own_fill_inputs(local: LocalData, arm: str) -> tuple[np.ndarray, np.random.Generator]:
    """The client's fill-to-max deficits and a generator seeded by (seed, arm, partition)."""
    rng = np.random.default_rng(derive_seed(local.cfg.seed, arm, local.node))
    return fill_to_max(local.histogram, local.cfg.augment_ratio), rng


def with_oversampling(local: LocalData, arm: str) -> Arrays:
    """Present classes topped up by the fill-to-max deficits, copies of own images."""
    deficits, rng = _own_fill_inputs(local, arm)
    return _with_extra(local, oversample(local.images, local.labels, deficits, rng))


def with_noisy_copies(local: LocalData, arm: str) -> Arrays:
    """The same deficits filled with own images plus Gaussian pixel noise."""
    deficits, rng = _own_fill_inputs(local, arm)
    return _with_extra(local, noise_fill(local.images, local.labels, deficits,
                                         local.cfg.noise_sigma, rng))


def with_received(local: LocalData, arm: str) -> Arrays:
    """Real images plus the synthetic batch the server shipped for ``arm``."""
    extra = local.store.load(arm)
    if extra is None:   # the generation round stores a batch for every node, empty or not
        raise MissingBatchError(
            f"node {local.node} has no synthetic batch for arm {arm!r} in "
            f"{local.store.root}: it missed that arm's generation round, or the folder was "
            f"removed (a cache-dir shared by two runs at once?); not training on real data "
            f"alone under the {arm!r} label")
    return _with_extra(local, extra)


class MissingBatchError(RuntimeError):
    """A node was asked to train an arm whose synthetic batch it does not hold."""


# Arm -> the local training set it trains on. New generative arms reuse with_received.
TRAINING_SETS: dict[str, Callable[[LocalData, str], Arrays]] = {
    "real": real_only,
    "oversample": with_oversampling,
    "noise": with_noisy_copies,
    "diffusion": with_received,
}


class ClassifierClient(NumPyClient):
    """Unpack the global ResNet-18, train it on this arm's local set, pack the result.

    Fit config: ``arm``, ``epochs``, ``batch-size``, ``lr``, ``seed``.
    """

    training_sets = TRAINING_SETS

    def __init__(self, local: LocalData):
        self.local = local

    def loss_hooks(self, model, config: dict) -> list[LossHook]:
        """Extra terms for the local loss of ``model`` (which holds the global weights
        when this is called). Here only the weight of the added rows (fit config
        ``augment-loss-weight``, 1 = off); FedProx/FedDifRC-style methods extend this
        instead of copying the loop."""
        weight = float(config.get("augment-loss-weight", 1.0))
        return [augment_weight(len(self.local.labels), weight)] if weight != 1.0 else []

    def fit(self, parameters, config):
        loc, cfg = self.local, self.local.cfg
        arm = str(config["arm"])
        if arm not in self.training_sets:
            raise ValueError(f"unknown arm {arm!r}; allowed: {', '.join(self.training_sets)}")
        images, labels = self.training_sets[arm](loc, arm)
        model = classifier_shell(cfg, loc.data.channels, loc.data.num_classes)
        set_weights(model, parameters)
        images, labels, dropped = self.screen(model, images, labels, config)
        hooks = self.loss_hooks(model, config)
        stats = train_classifier(model, images, labels, epochs=int(config["epochs"]),
                                 batch_size=int(config["batch-size"]), lr=float(config["lr"]),
                                 momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                                 seed=loc.seed(int(config["seed"])), device=loc.device,
                                 loss_hooks=hooks, precision=cfg.mixed_precision)
        for hook in hooks:   # hooks that keep their mean value report it (losses.TermHook)
            stats.update(getattr(hook, "metrics", dict)())
        return get_weights(model), len(labels), {**stats, "samples": len(labels),
                                                 "augment-dropped": dropped}

    def screen(self, model, images: np.ndarray, labels: np.ndarray,
               config: dict) -> tuple[np.ndarray, np.ndarray, int]:
        """The rows this round trains on, and how many added rows were left out: those
        the server's ``synthetic-keep`` mask leaves out (packed bits, one per added row:
        strategies.FedDiffAug.screen_synthetic), and, with ``augment-filter`` > 0 from
        round ``augment-filter-from`` on, the added rows whose label ``model`` (the global
        weights just received) gives a probability below it
        (:func:`fedgen.classifier.screen_added`)."""
        own = len(self.local.labels)
        keep = np.ones(len(labels), dtype=bool)
        if "synthetic-keep" in config:
            bits = np.frombuffer(bytes(config["synthetic-keep"]), dtype=np.uint8)
            added = len(labels) - own
            if len(bits) != (added + 7) // 8:
                raise ValueError(f"synthetic-keep: a mask for {8 * len(bits)} rows at most, "
                                 f"but node {self.local.node} holds {added} added rows")
            keep[own:] = np.unpackbits(bits, count=added).astype(bool)
        threshold = float(config.get("augment-filter", 0.0))
        start = int(config.get("augment-filter-from", 2))
        if threshold > 0 and int(config.get("round", 1)) >= start:
            keep &= screen_added(model, images, labels, own, threshold, self.local.device)
        return images[keep], labels[keep], int((~keep).sum())

    def evaluate(self, parameters, config):
        """The global model on this node's held-out test images (evaluation=clients/both):
        accuracy, loss, and per-class correct/total counts the server pools."""
        loc = self.local
        model = classifier_shell(loc.cfg, loc.data.channels, loc.data.num_classes)
        set_weights(model, parameters)
        counts = np.bincount(loc.test_labels, minlength=loc.data.num_classes)
        if not len(loc.test_labels):
            return 0.0, 0, {"accuracy": 0.0, "class-correct": json.dumps([0] * len(counts)),
                            "class-count": json.dumps(counts.tolist())}
        res = evaluate(model, loc.test_images, loc.test_labels, loc.data.num_classes,
                       loc.device)
        correct = [int(round(a * n)) if n else 0
                   for a, n in zip(res["per_class_accuracy"], counts)]
        return res["loss"], len(loc.test_labels), {
            "accuracy": res["accuracy"], "class-correct": json.dumps(correct),
            "class-count": json.dumps(counts.tolist())}


class ProximalClassifierClient(ClassifierClient):
    """FedProx's client: the same loop, plus the drift term toward the global weights it
    received (fit config ``proximal-mu``; 0 = off)."""

    def loss_hooks(self, model, config: dict) -> list[LossHook]:
        mu = float(config.get("proximal-mu", 0.0))
        return [*super().loss_hooks(model, config), *([proximal(model, mu)] if mu > 0 else [])]


class DifRCClassifierClient(ClassifierClient):
    """FedDifRC's client (Wang et al. 2025, methods.md E): the same loop, plus NDCR and
    TDCL on the penultimate embedding against this node's diffusion targets.

    Fit config: ``difrc-ndcr-weight``, ``difrc-tdcl-weight`` (0 = that term off),
    ``difrc-tau``, ``difrc-tdcl-form``. The targets belong to the node's own images, in
    the order it holds them (:func:`fedgen.difrc.node_targets`: built with the local
    ``sd-model-path`` pipeline on first use, then read from ``difrc-cache-dir``); the
    PCA sample comes from the data set the node loaded (the run's, or its site folder).
    Rows after the node's own images (synthetic or copied) get no diffusion term. With
    ``difrc-feature-source=ddpm`` the representation model is the run's DDPM, read from
    the folder the fit config names (``difrc-ddpm``).
    """

    def loss_hooks(self, model, config: dict) -> list[LossHook]:
        hooks = super().loss_hooks(model, config)
        w_ndcr = float(config.get("difrc-ndcr-weight", 0.0))
        w_tdcl = float(config.get("difrc-tdcl-weight", 0.0))
        if not (w_ndcr or w_tdcl):
            return hooks
        targets, dev = self.targets(config), self.local.device
        if w_ndcr:
            hooks.append(ndcr_hook(torch.as_tensor(targets.r_d, device=dev), w_ndcr))
        if w_tdcl:
            hooks.append(tdcl_hook(torch.as_tensor(targets.r_c, device=dev),
                                   float(config["difrc-tau"]), str(config["difrc-tdcl-form"]),
                                   w_tdcl))
        return hooks

    def targets(self, config: dict) -> Targets:
        """This node's targets; with difrc-feature-source=ddpm from the DDPM the server
        saved (fit config ``difrc-ddpm``)."""
        loc = self.local
        if loc.cfg.difrc_feature_source == "ddpm" and not config.get("difrc-ddpm"):
            raise ValueError("difrc-feature-source=ddpm: the fit config names no saved DDPM "
                             "(difrc-ddpm)")
        settings = Settings.from_config(loc.cfg, str(config.get("difrc-ddpm", "")))
        return node_targets(settings, loc.images, loc.labels,
                            reference=(loc.data.train_x, loc.data.train_y),
                            classes=loc.data.classes, device=loc.device,
                            cache_dir=loc.cfg.difrc_cache_dir)
