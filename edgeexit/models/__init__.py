"""Multi-exit backbones, exit heads and the stage split (pure torch)."""

# registers the torchvision backbones with MultiExitConfig.from_dict and build_model
from edgeexit.models import backbones as _backbones  # noqa: F401
from edgeexit.models.multiexit import (
    BasicBlock,
    ExitHead,
    MultiExitConfig,
    MultiExitNet,
    Segment,
    build_model,
    count_unit_cost,
    cumulative_exit_flops,
)

__all__ = [
    "BasicBlock",
    "ExitHead",
    "MultiExitConfig",
    "MultiExitNet",
    "Segment",
    "build_model",
    "count_unit_cost",
    "cumulative_exit_flops",
]
