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


# --- l2w, gradient equilibrium, the two-stage start, the distillation gate ------------------------------


def _one_sgd_step(method, **cfg):
    task = build_task(method, model(), LossConfig(**cfg))
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    x, y = batch()
    out = task(x, y)
    opt.zero_grad()
    out["loss"].backward()
    opt.step()
    return task, out["loss"].detach(), [p.detach().clone() for p in task.model.parameters()]


def test_l2w_at_initialisation_is_exactly_ce():
    """Same seed: the same loss and, after one SGD step, bit-identical parameters (every weight is 1)."""
    _, ce_loss, ce_params = _one_sgd_step("ce")
    task, l2w_loss, l2w_params = _one_sgd_step("l2w")
    assert torch.equal(ce_loss, l2w_loss)
    assert all(torch.equal(a, b) for a, b in zip(ce_params, l2w_params, strict=True))
    x, y = batch()
    assert torch.equal(task(x, y)["sample_weights"], torch.ones(16, 8))


def test_l2w_meta_step_learns_the_weights_and_leaves_the_model_alone():
    task = build_task("l2w", model(), LossConfig(meta_epsilon=1.0))
    x, y = batch()
    xm, ym = batch(seed=1)
    state = {k: v.clone() for k, v in task.model.state_dict().items()}  # weights and BatchNorm statistics
    meta_loss = task.meta_step(x, y, xm, ym, lr=0.1)
    assert torch.isfinite(meta_loss)
    assert all(torch.equal(state[k], v) for k, v in task.model.state_dict().items())
    assert all(p.grad is None for p in task.model.parameters())
    w = task(x, y)["sample_weights"]
    assert not torch.equal(w, torch.ones_like(w))  # the weight net moved off its CE start
    torch.testing.assert_close(w.mean(dim=0), torch.ones(8))  # each exit's total weight stays the batch size
    # the trainer's optimizer leaves the weight net to the meta step
    assert {id(p) for p in task.meta_parameters()} == {id(p) for p in task.weight_net.parameters()}
    assert task.meta_due(9) and not task.meta_due(8)  # every meta_interval (10) steps


def test_budget_exit_distribution_meets_the_budget_and_assigns_by_confidence():
    from edgeexit.train.meta import assign_exits, exit_distribution

    costs = [0.2, 0.35, 0.5, 0.7, 1.0]
    shares = exit_distribution(costs, 0.5)
    assert abs(sum(shares) - 1) < 1e-9 and abs(sum(p * c for p, c in zip(shares, costs, strict=True)) - 0.5) < 1e-6
    assert exit_distribution(costs, 0.1) == [1.0, 0, 0, 0, 0] and exit_distribution(costs, 1.0)[-1] == 1.0
    conf = torch.rand(200, 5, generator=torch.Generator().manual_seed(0))
    exit_of = assign_exits(conf, shares)
    counts = torch.bincount(exit_of, minlength=5).tolist()
    assert counts == [round(sum(shares[: k + 1]) * 200) - round(sum(shares[:k]) * 200) for k in range(5)]
    # exit 0 took the most confident images at exit 0: a threshold at a quantile of its confidences
    assert conf[exit_of == 0, 0].min() >= conf[exit_of != 0, 0].max()


def _segment_grads(task, losses_of):
    """Per segment, the gradient of the parameters it runs (a block split across two segments counts
    each half in its own) for the loss losses_of(logits, labels), from a fresh pass."""
    from edgeexit.models.multiexit import _own_parameters

    x, y = batch()
    task.zero_grad(set_to_none=True)
    logits, _ = task.run_model(x)
    losses_of(logits, y).backward()
    grads = []
    for seg in task.model.segments:
        own = _own_parameters(task.model, seg)
        grads.append(torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in own]))
    return grads


@pytest.mark.parametrize("exits", [4, 8])
def test_gradient_equilibrium_gives_each_segment_the_mean_of_its_exits_gradients(exits):
    """Segment j of K receives (1 / (K - j)) x the sum of the gradients of exits j..K-1 (heads unchanged)."""
    torch.manual_seed(0)
    net = build_model(MultiExitConfig(exits=exits, width=0.0625, in_chans=1, num_classes=10, input_size=[28, 28]))
    plain, ge = build_task("ce", net, LossConfig()), build_task("ce", net, LossConfig(gradient_equilibrium=True))
    net.eval()  # BatchNorm with running statistics: both passes see the same function
    per_exit = [
        _segment_grads(plain, lambda z, y, k=k: F.cross_entropy(z[k], y)) for k in range(exits)
    ]  # per exit k, per segment j
    got = _segment_grads(ge, lambda z, y: sum(F.cross_entropy(zk, y) for zk in z))
    for j in range(exits):
        want = sum(per_exit[k][j] for k in range(j, exits)) / (exits - j)
        torch.testing.assert_close(got[j], want, rtol=1e-4, atol=1e-7)
    # and the forward values are those of the plain model
    x, _ = batch()
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(plain.run_model(x)[0], ge.run_model(x)[0], strict=True))


@pytest.mark.parametrize("method", ["ce", "l2w", "mlcsd"])
def test_two_stage_first_stage_trains_trunk_and_final_exit_only(method):
    task = build_task(method, model(), LossConfig(two_stage=1.0, gradient_equilibrium=True))
    opt = torch.optim.SGD(task.model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    early = {k: v.clone() for k, v in task.model.heads[:-1].state_dict().items()}
    trunk = [p.detach().clone() for p in task.model.segments.parameters()]
    for step in range(2):
        task.set_progress(0.5 * step)  # still inside stage one
        out = task(*batch(seed=step))
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()
        assert len(out["logits"]) == 1 and not task.meta_due(9)
    # early heads: weights and BatchNorm statistics as they were (they were not run)
    assert all(torch.equal(early[k], v) for k, v in task.model.heads[:-1].state_dict().items())
    assert all(not torch.equal(a, b) for a, b in zip(trunk, task.model.segments.parameters(), strict=True))
    task.set_progress(1.0)  # stage two: every exit again
    assert len(task(*batch())["logits"]) == 8


def test_distill_gate_keeps_distillation_off_until_the_teacher_is_confident():
    x, y = batch()
    ce = build_task("ce", model(), LossConfig())(x, y)["loss"]
    # an untrained final exit is far below 0.99 confidence: SD with the gate is CE exactly
    gated = build_task("sd", model(), LossConfig(alpha=1.0, distill_gate=0.99))(x, y)["loss"]
    assert torch.equal(gated, ce)
    opened = build_task("sd", model(), LossConfig(alpha=1.0, distill_gate=0.01))(x, y)["loss"]
    assert opened > ce


@pytest.mark.parametrize(
    "overrides,field",
    [
        ({"distill_gate": 1.0}, "distill_gate"),
        ({"target_budget": 0.0}, "target_budget"),
        ({"two_stage": -1}, "two_stage"),
        ({"meta_interval": 0}, "meta_interval"),
    ],
)
def test_new_loss_options_are_checked(overrides, field):
    from edgeexit.models.multiexit import ConfigError

    with pytest.raises(ConfigError) as info:
        LossConfig(**overrides)
    assert info.value.field == field
