"""Training methods as *tasks*: ``task(images, labels) -> {"loss", "logits", ...}``.

The trainer never knows about exits or teachers; each method is a module that owns the model
(and, for MLCSD, the teacher-weight module).

- ``ce``    every exit trained with cross-entropy ("MEN").
- ``sd``    CE + KD from the detached final exit to every other exit (traditional self-distillation).
- ``byot``  Be Your Own Teacher: (1-a)·CE + a·KD from the final exit + feature hint to the final exit.
- ``mlcsd`` multi-level collaborative self-distillation (Zhang et al. 2024): every exit gets its own
  teacher, a learned per-sample mix of all exits' logits and features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from edgeexit.models import MultiExitNet
from edgeexit.models.multiexit import ConfigError

METHODS = ("ce", "sd", "byot", "mlcsd")


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

    def __post_init__(self) -> None:  # also on every dataclasses.replace
        if self.teacher_weights not in TEACHER_WEIGHTS:
            raise ConfigError("teacher_weights", f"must be 'learned' or 'frozen', got '{self.teacher_weights}'")


TEACHER_WEIGHTS = ("learned", "frozen")


class Task(nn.Module):
    def __init__(self, model: MultiExitNet, cfg: LossConfig) -> None:
        super().__init__()
        self.model = model
        self.cfg = cfg
        self.distill_scale = 1.0

    def set_progress(self, epoch_progress: float) -> None:
        """Called by the trainer before every step with the fractional epoch."""
        w = self.cfg.distill_warmup_epochs
        self.distill_scale = 1.0 if w <= 0 else min(1.0, epoch_progress / w)

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError


class CETask(Task):
    def forward(self, images, labels):
        logits, _ = self.model(images)
        ce = [F.cross_entropy(z, labels) for z in logits]
        loss = ce[-1] + self.cfg.gamma * sum(ce[:-1])
        return {"loss": loss, "logits": logits}


class SDTask(Task):
    def forward(self, images, labels):
        logits, _ = self.model(images)
        teacher = logits[-1].detach()
        ce = [F.cross_entropy(z, labels) for z in logits]
        kd = sum(kd_loss(z, teacher, self.cfg.temperature) for z in logits[:-1])
        loss = ce[-1] + self.cfg.gamma * sum(ce[:-1]) + self.distill_scale * self.cfg.alpha * kd
        return {"loss": loss, "logits": logits}


class BYOTTask(Task):
    """BYOT (Zhang et al. 2019): shallow exits get (1-a)·CE + a·KD(final) + λ·‖f_i − f_K‖²."""

    def forward(self, images, labels):
        logits, feats = self.model(images)
        a, lam = self.distill_scale * self.cfg.alpha, self.distill_scale * self.cfg.beta
        teacher_z, teacher_f = logits[-1].detach(), feats[-1].detach()
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

    def forward(self, images, labels):
        logits, feats = self.model(images)
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
        loss = loss + self.distill_scale * (cfg.alpha * kd + cfg.beta * mse)
        out = {"loss": loss, "logits": logits, "teacher_weights": w.detach()}
        if cfg.teacher_weights == "learned":
            loss_w = sum(F.cross_entropy(teacher_z[:, pos], labels) for pos in range(num_exits))
            out["loss"] = loss + loss_w
            out["loss_w"] = loss_w.detach()
        return out


TASKS = {"ce": CETask, "sd": SDTask, "byot": BYOTTask, "mlcsd": MLCSDTask}


def build_task(method: str, model: MultiExitNet, cfg: LossConfig) -> Task:
    if method not in TASKS:
        raise ValueError(f"unknown method '{method}': use one of {', '.join(METHODS)}")
    return TASKS[method](model, cfg)
