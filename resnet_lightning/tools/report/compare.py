"""The "Performance Comparison" table, measured rather than copied: ResNet-50 against
VGG-16, GoogLeNet, AlexNet and DenseNet-121 as built for ImageNet (224 px, 1000 classes):
parameters, multiply-accumulates, inference and training images/s on this machine, beside the
ImageNet top-1/top-5 that torchvision publishes for its weights of each network.

    python -m resnet_lightning.report compare [--batch-size 8 --iters 3 --device auto]

Timings use random images (speed does not depend on content) and torch.utils.benchmark, which
warms up and synchronises the GPU. On two CPU cores the defaults take minutes; on a GPU
pass e.g. --batch-size 128 --iters 20.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from torch.utils import benchmark
from torchvision.models import get_model_weights

from resnet_lightning.errors import UsageError
from resnet_lightning.models import create_model, list_models
from resnet_lightning.models.complexity import count_macs, count_parameters

from .output import thousands, write_report

MODELS = ("resnet50", "vgg16", "googlenet", "alexnet", "densenet121")
# Fewer timed iterations than this and a speed is mostly noise: the report says so.
RELIABLE_ITERS = 10
# The torchvision architecture whose published accuracy belongs beside each zoo model: the
# zoo's VGG-16 has batch norm, torchvision's vgg16_bn.
TORCHVISION_NAMES = {"vgg16": "vgg16_bn"}
# The original recipes, which every network here has; ResNet-50 also has IMAGENET1K_V2 (80.9%),
# trained with a newer recipe none of the others got.
WEIGHTS = "IMAGENET1K_V1"
NUM_CLASSES = 1000


def published_accuracy(name: str) -> dict[str, object]:
    """ImageNet top-1/top-5 (%) and parameters from torchvision's weights metadata (None for
    a network torchvision has no such weights of)."""
    torchvision_name = TORCHVISION_NAMES.get(name, name)
    try:
        meta = get_model_weights(torchvision_name)[WEIGHTS].meta
    except (ValueError, KeyError):
        return {"top1": None, "top5": None, "params": None, "weights": None}
    metrics = meta["_metrics"]["ImageNet-1K"]
    return {
        "top1": metrics["acc@1"],
        "top5": metrics["acc@5"],
        "params": meta["num_params"],
        "weights": f"{torchvision_name} {WEIGHTS}",
    }


def images_per_second(step: Callable[[], object], batch_size: int, iters: int) -> float:
    # timeit runs `step` twice to warm up (cuDNN autotuning, allocator), then `iters` times.
    timer = benchmark.Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    return batch_size / timer.timeit(iters).mean


def measure(
    name: str, image_size: int, batch_size: int, iters: int, device: torch.device
) -> dict[str, object]:
    """Parameters, MACs per image and inference/training throughput of one network."""
    with torch.device("meta"):  # MACs from shapes alone, as the model zoo counts them
        macs = count_macs(create_model(name, num_classes=NUM_CLASSES), image_size)
    model = create_model(name, num_classes=NUM_CLASSES).to(device)
    images = torch.randn(batch_size, 3, image_size, image_size, device=device)
    labels = torch.randint(0, NUM_CLASSES, (batch_size,), device=device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def infer() -> None:
        with torch.inference_mode():
            model(images)

    def train_step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(images), labels).backward()
        optimizer.step()

    model.eval()
    inference = images_per_second(infer, batch_size, iters)
    model.train()
    training = images_per_second(train_step, batch_size, iters)
    return {
        "params": count_parameters(model),
        "macs": macs,
        "inference": inference,
        "training": training,
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def comparison_rows(
    models: list[str], image_size: int, batch_size: int, iters: int, device: torch.device
) -> list[dict[str, object]]:
    rows = []
    for name in models:
        measured = measure(name, image_size, batch_size, iters, device)
        published = published_accuracy(name)
        rows.append(
            {
                "model": name,
                "params": measured["params"],
                "GMACs": measured["macs"] / 1e9,
                "inference img/s": measured["inference"],
                "training img/s": measured["training"],
                "ImageNet top-1 %": published["top1"],
                "ImageNet top-5 %": published["top5"],
                "weights": published["weights"],
            }
        )
    return rows


def plot_comparison(rows: list[dict[str, object]], title: str) -> Figure:
    """Parameters, MACs and throughput side by side; each label carries the published top-1."""
    labels = [
        f"{r['model']}\n{r['ImageNet top-1 %']:.1f}% top-1" if r["ImageNet top-1 %"] else r["model"]
        for r in rows
    ]
    panels = [
        ("parameters (millions)", [r["params"] / 1e6 for r in rows]),
        ("GMACs per image", [r["GMACs"] for r in rows]),
        ("inference images/s", [r["inference img/s"] for r in rows]),
        ("training images/s", [r["training img/s"] for r in rows]),
    ]
    figure = Figure(figsize=(14, 4), layout="constrained")
    for ax, (ylabel, values) in zip(figure.subplots(1, len(panels)), panels, strict=True):
        ax.bar(labels, values, color=[f"C{i}" for i in range(len(rows))])
        ax.set_ylabel(ylabel)
        ax.tick_params(axis="x", labelrotation=45, labelsize=7)
    figure.suptitle(title)
    return figure


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: no CUDA device here; use --device cpu or auto")
    return torch.device(device)


def write_comparison(
    out: Path,
    models: tuple[str, ...] | list[str] = MODELS,
    image_size: int = 224,
    batch_size: int = 8,
    iters: int = 3,
    device: str = "auto",
) -> list[Path]:
    """compare.md, compare.csv and compare.png in `out`."""
    unknown = [m for m in models if m not in list_models()]
    if unknown:
        raise UsageError(
            f"--models: unknown {', '.join(unknown)}; see python -m resnet_lightning.models"
        )
    if min(image_size, batch_size, iters) < 1:
        raise UsageError("--image-size, --batch-size and --iters must be positive")
    torch_device = resolve_device(device)
    torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick its fastest kernels
    rows = comparison_rows(list(models), image_size, batch_size, iters, torch_device)
    where = device_name(torch_device)
    setup = f"{image_size} px, batch {batch_size}, fp32, {iters} timed iteration(s), {where}"
    one_decimal = "{:,.1f}".format
    formats = {
        "params": thousands,
        "GMACs": "{:.2f}".format,
        "inference img/s": one_decimal,
        "training img/s": one_decimal,
        "ImageNet top-1 %": "{:.2f}".format,
        "ImageNet top-5 %": "{:.2f}".format,
    }
    text = (
        f"Measured with `python -m resnet_lightning.report compare` on: {setup}.\n\n"
        "Parameters and MACs (multiply-accumulates of one forward pass, one image) of each\n"
        "network as built for ImageNet (1000 classes); inference and training (forward,\n"
        "backward, SGD step) images per second on random images; ImageNet accuracy as\n"
        "torchvision publishes it for the named weights."
    )
    notes = ""
    if iters < RELIABLE_ITERS:
        notes = (
            f"With {iters} timed iteration(s) the speeds are noise (one late step moves them by "
            f"tens of percent): use --iters {RELIABLE_ITERS} or more for figures to quote."
        )
        print(f"warning: {notes}", file=sys.stderr)
    title = "ResNet-50 against the networks it was compared to"
    figure = plot_comparison(rows, setup)
    return write_report(
        out, "compare", title, text, rows, formats, figure, "comparison", notes=notes
    )
