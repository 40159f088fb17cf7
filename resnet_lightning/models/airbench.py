"""The network of airbench (Jordan 2024, "94% on CIFAR-10 in 3.29 Seconds on a Single GPU").

A frozen 2x2 patch-whitening conv (3 -> 24 channels), then three blocks of conv3x3 -> 2x2
max-pool -> BN -> GELU -> conv3x3 -> BN -> GELU (64/256/256 channels), a global max-pool
and a bias-free linear head whose logits are scaled by 1/9. Its BatchNorms have no scale
(weight frozen at 1), a tiny eps and a fast-moving average; its convs start as partial
identities. `residual` adds the input of each block's second conv to its output, as
airbench96 does over its last convs.

airbench94 has 1,972,792 parameters (1,971,352 trainable: the whitening weights and the BN
scales are frozen) and 118M multiply-accumulates per 32 px image; the paper quotes no count,
but its 3.6e14 FLOPs for ~10 epochs of 50,000 images and 6-view testing agree with it.
airbench93 (the repository's 93% variant, 11 epochs) halves the last two blocks to 128
channels: 569,656 parameters, 54M multiply-accumulates, about twice the images a second on
a CPU, which wins where a time budget holds few epochs (docs/experiments.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torchvision.models.resnet import conv3x3

from .registry import Family, register_variant

JORDAN2024 = "Jordan 2024, 94% on CIFAR-10 in 3.29 Seconds on a Single GPU (arXiv:2404.00498)"
AIRBENCH = Family("airbench (CIFAR)", 32, JORDAN2024)
# The whitening's regulariser: directions of the patches with less variance than this are
# not blown up to unit variance (airbench's value, for images normalised per channel).
WHITENING_EPS = 5e-4


class PatchWhitening(nn.Conv2d):
    """A conv whose filters whiten the image's k x k patches: the eigenvectors of their
    covariance, each scaled by 1 / sqrt(eigenvalue + eps), and their negatives (so that the
    activation after it sees both signs). Its weight is frozen; its bias trains.

    Until `init_from` sees the data it is an ordinary random conv.
    """

    def __init__(self, in_channels: int = 3, kernel_size: int = 2) -> None:
        patch = in_channels * kernel_size * kernel_size
        super().__init__(in_channels, 2 * patch, kernel_size, bias=True)
        self.weight.requires_grad_(False)

    @torch.no_grad()
    def init_from(self, images: Tensor, eps: float = WHITENING_EPS) -> None:
        """Set the filters from `images`, float (N, C, H, W) normalised as training sees them;
        the covariance is taken about zero (their mean, after normalisation), the bias is
        zeroed, so that the first half of the output channels has covariance
        diag(eigenvalue / (eigenvalue + eps)) over the patches: about the identity."""
        eigenvalues, eigenvectors = torch.linalg.eigh(patch_covariance(images, self.kernel_size))
        order = eigenvalues.argsort(descending=True)  # the strongest direction first
        filters = eigenvectors[:, order].T / (eigenvalues[order, None] + eps).sqrt()
        filters = filters.reshape(-1, *self.weight.shape[1:]).to(self.weight)
        self.weight.copy_(torch.cat([filters, -filters]))
        self.bias.zero_()


def patch_covariance(images: Tensor, kernel_size: tuple[int, int]) -> Tensor:
    """The (C*k*k, C*k*k) float64 second moment of all k x k patches of `images`, each
    flattened as a conv weight is (channel, row, column); in chunks, to bound the memory."""
    size = images.shape[1] * kernel_size[0] * kernel_size[1]
    total = torch.zeros(size, size, dtype=torch.float64, device=images.device)
    count = 0
    for chunk in images.split(256):
        patches = nn.functional.unfold(chunk.double(), kernel_size)  # (B, C*k*k, positions)
        patches = patches.transpose(1, 2).reshape(-1, size)
        total += patches.T @ patches
        count += len(patches)
    return total / count


def batch_norm(planes: int, momentum: float, eps: float, scale: bool) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(planes, eps=eps, momentum=momentum)
    bn.weight.requires_grad_(scale)  # without scale it stays at its initial 1
    return bn


def partial_identity_(conv: nn.Conv2d) -> None:
    """Make the first in_channels filters pass their input channel through (dirac), the rest
    keep their random init: the block starts close to the identity (airbench)."""
    with torch.no_grad():
        nn.init.dirac_(conv.weight[: conv.in_channels])


class AirbenchBlock(nn.Module):
    """conv1 -> 2x2 max-pool -> bn1 -> GELU -> conv2 -> bn2 -> GELU, with `residual`
    the input of conv2 added to the output."""

    def __init__(self, in_planes: int, planes: int, residual: bool, **bn: Any) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_planes, planes)
        self.pool = nn.MaxPool2d(2)
        self.bn1 = batch_norm(planes, **bn)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = batch_norm(planes, **bn)
        self.act = nn.GELU()
        self.residual = residual

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.bn1(self.pool(self.conv1(x))))
        out = self.act(self.bn2(self.conv2(x)))
        return x + out if self.residual else out


class AirbenchNet(nn.Module):
    """`whiten` (2x2 conv, no padding) + GELU, `layer1..3` (AirbenchBlock), global max-pool,
    `fc` (no bias), logit scale.

    Args:
        num_classes: outputs of the head.
        widths: channels of the three blocks.
        residual: each block adds the input of its second conv to that conv's output
            (x + GELU(BN(conv2(x)))); False: airbench94's plain chain.
        whiten: the first layer is a frozen patch-whitening conv, set from the training
            images by `init_whitening` (callbacks.whitening.WhiteningInit does it before a
            fit); False: an ordinary trainable 2x2 conv of the same shape.
        bn_scale: BatchNorm's weight trains; False: frozen at 1, only the bias (shift) trains.
        bn_momentum: torch's BatchNorm momentum, the weight of each batch in the running
            statistics (airbench's 0.6 is 1 - this: running = 0.6 running + 0.4 batch).
        bn_eps: BatchNorm's eps.
        logit_scale: multiplies the logits (1/9 keeps the bias-free head's outputs small).
        dirac_init: every 3x3 conv starts with its first in_channels filters as identities.
    """

    def __init__(
        self,
        num_classes: int = 10,
        widths: Sequence[int] = (64, 256, 256),
        residual: bool = False,
        whiten: bool = False,
        bn_scale: bool = True,
        bn_momentum: float = 0.1,
        bn_eps: float = 1e-5,
        logit_scale: float = 1.0,
        dirac_init: bool = False,
    ) -> None:
        super().__init__()
        if len(widths) != 3 or min(widths) < 1:
            raise ValueError(f"widths={list(widths)} must be three positive channel counts")
        if not 0.0 <= bn_momentum <= 1.0:
            raise ValueError(
                f"bn_momentum={bn_momentum} must be in [0, 1] (torch's meaning: the weight "
                "of each batch; airbench94 uses 0.4)"
            )
        if not bn_eps > 0:
            raise ValueError(f"bn_eps={bn_eps} must be positive, e.g. 1e-12")
        self.whiten = PatchWhitening() if whiten else nn.Conv2d(3, 24, kernel_size=2)  # same shape
        self.act = nn.GELU()
        bn = {"momentum": bn_momentum, "eps": bn_eps, "scale": bn_scale}
        planes = [self.whiten.out_channels, *widths]
        self.layer1, self.layer2, self.layer3 = (
            AirbenchBlock(planes[i], planes[i + 1], residual, **bn) for i in range(3)
        )
        # airbench's MaxPool2d(3) on the 3x3 maps of a 32 px image is this global max-pool.
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.fc = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale
        if dirac_init:
            for layer in (self.layer1, self.layer2, self.layer3):
                partial_identity_(layer.conv1)
                partial_identity_(layer.conv2)

    def init_whitening(self, images: Tensor, eps: float = WHITENING_EPS) -> None:
        """Set the whitening layer from training images (float (N, 3, H, W), normalised,
        un-augmented; airbench takes 5,000). A net built with whiten=False has none: no-op."""
        if isinstance(self.whiten, PatchWhitening):
            self.whiten.init_from(images.to(self.whiten.weight.device), eps)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layer3(self.layer2(self.layer1(self.act(self.whiten(x)))))
        return self.fc(torch.flatten(self.pool(x), 1)) * self.logit_scale


def airbench(num_classes: int = 10, stem: str = "cifar", **kwargs: Any) -> AirbenchNet:
    """An AirbenchNet; only the 32 px design exists (`stem` is accepted for the common
    interface)."""
    if stem != "cifar":
        raise ValueError(f"airbench has only the cifar stem, got '{stem}'")
    return AirbenchNet(num_classes, **kwargs)


# The paper's airbench94: every trick of its network on.
AIRBENCH94 = dict(
    widths=(64, 256, 256),
    whiten=True,
    bn_scale=False,
    bn_momentum=0.4,
    bn_eps=1e-12,
    logit_scale=1 / 9,
    dirac_init=True,
)
# airbench93: the same with 128-channel second and third blocks.
AIRBENCH93 = {**AIRBENCH94, "widths": (64, 128, 128)}
register_variant("airbench93", AIRBENCH, airbench, residual=False, **AIRBENCH93)
register_variant("airbench93_res", AIRBENCH, airbench, residual=True, **AIRBENCH93)
register_variant("airbench94", AIRBENCH, airbench, residual=False, **AIRBENCH94)
register_variant("airbench94_res", AIRBENCH, airbench, residual=True, **AIRBENCH94)
