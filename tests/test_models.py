import numpy as np
import torch
from diffusers import DDIMScheduler, DDPMPipeline, UNet2DModel

from fedgen.classifier import evaluate, train_classifier
from fedgen.config import RunConfig
from fedgen.diffusion import sample, train_ddpm
from fedgen.models import (build_classifier, build_sampler, build_scheduler, build_unet,
                           get_weights, set_weights)

CPU = torch.device("cpu")
TINY = RunConfig(unet_channels="8,16", unet_attention_levels=1)


def test_unet_is_class_conditional_with_attention_where_asked():
    unet = build_unet(TINY, channels=1, num_classes=10, image_size=8)
    assert unet.config.down_block_types == ("DownBlock2D", "AttnDownBlock2D")
    assert unet.config.up_block_types == ("AttnUpBlock2D", "UpBlock2D")
    x = torch.randn(4, 1, 8, 8)
    t = torch.tensor([0, 10, 500, 999])
    a = unet(x, t, class_labels=torch.tensor([0, 1, 2, 3])).sample
    b = unet(x, t, class_labels=torch.tensor([4, 5, 6, 7])).sample
    assert a.shape == x.shape and not torch.allclose(a, b)


def test_samplers_share_the_training_schedule():
    cfg = RunConfig(beta_end=0.03, beta_schedule="linear")
    train = build_scheduler(cfg)
    for name in ("ddim", "ddpm", "dpm-solver"):
        s = build_sampler(name, train)
        assert torch.allclose(s.betas, train.betas)
        assert s.config.num_train_timesteps == cfg.num_train_timesteps
    assert isinstance(build_sampler("ddim", train), DDIMScheduler)


def test_seeded_sampling_is_deterministic():
    unet = build_unet(TINY, 1, 10, 8, seed=0)
    sched = build_scheduler(TINY)
    labels = np.array([0, 1, 2, 3, 4])
    for name in ("ddim", "ddpm"):
        kw = dict(steps=4, device=CPU, batch_size=2, progress=False)
        a = sample(unet, build_sampler(name, sched), labels, seed=7, **kw)
        b = sample(unet, build_sampler(name, sched), labels, seed=7, **kw)
        c = sample(unet, build_sampler(name, sched), labels, seed=8, **kw)
        assert a.dtype == np.uint8 and a.shape == (5, 1, 8, 8)
        assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_ddpm_training_lowers_the_loss_and_is_seeded():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 32)
    sched = build_scheduler(TINY)
    def run():
        unet = build_unet(TINY, 1, 10, 8, seed=0)
        stats = train_ddpm(unet, sched, images, labels, epochs=3, batch_size=8, lr=1e-3,
                           seed=1, device=CPU)
        return stats, get_weights(unet)
    (s1, w1), (s2, w2) = run(), run()
    assert s1["steps"] == 12 and s1 == s2
    assert all(np.array_equal(a, b) for a, b in zip(w1, w2))


def test_loss_hook_changes_training():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 1, 8, 8), dtype=np.uint8)
    labels = rng.integers(0, 10, 16)
    def run(hooks):
        model = build_classifier(RunConfig(), 1, 10, seed=0)
        train_classifier(model, images, labels, epochs=1, batch_size=8, lr=0.1, momentum=0,
                         weight_decay=0, seed=0, device=CPU, loss_hooks=hooks)
        return get_weights(model)
    base = run([])
    l2 = run([lambda model, batch: 10 * batch["logits"].pow(2).mean()])
    assert any(not np.allclose(a, b) for a, b in zip(base, l2))


def test_classifier_norm_choice():
    group = build_classifier(RunConfig(classifier_norm="group"), 1, 10)
    batch = build_classifier(RunConfig(classifier_norm="batch"), 1, 10)
    assert isinstance(group.bn1, torch.nn.GroupNorm) and not list(group.buffers())
    assert isinstance(batch.bn1, torch.nn.BatchNorm2d)


def test_resnet_cifar_stem_and_weights_roundtrip_with_buffers():
    model = build_classifier(RunConfig(classifier_norm="batch"), channels=1, num_classes=10,
                             seed=0)
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 8, 8)).shape == (2, 10)
    weights = get_weights(model)
    assert len(weights) == len(model.state_dict())  # buffers travel too
    assert any("running_var" in k for k in model.state_dict())
    with torch.no_grad():
        model.bn1.running_var.fill_(3.0)
    weights = get_weights(model)
    other = build_classifier(RunConfig(classifier_norm="batch"), 1, 10, seed=1)
    set_weights(other, weights)
    for a, b in zip(get_weights(other), weights):
        assert np.array_equal(a, b)
    assert torch.all(other.bn1.running_var == 3.0)


def test_evaluate_runs_in_eval_mode_and_reports_per_class():
    model = build_classifier(RunConfig(), 1, 3, seed=0)
    images = np.zeros((6, 1, 8, 8), np.uint8)
    res = evaluate(model, images, np.array([0, 0, 1, 1, 2, 2]), 3, CPU)
    assert not model.training
    assert len(res["per_class_accuracy"]) == 3 and 0 <= res["accuracy"] <= 1


def test_saved_ddpm_loads_in_stock_diffusers(tmp_path):
    unet = build_unet(TINY, 1, 10, 8, seed=0)
    DDPMPipeline(unet=unet, scheduler=build_scheduler(TINY)).save_pretrained(tmp_path)
    loaded = UNet2DModel.from_pretrained(tmp_path, subfolder="unet")
    pipe = DDPMPipeline.from_pretrained(tmp_path)
    assert loaded.config.num_class_embeds == 11  # 10 classes + the null class
    assert pipe.scheduler.config.beta_end == TINY.beta_end
    x, t = torch.randn(1, 1, 8, 8), torch.tensor([3])
    y = torch.tensor([2])
    assert torch.allclose(loaded(x, t, class_labels=y).sample, unet(x, t, class_labels=y).sample,
                          atol=1e-5)


def test_get_weights_returns_copies_not_views():
    model = build_classifier(RunConfig(), 1, 10, seed=0)
    before = get_weights(model)
    snapshot = [w.copy() for w in before]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    assert all(np.array_equal(a, b) for a, b in zip(before, snapshot))


def test_reusable_shells_are_per_thread():
    import threading
    from fedgen.models import classifier_shell
    cfg = RunConfig()
    here = classifier_shell(cfg, 1, 10)
    assert classifier_shell(cfg, 1, 10) is here
    other = []
    t = threading.Thread(target=lambda: other.append(classifier_shell(cfg, 1, 10)))
    t.start()
    t.join()
    assert other[0] is not here
