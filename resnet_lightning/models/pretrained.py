"""Load torchvision's ImageNet weights or a local state dict into a registered model."""

from __future__ import annotations

import os
import pickle

import torch
from torch import Tensor, nn
from torchvision.models import get_model_weights

from .registry import ModelInfo


def read_state_dict(info: ModelInfo, source: str) -> dict[str, Tensor]:
    """`source` is a torchvision weights tag (IMAGENET1K_V1, ...) or a path to a state dict."""
    if os.path.isfile(source) or source.endswith((".pth", ".pt")):
        try:
            return torch.load(source, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as err:
            if "Weights only load failed" in str(err):
                raise  # a file that would run code: the caller says so
            raise ValueError(f"weights file {source} is corrupt ({_first_sentence(err)})") from None
        except (RuntimeError, EOFError, KeyError, ValueError) as err:  # truncated or foreign
            raise ValueError(
                f"weights file {source} is corrupt or incomplete ({_first_sentence(err)}); copy "
                "it again, or re-save the weights with torch.save(model.state_dict())"
            ) from None
    if not info.torchvision_weights:
        raise ValueError(
            f"torchvision has no weights that fit {info.name}; pass a path to a state dict"
        )
    tags = get_model_weights(info.name)
    if source not in tags.__members__:
        raise ValueError(
            f"unknown weights '{source}' for {info.name}: torchvision has "
            f"{', '.join(tags.__members__)}, or pass a path to a state dict"
        )
    weights = tags[source]
    try:  # torch hub's cache first, then the network
        return weights.get_state_dict(progress=False, check_hash=True)
    except OSError as err:  # urllib's URLError is an OSError
        cached = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(weights.url))
        raise FileNotFoundError(
            f"could not download {source} weights for {info.name} (offline? {err}); download "
            f"{weights.url} on a connected machine into {cached} or pass "
            "model.pretrained=/path/to/weights.pth"
        ) from None


def load_pretrained(model: nn.Module, info: ModelInfo, source: str) -> None:
    """Load `source` into `model`; a classifier of another shape stays freshly initialised."""
    state_dict = read_state_dict(info, source)
    own = model.state_dict()
    head = info.classifier + "."
    if any(own.get(k, v).shape != v.shape for k, v in state_dict.items() if k.startswith(head)):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(head)}
    mismatched = [
        f"{k} {list(v.shape)} vs {list(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    missing, unexpected = [], []
    if not mismatched:  # load_state_dict raises on shapes, even with strict=False
        # torch's own key check: BatchNorm fills in a num_batches_tracked the file lacks
        # (torchvision's older weights predate it).
        result = model.load_state_dict(state_dict, strict=False)
        missing = [k for k in result.missing_keys if not k.startswith(head)]
        unexpected = result.unexpected_keys
    if mismatched or missing or unexpected:
        problems = [
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (
                ("shape in weights vs model", mismatched),
                ("missing", missing),
                ("unexpected", unexpected),
            )
            if keys
        ]
        # ImageNet weights fit the 7x7 stem only; the CIFAR and deep stems differ.
        raise ValueError(
            f"weights {source} do not fit {info.name} as built ({'; '.join(problems)}); "
            "build it with the arguments the weights were trained with (stem=imagenet for "
            "torchvision's)"
        )


def _first_sentence(err: BaseException) -> str:
    return str(err).split(". ")[0].strip() or type(err).__name__
