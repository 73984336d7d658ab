"""The torch device a job runs on (`--device auto|cpu|cuda|cuda:N`): one small module that the
trainer and evaluation both import, so neither imports the other for it."""

from __future__ import annotations

import torch
import torch.distributed as dist

from edgeexit.errors import UserError


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        if dist.is_available() and dist.is_initialized() and not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("--device cuda asked for, but torch sees no CUDA device")
    try:
        return torch.device(device)
    except RuntimeError:
        raise UserError(f"--device must be auto, cpu, cuda or cuda:N, got '{device}'") from None
