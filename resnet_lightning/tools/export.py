"""Export a checkpoint's network for deployment, checked against the checkpoint on real images.

    python -m resnet_lightning.export ckpt_path=<ckpt> format=onnx [out=<file>] [tolerance=1e-4]
    python -m resnet_lightning.export ckpt_path=<ckpt> format=torchscript
    python -m resnet_lightning.export ckpt_path=<ckpt> format=exported_program

Formats: `onnx` (torch.onnx's dynamo exporter; run with onnxruntime, `pip install -e
'.[export]'`), `torchscript` (torch.jit.trace; load with torch.jit.load) and `exported_program`
(torch.export; load with torch.export.load(...).module()). The batch size is dynamic; weights
and inputs are fp32. Other `key=value` arguments override the run's saved config, as for eval.

Before anything is kept, the exported file is loaded again (ONNX in onnxruntime) and its
logits on the first test batch of the run's own data are compared with the checkpoint's; a
difference above `tolerance` (absolute, and relative to the logits' size) is an error and no
file is left. Beside the model, `<file>.json` records the class names, input size, mean/std,
the format and the difference measured. Test-time flips are not folded in: when the run used
them (`test_time_flip` in the JSON), average the logits of each image and its mirror.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from resnet_lightning.atomic_files import write_json
from resnet_lightning.data import NORMALIZATION
from resnet_lightning.errors import UsageError, one_line_errors
from resnet_lightning.tools.evaluate import key_value_args, load_trained_run
from resnet_lightning.training.config import instantiate_group

SUFFIXES = {"onnx": ".onnx", "torchscript": ".ts.pt", "exported_program": ".pt2"}
PARITY_IMAGES = 64


def export(
    ckpt_path: str | Path,
    file_format: str,
    out: str | Path | None = None,
    tolerance: float = 1e-4,
    overrides: Sequence[str] = (),
) -> tuple[Path, dict]:
    """Write the checkpoint's network as `file_format` to `out` (default: beside the
    checkpoint) and its JSON description; return the model file and the description."""
    if file_format not in SUFFIXES:
        raise UsageError(f"format={file_format} is unknown; use one of: {', '.join(SUFFIXES)}")
    cfg, module, class_names = load_trained_run(ckpt_path, overrides)
    net = module.net.eval()
    images = parity_images(cfg)
    with torch.inference_mode():
        expected = net(images)
    out = Path(out) if out else Path(ckpt_path).with_suffix(SUFFIXES[file_format])
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=".export-") as tmp:
        written = Path(tmp) / out.name
        run = EXPORTERS[file_format](net, images, written)
        got = run(images)
        difference = float((got - expected).abs().max())
        allowed = tolerance * max(1.0, float(expected.abs().max()))
        if not difference <= allowed:  # also catches nan
            raise UsageError(
                f"the {file_format} export gives logits {difference:.3g} away from the "
                f"checkpoint's on {len(images)} test images (more than {allowed:.3g}); nothing "
                "was written: try another format, or report the model"
            )
        written.replace(out)  # the same folder: an atomic rename
    image_size = int(cfg.data.image_size)
    mean, std = NORMALIZATION[cfg.data.normalization]
    description = {
        "format": file_format,
        "model": cfg.model.name,
        "checkpoint": str(Path(ckpt_path).resolve()),
        "class_names": class_names,
        "input": {"shape": ["batch", 3, image_size, image_size], "dtype": "float32"},
        "normalization": {"mean": list(mean), "std": list(std), "scale": "pixels / 255"},
        "test_time_flip": bool(cfg.module.get("test_time_flip", False)),
        "parity": {"images": len(images), "max_abs_logit_difference": difference},
    }
    write_json(out.with_name(out.name + ".json"), description)
    return out, description


def parity_images(cfg) -> Tensor:
    """The first PARITY_IMAGES test images of the run's data, as its test loader makes them."""
    datamodule = instantiate_group(cfg, "data")
    datamodule.setup("test")
    batches, count = [], 0
    for images, _ in datamodule.test_dataloader():
        batches.append(images)
        count += len(images)
        if count >= PARITY_IMAGES:
            break
    return torch.cat(batches)[:PARITY_IMAGES].float().contiguous()


def _onnx(net: nn.Module, images: Tensor, path: Path) -> Callable[[Tensor], Tensor]:
    try:
        import onnxruntime
    except ImportError:
        raise UsageError(
            "format=onnx needs onnx and onnxruntime: pip install -e '.[export]'"
        ) from None
    batch = torch.export.Dim("batch", min=1, max=65536)
    program = torch.onnx.export(net, (images,), dynamo=True, dynamic_shapes=({0: batch},))
    program.save(str(path))
    options = onnxruntime.SessionOptions()
    # As many threads as torch, so that the benchmark (tools/bench.py) compares like with like.
    options.intra_op_num_threads = torch.get_num_threads()
    session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])


def _torchscript(net: nn.Module, images: Tensor, path: Path) -> Callable[[Tensor], Tensor]:
    torch.jit.trace(net, images).save(str(path))
    loaded = torch.jit.load(str(path))
    return without_grad(loaded)


def _exported_program(net: nn.Module, images: Tensor, path: Path) -> Callable[[Tensor], Tensor]:
    batch = torch.export.Dim("batch", min=1, max=65536)
    torch.export.save(torch.export.export(net, (images,), dynamic_shapes=({0: batch},)), path)
    return without_grad(torch.export.load(path).module())


def without_grad(model: Callable[[Tensor], Tensor]) -> Callable[[Tensor], Tensor]:
    """`model` called under torch.inference_mode."""

    def run(x: Tensor) -> Tensor:
        with torch.inference_mode():
            return model(x)

    return run


EXPORTERS = {"onnx": _onnx, "torchscript": _torchscript, "exported_program": _exported_program}


def _tolerance(value: str) -> float:
    try:
        tolerance = float(value)
    except ValueError:
        tolerance = -1.0
    if not tolerance >= 0:  # NaN too
        raise UsageError(f"tolerance={value} must be a number >= 0, e.g. tolerance=1e-4")
    return tolerance


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m resnet_lightning.export ckpt_path=... format=... [out=...] [key=value ...]`."""
    argv = sys.argv[1:] if argv is None else list(argv)
    with one_line_errors():
        required = "ckpt_path=<file.ckpt> format=onnx|torchscript|exported_program"
        args = key_value_args(argv, __doc__, required)
        ckpt_path, file_format = args.pop("ckpt_path"), args.pop("format")
        out, tolerance = args.pop("out", None), _tolerance(args.pop("tolerance", "1e-4"))
        overrides = [f"{k}={v}" for k, v in args.items()]
        path, description = export(ckpt_path, file_format, out, tolerance, overrides)
        print(json.dumps({"file": str(path), **description["parity"]}))
