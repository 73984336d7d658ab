"""Multi-exit ResNet18 (MLCSD paper layout; CIFAR or ImageNet stem) and its stage split.

The network is stored as it is deployed: ``segments[pos]`` maps the state after the previous exit
to the state at exit ``pos + 1``, and ``heads[pos]`` reads the *tap* tensor of that state.
Names: ``pos`` is a 0-based position, ``exit_number`` the 1-based exit, ``num_exits`` a count. A state is a tuple of
tensors: one tensor at a layer boundary, two inside a residual block (block input for the
shortcut, and the activation after conv1-bn1-relu, which is the tap).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

State = tuple[torch.Tensor, ...]

STAGE_WIDTHS = (64, 128, 256, 512)
BLOCKS_PER_STAGE = (2, 2, 2, 2)


class ConfigError(ValueError):
    """A model or loss setting outside its domain. ``field`` names the setting, so a caller can
    name it its own way (the trainer names the CLI flag): ``f"{field} {problem}"`` is the message."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field} {problem}")
        self.field, self.problem = field, problem


def check_architecture(exits: int, stem: str) -> None:
    """The one check of the layout (`LAYOUTS`) and the stem (`STEMS`); raises ConfigError."""
    if exits not in LAYOUTS:
        raise ConfigError("exits", f"must be {', '.join(map(str, LAYOUTS[:-1]))} or {LAYOUTS[-1]}, got {exits}")
    if stem not in STEMS:
        raise ConfigError("stem", f"must be {' or '.join(STEMS)}, got '{stem}'")


@dataclass
class MultiExitConfig:
    """Everything needed to rebuild a :class:`MultiExitNet` (plain JSON types only)."""

    # 8 = paper layout (two taps per stage), 4 = stage outputs (BYOT placement), 9 = paper layout plus
    # an early exit inside the first block (after the stem and one conv): a cheap first exit
    exits: int = 8
    width: float = 1.0
    in_chans: int = 3
    num_classes: int = 10
    input_size: list[int] = field(default_factory=lambda: [32, 32])
    # cifar: 3x3 stride-1 conv, no max-pool (the paper's); imagenet: torchvision ResNet18's 7x7
    # stride-2 conv + 3x3 stride-2 max-pool (its parameter shapes match, so its weights load)
    stem: str = "cifar"

    def __post_init__(self) -> None:
        check_architecture(self.exits, self.stem)
        if self.width <= 0:
            raise ConfigError("width", f"must be positive, got {self.width}")
        self.input_size = [int(s) for s in self.input_size]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> MultiExitConfig:
        for key, kind in CONFIG_KINDS.items():  # another kind of model (a torchvision backbone) rebuilds its own way
            if d.get(key) is not None:
                return kind.from_dict(d)
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


# Other kinds of multi-exit model register themselves here (models.backbones, imported by the
# package): a config dict holding the key is theirs, and their config type builds their model.
CONFIG_KINDS: dict[str, type] = {}
MODEL_KINDS: dict[type, type] = {}

STEMS = ("cifar", "imagenet")
LAYOUTS = (4, 8, 9)
NATURAL_SIZE = {"cifar": 32, "imagenet": 224}


