"""What leaves a client: every in-process run of the test suite (tests/conftest.py
``run_in_process``, used by each method's end-to-end test) asserts that no array a client
sent back is one of its images or a resized copy. Here: the checker itself."""

import numpy as np
import pytest
import torch

import fedgen.inprocess
from clients import PHASE_CLIENTS, DataClient
from fedgen.collafuse import noise_to_cut
from fedgen.data import load_data
from fedgen.models import build_scheduler
from fedgen.config import RunConfig
from tests.conftest import InProcessProxy, leaked_images, run_in_process, tiny_config


def test_checker_finds_copies_scaled_copies_and_resized_copies_only():
    images = load_data(RunConfig()).train_x[:50]
    as_float = images.astype(np.float32) / 127.5 - 1
    bigger = torch.nn.functional.interpolate(torch.as_tensor(as_float[:7]), size=(32, 32),
                                             mode="bilinear").numpy()
    assert leaked_images([images[:5]], images) == 5
    assert leaked_images([as_float[10:13]], images) == 3
    assert leaked_images([bigger], images) == 7
    noised = noise_to_cut(build_scheduler(RunConfig()), images, 200, seed=0)
    assert leaked_images([noised], images) == 0   # CollaFuse's x_c at the default cut
    small = torch.nn.functional.interpolate(torch.as_tensor(as_float[:4]), size=(4, 4),
                                            mode="area").numpy()
    assert leaked_images([small], images) == 4   # a thumbnail is a copy too
    noise = np.random.default_rng(0).uniform(-1, 1, (20, 1, 8, 8)).astype(np.float32)
    kernels = np.zeros((3, 1, 3, 3), np.float32)   # a conv layer's weights: not images
    assert leaked_images([noise, kernels], images) == 0


class EchoClient(DataClient):
    """A stats client that also sends its images back: what the suite must catch."""

    def fit(self, parameters, config):
        _, n, metrics = super().fit(parameters, config)
        return [self.local.images[:4]], n, metrics


def test_a_client_that_sends_its_images_fails_the_run_check(tmp_path):
    cfg = tiny_config(tmp_path, method="fedavg", arms="real")
    leaky = InProcessProxy("node-0", cfg, 0)
    fedgen.inprocess.InProcessProxy.__init__(leaky, "node-0", cfg, 0,
                                             {**PHASE_CLIENTS, "stats": EchoClient})
    with pytest.raises(AssertionError, match="node 0: 4 of its images left it"):
        run_in_process(cfg, [leaky, 1, 2])
