"""Networks designed for 32 px CIFAR images, all as `ResNet` configurations.

The CIFAR ResNets of He et al. (2016, section 4.2) have three stages of n blocks with
16/32/64 planes on 32/16/8 px maps; depth = 6n + 2 with basic blocks, 9n + 2 with
bottlenecks. Wide ResNets multiply those widths, ResNeXt-29 uses grouped bottlenecks.
"""

from __future__ import annotations

from typing import Any

from .registry import Family, register, register_variant
from .resnet import BLOCK_TYPES, HE2016, HE2016_PREACT, XIE2017, ZAGORUYKO2016, ResNet


def cifar_resnet(
    depth: int,
    num_classes: int = 10,
    *,
    bottleneck: bool = False,
    preact: bool = False,
    widen_factor: int = 1,
    shortcut: str = "A",
    stem: str = "cifar",
    stem_width: int = 16,
    **kwargs: Any,
) -> ResNet:
    """CIFAR ResNet of `depth` layers; `plain=True` (passed on to ResNet) drops shortcuts."""
    block = BLOCK_TYPES[bottleneck, preact]
    convs_per_block = 3 if bottleneck else 2
    n, rest = divmod(depth - 2, 3 * convs_per_block)
    if rest or n < 1:
        raise ValueError(f"depth must be {3 * convs_per_block}n + 2 for this block, got {depth}")
    widths = [planes * widen_factor for planes in (16, 32, 64)]
    return ResNet(
        block,
        [n] * 3,
        num_classes,
        widths=widths,
        stem=stem,
        stem_width=stem_width,
        shortcut=shortcut,
        **kwargs,
    )


CIFAR = Family("ResNet (CIFAR)", 32, HE2016)
CIFAR_PLAIN = Family("Plain (CIFAR)", 32, HE2016)
CIFAR_PREACT = Family("Pre-act ResNet (CIFAR)", 32, HE2016_PREACT)
CIFAR_WIDE = Family("Wide ResNet (CIFAR)", 32, ZAGORUYKO2016)
CIFAR_RESNEXT = Family("ResNeXt (CIFAR)", 32, XIE2017)

# The paper's nets use the parameter-free option A shortcut (cifar_resnet's default); the
# plain twins have no shortcuts at all.
register_variant("resnet20", CIFAR, cifar_resnet, 20)
register_variant("resnet32", CIFAR, cifar_resnet, 32)
register_variant("resnet44", CIFAR, cifar_resnet, 44)
register_variant("resnet56", CIFAR, cifar_resnet, 56)
register_variant("resnet110", CIFAR, cifar_resnet, 110)
register_variant("resnet1202", CIFAR, cifar_resnet, 1202)
register_variant("plain20", CIFAR_PLAIN, cifar_resnet, 20, plain=True)
register_variant("plain32", CIFAR_PLAIN, cifar_resnet, 32, plain=True)
register_variant("plain44", CIFAR_PLAIN, cifar_resnet, 44, plain=True)
register_variant("plain56", CIFAR_PLAIN, cifar_resnet, 56, plain=True)
register_variant("plain110", CIFAR_PLAIN, cifar_resnet, 110, plain=True)

# Identity Mappings uses projection shortcuts where the shape changes.
PREACT_B = {"preact": True, "shortcut": "B"}
register_variant("preact_resnet110", CIFAR_PREACT, cifar_resnet, 110, **PREACT_B)
register_variant("preact_resnet164", CIFAR_PREACT, cifar_resnet, 164, bottleneck=True, **PREACT_B)
register_variant("preact_resnet1001", CIFAR_PREACT, cifar_resnet, 1001, bottleneck=True, **PREACT_B)


@register(CIFAR_WIDE)
def wrn(depth: int = 28, widen_factor: int = 10, dropout: float = 0.0, **kwargs: Any) -> ResNet:
    """WRN-depth-k: pre-activation basic blocks, k times wider, dropout between the convs.

    WRN depth counts the three 1x1 projection convs but not the classifier, so it is
    6n + 4 where the CIFAR ResNet's is 6n + 2.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"WRN depth must be 6n + 4 (10, 16, 22, 28, ...), got {depth}")
    return cifar_resnet(
        depth - 2,
        preact=True,
        widen_factor=widen_factor,
        shortcut="B",
        dropout=dropout,
        **kwargs,
    )


# Dropout 0.3: the paper's best CIFAR setting.
register_variant("wrn28_10", CIFAR_WIDE, wrn, 28, 10, dropout=0.3)

# ResNeXt-29 (C x 64d): three stages of three grouped bottlenecks on a 64-channel stem.
RESNEXT29 = {"bottleneck": True, "widen_factor": 4, "stem_width": 64, "shortcut": "B"}
register_variant(
    "resnext29_8x64d", CIFAR_RESNEXT, cifar_resnet, 29, groups=8, width_per_group=64, **RESNEXT29
)
register_variant(
    "resnext29_16x64d", CIFAR_RESNEXT, cifar_resnet, 29, groups=16, width_per_group=64, **RESNEXT29
)
