"""`python -m resnet_lightning.bench`: how fast the data paths, the models and the framework are.

Five measurements; each figure is taken in the same run as the figures it is compared with.

1. pipeline: input images/s of the torchvision/PIL path (DataLoader workers) against
   the tensor path (tensor_loader.py), at 32 and 224 px, on the CPU and on the GPU if any;
   then at 32 px with each augmentation policy, without and with random erasing (p = 0.25).
2. train: training images/s and peak memory per model, precision and memory format, through
   the plain loop (plain_loop.py) fed by the tensor path; on a GPU also experiment=seed_resnet50
   (ResNet-50 at 224 px, fp32, PIL pipeline with 2 workers) as the baseline.
3. overhead: one model, data and batch size through the plain loop and through
   `python -m resnet_lightning` with its default callbacks; the ratio of epoch times.
4. inference: images/s of a randomly initialised network with the CIFAR stem at 32 px on the
   CPU, at batch 1 and 256, run eagerly, torch.compile'd (with --compile: compiling takes
   minutes per model on a small CPU), traced to TorchScript and exported to ONNX and run in
   onnxruntime (both through tools/export.py's exporters).
5. cpu_train: training images/s on the CPU of models as conf/model/ builds them (ResNet-20 by
   default; `--cpu-models`), full steps (forward, backward, SGD) on random 32 px batches, per
   precision (fp32, bf16 autocast), memory format, batch size and intra-op threads; then, at the
   first batch size and the most threads, with oneDNN off, with oneDNN's fp32 math in bf16
   ("bf32"), and torch.compile'd (with --compile). The median of a few steps after warm-up.

Prints markdown tables and writes everything to a JSON file (`--json`).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from omegaconf import DictConfig
from PIL import Image
from torch import Tensor, nn

from resnet_lightning.atomic_files import write_json
from resnet_lightning.callbacks.epoch_timer import EpochTimer
from resnet_lightning.data import CifarDataModule, ImageFolderDataModule
from resnet_lightning.data.policies import POLICIES
from resnet_lightning.errors import UsageError
from resnet_lightning.models import create_model
from resnet_lightning.tools.export import EXPORTERS, without_grad
from resnet_lightning.tools.plain_loop import fit, run_epoch
from resnet_lightning.tools.report.output import markdown_table
from resnet_lightning.training.config import CONFIG_DIR, compose_config, instantiate_group
from resnet_lightning.training.precision import auto_precision, cpuinfo_flags

REPO = Path(__file__).resolve().parents[2]
SECTIONS = ("pipeline", "train", "overhead", "inference", "cpu_train")
# /proc/cpuinfo's flags that decide how fast a CPU trains: bf16 is native only with the last two.
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")
# cpu_train's oneDNN settings besides its defaults ("on"): convolutions and matmuls without
# oneDNN, and oneDNN's fp32 convolutions and matmuls computed in bf16 ("bf32": fast only where
# bf16 is native).
ONEDNN_SETTINGS = ("off", "bf32")


@dataclass(frozen=True)
class ModelSpec:
    """A training-throughput row's model: name, stem, image size, CPU and GPU batch sizes."""

    name: str
    stem: str
    image_size: int
    cpu_batch: int
    gpu_batch: int

    @property
    def label(self) -> str:
        return f"{self.name} ({self.stem} stem, {self.image_size} px)"