def make_stem(kind: str, in_chans: int, out_ch: int) -> nn.Sequential:
    if kind == "imagenet":
        return nn.Sequential(
            nn.Conv2d(in_chans, out_ch, 7, 2, 3, bias=False),
            nn.BatchNorm2d(out_ch),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(3, 2, 1),
        )
    return nn.Sequential(
        nn.Conv2d(in_chans, out_ch, 3, 1, 1, bias=False), nn.BatchNorm2d(out_ch), nn.ReLU(inplace=True)
    )


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """ResNet BasicBlock, computable in two halves so a segment can end inside it."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def first_half(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn1(self.conv1(x)))

    def second_half(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn2(self.conv2(h)) + self.shortcut(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second_half(x, self.first_half(x))


class Segment(nn.Module):
    """Backbone segment: state_{k-1} -> state_k.

    ``blocks`` run whole; ``open_block`` (optional) runs only its first half, leaving the state
    inside that block; ``close_block`` (optional) first finishes a block left open by the previous
    segment. The tap is always the last tensor of the returned state.
    """

    def __init__(
        self,
        stem: nn.Module | None = None,
        close_block: BasicBlock | None = None,
        blocks: list[BasicBlock] | None = None,
        open_block: BasicBlock | None = None,
    ) -> None:
        super().__init__()
        self.stem = stem
        self.close_block = close_block
        self.blocks = nn.ModuleList(blocks or [])
        self.open_block = open_block

    def forward(self, *state: torch.Tensor) -> State:
        if self.close_block is not None:
            x = self.close_block.second_half(state[0], state[1])
        else:
            x = state[0]
        if self.stem is not None:
            x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        if self.open_block is not None:
            return (x, self.open_block.first_half(x))
        return (x,)


class ExitHead(nn.Module):
    """Depthwise-separable stride-2 reductions until ``feat_ch`` channels, then GAP + linear.

    ``spatial_first``: the same stride-2 depthwise steps all run first and one pointwise convolution
    then widens to ``feat_ch`` on the smallest map. For a wide tap (ResNet-50's 256 channels at
    stride 4) the pointwise widenings dominate the head, and running the widening on a map a quarter
    the area cuts the head's cost about four times; the features keep the same width."""

    def __init__(self, in_ch: int, feat_ch: int, num_classes: int, spatial_first: bool = False) -> None:
        super().__init__()
        self.spatial_first = spatial_first
        layers: list[nn.Module] = []
        ch = in_ch
        while ch < feat_ch:
            out = min(ch * 2, feat_ch)
            if spatial_first:
                layers.append(nn.Conv2d(in_ch, in_ch, 3, 2, 1, groups=in_ch, bias=False))  # depthwise 3x3 s2
            else:
                layers += [
                    nn.Conv2d(ch, ch, 3, 2, 1, groups=ch, bias=False),  # depthwise 3x3 s2
                    nn.Conv2d(ch, out, 1, bias=False),  # pointwise
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                ]
            ch = out
        if spatial_first and feat_ch > in_ch:
            layers += [nn.Conv2d(in_ch, feat_ch, 1, bias=False), nn.BatchNorm2d(feat_ch), nn.ReLU(inplace=True)]
        self.reduce = nn.Sequential(*layers)
        # Adaptive pooling: any input size works (the reference code hard-codes 32x32).
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(feat_ch, num_classes)
        self.feat_dim = feat_ch

    def features(self, tap: torch.Tensor) -> torch.Tensor:
        return torch.flatten(self.pool(self.reduce(tap)), 1)

    def forward(self, tap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features(tap)
        return self.fc(f), f


class MultiExitNet(nn.Module):
    """ResNet18 with ``config.exits`` exits; ``forward`` returns (logits list, features list)."""

    def __init__(self, config: MultiExitConfig) -> None:
        super().__init__()
        self.config = config
        w = config.width
        widths = [scaled(c, w) for c in STAGE_WIDTHS]
        stem = make_stem(config.stem, config.in_chans, widths[0])
        stages: list[list[BasicBlock]] = []
        in_ch = widths[0]
        for i, (ch, n) in enumerate(zip(widths, BLOCKS_PER_STAGE, strict=True)):
            blocks = []
            for b in range(n):
                blocks.append(BasicBlock(in_ch, ch, stride=2 if (i > 0 and b == 0) else 1))
                in_ch = ch
            stages.append(blocks)
        self.stages = stages  # a plain list (not registered twice): the blocks live in the segments

        segments: list[Segment] = []
        tap_channels: list[int] = []
        if config.exits in (8, 9):
            # Two taps per stage: inside the last block (after conv1-bn1-relu), and stage output.
            for i, blocks in enumerate(stages):
                if i == 0 and config.exits == 9:  # one more tap, inside the first block
                    segments.append(Segment(stem=stem, open_block=blocks[0]))
                    segments.append(Segment(close_block=blocks[0], blocks=blocks[1:-1], open_block=blocks[-1]))
                    tap_channels.append(widths[0])
                else:
                    segments.append(Segment(stem=stem if i == 0 else None, blocks=blocks[:-1], open_block=blocks[-1]))
                segments.append(Segment(close_block=blocks[-1]))
                tap_channels += [widths[i], widths[i]]
        else:
            for i, blocks in enumerate(stages):
                segments.append(Segment(stem=stem if i == 0 else None, blocks=blocks))
                tap_channels.append(widths[i])
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(ExitHead(c, widths[-1], config.num_classes) for c in tap_channels)
        self.feat_dim = widths[-1]
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, feats = [], []
        state: State = (x,)
        for segment, head in zip(self.segments, self.heads, strict=True):
            state = segment(*state)
            z, f = head(state[-1])
            logits.append(z)
            feats.append(f)
        return logits, feats


def count_unit_cost(model: MultiExitNet, input_size: list[int] | None = None) -> list[dict]:
    """MACs, FLOPs (= 2 x MACs) and parameters of every unit, counted from the modules.

    Conv and linear multiply-accumulates are counted with forward hooks on a real forward pass
    of a single image; BN/ReLU/pooling/additions are not counted (the usual convention).
    """
    cfg = model.config
    h, w = input_size or cfg.input_size
    was_training = model.training
    model.eval()
    units = []
    try:
        with torch.no_grad(), MacCounter(model) as macs:
            state: State = (torch.zeros(1, cfg.in_chans, h, w),)
            for exit_number, (segment, head) in enumerate(zip(model.segments, model.heads, strict=True), 1):
                state = segment(*state)
                units.append(_unit_cost("segment", exit_number, macs.take(), model, segment))
                head(state[-1])
                units.append(_unit_cost("head", exit_number, macs.take(), model, head))
    finally:
        model.train(was_training)
    return units


class MacCounter:
    """Counts the conv and linear multiply-accumulates of every forward pass through ``model``'s
    modules while inside ``with``; `take` returns the count so far and starts again from zero."""

    def __init__(self, model: nn.Module) -> None:
        self.model, self.count, self.handles = model, 0, []

    def _hook(self, mod: nn.Module, inp: tuple, out: torch.Tensor) -> None:
        if isinstance(mod, nn.Conv2d):
            self.count += out.numel() * mod.kernel_size[0] * mod.kernel_size[1] * (mod.in_channels // mod.groups)
        elif isinstance(mod, nn.Linear):
            self.count += out.numel() * mod.in_features

    def __enter__(self) -> MacCounter:
        mods = [m for m in self.model.modules() if isinstance(m, nn.Conv2d | nn.Linear)]
        self.handles = [m.register_forward_hook(self._hook) for m in mods]
        return self

    def __exit__(self, *exc: object) -> None:
        for hd in self.handles:
            hd.remove()

    def take(self) -> int:
        count, self.count = self.count, 0
        return count


def _unit_cost(kind: str, exit_number: int, unit_macs: int, model: MultiExitNet, module: nn.Module) -> dict:
    prefix = "seg" if kind == "segment" else "head"
    return {
        "name": f"{prefix}_{exit_number:02d}",  # runtime.plan.segment_name / head_name (0-based there)
        "kind": kind,
        "exit_index": exit_number,  # the 1-based exit (the manifest's key)
        "macs": int(unit_macs),
        "flops": int(2 * unit_macs),
        "params": int(sum(p.numel() for p in _own_parameters(model, module))),
    }


def _own_parameters(model: MultiExitNet, module: nn.Module) -> list[nn.Parameter]:
    """Parameters a unit executes. A block split across two segments counts each half once."""
    if not isinstance(module, Segment):
        return list(module.parameters())
    params: list[nn.Parameter] = []
    if module.stem is not None:
        params += list(module.stem.parameters())
    for b in module.blocks:
        params += list(b.parameters())
    if module.open_block is not None:
        params += [*module.open_block.conv1.parameters(), *module.open_block.bn1.parameters()]
    if module.close_block is not None:
        cb = module.close_block
        params += [*cb.conv2.parameters(), *cb.bn2.parameters(), *cb.shortcut.parameters()]
    return params


def cumulative_exit_flops(units: list[dict]) -> list[float]:
    """Per exit (by position), the FLOPs to reach and evaluate it when every earlier head is
    evaluated (anytime cascade)."""
    total, out = 0, []
    for u in units:
        total += u["flops"]
        if u["kind"] == "head":
            out.append(float(total))
    return out


def build_model(config: MultiExitConfig | dict) -> MultiExitNet:
    """The network a config describes: the multi-exit ResNet18, or a torchvision backbone with exits
    (a config naming a ``backbone``)."""
    if isinstance(config, dict):
        config = MultiExitConfig.from_dict(config)
    if type(config) in MODEL_KINDS:
        return MODEL_KINDS[type(config)](config)
    return MultiExitNet(config)
