"""What the tests share besides fixtures: the repository, the real CLI run as a user runs it,
small run settings, and a CIFAR-shaped archive for machines without the real copy."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from resnet_lightning.callbacks.divergence import DivergenceGuard
from resnet_lightning.training.config import CONFIG_DIR, compose_config

__all__ = ["CONFIG_DIR", "compose_config"]  # re-exported for the tests

REPO = Path(__file__).resolve().parent.parent
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar10-jpeg.tar.gz"
# The classes of the `photos` fixture (conftest.py): the first three of the archive, in its order.
PHOTO_CLASSES = ["airplane", "automobile", "bird"]
CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def make_image_archive(path: Path, train_per_class: int = 600, test_per_class: int = 100) -> Path:
    """A CIFAR-shaped image-folder archive of PNGs, for machines without the real copy; big
    enough by default for the 5,000-image validation split."""
    generator = torch.Generator().manual_seed(0)
    with tarfile.open(path, "w:gz") as archive:
        for split, count in (("train", train_per_class), ("test", test_per_class)):
            for label, cls in enumerate(CLASSES):
                for i in range(count):
                    # Class-dependent colour plus noise, so a network can learn something.
                    base = torch.full((32, 32, 3), 20 * label, dtype=torch.int16)
                    noise = torch.randint(
                        0, 60, (32, 32, 3), generator=generator, dtype=torch.int16
                    )
                    pixels = (base + noise).clamp(0, 255).to(torch.uint8).numpy()
                    buffer = io.BytesIO()
                    Image.fromarray(pixels).save(buffer, format="PNG")
                    info = tarfile.TarInfo(f"cifar/{split}/{cls}/{i:04d}.png")
                    info.size = buffer.tell()
                    buffer.seek(0)
                    archive.addfile(info, buffer)
    return path


def chi_square_agrees(a: Counter, b: Counter) -> bool:
    """Whether two equal-sized samples' counts pass the two-sample chi-square test at
    p = 0.001 (critical value by Wilson and Hilferty's approximation, within 1% here)."""
    keys = set(a) | set(b)
    stat = sum((a[k] - b[k]) ** 2 / (a[k] + b[k]) for k in keys)
    dof = len(keys) - 1
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * (2 / (9 * dof)) ** 0.5) ** 3
    return stat < critical


def make_datamodule(data_root, cifar_archive, **kwargs):
    """A CifarDataModule on the session's data, set up, loading in the test process."""
    from resnet_lightning.data import CifarDataModule

    dm = CifarDataModule(root=str(data_root), path=str(cifar_archive), num_workers=0, **kwargs)
    dm.setup()
    return dm


def bare_trainer(**kwargs) -> L.Trainer:
    """A Trainer on the CPU without logger, checkpoints, progress bar or model summary."""
    return L.Trainer(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


def without_callbacks(*keep: str) -> list[str]:
    """Overrides switching off every configured callback but `keep`, for tests whose subject is
    not the callbacks: the TensorBoard figures cost more than a tiny run's training."""
    return [f"callbacks.{name}=null" for name in compose_config().callbacks if name not in keep]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: the tests name their data explicitly, whatever
    the caller's environment says."""
    return {k: v for k, v in os.environ.items() if k != "CIFAR10_PATH"}


def run_cli(
    args: list[str],
    cwd: Path,
    timeout: int = 600,
    check: bool = True,
    command: str = "resnet_lightning",
):
    """`python -m COMMAND ARGS` (by default the training CLI) in a subprocess, as a user runs it."""
    result = subprocess.run(
        [sys.executable, "-m", command, *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"exit {result.returncode}\nSTDOUT:\n{result.stdout[-4000:]}"
            f"\nSTDERR:\n{result.stderr[-4000:]}"
        )
    return result


def free_port() -> int:
    """A TCP port of localhost that no one listens on (a moment ago)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_metrics(run_dir: Path) -> dict:
    """A run's metrics.json less what differs between two runs of the same training: the wall
    time, and the best checkpoint's folder."""
    metrics = json.loads((run_dir / "metrics.json").read_text())
    metrics.pop("wall_time_s")
    metrics.pop("rss_mb", None)  # the process's memory, not the training's
    metrics["best_checkpoint"] = Path(metrics["best_checkpoint"]).name
    return metrics


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return torch.load(checkpoint, weights_only=True)["state_dict"]


def train_loss_curve(run_dir: Path) -> dict[int, float]:
    """train/loss by step over every events file of the run, later files winning."""
    curve = {}
    for events in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        if "train/loss" in accumulator.Tags()["scalars"]:
            curve |= {e.step: e.value for e in accumulator.Scalars("train/loss")}
    return curve


def run_together(commands: list[list[str]], timeout: float) -> list[str]:
    """Start `commands` (each a whole command line) at once from the repository and wait for
    all; their outputs, after every one succeeded."""
    processes = [
        subprocess.Popen(
            command,
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for command in commands
    ]
    outputs = [process.communicate(timeout=timeout)[0] for process in processes]
    failed = [out[-3000:] for p, out in zip(processes, outputs, strict=True) if p.returncode != 0]
    assert not failed, failed
    return outputs


def run_main(args: list[str], capfd, monkeypatch) -> tuple[int, str]:
    """The CLI's entry point with `args` as its command line, in this process (no interpreter
    start-up): the exit code and everything written to stderr."""
    from resnet_lightning.training.train import main

    monkeypatch.setattr(sys, "argv", ["resnet_lightning", *args])
    monkeypatch.delenv("CIFAR10_PATH", raising=False)
    capfd.readouterr()
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    return code, capfd.readouterr().err


def signal_at_step(patch, step: int, signum: int = signal.SIGTERM) -> None:
    """Make an in-process run (`run_main`) send itself a real signal, as `kill` or SLURM do,
    when training step `step` (0-based) starts: it stops after that step. `patch`: a
    monkeypatch context, which undoes this when it closes."""
    start_batch = DivergenceGuard.on_train_batch_start

    def signal_at_the_step(self, trainer, *hook_args):
        start_batch(self, trainer, *hook_args)
        if trainer.global_step == step:
            os.kill(os.getpid(), signum)

    patch.setattr(DivergenceGuard, "on_train_batch_start", signal_at_the_step)


# Small CPU settings shared by the end-to-end tests: 2 epochs of 3 batches.
TINY = [
    "trainer=cpu",
    "trainer.max_epochs=2",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
    "trainer.log_every_n_steps=1",
    "data.batch_size=16",
    "data.num_workers=0",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]
