"""Parameter and multiply-accumulate counts, and the zoo's markdown table.

Models are built on the meta device, so even the 1202-layer and 224 px ones cost no memory
and little time: FlopCounterMode counts conv and matmul FLOPs on meta tensors.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .factory import create_model
from .registry import get_model_info, list_models


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: int) -> int:
    """Multiply-accumulates of one eval-mode forward pass on one image (FLOPs / 2)."""
    device = next(model.parameters()).device
    x = torch.zeros(1, 3, input_size, input_size, device=device)
    was_training = model.training
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model.eval()(x)
    model.train(was_training)
    return counter.get_total_flops() // 2


def stages(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's top-level children that hold parameters: conv1, bn1, layer1..N, fc for the
    ResNets; features, classifier for VGG and DenseNet."""
    return [(n, m) for n, m in model.named_children() if any(True for _ in m.parameters())]


def parameter_counts(model: nn.Module) -> dict[str, Counter[str]]:
    """{stage: {layer type: parameters}}; a layer type is the class that owns the tensors."""
    counts: dict[str, Counter[str]] = {}
    for name, module in model.named_modules():
        own = sum(p.numel() for p in module.parameters(recurse=False))
        if own:
            stage = name.split(".")[0] or type(model).__name__
            counts.setdefault(stage, Counter())[type(module).__name__] += own
    return counts


def _si(n: int) -> str:
    return f"{n / 1e9:.2f} G" if n >= 1e9 else f"{n / 1e6:.1f} M"


def zoo_table() -> Iterator[str]:
    """Every registered model as a markdown table, a line at a time (each row is counted as
    it comes): family, parameters, MACs, paper."""
    yield from (
        "Parameters with the natural head: 1000 classes for 224 px (ImageNet) models, 10 for",
        "32 px (CIFAR) ones. MACs (FLOPs / 2) for one image at the natural size with the default",
        "stem, and at 32 px with stem=cifar, as the CIFAR configs build them.",
        "",
        "| name | family | input | params | MACs | MACs @32 px, stem=cifar | reference |",
        "|---|---|---:|---:|---:|---:|---|",
    )
    for name in list_models():
        info = get_model_info(name)
        num_classes = 10 if info.input_size == 32 else 1000
        with torch.device("meta"):
            model = create_model(name, num_classes=num_classes)
            cifar_model = create_model(name, stem="cifar")
        yield (
            f"| {name} | {info.family} | {info.input_size} | {count_parameters(model):,} "
            f"| {_si(count_macs(model, info.input_size))} "
            f"| {_si(count_macs(cifar_model, 32))} | {info.reference} |"
        )
