"""FedDifRC (methods.md E): Stable Diffusion decoder features as targets of two loss hooks
of the one classifier loop. Tiny random pipelines are built from configs (no weights exist
here), so only shapes, caching, the loss formulas and the plumbing are tested."""

import math
import shutil
import threading

import numpy as np
import pytest
import torch
from flwr.common import parameters_to_ndarrays
from PIL import Image

import fedgen.difrc as difrc
from clients import DifRCClassifierClient
from fedgen.classifier import train_classifier
from fedgen.config import ConfigError, RunConfig
from fedgen.data import load_data
from fedgen.losses import ndcr, ndcr_hook, tdcl, tdcl_batch_pooled, tdcl_hook
from fedgen.methods import method_for
from fedgen.models import build_classifier
from fedgen.simulation import main
from fedgen.stable_diffusion import build_tiny_pipeline
from tests.conftest import ROOT, run_in_process, tiny_config

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def sd_path(tmp_path_factory):
    """The tiny pipeline of ``python -m fedgen.stable_diffusion --tiny`` (2 UNet levels:
    up-block 1 only, 32 channels)."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd") / "tiny-sd")


@pytest.fixture(scope="module")
def sd4_path(tmp_path_factory):
    """Four UNet levels, as SD has: up-blocks 1-3 give 96 / 64 / 32 channels."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("sd4") / "tiny-sd4",
                               unet_channels=(32, 64, 96, 128))


@pytest.fixture(scope="module")
def digits():
    return load_data(RunConfig())


def _settings(path, **changes):
    values = dict(model_path=str(path), resolution=16, feature_t=150, negatives=3,
                  pca_sample=16, prompt="a photo of a {}", seed=0)
    return difrc.Settings(**{**values, **changes})


# ------------------------------------------------------------------ the shared loop
def test_train_classifier_batches_carry_index_and_features():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 10)
    model = build_classifier(RunConfig(), 1, 10, seed=0)
    seen = []

    def spy(m, batch):
        z = batch["features"]
        assert z.shape == (len(batch["labels"]), 512) and z.requires_grad
        assert torch.allclose(m.fc(z), batch["logits"])   # z is the input of fc
        assert batch["index"].dtype == torch.long
        assert torch.equal(batch["images"], (torch.as_tensor(images)[batch["index"]]
                                             .float() / 127.5 - 1))
        seen.append(batch["index"].clone())
        return z.new_zeros(())

    train_classifier(model, images, labels, epochs=1, batch_size=4, lr=0.1, momentum=0,
                     weight_decay=0, seed=0, device=CPU, loss_hooks=[spy])
    assert sorted(torch.cat(seen).tolist()) == list(range(10))   # batches of 4, 4, 2
    assert not model.fc._forward_pre_hooks                       # the capture is removed


# ------------------------------------------------------------------ the losses, by hand
def _softmax(v):
    e = [math.exp(x) for x in v]
    return [x / sum(e) for x in e]


def _unit(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def _cos(a, b):
    return sum(x * y for x, y in zip(_unit(a), _unit(b)))


Z = [[1.0, 2.0, -1.0], [0.5, -1.0, 2.0]]
POS = [[1.0, 1.0, 0.0], [0.0, -1.0, 1.0]]
NEG = [[[0.0, 1.0, 1.0], [-1.0, 0.0, 2.0]], [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]]]


def test_ndcr_matches_the_hand_formula():
    expected = 0.0
    for z, r in zip(Z, POS):
        p, q = _softmax(_unit(r)), _softmax(_unit(z))
        expected += sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q)) / len(Z)
    got = ndcr(torch.tensor(Z), torch.tensor(POS))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # it is what the released code computes (KLDivLoss, batchmean, of log_softmax(z/|z|))
    z, r = torch.nn.functional.normalize(torch.tensor(Z), dim=1), \
        torch.nn.functional.normalize(torch.tensor(POS), dim=1)
    kl = torch.nn.KLDivLoss(reduction="batchmean")(torch.log_softmax(z, 1), torch.softmax(r, 1))
    assert got.item() == pytest.approx(kl.item(), rel=1e-5)


