"""Any torchvision classification CNN as a multi-exit network: backbones as data.

A backbone is the user's own network cut into a flat list of *blocks* (each maps one tensor to one
tensor) and its classifier (pooling + the network's own classifier layers). Blocks are grouped into
*stages* by their output stride, measured on a dry run rather than written down per architecture
(timm's ``feature_info``: one entry per stage with its channels and reduction). Exits sit at stage
boundaries, and with ``layout="dense"`` also in the middle of every stage of four or more blocks.
The final exit is the network's own classifier on the network's own trunk, so a network whose
weights are loaded and frozen (``freeze_trunk``) predicts bit-identically through the final exit.

Architectures are built from torchvision without weights (nothing is downloaded); ``--init FILE``
loads a torchvision state_dict the user already has (`load_torchvision_weights`).

Small inputs (under 64 px, e.g. Fashion-MNIST's 28 px): the stem's first convolution runs at stride
1 (and a ResNet drops its max-pool), as the CIFAR stem of the ResNet18 path does, so the last stage
still sees a few pixels. Parameter shapes are unchanged, so ImageNet weights still load.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from edgeexit.models.multiexit import CONFIG_KINDS, MODEL_KINDS, ConfigError, ExitHead, MacCounter

State = tuple[torch.Tensor, ...]

# name -> family; every architecture torchvision builds without weights
BACKBONES = {
    "resnet18": "resnet",
    "resnet34": "resnet",
    "resnet50": "resnet",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenet_v3_small": "mobilenet_v3",
    "mobilenet_v3_large": "mobilenet_v3",
    "efficientnet_b0": "efficientnet",
    "efficientnet_b1": "efficientnet",
    "efficientnet_b2": "efficientnet",
    "regnet_y_400mf": "regnet",
    "regnet_y_800mf": "regnet",
    "convnext_tiny": "convnext",
}
LAYOUTS = ("stages", "dense")
HEAD_RULES = ("by-cost", "widen")
# An early head may cost this share of the segment before it (multiply-accumulates) before it is built
# spatial-first. Measured at 224 px on ONNX Runtime CPU: ResNet-50's widening heads on its 256- and
# 512-channel taps took 31 % and 25 % of their segments' time (docs/results.md, "Your own backbone").
HEAD_SHARE = 0.10
SMALL_INPUT_BELOW = 64  # px: inputs smaller than this get the reduced-stride stem


def check_backbone(name: str) -> None:
    if name not in BACKBONES:
        raise ConfigError("backbone", f"must be one of {', '.join(BACKBONES)}, got '{name}'")


@dataclass
class BackboneConfig:
    """Everything needed to rebuild a :class:`BackboneNet` (plain JSON types only)."""

    backbone: str = "mobilenet_v2"
    width: float = 1.0
    in_chans: int = 3
    num_classes: int = 10
    input_size: list[int] = field(default_factory=lambda: [224, 224])
    # None: decided by the input size (under SMALL_INPUT_BELOW px: stride-1 stem)
    small_input: bool | None = None
    layout: str = "stages"  # stages: one exit per stage boundary; dense: also inside long stages
    freeze_trunk: bool = False  # train only the early exit heads; trunk and classifier stay as loaded
    # how early heads reduce their tap: "widen" (widen while reducing, every head), or "by-cost": a head
    # that would cost over HEAD_SHARE of the segment before it reduces first, then widens (`head_layouts`)
    heads: str = "by-cost"

    def __post_init__(self) -> None:
        check_backbone(self.backbone)
        if self.layout not in LAYOUTS:
            raise ConfigError("exit_layout", f"must be {' or '.join(LAYOUTS)}, got '{self.layout}'")
        if not (isinstance(self.width, int | float) and 0 < self.width <= 4):
            raise ConfigError("width", f"must be within (0, 4], got {self.width}")
        self.input_size = [int(s) for s in self.input_size]
        if self.small_input is None:
            self.small_input = min(self.input_size) < SMALL_INPUT_BELOW
        if self.heads not in HEAD_RULES:
            raise ConfigError("heads", f"must be {' or '.join(HEAD_RULES)}, got '{self.heads}'")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> BackboneConfig:
        fields = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        fields.setdefault("heads", "widen")  # a checkpoint written before heads were chosen by cost
        return cls(**fields)


# ----------------------------------------------------------------------------------------------
# torchvision architectures, weightless, at any width and input channel count


def _divisible(v: float, divisor: int = 8) -> int:
    return max(divisor, int(v + divisor / 2) // divisor * divisor)


def torchvision_network(name: str, width: float = 1.0, num_classes: int = 1000) -> nn.Module:
    """torchvision's ``name`` without weights; ``width`` scales every stage's channels (1.0: the
    published network, whose state_dict keys and shapes match torchvision's weights)."""
    import torchvision.models as tvm

    check_backbone(name)
    family = BACKBONES[name]
    if family == "resnet":
        return _resnet(name, width, num_classes)
    if family == "mobilenet_v2":
        return tvm.MobileNetV2(num_classes=num_classes, width_mult=width)
    if family == "mobilenet_v3":
        from torchvision.models.mobilenetv3 import MobileNetV3, _mobilenet_v3_conf

        setting, last = _mobilenet_v3_conf(name, width_mult=width)
        return MobileNetV3(setting, last, num_classes=num_classes)
    if family == "convnext":
        return _convnext(width, num_classes)
    if family == "efficientnet":
        from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf

        # torchvision's (width, depth, dropout) per variant
        w, d, drop = {"efficientnet_b0": (1.0, 1.0, 0.2), "efficientnet_b1": (1.0, 1.1, 0.2),
                      "efficientnet_b2": (1.1, 1.2, 0.3)}[name]  # fmt: skip
        setting, last = _efficientnet_conf(name, width_mult=w * width, depth_mult=d)
        return EfficientNet(setting, drop, last_channel=last, num_classes=num_classes)
    from torchvision.models.regnet import BlockParams, RegNet

    # torchvision's regnet_y_400mf / regnet_y_800mf parameters. Width scales each stage's width
    # afterwards (a multiple of its group width), so the stages' depths stay the published ones.
    depth, w0, wa, wm, group = {"regnet_y_400mf": (16, 48, 27.89, 2.09, 8),
                                "regnet_y_800mf": (14, 56, 38.84, 2.4, 16)}[name]  # fmt: skip
    p = BlockParams.from_init_params(depth=depth, w_0=w0, w_a=wa, w_m=wm, group_width=group, se_ratio=0.25)
    if width != 1.0:
        groups = [min(g, _divisible(w * width)) for g, w in zip(p.group_widths, p.widths, strict=True)]
        widths = [max(g, round(w * width / g) * g) for g, w in zip(groups, p.widths, strict=True)]
        p = BlockParams(p.depths, widths, groups, p.bottleneck_multipliers, p.strides, p.se_ratio)
    return RegNet(p, stem_width=_divisible(32 * width), num_classes=num_classes)


def _convnext(width: float, num_classes: int) -> nn.Module:
    """torchvision's convnext_tiny (channels 96-768, depths 3-3-9-3, stochastic depth 0.1)."""
    from torchvision.models.convnext import CNBlockConfig, ConvNeXt

    c = [96, 192, 384, 768] if width == 1.0 else [_divisible(ch * width) for ch in (96, 192, 384, 768)]
    setting = [CNBlockConfig(c[0], c[1], 3), CNBlockConfig(c[1], c[2], 3), CNBlockConfig(c[2], c[3], 9),
               CNBlockConfig(c[3], None, 3)]  # fmt: skip
    return ConvNeXt(setting, stochastic_depth_prob=0.1, num_classes=num_classes)


def _resnet(name: str, width: float, num_classes: int) -> nn.Module:
    import torchvision.models as tvm
    from torchvision.models.resnet import BasicBlock, Bottleneck

    block, layers = {"resnet18": (BasicBlock, [2, 2, 2, 2]), "resnet34": (BasicBlock, [3, 4, 6, 3]),
                     "resnet50": (Bottleneck, [3, 4, 6, 3])}[name]  # fmt: skip
    net = tvm.ResNet(block, layers, num_classes=num_classes)
    if width == 1.0:
        return net
    # torchvision's ResNet has fixed widths: rebuild its stem, stages and classifier at the scaled
    # widths with its own _make_layer, so module names (and the forward) stay torchvision's.
    c = [max(1, round(64 * 2**i * width)) for i in range(4)]
    net.inplanes = c[0]
    net.conv1 = nn.Conv2d(3, c[0], 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(c[0])
    net.layer1 = net._make_layer(block, c[0], layers[0])
    net.layer2 = net._make_layer(block, c[1], layers[1], stride=2)
    net.layer3 = net._make_layer(block, c[2], layers[2], stride=2)
    net.layer4 = net._make_layer(block, c[3], layers[3], stride=2)
    net.fc = nn.Linear(c[3] * block.expansion, num_classes)
    for m in net.modules():  # torchvision's initialisation
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    return net


def _first_conv(net: nn.Module) -> tuple[nn.Module, str, nn.Conv2d]:
    """(parent, attribute, conv) of the stem's convolution: the first Conv2d registered."""
    for parent in net.modules():
        for attr, child in parent.named_children():
            if isinstance(child, nn.Conv2d):
                return parent, attr, child
    raise ValueError("no convolution in the network")


def adapt_input_channels(net: nn.Module, in_chans: int) -> None:
    """Replace the stem convolution by one taking ``in_chans`` channels (Fashion-MNIST: 1)."""
    parent, attr, conv = _first_conv(net)
    if conv.in_channels == in_chans:
        return
    new = nn.Conv2d(
        in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, bias=conv.bias is not None
    )
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")
    setattr(parent, attr, new)


def reduce_stem_stride(net: nn.Module, family: str) -> None:
    """The small-input variant: stem convolution at stride 1; a ResNet also drops its max-pool."""
    _, _, conv = _first_conv(net)
    conv.stride = (1, 1)
    if family == "resnet":
        net.maxpool = nn.Identity()


# ----------------------------------------------------------------------------------------------
# the cut: blocks, stages, exits


class ClassifierHead(nn.Module):
    """The network's own ending: global average pooling, then its classifier, exactly as its
    ``forward`` runs them. Returns (logits, pooled features)."""

    def __init__(self, pool: nn.Module, classifier: nn.Module, feat_dim: int) -> None:
        super().__init__()
        self.pool = pool
        self.classifier = classifier
        self.feat_dim = feat_dim

    def forward(self, tap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = torch.flatten(self.pool(tap), 1)
        return self.classifier(f), f


class BlockSegment(nn.Module):
    """Blocks run in order: state (one tensor) -> state."""

    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, *state: torch.Tensor) -> State:
        x = state[0]
        for b in self.blocks:
            x = b(x)
        return (x,)


def split_network(net: nn.Module, family: str) -> tuple[list[nn.Module], nn.Module, nn.Module]:
    """(blocks, pooling, classifier) of a torchvision network, in the order its forward runs them.
    The blocks are the network's own modules (shared, not copied)."""
    if family == "resnet":
        stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
        blocks = [stem] + [b for layer in (net.layer1, net.layer2, net.layer3, net.layer4) for b in layer]
        return blocks, net.avgpool, net.fc
    if family == "regnet":
        return [net.stem] + [b for stage in net.trunk_output for b in stage], net.avgpool, net.fc
    if family == "mobilenet_v2":
        # torchvision runs F.adaptive_avg_pool2d(x, (1, 1)): the same kernel as this module
        return list(net.features), nn.AdaptiveAvgPool2d((1, 1)), net.classifier
    if family == "mobilenet_v3":
        return list(net.features), net.avgpool, net.classifier
    if family == "efficientnet":
        f = net.features
        blocks = [f[0]] + [b for stage in f[1:-1] for b in stage] + [f[-1]]
        return blocks, net.avgpool, net.classifier
    if family == "convnext":
        # features alternate stem/downsampling and stages; the classifier is (LayerNorm2d, Flatten,
        # Linear) on the pooled 4-D map: the norm joins the pooling so the head's features are what
        # the Linear layer reads, computed exactly as torchvision's forward does
        blocks = [b for i, part in enumerate(net.features) for b in (part if i % 2 else [part])]
        return blocks, nn.Sequential(net.avgpool, net.classifier[0]), net.classifier[2]
    raise ValueError(f"unknown family {family}")


DRY_RUN_PX = 64


@torch.no_grad()
def block_shapes(blocks: list[nn.Module], in_chans: int, size: int = DRY_RUN_PX) -> list[tuple[int, int, int]]:
    """(output channels, reduction, multiply-accumulates) of every block, measured on one dry run at
    ``size`` px."""
    x = torch.zeros(1, in_chans, size, size)
    shapes = []
    training = [b.training for b in blocks]
    for b in blocks:
        b.eval()
    try:
        for b in blocks:
            with MacCounter(b) as macs:
                x = b(x)
            shapes.append((int(x.shape[1]), size // int(x.shape[-1]), macs.take()))
    finally:
        for b, t in zip(blocks, training, strict=True):
            b.train(t)
    return shapes


@torch.no_grad()
def early_head(shapes: list[tuple[int, int, int]], start: int, end: int, feat: int, config: BackboneConfig):
    """The exit head after blocks ``start:end``: it widens its tap 4x (up to the network's final
    width) in stride-2 depthwise-separable steps, then pools, cheap next to the trunk for most taps
    (widening to the final width, as the ResNet18 heads do, cost MobileNetV2 1.3M parameters per
    head for its 1280 channels). Under ``heads="by-cost"`` a head whose widening would cost more than
    HEAD_SHARE of the blocks before it is built spatial-first (`ExitHead`)."""
    tap, reduction, _ = shapes[end - 1]
    head = ExitHead(tap, min(feat, 4 * tap), config.num_classes)
    if config.heads == "widen":
        return head
    side = max(1, DRY_RUN_PX // reduction)
    with MacCounter(head) as macs:
        head.eval()(torch.zeros(1, tap, side, side))
    if macs.take() <= HEAD_SHARE * sum(m for _, _, m in shapes[start:end]):
        return head.train()
    return ExitHead(tap, min(feat, 4 * tap), config.num_classes, spatial_first=True)


def stages_of(shapes: list[tuple[int, int, int]]) -> list[dict]:
    """Consecutive blocks of one reduction form a stage (timm's feature_info: num_chs, reduction,
    and here the block range). The last stage also holds a final 1x1 conv of the same stride."""
    stages: list[dict] = []
    for i, (ch, red, _) in enumerate(shapes):
        if stages and stages[-1]["reduction"] == red:
            stages[-1].update(end=i + 1, num_chs=ch)
        else:
            stages.append({"start": i, "end": i + 1, "num_chs": ch, "reduction": red})
    return stages


def exit_points(stages: list[dict], layout: str) -> list[int]:
    """Block counts after which an exit sits (the last one is the whole trunk). Exits start at the
    stride-4 stage: a head on the stride-2 maps costs much and classifies little."""
    points = []
    for s in stages:
        if s["reduction"] < 4:
            continue
        n = s["end"] - s["start"]
        if layout == "dense" and n >= 4:
            points.append(s["start"] + n // 2)
        points.append(s["end"])
    return sorted(set(points))


class BackboneNet(nn.Module):
    """A torchvision network with exits at its stage boundaries. Same interface as MultiExitNet:
    ``segments``, ``heads``, ``forward`` -> (logits list, features list), shallow to deep."""

    def __init__(self, config: BackboneConfig) -> None:
        super().__init__()
        self.config = config
        family = BACKBONES[config.backbone]
        net = torchvision_network(config.backbone, config.width, config.num_classes)
        adapt_input_channels(net, config.in_chans)
        blocks, pool, classifier = split_network(net, family)
        # stages from the published strides (a small input changes the stem only, not the stages)
        shapes = block_shapes(blocks, config.in_chans)
        if config.small_input:
            reduce_stem_stride(net, family)
            blocks, pool, classifier = split_network(net, family)  # the ResNet stem holds the new max-pool
        self.stage_info = stages_of(shapes)
        self.feature_info = [
            {"num_chs": s["num_chs"], "reduction": s["reduction"], "module": f"blocks.{s['end'] - 1}"}
            for s in self.stage_info
        ]
        points = exit_points(self.stage_info, config.layout)
        feat = shapes[-1][0]
        segments, heads, start = [], [], 0
        for i, end in enumerate(points):
            segments.append(BlockSegment(blocks[start:end]))
            if i == len(points) - 1:
                heads.append(ClassifierHead(pool, classifier, feat))
            else:
                heads.append(early_head(shapes, start, end, feat, config))
            start = end
        self.segments = nn.ModuleList(segments)
        self.heads = nn.ModuleList(heads)
        self.feat_dim = feat
        self.exit_blocks = points
        # The torchvision network shares its modules with the segments and the final head; kept
        # unregistered (a plain list) so its parameters are not counted or saved twice.
        self._network = [net]
        if config.freeze_trunk:
            self.freeze_trunk()

    @property
    def network(self) -> nn.Module:
        """The torchvision network itself (the same parameters as the segments and final head)."""
        return self._network[0]

    @property
    def num_exits(self) -> int:
        return len(self.heads)

    def freeze_trunk(self) -> None:
        """Only the early heads learn: the trunk and the network's classifier keep their weights and
        their BatchNorm statistics (they stay in eval mode, see `train`)."""
        self.config.freeze_trunk = True
        for p in (*self.segments.parameters(), *self.heads[-1].parameters()):
            p.requires_grad_(False)

    def train(self, mode: bool = True) -> BackboneNet:
        super().train(mode)
        if self.config.freeze_trunk:
            self.segments.eval()
            self.heads[-1].eval()
        return self

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        logits, feats = [], []
        state: State = (x,)
        for segment, head in zip(self.segments, self.heads, strict=True):
            state = segment(*state)
            z, f = head(state[-1])
            logits.append(z)
            feats.append(f)
        return logits, feats


CONFIG_KINDS["backbone"] = BackboneConfig
MODEL_KINDS[BackboneConfig] = BackboneNet


def build_backbone(config: BackboneConfig | dict) -> BackboneNet:
    if isinstance(config, dict):
        config = BackboneConfig.from_dict(config)
    return BackboneNet(config)


# ----------------------------------------------------------------------------------------------
# the user's weights


def load_torchvision_weights(model: BackboneNet, state_dict: dict) -> dict:
    """Load a torchvision state_dict (the architecture's own keys) into ``model``'s network.

    The classifier's last layer is loaded when its shape matches (the user's fine-tuned network,
    same classes) and left fresh otherwise (ImageNet's 1000 classes on another task); a 3-channel
    stem is summed over its input channels for 1-channel images (timm's adapt_input_conv). Any
    other missing key or shape mismatch is a UserError naming it. Returns what was loaded."""
    from edgeexit.errors import UserError

    net = model.network
    own = net.state_dict()
    _, _, conv = _first_conv(net)
    stem_key = next(k for k, v in net.named_parameters() if v is conv.weight)
    classifier_keys = {f"{_classifier_prefix(net)}{k}" for k in ("weight", "bias")}
    sd = dict(state_dict)
    w = sd.get(stem_key)
    if isinstance(w, torch.Tensor) and w.ndim == 4 and w.shape[1] != conv.in_channels and conv.in_channels == 1:
        sd[stem_key] = w.sum(dim=1, keepdim=True)
    fresh = []
    for key, target in own.items():
        src = sd.get(key)
        if src is None:
            raise UserError(f"the --init weights have no '{key}': not a torchvision {model.config.backbone} state_dict")
        if tuple(src.shape) != tuple(target.shape):
            if key in classifier_keys:
                fresh.append(key)
                continue
            raise UserError(
                f"'{key}' has shape {tuple(src.shape)} in the --init weights but {tuple(target.shape)} here "
                f"({model.config.backbone} at --width {model.config.width}; torchvision's weights need --width 1)"
            )
    if model.config.freeze_trunk and fresh:
        raise UserError(
            f"--freeze-trunk keeps the network's own classifier, but the --init classifier has "
            f"{tuple(sd[sorted(fresh)[0]].shape)} where this task needs {tuple(own[sorted(fresh)[0]].shape)}: "
            "fine-tune the network on these classes first, or train without --freeze-trunk"
        )
    with torch.no_grad():
        for key, target in own.items():
            if key not in fresh:
                target.copy_(sd[key])
    return {"loaded": len(own) - len(fresh), "fresh": sorted(fresh)}


def _classifier_prefix(net: nn.Module) -> str:
    """State-dict prefix of the network's last Linear layer (its classifier output)."""
    name = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]
    return f"{name}."
