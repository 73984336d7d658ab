"""Training methods as *tasks*: ``task(images, labels) -> {"loss", "logits", ...}``.

The trainer never knows about exits or teachers; each method is a module that owns the model
(and, for MLCSD, the teacher-weight module).

- ``ce``    every exit trained with cross-entropy ("MEN").
- ``sd``    CE + KD from the detached final exit to every other exit (traditional self-distillation).
- ``byot``  Be Your Own Teacher: (1-a)·CE + a·KD from the final exit + feature hint to the final exit.
- ``mlcsd`` multi-level collaborative self-distillation (Zhang et al. 2024): every exit gets its own
  teacher, a learned per-sample mix of all exits' logits and features.
- ``l2w``   CE with meta-learned per-sample, per-exit weights (L2W-DEN, Han et al. 2022): each exit is
  trained most on the images a cascade at ``target_budget`` would hand it (edgeexit.train.meta).

Options every method takes (`Task`):

- ``gradient_equilibrium`` (IMTA, Li et al. ICCV 2019): at every exit the trunk's gradient is rescaled
  so that segment j (0-based) of K receives the *mean*, not the sum, of the gradients of the K − j
  exits it feeds; the heads' own gradients are unchanged (`equilibrium_forward`).
- ``two_stage`` N: for the first N epochs only the trunk and the final exit learn (Kubaty et al. 2024);
  the early heads are not even run, so neither their weights nor their BatchNorm statistics move.
- ``distill_gate`` (sd, byot, mlcsd): the distillation terms count only on batches where the teacher's
  mean max-softmax confidence is at least the gate (Phuong & Lampert 2019: a weak teacher harms).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.models import MultiExitNet
from edgeexit.models.multiexit import ConfigError

METHODS = ("ce", "sd", "byot", "mlcsd", "l2w")


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=1), F.softmax(teacher_logits / t, dim=1), reduction="batchmean"
    ) * (t * t)


@dataclass
class LossConfig:
    temperature: float = 4.0
    alpha: float = 5.0  # KD weight (MLCSD α; SD's KD weight; BYOT's CE/KD mix)
    beta: float = 10.0  # feature weight (MLCSD β; BYOT's hint weight)
    gamma: float = 1.0  # weight of the CE of the non-final exits
    teacher_weights: str = "learned"  # mlcsd: learned | frozen (the released code's behaviour)
    # Distillation terms ramp linearly from 0 to full weight over this many epochs. Teachers are
    # random at the start; very short CPU runs learn faster with the ramp. Paper recipes: 0.
    distill_warmup_epochs: float = 0.0
    # sd/byot/mlcsd: distil only on batches whose teacher's mean confidence reaches this (0: always)
    distill_gate: float = 0.0
    gradient_equilibrium: bool = False  # every method: the trunk gets the mean of the exits' gradients
    two_stage: float = 0.0  # epochs (a fraction allowed) of trunk + final exit only before joint training
    # l2w: the budget (fraction of the full model's FLOPs) whose exit assignment weights the meta-loss,
    # a meta step every meta_interval steps, weights 1 + epsilon·(w − mean w), Adam at meta_lr
    target_budget: float = 0.5
    meta_interval: int = 10
    meta_epsilon: float = 1.0
    meta_lr: float = 1e-3

    def __post_init__(self) -> None:  # also on every dataclasses.replace
        if self.teacher_weights not in TEACHER_WEIGHTS:
            raise ConfigError("teacher_weights", f"must be 'learned' or 'frozen', got '{self.teacher_weights}'")
        _check_fraction("distill_gate", self.distill_gate, lo_open=False, hi_open=True)
        _check_fraction("target_budget", self.target_budget, lo_open=True, hi_open=False)
        t = self.two_stage
        if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
            raise ConfigError("two_stage", f"must be a number of epochs >= 0, got {t!r}")
        if isinstance(self.meta_interval, bool) or not isinstance(self.meta_interval, int) or self.meta_interval < 1:
            raise ConfigError("meta_interval", f"must be a whole number of steps >= 1, got {self.meta_interval!r}")
        if not (math.isfinite(self.meta_epsilon) and self.meta_epsilon >= 0):
            raise ConfigError("meta_epsilon", f"must be a number >= 0, got {self.meta_epsilon}")
        if not (math.isfinite(self.meta_lr) and self.meta_lr > 0):
            raise ConfigError("meta_lr", f"must be a positive number, got {self.meta_lr}")


def _check_fraction(name: str, v, lo_open: bool, hi_open: bool) -> None:
    ok = isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
    ok = ok and (v > 0 if lo_open else v >= 0) and (v < 1 if hi_open else v <= 1)
    if not ok:
        lo, hi = "(0" if lo_open else "[0", "1)" if hi_open else "1]"
        raise ConfigError(name, f"must be within {lo}, {hi}, got {v!r}")


TEACHER_WEIGHTS = ("learned", "frozen")


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` backward."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


def equilibrium_forward(model: nn.Module, x: torch.Tensor, equilibrium: bool) -> tuple[list, list]:
    """``model(x)`` for any multi-exit net (``segments`` + ``heads``); with ``equilibrium``, IMTA's gradient
    equilibrium: after segment j (0-based, K exits) the state's gradient is scaled by 1/(K − j), then, past
    head j's tap, the state going deeper is scaled by K − j − 1. The gradient reaching segment j's output is
    then (head j's + (K − j − 1) · the deeper path's) / (K − j): by induction the mean of the K − j exits'
    gradients, where without it is their sum. Forward values are unchanged."""
    if not equilibrium:
        return model(x)
    k = len(model.heads)
    logits, feats = [], []
    state = (x,)
    for pos, (segment, head) in enumerate(zip(model.segments, model.heads, strict=True)):
        state = tuple(_GradScale.apply(t, 1.0 / (k - pos)) for t in segment(*state))
        z, f = head(state[-1])
        logits.append(z)
        feats.append(f)
        if pos < k - 1:
            state = tuple(_GradScale.apply(t, float(k - pos - 1)) for t in state)
    return logits, feats


def teacher_confidence(teacher_logits: torch.Tensor) -> torch.Tensor:
    """Mean max-softmax confidence of (B, C) or (B, K, C) teacher logits (no gradient)."""
    return F.softmax(teacher_logits.detach().float(), dim=-1).max(dim=-1).values.mean()


class Task(nn.Module):
    """A training method: ``task(images, labels) -> {"loss", "logits", ...}``. Subclasses write `joint`;
    this class adds what every method takes (see the module docstring): the two-stage start, gradient
    equilibrium (`run_model`) and the distillation warm-up and gate (`distill_factor`)."""

    def __init__(self, model: MultiExitNet, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.distill_scale = 1.0
        self.stage_one = cfg.two_stage > 0

    def set_progress(self, epoch_progress: float) -> None:
        """Called by the trainer before every step with the fractional epoch."""
        w = self.cfg.distill_warmup_epochs
        self.distill_scale = 1.0 if w <= 0 else min(1.0, epoch_progress / w)
        self.stage_one = epoch_progress < self.cfg.two_stage

    def run_model(self, images: torch.Tensor) -> tuple[list, list]:
        return equilibrium_forward(self.model, images, self.cfg.gradient_equilibrium)

    def distill_factor(self, teacher_logits: torch.Tensor) -> torch.Tensor | float:
        """The warm-up ramp, times 0 on a batch whose teacher is below ``distill_gate`` (a tensor: no sync)."""
        if self.cfg.distill_gate <= 0:
            return self.distill_scale
        passed = teacher_confidence(teacher_logits) >= self.cfg.distill_gate
        return self.distill_scale * passed.to(teacher_logits.dtype)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.stage_one:
            return self.final_exit_only(images, labels)
        return self.joint(images, labels)

    def final_exit_only(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Stage one: the trunk and the final exit on CE; the early heads are not run."""
        state = (images,)
        for segment in self.model.segments:
            state = segment(*state)
        z, _ = self.model.heads[-1](state[-1])
        return {"loss": F.cross_entropy(z, labels), "logits": [z]}

    def joint(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    # meta-learning methods (l2w) override these; the trainer asks every task
    def meta_parameters(self) -> list[nn.Parameter]:
        """Parameters the trainer's optimizer must leave alone (the task updates them itself)."""
        return []

    def meta_due(self, global_step: int) -> bool:
        return False


class CETask(Task):
    def joint(self, images, labels):
        logits, _ = self.run_model(images)
        ce = [F.cross_entropy(z, labels) for z in logits]
        loss = ce[-1] + self.cfg.gamma * sum(ce[:-1])
        return {"loss": loss, "logits": logits}


class SDTask(Task):
    def joint(self, images, labels):
        logits, _ = self.run_model(images)
        teacher = logits[-1].detach()
        ce = [F.cross_entropy(z, labels) for z in logits]
        kd = sum(kd_loss(z, teacher, self.cfg.temperature) for z in logits[:-1])
        loss = ce[-1] + self.cfg.gamma * sum(ce[:-1]) + self.distill_factor(teacher) * self.cfg.alpha * kd
        return {"loss": loss, "logits": logits}


class BYOTTask(Task):
    """BYOT (Zhang et al. 2019): shallow exits get (1-a)·CE + a·KD(final) + λ·‖f_i − f_K‖²."""

    def joint(self, images, labels):
        logits, feats = self.run_model(images)
        teacher_z, teacher_f = logits[-1].detach(), feats[-1].detach()
        scale = self.distill_factor(teacher_z)
        a, lam = scale * self.cfg.alpha, scale * self.cfg.beta
        loss = F.cross_entropy(logits[-1], labels)
        for z, f in zip(logits[:-1], feats[:-1], strict=True):
            loss = loss + (1 - a) * F.cross_entropy(z, labels) + a * kd_loss(z, teacher_z, self.cfg.temperature)
            loss = loss + lam * (f - teacher_f).pow(2).sum(dim=1).mean()
        return {"loss": loss, "logits": logits}


class TeacherWeights(nn.Module):
    """Exit i's per-sample mixing weights over all K exits: w_i = softmax(W_i · f_i)."""

    def __init__(self, num_exits: int, feat_dim: int) -> None:
        super().__init__()
        self.proj = nn.ModuleList(nn.Linear(feat_dim, num_exits) for _ in range(num_exits))

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """(B, K, K): row i holds exit i's weights over the K exits."""
        return torch.stack([F.softmax(p(f), dim=1) for p, f in zip(self.proj, feats, strict=True)], dim=1)


class MLCSDTask(Task):
    """L = CE(z_K) + γ·Σ_{i<K} CE(z_i) + α·Σ_i T²·KL(t_i ‖ z_i) + β·Σ_i MSE(f_i, g_i) + L_w.

    ``L_w`` = Σ_i CE(t_i, y) with the exits' logits detached: its gradient reaches only the weight
    module, which is what makes the weights *learned* (the released code detaches everything so
    its weights never change; ``teacher_weights="frozen"`` reproduces that). The teachers are
    detached inside the KD and MSE terms, and the feature MSE is per sample on (B, D) tensors.
    """

    def __init__(self, model: MultiExitNet, cfg: LossConfig) -> None:
        super().__init__(model, cfg)
        self.weights = TeacherWeights(model.num_exits, model.feat_dim)
        if cfg.teacher_weights == "frozen":  # LossConfig checked the value
            self.weights.requires_grad_(False)

    def joint(self, images, labels):
        logits, feats = self.run_model(images)
        cfg = self.cfg
        z = torch.stack(logits, dim=1).float()  # (B, K, C)
        f = torch.stack(feats, dim=1).float()  # (B, K, D)
        w = self.weights([x.detach().float() for x in feats])  # (B, K, K)
        teacher_z = torch.bmm(w, z.detach())  # t_i = Σ_j w_ij z_j
        teacher_f = torch.bmm(w, f.detach())  # g_i = Σ_j w_ij f_j

        ce = [F.cross_entropy(zi, labels) for zi in logits]
        loss = ce[-1] + cfg.gamma * sum(ce[:-1])
        num_exits = z.shape[1]
        kd = sum(kd_loss(z[:, pos], teacher_z[:, pos].detach(), cfg.temperature) for pos in range(num_exits))
        mse = sum(F.mse_loss(f[:, pos], teacher_f[:, pos].detach()) for pos in range(num_exits))
        loss = loss + self.distill_factor(teacher_z) * (cfg.alpha * kd + cfg.beta * mse)
        out = {"loss": loss, "logits": logits, "teacher_weights": w.detach()}
        if cfg.teacher_weights == "learned":
            loss_w = sum(F.cross_entropy(teacher_z[:, pos], labels) for pos in range(num_exits))
            out["loss"] = loss + loss_w
            out["loss_w"] = loss_w.detach()
        return out


class L2WTask(Task):
    """CE with per-sample, per-exit weights ``1 + ε(w − mean w)`` from a `meta.WeightNet` of the detached
    per-exit losses (L2W-DEN). Every ``meta_interval`` steps, after the model's own step, `meta_step`
    updates the weight net: a one-step SGD look-ahead of the model on the weighted loss of the training
    batch (momentum and weight decay left out of the look-ahead), then the look-ahead model's CE on a
    meta batch (`_substituted` weights), each exit counting only the images a cascade at
    ``target_budget`` would hand it (`meta.assign_exits`); its gradient reaches the weight net through
    the look-ahead. At the start every weight is 1: the first step is CE's.
    Nothing changes at inference."""

    def __init__(self, model: MultiExitNet, cfg: LossConfig) -> None:
        from edgeexit.train import meta

        super().__init__(model, cfg)
        self.weight_net = meta.WeightNet(model.num_exits)
        self.shares = meta.exit_distribution(meta.exit_costs(model), cfg.target_budget)
        # Adam's moments live outside state_dict: the trainer saves and restores them with the optimizer's
        self.meta_opt = torch.optim.Adam(self.weight_net.parameters(), lr=cfg.meta_lr, weight_decay=1e-4)

    def meta_parameters(self) -> list[nn.Parameter]:
        return list(self.weight_net.parameters())

    def meta_due(self, global_step: int) -> bool:
        return not self.stage_one and (global_step + 1) % self.cfg.meta_interval == 0

    def weighted_loss(self, ce: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """(B, K) per-sample CE and weights -> final exit's weighted mean + γ · the others'."""
        per_exit = (weights * ce).mean(dim=0)
        return per_exit[-1] + self.cfg.gamma * per_exit[:-1].sum()

    def sample_weights(self, ce: torch.Tensor) -> torch.Tensor:
        from edgeexit.train.meta import centred_weights

        return centred_weights(self.weight_net(ce.detach().float()), self.cfg.meta_epsilon)

    def joint(self, images, labels):
        logits, _ = self.run_model(images)
        ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits], dim=1)
        with torch.no_grad():
            weights = self.sample_weights(ce)
        return {"loss": self.weighted_loss(ce, weights), "logits": logits, "sample_weights": weights}

    def meta_step(self, images, labels, meta_images, meta_labels, lr: float) -> torch.Tensor:
        """One update of the weight net; returns the meta-loss (detached). BatchNorm statistics are not
        touched (the look-ahead runs on copies of the buffers)."""
        from edgeexit.train.meta import assign_exits

        params = [p for p in self.model.parameters() if p.requires_grad]
        with _substituted(self.model, {}):
            logits, _ = self.run_model(images)
        ce = torch.stack([F.cross_entropy(z, labels, reduction="none") for z in logits], dim=1)
        loss = self.weighted_loss(ce, self.sample_weights(ce))
        grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
        ahead = {id(p): p if g is None else p - lr * g for p, g in zip(params, grads, strict=True)}
        with _substituted(self.model, ahead):
            meta_logits, _ = self.run_model(meta_images)
        z = torch.stack(meta_logits, dim=1)  # (B, K, C)
        with torch.no_grad():
            exit_of = assign_exits(F.softmax(z.float(), dim=-1).max(dim=-1).values, self.shares)
        chosen = z[torch.arange(len(meta_labels), device=z.device), exit_of]
        meta_loss = F.cross_entropy(chosen, meta_labels)
        self.meta_opt.zero_grad(set_to_none=True)
        meta_loss.backward(inputs=self.meta_parameters())
        _average_across_ranks(self.meta_parameters())
        self.meta_opt.step()
        return meta_loss.detach()


