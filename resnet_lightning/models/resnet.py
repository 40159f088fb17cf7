"""ResNet and its descendants as arguments of one `ResNet` class.

Parameter names follow torchvision (`conv1`, `bn1`, `layer1.0.conv1`, `layer1.0.downsample.0`,
`fc`) so torchvision and other standard checkpoints load with strict=True. Variants:

- `block`: BasicBlock / Bottleneck (He et al. 2016) or their pre-activation twins
  (He et al. 2016b); ResNeXt and Wide ResNet are Bottleneck with `groups` / `width_per_group`.
- `stem`: 'imagenet' (7x7/2 conv + max-pool), 'cifar' (3x3/1 conv, no pool, for 32 px
  images) or 'deep' (three 3x3 convs, ResNet-C of "Bag of Tricks").
- `shortcut`: 'B' projects with a 1x1 conv where the shape changes, 'A' zero-pads channels
  and subsamples (parameter-free, as the paper's CIFAR nets); `plain=True` drops shortcuts.
- `avg_down` (ResNet-D) and `stride_in_1x1` (ResNet v1 instead of v1.5).
- `drop_path`: stochastic depth (Huang et al. 2016), the residual branch of whole samples
  dropped in training, with a probability rising linearly over the blocks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import conv1x1, conv3x3
from torchvision.ops import StochasticDepth

from .registry import Family, register_variant

HE2016 = "He et al. 2016, Deep Residual Learning (arXiv:1512.03385)"
HE2016_PREACT = "He et al. 2016, Identity Mappings in Deep ResNets (arXiv:1603.05027)"
XIE2017 = "Xie et al. 2017, ResNeXt (arXiv:1611.05431)"
ZAGORUYKO2016 = "Zagoruyko & Komodakis 2016, Wide ResNets (arXiv:1605.07146)"
HE2019 = "He et al. 2019, Bag of Tricks, ResNet-D (arXiv:1812.01187)"
RESNET = Family("ResNet", 224, HE2016, torchvision_weights=True)
RESNET_V1 = Family("ResNet", 224, HE2016)  # not torchvision's v1.5: its weights do not fit
RESNET_D = Family("ResNet-D", 224, HE2019)
PREACT = Family("Pre-act ResNet", 224, HE2016_PREACT)
RESNEXT = Family("ResNeXt", 224, XIE2017, torchvision_weights=True)
WIDE = Family("Wide ResNet", 224, ZAGORUYKO2016, torchvision_weights=True)

STEMS = ("imagenet", "cifar", "deep")


class ZeroPadShortcut(nn.Module):
    """Option A shortcut: subsample like a strided 1x1 conv, fill new channels with zeros."""

    def __init__(self, extra_channels: int, stride: int) -> None:
        super().__init__()
        self.extra_channels = extra_channels
        self.stride = stride

    def extra_repr(self) -> str:
        return f"extra_channels={self.extra_channels}, stride={self.stride}"

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra_channels))


class ResidualBlock(nn.Module):
    """What all blocks share: how the shortcut joins the residual branch.

    `downsample` is the shortcut (None: identity); `residual=False` drops it, as in the
    paper's plain networks. Subclasses set both last, keeping torchvision's key order.
    `drop_path` > 0 zeroes the residual branch of each sample with that probability in
    training (stochastic depth; it has no parameters, so no state-dict keys).
    """

    expansion = 1
    preact = False
    downsample: nn.Module | None
    residual: bool
    drop_path: nn.Module | None

    def __init__(self, drop_path: float = 0.0) -> None:
        super().__init__()
        # "row": each sample of the batch is dropped on its own, as in timm's DropPath.
        self.drop_path = StochasticDepth(drop_path, "row") if drop_path > 0 else None

    def add_shortcut(
        self, out: Tensor, x: Tensor, projection_input: Tensor | None = None
    ) -> Tensor:
        """`out` plus the shortcut of `x`; a projection reads `projection_input` if given."""
        if not self.residual:
            return out
        if self.drop_path is not None:
            out = self.drop_path(out)
        if self.downsample is None:
            return out + x
        return out + self.downsample(x if projection_input is None else projection_input)

    def zero_init_last(self) -> None:
        """Zero the branch's last scale so the block starts as its shortcut."""
        raise NotImplementedError


class BasicBlock(ResidualBlock):
    """Two 3x3 convs; the sum with the shortcut is followed by ReLU."""

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(drop_path)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(self.add_shortcut(out, x))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn2.weight)


