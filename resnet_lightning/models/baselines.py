"""The networks ResNets are compared with, built from torchvision's classes.

`stem='cifar'` gives each its 32 px variant: the ImageNet input ends (strided convs and
pools, or VGG's 7x7 head) would shrink a CIFAR image to nothing or to one pixel copied 49
times. Everything else is torchvision's.
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torchvision import models as tvm
from torchvision.models.googlenet import BasicConv2d

from .registry import Family, register

SIMONYAN2015 = "Simonyan & Zisserman 2015, VGG (arXiv:1409.1556)"
SZEGEDY2015 = "Szegedy et al. 2015, GoogLeNet (arXiv:1409.4842)"
KRIZHEVSKY2012 = "Krizhevsky et al. 2012, AlexNet (NeurIPS); torchvision's arXiv:1404.5997"
HUANG2017 = "Huang et al. 2017, DenseNet (arXiv:1608.06993)"


def _check_stem(stem: str) -> bool:
    """True for the 32 px variant; checked before building, which takes a while for VGG."""
    if stem not in ("imagenet", "cifar"):
        raise ValueError(f"stem must be 'imagenet' or 'cifar', got '{stem}'")
    return stem == "cifar"


@register(Family("VGG", 224, SIMONYAN2015), classifier="classifier")
def vgg16(
    num_classes: int = 1000, stem: str = "imagenet", batch_norm: bool = True, **kwargs: Any
) -> tvm.VGG:
    """VGG-16 (configuration D); with BN by default, which training from scratch needs."""
    cifar = _check_stem(stem)
    model = (tvm.vgg16_bn if batch_norm else tvm.vgg16)(num_classes=num_classes, **kwargs)
    if cifar:
        # Five pools leave 1x1x512 at 32 px; the 4096-wide MLP over a 7x7 copy of it would
        # add 120M parameters and nothing else, so one linear layer reads the vector.
        model.avgpool = nn.AdaptiveAvgPool2d(1)
        model.classifier = nn.Linear(512, num_classes)
    return model


@register(Family("GoogLeNet", 224, SZEGEDY2015))
def googlenet(num_classes: int = 1000, stem: str = "imagenet", **kwargs: Any) -> tvm.GoogLeNet:
    """GoogLeNet without the auxiliary heads, so forward returns logits in training too."""
    kwargs = {"aux_logits": False, "init_weights": True, **kwargs}
    cifar = _check_stem(stem)
    model = tvm.GoogLeNet(num_classes, **kwargs)
    if cifar:
        # The 7x7/2 conv and two pools reduce 8x before the first Inception block; at 32 px
        # that leaves 4x4, so keep full resolution there as the usual CIFAR variant does.
        model.conv1 = BasicConv2d(3, 64, kernel_size=3, padding=1)
        nn.init.trunc_normal_(model.conv1.conv.weight, std=0.01, a=-2, b=2)  # as torchvision
        model.maxpool1 = nn.Identity()
        model.maxpool2 = nn.Identity()
    return model


@register(Family("AlexNet", 224, KRIZHEVSKY2012), classifier="classifier")
def alexnet(num_classes: int = 1000, stem: str = "imagenet", **kwargs: Any) -> tvm.AlexNet:
    cifar = _check_stem(stem)
    model = tvm.AlexNet(num_classes, **kwargs)
    if cifar:
        # An 11x11/4 conv leaves 7 px, which the three 3x3/2 pools cannot take; a 3x3/1
        # conv makes them end at 3x3, read by the first linear layer.
        model.features[0] = nn.Conv2d(3, 64, kernel_size=3, padding=1)
        model.avgpool = nn.AdaptiveAvgPool2d(3)
        model.classifier[1] = nn.Linear(256 * 3 * 3, 4096)
    return model


def densenet(
    growth_rate: int,
    block_config: tuple[int, ...],
    num_init_features: int,
    num_classes: int,
    stem: str,
    **kwargs: Any,
) -> tvm.DenseNet:
    """torchvision's DenseNet(-BC: bottleneck layers, transitions halve the channels)."""
    cifar = _check_stem(stem)
    model = tvm.DenseNet(
        growth_rate, block_config, num_init_features, num_classes=num_classes, **kwargs
    )
    if cifar:
        # Huang et al.'s CIFAR stem is one 3x3 conv: each dense layer starts with BN-ReLU.
        model.features.conv0 = nn.Conv2d(3, num_init_features, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(model.features.conv0.weight)  # as torchvision
        del model.features.norm0, model.features.relu0, model.features.pool0
    return model


@register(Family("DenseNet", 224, HUANG2017), classifier="classifier")
def densenet121(num_classes: int = 1000, stem: str = "imagenet", **kwargs: Any) -> tvm.DenseNet:
    return densenet(32, (6, 12, 24, 16), 64, num_classes, stem, **kwargs)


@register(Family("DenseNet", 32, HUANG2017), classifier="classifier")
def densenet_bc100(num_classes: int = 10, stem: str = "cifar", **kwargs: Any) -> tvm.DenseNet:
    """DenseNet-BC, L=100, k=12: 3 blocks of 16 bottleneck layers, 2k stem channels."""
    return densenet(12, (16, 16, 16), 24, num_classes, stem, **kwargs)
