"""Name -> model registry and `create_model`, the one constructor configs call."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn

from .pretrained import load_pretrained


@dataclass(frozen=True)
class ModelInfo:
    """What the training code needs to know about a registered model."""

    name: str
    builder: Callable[..., nn.Module]
    family: str
    input_size: int  # natural input resolution in pixels: 32 (CIFAR) or 224 (ImageNet)
    reference: str
    classifier: str = "fc"  # attribute holding the head, replaced for new class counts
    torchvision_weights: bool = False  # torchvision's ImageNet weights for `name` fit as-is


_REGISTRY: dict[str, ModelInfo] = {}


def register(
    family: str,
    input_size: int,
    reference: str,
    *,
    name: str | None = None,
    classifier: str = "fc",
    torchvision_weights: bool = False,
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
            key, builder, family, input_size, reference, classifier, torchvision_weights
        )
        return builder

    return decorate


def register_variant(
    name: str,
    family: str,
    input_size: int,
    reference: str,
    builder: Callable[..., nn.Module],
    *args: Any,
    torchvision_weights: bool = False,
    **config: Any,
) -> None:
    """Register `name` as `builder(*args, **config)`; keyword settings can be overridden at
    build time, positional ones (the depth) are fixed.

    A partial rather than a closure keeps models, which carry their ModelInfo, picklable.
    """
    decorate = register(
        family, input_size, reference, name=name, torchvision_weights=torchvision_weights
    )
    decorate(partial(builder, *args, **config))


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


def get_classifier(model: nn.Module) -> nn.Module:
    """The head of a model built by `create_model` (e.g. `model.fc`)."""
    info = getattr(model, "model_info", None)
    if not isinstance(info, ModelInfo):
        raise TypeError("get_classifier needs a model built by create_model")
    return model.get_submodule(info.classifier)


def create_model(
    name: str,
    *,
    num_classes: int = 10,
    pretrained: str | None = None,
    freeze_backbone: bool = False,
    channels_last: bool = False,
    compile: bool | str = False,
    **kwargs: Any,
) -> nn.Module:
    """Build a registered model.

    `kwargs` go to the model's builder (e.g. `stem`, `zero_init_residual`); an argument it
    does not take raises TypeError. `pretrained` is a torchvision weights tag such as
    'IMAGENET1K_V2' or a path to a state dict; a classifier of another size than the
    weights' stays freshly initialised for `num_classes`, and `freeze_backbone` leaves only
    it trainable. `compile` uses the in-place `nn.Module.compile` so state-dict keys keep
    their names (True -> default mode, a string -> that mode).
    """
    info = get_model_info(name)
    try:
        model = info.builder(num_classes=num_classes, **kwargs)
    except TypeError as err:  # say which model the misspelt argument was meant for
        raise TypeError(f"{name}: {err}") from err
    model.model_info = info  # lets get_classifier find the head without the name
    if pretrained:
        load_pretrained(model, info, pretrained)
    if freeze_backbone:
        model.requires_grad_(False)
        get_classifier(model).requires_grad_(True)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model.compile(mode=None if compile is True else compile)
    return model