class Bottleneck(ResidualBlock):
    """1x1 reduce, 3x3 (grouped for ResNeXt), 1x1 expand by 4.

    The stride sits on the 3x3 conv (ResNet v1.5, torchvision) unless `stride_in_1x1`
    (the paper's v1: cheaper, slightly less accurate).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        groups: int = 1,
        width_per_group: int = 64,
        stride_in_1x1: bool = False,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(drop_path)
        width = int(planes * (width_per_group / 64.0)) * groups
        stride_1x1, stride_3x3 = (stride, 1) if stride_in_1x1 else (1, stride)
        self.conv1 = conv1x1(inplanes, width, stride_1x1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride_3x3, groups)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.add_shortcut(out, x))

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)


class PreActBasicBlock(ResidualBlock):
    """BN-ReLU-conv twice, nothing after the sum, so the shortcut path stays an identity.

    A projection shortcut sees the pre-activated input, as in the paper's code. `dropout`
    between the convs is the Wide ResNet regulariser.
    """

    preact = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        dropout: float = 0.0,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(drop_path)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.dropout(self.relu(self.bn2(out))))
        return self.add_shortcut(out, x, pre)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv2.weight)


class PreActBottleneck(ResidualBlock):
    """Pre-activation Bottleneck: (BN-ReLU-conv) x 3 with 1x1, 3x3 (stride), 1x1 convs."""

    expansion = 4
    preact = True

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        residual: bool = True,
        groups: int = 1,
        width_per_group: int = 64,
        drop_path: float = 0.0,
    ) -> None:
        super().__init__(drop_path)
        width = int(planes * (width_per_group / 64.0)) * groups
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = conv1x1(inplanes, width)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv2 = conv3x3(width, width, stride, groups)
        self.bn3 = nn.BatchNorm2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        pre = self.relu(self.bn1(x))
        out = self.conv1(pre)
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        return self.add_shortcut(out, x, pre)

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)


Block = type[ResidualBlock]


class ResNet(nn.Module):
    """Stem, stages `layer1..layerN` of `block`s, global average pool, `fc`.

    `widths` are the stages' `planes` (outputs are `planes * block.expansion`); the first
    stage keeps the resolution and each later one halves it. `block_kwargs` go to every
    block: `groups`, `width_per_group`, `stride_in_1x1` (Bottleneck), `dropout`
    (PreActBasicBlock); a block that lacks one raises TypeError. `drop_path` is the stochastic
    depth drop probability of the last block; block i of n gets drop_path * i / (n - 1), from
    0 at the first (timm's rule; Huang et al. 2016's linear decay).
    """

    def __init__(
        self,
        block: Block,
        layers: Sequence[int],
        num_classes: int = 1000,
        *,
        widths: Sequence[int] = (64, 128, 256, 512),
        stem: str = "imagenet",
        stem_width: int = 64,
        shortcut: str = "B",
        plain: bool = False,
        avg_down: bool = False,
        zero_init_residual: bool = False,
        drop_path: float = 0.0,
        **block_kwargs: Any,
    ) -> None:
        super().__init__()
        if stem not in STEMS:
            raise ValueError(f"stem must be one of {', '.join(STEMS)}, got '{stem}'")
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got '{shortcut}'")
        if len(widths) != len(layers):
            raise ValueError(f"one width per stage: {len(layers)} layers, {len(widths)} widths")
        if plain and zero_init_residual:
            raise ValueError("zero_init_residual would silence a plain network's blocks")
        if not 0 <= drop_path < 1:
            raise ValueError(f"drop_path must be in [0, 1) (0: off), got {drop_path}")
        if plain and drop_path:
            raise ValueError("drop_path drops residual branches; a plain network has none")
        last = max(sum(layers) - 1, 1)
        drop_paths = [drop_path * i / last for i in range(sum(layers))]
        self._build_stem(stem, stem_width, block.preact)
        self.inplanes = stem_width
        self.stage_names = [f"layer{i + 1}" for i in range(len(layers))]
        for i, (planes, depth) in enumerate(zip(widths, layers, strict=True)):
            stride = 1 if i == 0 else 2
            stage_drop_paths, drop_paths = drop_paths[:depth], drop_paths[depth:]
            stage = self._make_layer(
                block, planes, stride, shortcut, plain, avg_down, stage_drop_paths, block_kwargs
            )
            self.add_module(self.stage_names[i], stage)
        # Pre-activation blocks normalise their input, so they need no BN after the stem but
        # one after the last block.
        self.bn_final = nn.BatchNorm2d(self.inplanes) if block.preact else None
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(self.inplanes, num_classes)

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_residual:  # each block starts as an identity (Goyal et al. 2017)
            for m in self.modules():
                if isinstance(m, ResidualBlock):
                    m.zero_init_last()

    def _build_stem(self, stem: str, width: int, preact: bool) -> None:
        if stem == "deep":
            half = width // 2
            self.conv1: nn.Module = nn.Sequential(
                conv3x3(3, half, stride=2),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                conv3x3(half, half),
                nn.BatchNorm2d(half),
                nn.ReLU(inplace=True),
                conv3x3(half, width),
            )
        elif stem == "imagenet":
            self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
        else:
            self.conv1 = conv3x3(3, width)
        self.bn1 = None if preact else nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        # 32 px images cannot afford another 2x reduction before the first stage.
        self.maxpool = nn.Identity() if stem == "cifar" else nn.MaxPool2d(3, 2, padding=1)

    def _make_layer(
        self,
        block: Block,
        planes: int,
        stride: int,
        shortcut: str,
        plain: bool,
        avg_down: bool,
        drop_paths: Sequence[float],
        block_kwargs: dict[str, Any],
    ) -> nn.Sequential:
        """A stage of one block per entry of `drop_paths` (each block's probability)."""
        out_planes = planes * block.expansion
        blocks = []
        for i, drop_path in enumerate(drop_paths):
            block_stride = stride if i == 0 else 1
            downsample = None
            if not plain and (block_stride != 1 or self.inplanes != out_planes):
                downsample = self._shortcut(
                    self.inplanes, out_planes, block_stride, shortcut, avg_down, block.preact
                )
            blocks.append(
                block(
                    self.inplanes,
                    planes,
                    block_stride,
                    downsample,
                    residual=not plain,
                    drop_path=drop_path,
                    **block_kwargs,
                )
            )
            self.inplanes = out_planes
        return nn.Sequential(*blocks)

    @staticmethod
    def _shortcut(
        inplanes: int, out_planes: int, stride: int, kind: str, avg_down: bool, preact: bool
    ) -> nn.Module:
        if kind == "A":
            return ZeroPadShortcut(out_planes - inplanes, stride)
        # A pre-activated input is already normalised, so the projection needs no BN.
        norm = [] if preact else [nn.BatchNorm2d(out_planes)]
        if not avg_down:
            return nn.Sequential(conv1x1(inplanes, out_planes, stride), *norm)
        # ResNet-D: average 2x2 windows instead of skipping 3/4 of the input. The Identity
        # keeps timm's key layout (downsample.1 = conv) in every stage.
        pool = (
            nn.AvgPool2d(2, stride, ceil_mode=True, count_include_pad=False)
            if stride != 1
            else nn.Identity()
        )
        return nn.Sequential(pool, conv1x1(inplanes, out_planes), *norm)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.conv1(x)
        if self.bn1 is not None:
            x = self.relu(self.bn1(x))
        x = self.maxpool(x)
        for name in self.stage_names:
            x = getattr(self, name)(x)
        if self.bn_final is not None:
            x = self.relu(self.bn_final(x))
        return torch.flatten(self.avgpool(x), 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.forward_features(x))


# (bottleneck, pre-activation) -> block
BLOCK_TYPES: dict[tuple[bool, bool], Block] = {
    (False, False): BasicBlock,
    (True, False): Bottleneck,
    (False, True): PreActBasicBlock,
    (True, True): PreActBottleneck,
}

# Blocks per stage by depth (He et al. 2016, Table 1).
STAGES = {
    18: [2, 2, 2, 2],
    34: [3, 4, 6, 3],
    50: [3, 4, 6, 3],
    101: [3, 4, 23, 3],
    152: [3, 8, 36, 3],
}


def imagenet_resnet(
    depth: int, num_classes: int = 1000, *, preact: bool = False, **kwargs: Any
) -> ResNet:
    """The ImageNet ResNet-`depth` (18 to 152): bottleneck blocks from 50 layers on."""
    if depth not in STAGES:
        raise ValueError(f"depth must be one of {', '.join(map(str, STAGES))}, got {depth}")
    block = BLOCK_TYPES[depth >= 50, preact]
    return ResNet(block, STAGES[depth], num_classes, **kwargs)


# Every variant is an entry: its name, family, builder and the builder's arguments (keywords
# can be overridden at build time, the depth cannot).
register_variant("resnet18", RESNET, imagenet_resnet, 18)
register_variant("resnet34", RESNET, imagenet_resnet, 34)
register_variant("resnet50", RESNET, imagenet_resnet, 50)
register_variant("resnet101", RESNET, imagenet_resnet, 101)
register_variant("resnet152", RESNET, imagenet_resnet, 152)
# torchvision's resnet50 is v1.5; the paper's v1 strides in the first 1x1 conv.
register_variant("resnet50_v1", RESNET_V1, imagenet_resnet, 50, stride_in_1x1=True)
register_variant("resnet50d", RESNET_D, imagenet_resnet, 50, stem="deep", avg_down=True)

register_variant("preact_resnet18", PREACT, imagenet_resnet, 18, preact=True)
register_variant("preact_resnet34", PREACT, imagenet_resnet, 34, preact=True)
register_variant("preact_resnet50", PREACT, imagenet_resnet, 50, preact=True)
register_variant("preact_resnet101", PREACT, imagenet_resnet, 101, preact=True)
register_variant("preact_resnet152", PREACT, imagenet_resnet, 152, preact=True)

# ResNeXt and Wide ResNet are bottleneck ResNets with other `groups` and `width_per_group`.
register_variant("resnext50_32x4d", RESNEXT, imagenet_resnet, 50, groups=32, width_per_group=4)
register_variant("resnext101_32x8d", RESNEXT, imagenet_resnet, 101, groups=32, width_per_group=8)
register_variant("wide_resnet50_2", WIDE, imagenet_resnet, 50, width_per_group=128)
register_variant("wide_resnet101_2", WIDE, imagenet_resnet, 101, width_per_group=128)
