"""Central pretraining (fedgen.pretrain) and federated fine-tuning from its checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flwr.common import parameters_to_ndarrays

from conftest import run_in_process, tiny_config
from fedgen import pretrain
from fedgen.config import ConfigError, RunConfig
from fedgen.models import get_weights, load_unet

TINY_UNET = dict(unet_channels="8,16", diffusion_batch_size=64, sampling_steps=3)


def test_pretrain_writes_a_checkpoint_a_run_starts_from(tmp_path):
    cfg = RunConfig(**TINY_UNET)
    ckpt = tmp_path / "ckpt"
    info = pretrain.pretrain(cfg, epochs=3, out=ckpt, per_class=20)

    saved = json.loads((ckpt / "pretrain.json").read_text())
    assert [h["epoch"] for h in saved["history"]] == [1, 2, 3]
    assert saved["history"][-1]["loss"] < saved["history"][0]["loss"]
    assert 0.0 <= saved["fidelity"] <= 1.0 and saved["frechet_distance"] > 0
    assert saved == json.loads(json.dumps(info))
    assert (ckpt / "model_index.json").is_file() and (ckpt / "scheduler").is_dir()

    # Federated fine-tuning: the first diffusion round ships exactly the checkpoint.
    unet = load_unet(str(ckpt), 1, 10, 8)
    run_cfg = tiny_config(tmp_path, **TINY_UNET, arms="diffusion", diffusion_init=str(ckpt))
    _, proxies = run_in_process(run_cfg)
    first = next(ins for ins in proxies[0].received if ins.config.get("phase") == "diffusion")
    shipped = parameters_to_ndarrays(first.parameters)
    expected = get_weights(unet)
    assert len(shipped) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(shipped, expected))


def test_pretraining_is_seeded(tmp_path):
    cfg = RunConfig(**TINY_UNET, seed=3)
    pretrain.pretrain(cfg, epochs=1, out=tmp_path / "a", per_class=0)
    pretrain.pretrain(cfg, epochs=1, out=tmp_path / "b", per_class=0)
    a = get_weights(load_unet(str(tmp_path / "a"), 1, 10, 8))
    b = get_weights(load_unet(str(tmp_path / "b"), 1, 10, 8))
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_a_checkpoint_of_another_size_is_refused(tmp_path):
    pretrain.pretrain(RunConfig(**TINY_UNET, image_size=16), epochs=1,
                      out=tmp_path / "px16", per_class=0)
    with pytest.raises(ConfigError, match=r"\(1, 10, 16\).*\(1, 10, 8\)"):
        load_unet(str(tmp_path / "px16"), 1, 10, 8)


def test_cli_refuses_bad_input_before_training(tmp_path, capsys):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "pretrain.json").write_text("{}")
    assert pretrain.main(["--out", str(out)]) == 2
    assert "already holds a checkpoint" in capsys.readouterr().err
    assert (out / "pretrain.json").read_text() == "{}"   # nothing overwritten
    assert pretrain.main(["--set", "alhpa=1", "--out", str(tmp_path / "x")]) == 2
    assert "alhpa" in capsys.readouterr().err
    assert pretrain.main(["--epochs", "0", "--out", str(tmp_path / "x")]) == 2
    assert pretrain.main(["--set", "dataset=cifar10", "--set", "data-dir=/nonexistent",
                          "--out", str(tmp_path / "x")]) == 2
    assert "/nonexistent" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
