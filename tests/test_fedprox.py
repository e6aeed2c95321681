"""FedProx (Li et al. 2020): the drift term as a loss hook of the one classifier loop."""

import numpy as np
import torch
from flwr.common import parameters_to_ndarrays

from clients import ProximalClassifierClient
from fedgen.losses import proximal
from fedgen.server_app import build_strategy
from tests.conftest import run_in_process, tiny_config


def _update_norms(proxies) -> list[float]:
    norms = []
    for proxy in proxies:
        for ins, res in zip(proxy.received, proxy.replied):
            if ins.config["phase"] == "classify":
                sent = parameters_to_ndarrays(ins.parameters)
                got = parameters_to_ndarrays(res.parameters)
                norms.append(float(np.sqrt(sum(((g - s) ** 2).sum() for g, s in zip(got, sent)))))
    return norms


def test_fedprox_term_gradient_pulls_toward_the_global_weights():
    model = torch.nn.Linear(3, 2)
    hook = proximal(model, mu=0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)   # every weight 1 away from the anchor
    loss = hook(model, {})
    loss.backward()
    assert torch.isclose(loss, torch.tensor(0.5 * 0.5 * 8))   # 8 weights, each (1)^2
    for p in model.parameters():
        assert torch.allclose(p.grad, torch.full_like(p, 0.5))   # mu (w - w_global)


def test_fedprox_runs_every_arm_and_mu_shrinks_the_client_updates(tmp_path):
    every_arm = build_strategy(tiny_config(tmp_path / "all", method="fedprox"))
    assert [p.name for p in every_arm.phases] == [
        "stats", "diffusion", "generation:diffusion", "classify:real", "classify:oversample",
        "classify:noise", "classify:diffusion"]
    common = dict(method="fedprox", arms="real", classifier_rounds=1, lr=0.05)
    off, off_proxies = run_in_process(tiny_config(tmp_path / "off", proximal_mu=0.0, **common))
    on, on_proxies = run_in_process(tiny_config(tmp_path / "on", proximal_mu=5.0, **common))
    assert on_proxies[0].client.clients["classify"] is ProximalClassifierClient
    fit = [i for i in on_proxies[0].received if i.config["phase"] == "classify"][0]
    assert fit.config["proximal-mu"] == 5.0
    # the same seeds and data: only the drift term differs, and it shortens every update
    assert all(a < b for a, b in zip(_update_norms(on_proxies), _update_norms(off_proxies)))
    # mu = 0 is plain FedAvg: the real arm equals fed-diff-aug's
    plain, _ = run_in_process(tiny_config(tmp_path / "plain", **{**common, "method": "fed-diff-aug"}))
    assert off.recorder.results["arms"]["real"]["final_accuracy"] == \
        plain.recorder.results["arms"]["real"]["final_accuracy"]
