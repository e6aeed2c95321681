"""Gen-FedSD (methods.md B): a local Stable Diffusion pipeline fills the class gaps.
A tiny random pipeline is built from configs and loaded by path (nothing is downloaded)."""

import json
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays

import fedgen.stable_diffusion as sd
from clients.local import SyntheticStore
from fedgen.balancing import fill_to_max
from fedgen.config import ConfigError
from fedgen.methods import method_for
from tests.conftest import ROOT, run_in_process, tiny_config

CPU = torch.device("cpu")
FAST = dict(sd_steps=2, sd_resolution=16, sd_batch_size=16)


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    return sd.build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


class FakePipe:
    """Records the prompts and generators; returns a flat image per prompt."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompts, *, generator, height, width, **kw):
        self.calls.append(list(prompts))
        value = [g.initial_seed() % 255 / 255 for g in generator]
        images = np.stack([np.full((32, 32, 3), v, np.float32) for v in value])
        return SimpleNamespace(images=images)


def test_deficits_map_to_prompts_with_class_names_and_templates(tmp_path):
    pipe = FakePipe()
    kw = dict(templates=["a {}", "b {}"], seed=7, steps=2, guidance_scale=7.5,
              resolution=32, channels=1, image_size=8, batch_size=2, device=CPU)
    images, labels = sd.fill_deficits(tmp_path, np.array([0, 2, 0, 3]),
                                      ["zero", "one", "two", "three"], pipe=pipe, **kw)
    assert pipe.calls == [["a one", "b one"], ["a three", "b three"], ["a three"]]
    assert labels.tolist() == [1, 1, 3, 3, 3]
    assert images.shape == (5, 1, 8, 8) and images.dtype == np.uint8
    # image i of a class has its own seed: the same whatever the batch size
    again, _ = sd.fill_deficits(tmp_path, np.array([0, 2, 0, 3]),
                                ["zero", "one", "two", "three"], pipe=FakePipe(),
                                **{**kw, "batch_size": 5})
    assert np.array_equal(images, again)
    # a cache answers a rerun without calling the pipeline; more images only add the rest
    cache = sd.SDCache(tmp_path / "cache")
    first, _ = sd.fill_deficits(tmp_path, np.array([0, 2]), ["zero", "one"], pipe=pipe,
                                cache=cache, **kw)
    pipe.calls.clear()
    more, _ = sd.fill_deficits(tmp_path, np.array([0, 3]), ["zero", "one"], pipe=pipe,
                               cache=cache, **kw)
    assert pipe.calls == [["a one"]] and np.array_equal(more[:2], first)


def test_missing_or_incomplete_sd_folder_is_a_clear_error(tmp_path, sd_path):
    with pytest.raises(ConfigError, match="sd-model-path: method gen-fedsd needs"):
        method_for(tiny_config(tmp_path, method="gen-fedsd"))
    with pytest.raises(ConfigError, match="no such folder"):
        method_for(tiny_config(tmp_path, method="gen-fedsd", sd_model_path=str(tmp_path / "x")))
    broken = tmp_path / "broken"
    shutil.copytree(sd_path, broken)
    shutil.rmtree(broken / "unet")
    for f in (broken / "vae").glob("*.safetensors"):
        f.unlink()
    with pytest.raises(ConfigError) as exc:
        method_for(tiny_config(tmp_path, method="gen-fedsd", sd_model_path=str(broken)))
    assert "unet/config.json (the denoising UNet)" in str(exc.value)
    assert "vae/ weights" in str(exc.value) and "tokenizer" not in str(exc.value)
    # from the command line: exit 2, one line, no traceback, nothing started
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "run_simulation.py", "--config",
                           "configs/smoke.toml", "--set", "method=gen-fedsd", "--set",
                           f"sd-model-path={broken}", "--set", f"out-dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "missing unet/config.json" in proc.stderr and not out.exists()


def test_gen_fedsd_on_clients_sends_only_counts_and_matches_the_server_side(
        tmp_path, sd_path, monkeypatch):
    saved = {}
    save = SyntheticStore.save

    def spy(self, name, images, labels):
        saved.setdefault(self.root.parent.parent.name, {})[self.root.name] = (images, labels)
        save(self, name, images, labels)

    monkeypatch.setattr(SyntheticStore, "save", spy)
    common = dict(method="gen-fedsd", arms="diffusion", sd_model_path=str(sd_path),
                  sd_cache_dir=str(tmp_path / "sd-cache"), **FAST)
    strategy, proxies = run_in_process(tiny_config(tmp_path / "clients", **common))
    assert [p.kind for p in strategy.phases] == ["stats", "sd-generation", "classify"]
    for proxy in proxies:
        (ins,) = [i for i in proxy.received if i.config["phase"] == "sd-generation"]
        (counts,) = parameters_to_ndarrays(ins.parameters)   # counts, nothing else
        node = proxy.client.local.node
        assert counts.tolist() == fill_to_max(strategy.histograms[node], 0.3).tolist()
        assert ins.config["class-names"] == ",".join(str(c) for c in range(10))
        (res,) = [r for r, i in zip(proxy.replied, proxy.received) if i is ins]
        assert res.parameters.tensors == [] and res.metrics["made"] == counts.sum()
    res = json.loads((tmp_path / "clients" / "out" / "results.json").read_text())
    assert res["generation"]["where"] == "clients (sd-generation)"
    assert res["arms"]["diffusion"]["train_samples_per_round"] == 1437 + res["generation"]["total"]

    # the server side makes the same batches (same seeds), from the cache, and scores them
    monkeypatch.setattr(sd, "load_pipeline", lambda *a: pytest.fail("cache missed"))
    import strategies.gen_fedsd as gen
    monkeypatch.setattr(gen, "load_pipeline", lambda *a: None)
    server, _ = run_in_process(tiny_config(tmp_path / "server", sd_where="server", **common))
    assert [p.kind for p in server.phases][1] == "generation"
    gen_res = server.recorder.results["generation"]
    assert 0 <= gen_res["fidelity"] <= 1 and len(gen_res["per_class_fidelity"]) == 10
    for part, (images, labels) in saved["clients"].items():
        other_images, other_labels = saved["server"][part]
        assert np.array_equal(images, other_images) and np.array_equal(labels, other_labels)
