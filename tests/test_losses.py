import dataclasses

import pytest
import torch
import torch.nn.functional as F

from edgeexit.models import MultiExitConfig, build_model
from edgeexit.train.losses import METHODS, LossConfig, build_task
from edgeexit.train.recipes import get_recipe


def batch(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def model():
    torch.manual_seed(0)
    return build_model(MultiExitConfig(exits=8, width=0.0625, in_chans=1, num_classes=10, input_size=[28, 28]))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_a_finite_loss_with_gradients(method):
    task = build_task(method, model(), get_recipe("cifar10", method).loss)
    x, y = batch()
    out = task(x, y)
    assert torch.isfinite(out["loss"]) and len(out["logits"]) == 8
    out["loss"].backward()
    assert all(p.grad is not None for p in task.model.parameters())


def test_mlcsd_teacher_weights_are_learned_and_per_sample():
    task = build_task("mlcsd", model(), LossConfig())
    before = [p.detach().clone() for p in task.weights.parameters()]
    opt = torch.optim.SGD(task.parameters(), lr=0.1)
    x, y = batch()
    out = task(x, y)
    w = out["teacher_weights"]
    assert w.shape == (16, 8, 8)
    torch.testing.assert_close(w.sum(-1), torch.ones(16, 8))
    assert (w[0] - w[1]).abs().max() > 1e-4  # weights differ across samples
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    assert any((a - b.detach()).abs().max() > 0 for a, b in zip(before, task.weights.parameters(), strict=True))
    assert torch.isfinite(out["loss_w"])


def test_mlcsd_frozen_weights_never_change():
    task = build_task("mlcsd", model(), LossConfig(teacher_weights="frozen"))
    before = [p.detach().clone() for p in task.weights.parameters()]
    opt = torch.optim.SGD([p for p in task.parameters() if p.requires_grad], lr=0.1)
    x, y = batch()
    out = task(x, y)
    out["loss"].backward()
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(before, task.weights.parameters(), strict=True))
    assert "loss_w" not in out


def test_mlcsd_loss_is_the_documented_sum_with_per_sample_feature_mse():
    cfg = LossConfig(temperature=4.0, alpha=5.0, beta=10.0, gamma=1.0)
    task = build_task("mlcsd", model(), cfg).eval()
    x, y = batch(8)
    out = task(x, y)
    logits, feats = task.model(x)
    z, f = torch.stack(logits, 1), torch.stack(feats, 1)
    w = task.weights(feats)
    t, g = torch.bmm(w, z), torch.bmm(w, f)
    t2 = cfg.temperature**2
    kd = sum(
        F.kl_div(F.log_softmax(z[:, i] / 4, 1), F.softmax(t[:, i] / 4, 1), reduction="batchmean") * t2 for i in range(8)
    )
    # per sample: mean over the feature dimension of (f_i - g_i)², then over the batch — a (B, D) op
    mse = sum(((f[:, i] - g[:, i]) ** 2).mean(dim=1).mean() for i in range(8))
    ce = [F.cross_entropy(zi, y) for zi in logits]
    lw = sum(F.cross_entropy(t[:, i], y) for i in range(8))
    expected = ce[-1] + sum(ce[:-1]) + 5.0 * kd + 10.0 * mse + lw
    torch.testing.assert_close(out["loss"], expected, rtol=1e-4, atol=1e-4)


def test_sd_teacher_is_the_detached_final_exit():
    task = build_task("sd", model(), LossConfig(alpha=1.0))
    x, y = batch()
    out = task(x, y)
    out["loss"].backward()
    # the final head receives only its own CE gradient: compare with CE alone
    g_total = task.model.heads[-1].fc.weight.grad.clone()
    task.zero_grad()
    logits, _ = task.model(x)
    F.cross_entropy(logits[-1], y).backward()
    torch.testing.assert_close(task.model.heads[-1].fc.weight.grad, g_total)


def test_paper_recipe_values():
    r = get_recipe("cifar100", "mlcsd")
    assert (r.lr, r.momentum, r.weight_decay, r.batch_size, r.epochs, r.milestones) == (
        0.05,
        0.9,
        5e-4,
        64,
        240,
        [150, 180, 210],
    )
    assert (r.loss.temperature, r.loss.alpha, r.loss.beta, r.loss.gamma) == (4.0, 5.0, 10.0, 1.0)


@pytest.mark.parametrize("method", ["sd", "mlcsd"])
def test_distill_warmup_ramps_the_distillation_terms_linearly_then_holds(method):
    """distill_warmup_epochs: distillation weight 0 at step 0, half at half the warm-up, full from its end
    on; the CE part never changes. With no warm-up the scale is 1 from the start."""
    cfg = get_recipe("cifar10", method).loss
    ce_only = build_task("ce", model(), cfg)
    x, y = batch()
    task = build_task(method, model(), dataclasses.replace(cfg, distill_warmup_epochs=2.0))
    scales = []
    for progress in (0.0, 0.5, 1.0, 2.0, 3.5):
        task.set_progress(progress)
        scales.append(task.distill_scale)
    assert scales == [0.0, 0.25, 0.5, 1.0, 1.0]
    task.set_progress(0.0)
    with torch.no_grad():
        ce_loss = ce_only(x, y)["loss"]
        at_start = task(x, y)["loss"]  # the same weights (seed 0): only the distillation terms differ
        task.set_progress(2.0)
        full = task(x, y)["loss"]
        task.set_progress(1.0)
        half = task(x, y)["loss"]
    if method == "sd":  # SD's loss is CE + scale·α·KD: exactly linear in the scale
        assert at_start.item() == pytest.approx(ce_loss.item(), rel=1e-5)
        assert half.item() == pytest.approx((at_start.item() + full.item()) / 2, rel=1e-5)
    assert full.item() > at_start.item()
    none = build_task(method, model(), cfg)  # recipe default: no warm-up
    none.set_progress(0.0)
    assert none.distill_scale == 1.0