def test_tdcl_per_sample_matches_the_hand_formula():
    tau = 0.5
    expected = 0.0
    for z, pos, negs in zip(Z, POS, NEG):
        e_pos = math.exp(_cos(z, pos) / tau)
        e_all = e_pos + sum(math.exp(_cos(z, n) / tau) for n in negs)
        expected += -math.log(e_pos / e_all) / len(Z)
    got = tdcl(torch.tensor(Z), torch.tensor(POS), torch.tensor(NEG), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_tdcl_batch_pooled_is_the_released_codes_misaligned_form():
    """B = 2, K = 2: rows z0.p0, z1.p1, then z tiled against the negatives sample by
    sample: z0.n00, z1.n01 (sample 0's negative!), z0.n10 (sample 1's!), z1.n11."""
    tau = 0.5
    pairs = [(Z[0], NEG[0][0]), (Z[1], NEG[0][1]), (Z[0], NEG[1][0]), (Z[1], NEG[1][1])]
    e_pos = [math.exp(_cos(Z[i], POS[i]) / tau) for i in range(2)]
    e_neg = [math.exp(_cos(z, n) / tau) for z, n in pairs]
    expected = -math.log(sum(e_pos) / (sum(e_pos) + sum(e_neg)))
    got = tdcl_batch_pooled(torch.tensor(Z), torch.tensor(POS), torch.tensor(NEG), tau)
    assert got.item() == pytest.approx(expected, rel=1e-5)
    # the released calculate_infonce, written out: the same number
    f_now = torch.tensor(Z).repeat(3, 1)
    f_proto = torch.cat([torch.tensor(POS), torch.tensor(NEG).reshape(-1, 3)])
    e = torch.exp(torch.cosine_similarity(f_now, f_proto, dim=1) / tau)
    assert got.item() == pytest.approx(-math.log(e[:2].sum() / e.sum()), rel=1e-5)
    # with one sample the two forms agree
    one = [torch.tensor(a)[:1] for a in (Z, POS, NEG)]
    assert tdcl_batch_pooled(*one, tau).item() == pytest.approx(tdcl(*one, tau).item())


def test_hooks_give_synthetic_rows_no_diffusion_term():
    """Rows 0-2 are the client's images (they have targets); 3+ are appended ones."""
    r_d = torch.randn(3, 4)
    r_c = torch.randn(3, 3, 4)
    z = torch.randn(4, 4, requires_grad=True)
    index = torch.tensor([0, 4, 2, 5])
    real = torch.tensor([0, 2])
    batch = {"features": z, "index": index}
    hook = ndcr_hook(r_d, weight=2.0)
    value = hook(None, batch)
    assert value.item() == pytest.approx(2 * ndcr(z[real], r_d[[0, 2]]).item())
    value.backward()
    assert z.grad[[1, 3]].abs().sum() == 0 and z.grad[[0, 2]].abs().sum() > 0
    for form, fn in (("per-sample", tdcl), ("batch-pooled", tdcl_batch_pooled)):
        got = tdcl_hook(r_c, 0.06, form)(None, batch)
        r = r_c[[0, 2]]
        assert got.item() == pytest.approx(fn(z[real], r[:, 0], r[:, 1:], 0.06).item())
    synthetic_only = {"features": z, "index": torch.tensor([3, 4, 5, 6])}
    assert hook(None, synthetic_only).item() == 0
    assert hook.calls == 1 and set(hook.metrics()) == {"ndcr"}


# ------------------------------------------------------------------ the feature builder
def test_fused_targets_are_512_d_zero_padded_and_seeded(tmp_path, sd4_path, digits):
    s = _settings(sd4_path)
    x, y = digits.train_x[:6], digits.train_y[:6]
    t = difrc.node_targets(s, x, y, reference=(digits.train_x, digits.train_y),
                           classes=digits.classes, device=CPU, cache_dir=tmp_path)
    assert t.r_d.shape == (6, 512) and t.r_c.shape == (6, 4, 512) and t.slots.shape == (6, 4)
    assert (t.slots[:, 0] == y).all()
    assert all(len(set(row)) == 4 for row in t.slots)           # distinct negatives
    # up-blocks 1 / 2 / 3 have 96 / 64 / 32 channels: PCA keeps what exists, zero-pads
    for r in (t.r_d, t.r_c.reshape(-1, 512)):
        for start, have, width in ((0, 96, 256), (256, 64, 128), (384, 32, 128)):
            assert (r[:, start:start + have] != 0).any(axis=0).mean() > 0.9
            assert (r[:, start + have:start + width] == 0).all()
        assert (r >= 0).all()                                   # L2 norms over space
    (basis,) = tmp_path.glob("basis-*.npz")
    with np.load(basis) as f:
        shapes = {k: f[k].shape for k in f.files if k.endswith("components")}
    assert shapes == {"noise/1/components": (96, 96), "noise/2/components": (64, 64),
                      "noise/3/components": (32, 32), "text/1/components": (96, 96),
                      "text/2/components": (64, 64), "text/3/components": (32, 32)}
    # all other classes when there are no more than difrc-negatives
    many = difrc.negatives(y, 10, 10, seed=1)
    assert many.shape == (6, 10) and all(sorted(r) == list(range(10)) for r in many)


def test_basis_is_fitted_once_and_a_rerun_needs_no_pipeline(tmp_path, sd_path, digits,
                                                            monkeypatch):
    fits = []
    fit = difrc.fit_basis
    monkeypatch.setattr(difrc, "fit_basis", lambda *a, **k: fits.append(1) or fit(*a, **k))
    s = _settings(sd_path, negatives=1, pca_sample=8)
    ref = (digits.train_x, digits.train_y)
    nodes = [(digits.train_x[k:k + 4], digits.train_y[k:k + 4]) for k in (0, 4, 8)]
    out = {}

    def node(k):   # three nodes start at once: one fits the basis, the others wait
        out[k] = difrc.node_targets(s, *nodes[k], reference=ref, classes=digits.classes,
                                    device=CPU, cache_dir=tmp_path)

    threads = [threading.Thread(target=node, args=(k,)) for k in range(3)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(fits) == 1 and len(list(tmp_path.glob("basis-*.npz"))) == 1
    assert len(list(tmp_path.glob("targets-*.npz"))) == 3
    assert not list(tmp_path.glob("*.tmp.npz"))
    # up-block 1 only in this pipeline (32 channels): the rest of the 512 are zeros
    assert (out[0].r_d[:, 32:] == 0).all() and (out[0].r_d[:, :32] != 0).any()
    # a rerun reads the cache: the pipeline folder is gone
    moved = tmp_path / "moved"
    shutil.move(str(sd_path), moved)
    try:
        again = difrc.node_targets(s, *nodes[1], reference=ref, classes=digits.classes,
                                   device=CPU, cache_dir=tmp_path)
    finally:
        shutil.move(str(moved), sd_path)
    assert np.array_equal(again.r_d, out[1].r_d) and np.array_equal(again.r_c, out[1].r_c)
    assert len(fits) == 1


# ------------------------------------------------------------------ the method
def test_missing_sd_model_path_is_a_config_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="sd-model-path: method feddifrc needs"):
        method_for(tiny_config(tmp_path, method="feddifrc"))
    # from the command line: exit 2, one line, nothing started
    out = tmp_path / "run"
    code = main(["--config", str(ROOT / "configs/smoke.toml"), "--set", "method=feddifrc",
                 "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists() and len(err.splitlines()) == 1
    assert err.startswith("error: sd-model-path: method feddifrc needs")
    with pytest.raises(ConfigError, match="difrc-prompt"):
        RunConfig.from_mapping({"difrc-prompt": "a photo"})
    with pytest.raises(ConfigError, match="difrc-tdcl-form: unknown value 'pooled'"):
        RunConfig.from_mapping({"difrc-tdcl-form": "pooled"})


def _classify_updates(proxies):
    out = []
    for proxy in proxies:
        for ins, res in zip(proxy.received, proxy.replied):
            if ins.config["phase"] == "classify":
                out.append((parameters_to_ndarrays(ins.parameters),
                            parameters_to_ndarrays(res.parameters), res.metrics))
    return out


@pytest.fixture(scope="module")
def small_folder(tmp_path_factory, digits):
    """80 digits (8 per class) as an ImageFolder: a run small enough to extract in seconds."""
    root = tmp_path_factory.mktemp("small")
    for c in range(10):
        (root / str(c)).mkdir()
        for i, img in enumerate(digits.train_x[digits.train_y == c][:8]):
            Image.fromarray(img[0]).save(root / str(c) / f"{i}.png")
    return root


def test_feddifrc_end_to_end_hooks_change_the_classifier_updates(tmp_path, sd_path,
                                                                  small_folder):
    common = dict(arms="real", classifier_rounds=1, lr=0.05, dataset="imagefolder",
                  data_dir=str(small_folder), image_size=8, test_fraction=0.25,
                  partitioning="iid")
    difrc_cfg = dict(method="feddifrc", sd_model_path=str(sd_path), difrc_resolution=16,
                     difrc_negatives=2, difrc_pca_sample=32,
                     difrc_cache_dir=str(tmp_path / "difrc"), **common)
    strategy, proxies = run_in_process(tiny_config(tmp_path / "difrc", **difrc_cfg))
    assert [p.name for p in strategy.phases] == ["stats", "classify:real"]
    assert proxies[0].client.clients["classify"] is DifRCClassifierClient
    fit = [i for i in proxies[0].received if i.config["phase"] == "classify"][0]
    assert {k: fit.config[k] for k in ("difrc-ndcr-weight", "difrc-tdcl-weight", "difrc-tau",
                                       "difrc-tdcl-form")} == {
        "difrc-ndcr-weight": 1.0, "difrc-tdcl-weight": 1.0, "difrc-tau": 0.06,
        "difrc-tdcl-form": "per-sample"}
    _, plain = run_in_process(tiny_config(tmp_path / "fedavg", method="fedavg", **common))
    ours, theirs = _classify_updates(proxies), _classify_updates(plain)
    assert len(ours) == len(theirs) == 3
    for (sent, got, metrics), (sent2, got2, metrics2) in zip(ours, theirs):
        assert all(np.array_equal(a, b) for a, b in zip(sent, sent2))   # same start
        assert any(not np.allclose(a, b) for a, b in zip(got, got2))    # other update
        assert metrics["ndcr"] > 0 and metrics["tdcl"] > 0               # the hooks ran
        assert "ndcr" not in metrics2
    assert len(list((tmp_path / "difrc").glob("targets-*.npz"))) == 3


def test_feddifrc_on_the_runs_own_ddpm_needs_no_stable_diffusion(tmp_path, small_folder):
    """difrc-feature-source=ddpm: the federated DDPM (saved after the diffusion phase,
    which now runs for arms=real too) is the representation model."""
    with pytest.raises(ConfigError, match="needs a DDPM"):
        method_for(tiny_config(tmp_path, method="feddifrc", difrc_feature_source="ddpm",
                               diffusion_rounds=0, arms="real"))
    cfg = tiny_config(tmp_path, method="feddifrc", difrc_feature_source="ddpm", arms="real",
                      dataset="imagefolder", data_dir=str(small_folder), image_size=8,
                      test_fraction=0.25, partitioning="iid", difrc_negatives=2,
                      difrc_pca_sample=32, difrc_cache_dir=str(tmp_path / "difrc"))
    strategy, proxies = run_in_process(cfg)
    assert [p.name for p in strategy.phases] == ["stats", "diffusion", "classify:real"]
    fit = [i for i in proxies[0].received if i.config["phase"] == "classify"][0]
    assert fit.config["difrc-ddpm"] == str((tmp_path / "out" / "ddpm").resolve())
    for _, _, metrics in _classify_updates(proxies):
        assert metrics["ndcr"] > 0 and metrics["tdcl"] > 0
    (target, *_) = sorted((tmp_path / "difrc").glob("targets-*.npz"))
    with np.load(target) as f:
        r_d = f["r_d"]
    # the run's UNet ("8,16"): up-block 1 only, 8 channels; zero-padded to 512
    assert r_d.shape[1] == 512 and (r_d[:, :8] != 0).any() and (r_d[:, 8:] == 0).all()
