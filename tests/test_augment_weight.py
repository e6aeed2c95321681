"""augment-loss-weight: the cross-entropy of the rows a client adds to its own images
(synthetic, copied, noisy) weighted through a loss hook of the one classifier loop."""

import numpy as np
import torch

from clients import ClassifierClient
from clients.local import LocalData
from fedgen.classifier import train_classifier
from fedgen.losses import augment_weight
from fedgen.models import classifier_shell, get_weights
from fedgen.server_app import build_strategy
from tests.conftest import tiny_config


def test_the_hook_turns_the_batch_mean_into_a_weighted_mean():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, requires_grad=True)
    labels = torch.tensor([0, 1, 2, 0, 1])
    index = torch.tensor([7, 1, 4, 0, 9])        # rows >= 4 are added rows: 7, 4, 9
    batch = dict(logits=logits, labels=labels, index=index)
    base = torch.nn.functional.cross_entropy(logits, labels)
    total = base + augment_weight(num_real=4, weight=0.25)(None, batch)
    ce = torch.nn.functional.cross_entropy(logits, labels, reduction="none").detach()
    w = torch.tensor([0.25, 1.0, 0.25, 1.0, 0.25])
    assert torch.isclose(total, (w * ce).sum() / 5)
    # weight 0: only the own rows (1 and 0) carry gradient, each with 1/B of its CE's
    total = base + augment_weight(num_real=4, weight=0.0)(None, batch)
    total.backward()
    assert torch.all(logits.grad[[0, 2, 4]].abs() < 1e-7)
    assert torch.all(logits.grad[[1, 3]].abs().sum(1) > 0.01)
    # a batch of own rows only: the term is 0
    own = dict(logits=logits, labels=labels, index=torch.arange(5))
    assert float(augment_weight(num_real=5, weight=0.0)(None, own).detach()) == 0.0


def _train(labels: np.ndarray, images: np.ndarray, hooks) -> list[np.ndarray]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    train_classifier(model, images, labels, epochs=2, batch_size=8, lr=0.1, momentum=0.9,
                     weight_decay=0.0, seed=3, device=torch.device("cpu"), loss_hooks=hooks)
    return [p.detach().numpy().copy() for p in model.parameters()]


def test_at_weight_zero_the_added_rows_labels_do_not_matter():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (40, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 40)
    shuffled = labels.copy()
    shuffled[24:] = (labels[24:] + 1 + rng.integers(0, 9, 16)) % 10   # every added label wrong
    zero = [augment_weight(24, 0.0)]
    for a, b in zip(_train(labels, images, zero), _train(shuffled, images, zero)):
        assert np.allclose(a, b, atol=1e-6)
    half = [augment_weight(24, 0.5)]
    assert any(not np.allclose(a, b, atol=1e-4)
               for a, b in zip(_train(labels, images, half), _train(shuffled, images, half)))


def test_the_strategy_sends_the_weight_and_the_client_applies_it(tmp_path):
    cfg = tiny_config(tmp_path, arms="oversample", augment_loss_weight=0.25)
    strategy = build_strategy(cfg)
    classify = [p for p in strategy.phases if p.kind == "classify"][0]
    config = strategy.fit_config(classify, 1, 3)
    assert config["augment-loss-weight"] == 0.25
    local = LocalData.from_node(cfg, {"partition-id": 0}, run_id=0)
    client = ClassifierClient(local)
    assert len(client.loss_hooks(None, config)) == 1
    assert client.loss_hooks(None, {**config, "augment-loss-weight": 1.0}) == []
    start = get_weights(classifier_shell(cfg, local.data.channels, local.data.num_classes))
    fits = {w: client.fit(start, {**config, "augment-loss-weight": w}) for w in (0.25, 1.0)}
    assert fits[0.25][1] == fits[1.0][1] > len(local.labels)     # the same rows, copies added
    assert any(not np.allclose(a, b) for a, b in zip(fits[0.25][0], fits[1.0][0]))
