"""`create_model`, the one constructor the configs call, and `get_classifier`."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .pretrained import load_pretrained
from .registry import ModelInfo, get_model_info


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
