"""Multi-exit backbones, exit heads and the stage split (pure torch)."""

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
