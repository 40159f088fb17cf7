"""Name -> model registry: what each registered model is, and the builder that makes it."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

from torch import nn


@dataclass(frozen=True)
class Family:
    """What the variants of one design share: its name, natural input size, paper."""

    name: str
    input_size: int  # natural input resolution in pixels: 32 (CIFAR) or 224 (ImageNet)
    reference: str
    # The variants are torchvision's architectures of the same names, parameter for parameter,
    # so its ImageNet weights fit them as they are.
    torchvision_weights: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """What the training code needs to know about a registered model."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    input_size: int
    reference: str
    classifier: str = "fc"  # attribute holding the head, replaced for new class counts
    torchvision_weights: bool = False  # torchvision's ImageNet weights for `name` fit as-is


_REGISTRY: dict[str, ModelInfo] = {}


def register(
    family: Family, *, name: str | None = None, classifier: str = "fc"
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator that registers a builder under `name`, by default its function name.

    Builders must be picklable (module-level functions or partials of them): models carry
    their ModelInfo, and DDP spawn or `torch.save(model)` pickle it.
    """

    def decorate(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        key = name or builder.__name__
        if key in _REGISTRY:
            raise ValueError(f"model '{key}' is registered twice")
        _REGISTRY[key] = ModelInfo(
            key,
            builder,
            family.name,
            family.input_size,
            family.reference,
            classifier,
            family.torchvision_weights,
        )
        return builder

    return decorate


def register_variant(
    name: str, family: Family, builder: Callable[..., nn.Module], *args: Any, **config: Any
) -> None:
    """Register `name` as `builder(*args, **config)`; keyword settings can be overridden at
    build time, positional ones (the depth) are fixed.

    A partial rather than a closure keeps models, which carry their ModelInfo, picklable.
    """
    register(family, name=name)(partial(builder, *args, **config))


def list_models() -> list[str]:
    """Registered names in natural order (resnet18 before resnet101)."""
    return sorted(_REGISTRY, key=_natural_key)


def _natural_key(name: str) -> list[int | str]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def get_model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(list_models())
        raise ValueError(f"unknown model '{name}'; known models: {known}") from None
