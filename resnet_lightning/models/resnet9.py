"""ResNet-9 of Page's DAWNBench entries ("How to train your ResNet", Myrtle.ai, 2018-2019).

Four conv-BN-activation layers of 64/128/256/512 channels, each later one followed by a 2x2
max-pool, with a residual block of two such layers after the first and the third; a global
max-pool, and a bias-free linear classifier whose logits are scaled by 1/8. It reaches 94% on
CIFAR-10 in about 24 epochs, and fewer with the tricks of the last post (label smoothing,
CELU, test-time flips): `experiment=fast94`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import conv3x3

from .registry import Family, register

PAGE2019 = "Page 2019, How to Train Your ResNet (myrtle.ai), DAWNBench CIFAR-10 ResNet-9"


def conv_bn(in_planes: int, planes: int, celu_alpha: float | None) -> nn.Sequential:
    activation = nn.ReLU(inplace=True) if celu_alpha is None else nn.CELU(celu_alpha, inplace=True)
    return nn.Sequential(conv3x3(in_planes, planes), nn.BatchNorm2d(planes), activation)


class Residual(nn.Module):
    """x + two conv-BN-activation layers of x."""

    def __init__(self, planes: int, celu_alpha: float | None) -> None:
        super().__init__()
        self.res1 = conv_bn(planes, planes, celu_alpha)
        self.res2 = conv_bn(planes, planes, celu_alpha)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.res2(self.res1(x))


class ResNet9(nn.Module):
    """`prep`, `layer1..3` (conv, pool, [residual]), global max-pool, `fc`, logit scale.

    Args:
        widths: channels of prep and the three layers.
        celu_alpha: CELU(alpha) activations instead of ReLU (Page used 0.075: a slightly
            smoothed ReLU that trains a little faster).
        logit_scale: multiplies the logits; 1/8 keeps the bias-free head's outputs small.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 128, 256, 512),
        celu_alpha: float | None = None,
        logit_scale: float = 0.125,
    ) -> None:
        super().__init__()
        prep, w1, w2, w3 = widths
        self.prep = conv_bn(3, prep, celu_alpha)
        self.layer1 = nn.Sequential(
            conv_bn(prep, w1, celu_alpha), nn.MaxPool2d(2), Residual(w1, celu_alpha)
        )
        self.layer2 = nn.Sequential(conv_bn(w1, w2, celu_alpha), nn.MaxPool2d(2))
        self.layer3 = nn.Sequential(
            conv_bn(w2, w3, celu_alpha), nn.MaxPool2d(2), Residual(w3, celu_alpha)
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(w3, num_classes, bias=False)
        self.logit_scale = logit_scale

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.prep(x))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


@register(Family("ResNet-9 (CIFAR)", 32, PAGE2019))
def resnet9(num_classes: int = 10, stem: str = "cifar", **kwargs: Any) -> ResNet9:
    """ResNet-9; only the 32 px design exists (`stem` is accepted for the common interface)."""
    if stem != "cifar":
        raise ValueError(f"resnet9 has only the cifar stem, got '{stem}'")
    return ResNet9(num_classes, **kwargs)