@contextmanager
def _substituted(model: nn.Module, tensors: dict[int, torch.Tensor]):
    """Inside: each parameter ``p`` of ``model`` with ``id(p)`` in ``tensors`` replaced by that tensor, and
    every buffer by a copy (BatchNorm statistics stay as they are). Done module by module rather than
    with `torch.func.functional_call`, which does not put back a parameter whose module is registered
    under two names (the ResNet18 layouts' block split across two segments)."""
    saved: list[tuple[nn.Module, str, str, torch.Tensor]] = []
    copies: dict[int, torch.Tensor] = {}
    try:
        for mod in model.modules():  # each module once, however many names it has
            for name, p in list(mod._parameters.items()):
                if p is not None and id(p) in tensors:
                    saved.append((mod, "_parameters", name, p))
                    del mod._parameters[name]
                    setattr(mod, name, tensors[id(p)])
            for name, buf in list(mod._buffers.items()):
                if buf is not None:
                    saved.append((mod, "_buffers", name, buf))
                    mod._buffers[name] = copies.setdefault(id(buf), buf.clone())
        yield
    finally:
        for mod, kind, name, original in reversed(saved):
            if kind == "_parameters":
                mod.__dict__.pop(name, None)
            getattr(mod, kind)[name] = original


def _average_across_ranks(params: list[nn.Parameter]) -> None:
    """Under torchrun, every rank's weight net takes the same (averaged) meta-gradient step."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for p in params:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= dist.get_world_size()


TASKS = {"ce": CETask, "sd": SDTask, "byot": BYOTTask, "mlcsd": MLCSDTask, "l2w": L2WTask}


def build_task(method: str, model: MultiExitNet, cfg: LossConfig) -> Task:
    if method not in TASKS:
        raise ValueError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    return TASKS[method](model, cfg)