MODELS = {
    "resnet20": ModelSpec("resnet20", "cifar", 32, 128, 512),
    "resnet18": ModelSpec("resnet18", "cifar", 32, 64, 512),
    "resnet50": ModelSpec("resnet50", "imagenet", 224, 8, 256),
    "resnet9": ModelSpec("resnet9", "cifar", 32, 128, 512),
}
# experiment=seed_resnet50 end to end: its model, precision, pipeline, workers and batch size.
SEED = {"model": "resnet50", "stem": "imagenet", "image_size": 224, "workers": 2, "batch": 128}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m resnet_lightning.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--quick", action="store_true", help="tiny sizes: checks that everything runs (tests)"
    )
    parser.add_argument("--data-root", default=str(REPO / "data"), help="the data cache folder")
    parser.add_argument(
        "--data-path",
        default=os.environ.get("CIFAR10_PATH"),
        help="CIFAR-10 image-folder tree or archive (default: $CIFAR10_PATH, else download)",
    )
    parser.add_argument("--devices", nargs="+", choices=("cpu", "cuda"), help="default: all")
    parser.add_argument("--seconds", type=float, default=3.0, help="time per pipeline row")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--pipeline-batch", type=int, default=256)
    parser.add_argument(
        "--policies", nargs="+", choices=POLICIES, default=list(POLICIES), help="pipeline rows"
    )
    parser.add_argument("--models", nargs="+", choices=sorted(MODELS), default=None)
    parser.add_argument("--precisions", nargs="+", default=None, help="default: by device")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per train row")
    parser.add_argument("--overhead-model", choices=sorted(MODELS), default="resnet20")
    parser.add_argument("--overhead-batch", type=int, default=128)
    parser.add_argument("--overhead-epochs", type=int, default=3, help="the first is warm-up")
    parser.add_argument("--overhead-batches", type=int, default=30, help="per epoch; 0: all")
    parser.add_argument("--overhead-rounds", type=int, default=2, help="runs of each, alternated")
    parser.add_argument("--inference-models", nargs="+", choices=sorted(MODELS))
    parser.add_argument("--inference-batches", type=int, nargs="+", help="default: 1 256")
    parser.add_argument(
        "--inference-seconds", type=float, default=2.0, help="time per inference row, at least"
    )
    parser.add_argument(
        "--inference-calls", type=int, default=3, help="timed calls per inference row, at least"
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="inference and cpu_train: also torch.compile'd (compiling takes minutes per model "
        "on a small CPU)",
    )
    parser.add_argument(
        "--cpu-models",
        nargs="+",
        choices=model_configs(),
        default=["resnet20"],
        help="cpu_train: models of conf/model/",
    )
    parser.add_argument(
        "--cpu-precisions",
        nargs="+",
        choices=("32-true", "bf16-mixed"),
        default=["32-true", "bf16-mixed"],
        help="cpu_train: Lightning precisions (autocast for bf16-mixed)",
    )
    parser.add_argument("--cpu-batches", type=positive_int, nargs="+", help="default: 128 256 512")
    parser.add_argument(
        "--cpu-threads", type=positive_int, nargs="+", help="cpu_train: default 1 and all cores"
    )
    parser.add_argument(
        "--cpu-onednn",
        nargs="*",
        choices=ONEDNN_SETTINGS,
        default=list(ONEDNN_SETTINGS),
        help="cpu_train: oneDNN settings to try besides its defaults (none: only the defaults)",
    )
    parser.add_argument(
        "--cpu-warmup", type=positive_int, default=1, help="cpu_train: untimed steps per row"
    )
    parser.add_argument(
        "--cpu-steps", type=positive_int, help="cpu_train: timed steps per row (default: 3)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="torch (and onnxruntime) intra-op threads (default: torch's)",
    )
    parser.add_argument("--json", type=Path, help="default: outputs/bench/<date>_<time>.json")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.workers, args.pipeline_batch = 0.3, [0], 32
        args.policies = ["trivialaugment"]
        args.models = args.models or ["resnet20"]
        args.precisions = args.precisions or ["32-true"]
        args.steps = args.steps or 2
        args.overhead_batch, args.overhead_epochs, args.overhead_batches = 16, 2, 2
        args.overhead_rounds = 1
        args.inference_models = args.inference_models or ["resnet20"]
        args.inference_batches = args.inference_batches or [1, 8]
        args.inference_seconds, args.inference_calls = 0.0, 2
        args.cpu_batches = args.cpu_batches or [4]
        args.cpu_threads, args.cpu_steps = args.cpu_threads or [1], args.cpu_steps or 2
    args.inference_models = args.inference_models or ["resnet20", "resnet50"]
    args.inference_batches = args.inference_batches or [1, 256]
    args.cpu_batches, args.cpu_steps = args.cpu_batches or [128, 256, 512], args.cpu_steps or 3
    args.cpu_threads = sorted(set(args.cpu_threads or [1, len(os.sched_getaffinity(0))]))
    if args.devices is None:
        args.devices = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    if "cuda" in args.devices and not torch.cuda.is_available():
        parser.error("--devices cuda: no CUDA device here")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.backends.cudnn.benchmark = True
    started = datetime.datetime.now()
    report: dict = {
        "command": shlex.join(["python", "-m", "resnet_lightning.bench", *sys.argv[1:]]),
        "date": started.isoformat(timespec="seconds"),
        "machine": machine(),
    }
    if "pipeline" in args.sections:
        report["pipeline"] = bench_pipelines(args) + bench_image_folder(args)
    if "train" in args.sections:
        report["train"] = bench_training(args)
    if "overhead" in args.sections:
        report["overhead"] = bench_overhead(args)
    if "inference" in args.sections:
        report["inference"] = bench_inference(args)
    if "cpu_train" in args.sections:
        report["cpu_train"] = bench_cpu_training(args)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    print(markdown(report))
    path = args.json or REPO / "outputs" / "bench" / f"{started:%Y-%m-%d_%H-%M-%S}.json"
    write_json(path, report)
    print(f"\nwrote {path}")


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive whole number")
    return number


def model_configs() -> list[str]:
    """The models a run can name: conf/model/<name>.yaml."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / "model").glob("[!_]*.yaml"))


def machine() -> dict:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "cpu_flags": [flag for flag in CPU_FLAGS if flag in cpuinfo_flags()],
        "cpu_cores": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "cpu_auto_precision": auto_precision("cpu")[0],
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    try:
        info["onnxruntime"] = importlib.metadata.version("onnxruntime")
    except importlib.metadata.PackageNotFoundError:
        pass
    return info


def cpu_name() -> str:
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def datamodule(args: argparse.Namespace, **kwargs) -> CifarDataModule:
    dm = CifarDataModule(root=args.data_root, path=args.data_path, **kwargs)
    dm.setup()
    return dm


def timed_batches(
    loader: Iterable, device: torch.device, seconds: float, min_batches: int = 2
) -> tuple[int, float]:
    """Images delivered on `device` per second, after a first batch (workers start, warm-up);
    over epochs if one is done sooner than `seconds`."""
    batches = repeat(loader)
    next(batches)
    images, count, start = 0, 0, time.perf_counter()
    for x, _ in batches:
        x = x.to(device, non_blocking=True)
        images, count = images + len(x), count + 1
        if count >= min_batches and time.perf_counter() - start > seconds:
            break
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return images, time.perf_counter() - start


def bench_pipelines(args: argparse.Namespace) -> list[dict]:
    rows = []
    for device_name in args.devices:
        for size in (32, 224):
            rows += pipeline_rows(args, device_name, size, "none", 0.0)
        for policy in args.policies:
            for erasing in (0.0, 0.25):
                if (policy, erasing) != ("none", 0.0):  # measured above
                    rows += pipeline_rows(args, device_name, 32, policy, erasing)
    return rows


def pipeline_rows(
    args: argparse.Namespace, device_name: str, size: int, policy: str, erasing: float
) -> list[dict]:
    """Both paths' training batches at `size` px with `policy` and random erasing."""
    device = torch.device(device_name)
    common = {"batch_size": args.pipeline_batch, "image_size": size}
    common |= {"policy": policy, "random_erasing": erasing}
    if size == 224:
        common["normalization"] = "imagenet"

    def row(pipeline: str, workers: int | None, images: int, seconds: float) -> dict:
        return {
            "pipeline": pipeline,
            "device": device_name,
            "image_size": size,
            "workers": workers,
            "policy": policy,
            "random_erasing": erasing,
            "images": images,
            "images_per_s": round(images / seconds, 1),
        }

    rows = []
    for workers in args.workers:
        dm = datamodule(args, num_workers=workers, **common)
        rows.append(
            row("torchvision", workers, *timed_batches(dm.train_dataloader(), device, args.seconds))
        )
    dm = datamodule(args, pipeline="tensor", **common)
    loader = dm.tensor_loader("train", device)
    rows.append(row("tensor", None, *timed_batches(loader, device, args.seconds)))
    rows[-1]["dataset_mb"] = round(dataset_bytes(dm) / 2**20)
    print(f"pipeline {device_name} {size} px, policy {policy}, erasing {erasing} done", flush=True)
    return rows


def bench_image_folder(args: argparse.Namespace) -> list[dict]:
    """data=imagefolder at 224 px: JPEG photos decoded, RandomResizedCrop + flip'd and
    normalised in DataLoader workers, the ImageNet path; then the tensor path (the photos
    decoded once to 256 px squares, batches cropped whole on the device). The photos are
    CIFAR-10 training images enlarged to ImageNet's typical 500x375 and saved as JPEG
    (quality 90)."""
    count = 64 if args.quick else 1024
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tree, arrays = Path(tmp) / "photos", datamodule(args).arrays
        for i in range(count):
            label = int(arrays.train_labels[i])
            file = tree / "train" / arrays.classes[label] / f"{i:05d}.jpg"
            file.parent.mkdir(parents=True, exist_ok=True)
            image = Image.fromarray(arrays.train_images[i].numpy())
            image.resize((500, 375), Image.BICUBIC).save(file, quality=90)
        for device_name in args.devices:
            device = torch.device(device_name)
            for workers in (*args.workers, "tensor"):
                tensor = workers == "tensor"
                dm = ImageFolderDataModule(
                    root=tmp,
                    path=str(tree / "train"),
                    batch_size=args.pipeline_batch,
                    # The tensor path decodes the squares once (not timed) in these workers.
                    num_workers=max(args.workers) if tensor else workers,
                    val_size=0.1,
                    pipeline="tensor" if tensor else "torchvision",
                )
                dm.setup()
                loader = dm.tensor_loader("train", device) if tensor else dm.train_dataloader()
                images, seconds = timed_batches(loader, device, args.seconds)
                rows.append(
                    {
                        "pipeline": "imagefolder tensor (cache 256)"
                        if tensor
                        else "imagefolder (JPEG 500x375)",
                        "device": device_name,
                        "image_size": 224,
                        "workers": None if tensor else workers,
                        "policy": "none",
                        "random_erasing": 0.0,
                        "images": images,
                        "images_per_s": round(images / seconds, 1),
                    }
                )
    print("pipeline image folder done", flush=True)
    return rows


def dataset_bytes(dm: CifarDataModule) -> int:
    a = dm.arrays
    return sum(t.nbytes for t in (a.train_images, a.test_images))


def bench_training(args: argparse.Namespace) -> list[dict]:
    device = torch.device("cuda" if "cuda" in args.devices else "cpu")
    on_gpu = device.type == "cuda"
    precisions = args.precisions or (
        ["32-true", "16-mixed", "bf16-mixed"] if on_gpu else ["32-true", "bf16-mixed"]
    )
    steps = args.steps or (30 if on_gpu else 3)
    rows = []
    for name in args.models or ["resnet20", "resnet18", "resnet50"]:
        spec = MODELS[name]
        batch = spec.gpu_batch if on_gpu else spec.cpu_batch
        if args.quick:
            batch = 16
        for precision in precisions:
            for channels_last in (False, True):
                dm = datamodule(
                    args,
                    pipeline="tensor",
                    batch_size=batch,
                    image_size=spec.image_size,
                    normalization="imagenet" if spec.stem == "imagenet" else "cifar",
                    channels_last=channels_last,
                )
                loader = dm.tensor_loader("train", device)
                row = train_row(
                    spec.name, spec.stem, loader, device, precision, channels_last, steps
                )
                rows.append({"model": spec.label, "pipeline": "tensor", "batch": batch, **row})
                print(f"train {spec.label} {precision} cl={channels_last} done", flush=True)
    if on_gpu and not args.quick:
        dm = datamodule(
            args,
            batch_size=SEED["batch"],
            image_size=SEED["image_size"],
            num_workers=SEED["workers"],
            normalization="imagenet",
        )
        torch.backends.cudnn.benchmark = False  # the seed left it off
        row = train_row(
            SEED["model"], SEED["stem"], dm.train_dataloader(), device, "32-true", False, steps
        )
        torch.backends.cudnn.benchmark = True
        label = f"seed: {MODELS['resnet50'].label}, PIL pipeline, {SEED['workers']} workers"
        rows.append({"model": label, "pipeline": "torchvision", "batch": SEED["batch"], **row})
    return rows


def train_row(
    name: str,
    stem: str,
    loader: Iterable,
    device: torch.device,
    precision: str,
    channels_last: bool,
    steps: int,
) -> dict:
    torch.manual_seed(0)
    model = create_model(name, stem=stem, channels_last=channels_last).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    criterion = nn.CrossEntropyLoss()
    batches = repeat(loader)
    warmup = 2 if device.type == "cuda" else 1  # cuDNN autotuning, first allocations
    scaler = torch.amp.GradScaler() if precision == "16-mixed" else None
    run_epoch(model, batches, criterion, precision, warmup, optimizer, scaler)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    result = run_epoch(model, batches, criterion, precision, steps, optimizer, scaler)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    return {
        "device": device.type,
        "precision": precision,
        "memory_format": "channels_last" if channels_last else "NCHW",
        "images_per_s": round(result.images / result.seconds, 1),
        "peak_memory_mb": None if peak is None else round(peak),
    }


def repeat(loader: Iterable) -> Iterator:
    """An endless stream of the loader's batches, so warm-up and timing share one iterator."""
    while True:
        yield from loader


def bench_overhead(args: argparse.Namespace) -> dict:
    device = "cuda" if "cuda" in args.devices else "cpu"
    spec = MODELS[args.overhead_model]
    precision, channels_last = ("bf16-mixed", True) if device == "cuda" else ("32-true", False)
    batches = args.overhead_batches or None
    val_batches = max(1, batches // 4) if batches else None
    overrides = [
        f"model={spec.name}",
        f"model.stem={spec.stem}",
        f"model.channels_last={channels_last}",
        "data.pipeline=tensor",
        f"data.batch_size={args.overhead_batch}",
        f"data.image_size={spec.image_size}",
        f"data.root={Path(args.data_root).resolve()}",
        f"data.path={args.data_path or 'null'}",
        f"trainer.precision={precision}",
        f"trainer.max_epochs={args.overhead_epochs}",
        "trainer.num_sanity_val_steps=0",
        f"trainer.limit_train_batches={batches or 1.0}",
        f"trainer.limit_val_batches={val_batches or 1.0}",
        "trainer.limit_test_batches=1",
        "seed=0",
        "trainer=gpu" if device == "cuda" else "trainer=cpu",
    ]
    plain, framework = [], []
    for _ in range(args.overhead_rounds):  # alternated, so both meet the same machine load
        plain.append(
            plain_epochs(overrides, device, args.overhead_epochs, batches, val_batches, precision)
        )
        with tempfile.TemporaryDirectory(prefix="bench-overhead-") as tmp:
            framework.append(framework_epochs(overrides, Path(tmp)))
    framework_s, plain_s = fastest(framework), fastest(plain)
    return {
        "model": spec.label,
        "device": device,
        "precision": precision,
        "batch": args.overhead_batch,
        "train_batches_per_epoch": batches,
        "plain_epoch_s": [[round(t, 3) for t in run] for run in plain],
        "framework_epoch_s": [[round(t, 3) for t in run] for run in framework],
        "plain_s": round(plain_s, 3),
        "framework_s": round(framework_s, 3),
        "ratio": round(framework_s / plain_s, 4),
        "overrides": overrides,
    }


def fastest(runs: list[list[float]]) -> float:
    """The fastest epoch but each run's first (its warm-up): the one other processes on the
    machine disturbed least, as they only ever add time."""
    return min(t for run in runs for t in (run[1:] or run))


def framework_epochs(overrides: list[str], tmp: Path) -> list[float]:
    """Epoch times of `python -m resnet_lightning`, default callbacks and loggers included."""
    times = tmp / "epoch_times.json"
    timer = f"+callbacks.epoch_timer={{_target_:{EpochTimer.__module__}.EpochTimer,path:'{times}'}}"
    command = [
        sys.executable,
        "-m",
        "resnet_lightning",
        *overrides,
        timer,
        f"hydra.run.dir={tmp / 'run'}",
    ]
    env = {k: v for k, v in os.environ.items() if k != "CIFAR10_PATH"}
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{result.stderr[-3000:]}")
    return json.loads(times.read_text())["epoch_s"]


def plain_epochs(
    overrides: list[str],
    device: str,
    epochs: int,
    batches: int | None,
    val_batches: int | None,
    precision: str,
) -> list[float]:
    """Epoch times of plain_loop.fit on what the same overrides build: data, model,
    optimizer, scheduler and loss."""
    cfg = compose_config(overrides)
    device = torch.device(device)
    torch.manual_seed(0)
    dm = instantiate_group(cfg, "data")
    dm.setup()
    model = instantiate_group(cfg, "model").to(device)
    optimizer = instantiate_group(cfg, "optimizer")(model.parameters())
    scheduler = instantiate_group(cfg, "scheduler")(optimizer) if cfg.scheduler else None
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.module.label_smoothing)
    return fit(
        model,
        dm.tensor_loader("train", device),
        dm.tensor_loader("val", device),
        optimizer,
        criterion,
        epochs,
        scheduler,
        precision,
        batches,
        val_batches,
    )


INFERENCE_BACKENDS = ("eager", "compiled", "torchscript", "onnxruntime")


def bench_inference(args: argparse.Namespace) -> list[dict]:
    backends = [b for b in INFERENCE_BACKENDS if b != "compiled" or args.compile]
    rows = []
    for name in args.inference_models:
        # Every model as the configs build it (conf/model/_resnet.yaml: stem: cifar) at 32 px.
        spec = replace(MODELS[name], stem="cifar", image_size=32)
        torch.manual_seed(0)
        net = create_model(spec.name, stem=spec.stem).eval()
        # A batch of 2: torch.export would fix a dynamic batch size that it sees as 1.
        example = torch.randn(2, 3, spec.image_size, spec.image_size)
        with tempfile.TemporaryDirectory(prefix="bench-inference-") as tmp:
            for backend in backends:
                start = time.perf_counter()
                try:
                    run = inference_runner(backend, net, example, Path(tmp))
                except UsageError as err:  # onnxruntime not installed
                    print(f"inference {backend}: skipped, {err}", flush=True)
                    continue
                setup_s = time.perf_counter() - start
                for batch in args.inference_batches:
                    images = torch.randn(batch, 3, spec.image_size, spec.image_size)
                    timing = time_calls(run, images, args.inference_seconds, args.inference_calls)
                    row = {"model": spec.label, "backend": backend, "batch": batch, **timing}
                    rows.append({**row, "setup_s": round(setup_s, 2)})
                    print(f"inference {spec.label} {backend} batch {batch} done", flush=True)
    return rows


def inference_runner(
    backend: str, net: nn.Module, example: Tensor, tmp: Path
) -> Callable[[Tensor], Tensor]:
    """`net` run by `backend`; the exported ones written to `tmp` and loaded again."""
    if backend == "onnxruntime":
        return EXPORTERS["onnx"](net, example, tmp / "model.onnx")
    if backend == "torchscript":
        return EXPORTERS["torchscript"](net, example, tmp / "model.ts.pt")
    # dynamic=False: each batch size gets kernels specialised to it, as a fixed-size server's.
    return without_grad(torch.compile(net, dynamic=False) if backend == "compiled" else net)


def time_calls(run: Callable[[Tensor], Tensor], images: Tensor, seconds: float, calls: int) -> dict:
    """Images/s from the median call, after two warm-up calls (the first compiles, TorchScript
    optimises on the second); timed calls continue until `calls` and `seconds` are reached.
    The median, because other processes on the machine only slow some calls down."""
    start = time.perf_counter()
    run(images)
    first_call_s = time.perf_counter() - start
    run(images)
    times: list[float] = []
    while len(times) < calls or sum(times) < seconds:
        start = time.perf_counter()
        run(images)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {
        "images_per_s": round(len(images) / median, 1),
        "ms_per_call": round(median * 1000, 2),
        "calls": len(times),
        "first_call_s": round(first_call_s, 3),
    }


@dataclass(frozen=True)
class CpuTrainSetting:
    """One cpu_train row's settings."""

    precision: str
    memory_format: str  # NCHW or channels_last
    batch: int
    threads: int
    onednn: str = "on"  # or one of ONEDNN_SETTINGS
    run: str = "eager"  # or compiled


def cpu_train_settings(args: argparse.Namespace) -> list[CpuTrainSetting]:
    """Every precision x memory format x batch x threads with oneDNN's defaults, eager; then
    each other oneDNN setting, and torch.compile, at the first batch size and the most threads."""
    formats = ("NCHW", "channels_last")
    settings = [
        CpuTrainSetting(precision, memory_format, batch, threads)
        for precision in args.cpu_precisions
        for memory_format in formats
        for batch in args.cpu_batches
        for threads in args.cpu_threads
    ]
    batch, threads = args.cpu_batches[0], max(args.cpu_threads)
    for onednn in args.cpu_onednn:
        # bf32 changes fp32 math only: under bf16 autocast it would measure nothing new.
        precisions = ["32-true"] if onednn == "bf32" else args.cpu_precisions
        settings += [
            CpuTrainSetting(precision, memory_format, batch, threads, onednn)
            for precision in precisions
            if precision in args.cpu_precisions
            for memory_format in formats
        ]
    if args.compile:
        settings += [
            CpuTrainSetting(precision, memory_format, batch, threads, run="compiled")
            for precision in args.cpu_precisions
            for memory_format in formats
        ]
    return settings


def bench_cpu_training(args: argparse.Namespace) -> list[dict]:
    """A row per model and setting; torch's thread count is restored afterwards."""
    threads = torch.get_num_threads()
    rows = []
    try:
        for name in args.cpu_models:
            cfg = compose_config([f"model={name}"])
            for setting in cpu_train_settings(args):
                row = cpu_train_row(cfg, setting, args.cpu_warmup, args.cpu_steps)
                rows.append({"model": name, **asdict(setting), **row})
                print(f"cpu_train {name} {setting} done", flush=True)
    finally:
        torch.set_num_threads(threads)
    return rows


def cpu_train_row(cfg: DictConfig, setting: CpuTrainSetting, warmup: int, steps: int) -> dict:
    """Training images/s of the model `cfg` builds, from the median of `steps` timed steps after
    `warmup` others (the first of which compiles a compiled model: `first_step_s`)."""
    torch.set_num_threads(setting.threads)
    torch.manual_seed(0)
    channels_last = setting.memory_format == "channels_last"
    compiled = setting.run == "compiled"
    with onednn(setting.onednn):
        model = instantiate_group(cfg, "model", channels_last=channels_last, compile=compiled)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        size = int(cfg.data.image_size)
        x = torch.randn(setting.batch, 3, size, size)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        batches = [(x, torch.randint(0, int(cfg.model.num_classes), (setting.batch,)))]
        criterion = nn.CrossEntropyLoss()
        # One training step each: a CPU computes synchronously, so each call times its step.
        seconds = [
            run_epoch(model, batches, criterion, setting.precision, None, optimizer).seconds
            for _ in range(warmup + steps)
        ]
    first_step_s, median = seconds[0], statistics.median(seconds[warmup:])
    return {
        "images_per_s": round(setting.batch / median, 1),
        "ms_per_step": round(median * 1000, 1),
        "first_step_s": round(first_step_s, 2),
        "timed_steps": steps,
        "warmup_steps": warmup,
    }


@contextmanager
def onednn(setting: str) -> Iterator[None]:
    """oneDNN as `setting` says ("on": torch's defaults, or one of ONEDNN_SETTINGS), restored
    afterwards."""
    mkldnn = torch.backends.mkldnn
    enabled = mkldnn.enabled
    conv, matmul = mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision
    try:
        if setting == "off":
            mkldnn.enabled = False
        elif setting == "bf32":
            mkldnn.conv.fp32_precision = mkldnn.matmul.fp32_precision = "bf16"
        yield
    finally:
        mkldnn.enabled = enabled
        mkldnn.conv.fp32_precision, mkldnn.matmul.fp32_precision = conv, matmul


# The columns of the pipeline, train, inference and cpu_train tables: title -> key of each row.
TABLE_COLUMNS = {
    "pipeline": {
        "pipeline": "pipeline",
        "device": "device",
        "px": "image_size",
        "workers": "workers",
        "policy": "policy",
        "erasing": "random_erasing",
        "images/s": "images_per_s",
    },
    "train": {
        "model": "model",
        "pipeline": "pipeline",
        "batch": "batch",
        "device": "device",
        "precision": "precision",
        "memory format": "memory_format",
        "images/s": "images_per_s",
        "peak MB": "peak_memory_mb",
    },
    "inference": {
        "model": "model",
        "backend": "backend",
        "batch": "batch",
        "images/s": "images_per_s",
        "ms/call": "ms_per_call",
        "first call s": "first_call_s",
    },
    "cpu_train": {
        "model": "model",
        "precision": "precision",
        "memory format": "memory_format",
        "batch": "batch",
        "threads": "threads",
        "oneDNN": "onednn",
        "run": "run",
        "images/s": "images_per_s",
        "ms/step": "ms_per_step",
        "first step s": "first_step_s",
    },
}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [
        f"machine: {m['cpu']}, {m['cpu_cores']} cores ({m['torch_threads']} torch threads)"
        + (f", {m['gpu']}" if "gpu" in m else "")
        + f"; torch {m['torch']}"
        + (f", onnxruntime {m['onnxruntime']}" if "onnxruntime" in m else "")
        + f"; {report['date']}",
        f"CPU flags: {' '.join(m['cpu_flags']) or 'none of ' + ', '.join(CPU_FLAGS)}; "
        f"trainer.precision=auto on this CPU: {m['cpu_auto_precision']}",
        f"command: {report['command']}",
    ]
    rate = {
        "images/s": "{:,.0f}".format,
        "peak MB": "{:,}".format,
        "ms/call": "{:,.1f}".format,
        "first call s": "{:.2f}".format,
        "ms/step": "{:,.1f}".format,
        "first step s": "{:.2f}".format,
    }
    for section, columns in TABLE_COLUMNS.items():
        if section in report:
            rows = [{title: r[key] for title, key in columns.items()} for r in report[section]]
            lines += ["", markdown_table(rows, rate)]
    if report.get("cpu_train"):
        row = report["cpu_train"][0]
        lines += [
            "",
            "cpu_train: full training steps (forward, backward, SGD) on random batches; images/s "
            f"from the median of {row['timed_steps']} timed steps after {row['warmup_steps']} "
            "warm-up step(s); first step s: the first warm-up step, in compiled rows the "
            "compilation; oneDNN off: torch.backends.mkldnn.enabled=False; bf32: oneDNN's fp32 "
            "convolutions and matmuls computed in bf16 (torch.backends.mkldnn.conv/matmul."
            "fp32_precision='bf16')",
        ]
    if "overhead" in report:
        o = report["overhead"]
        row = {
            "framework overhead": o["model"],
            "device": o["device"],
            "precision": o["precision"],
            "batch": o["batch"],
            "plain loop epoch s*": o["plain_s"],
            "Trainer epoch s*": o["framework_s"],
            "ratio": o["ratio"],
        }
        seconds = "{:.3f}".format
        formats = {"plain loop epoch s*": seconds, "Trainer epoch s*": seconds, "ratio": seconds}
        lines += [
            "",
            markdown_table([row], formats),
            "",
            f"\\* the fastest epoch after the first of each run, {len(o['plain_epoch_s'])} run(s) "
            f"each of {o['train_batches_per_epoch'] or 'all'} training batches an epoch",
        ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
