"""Fixtures: real CIFAR-10 images, cached once per session."""

from __future__ import annotations

import io
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from tests.cli_harness import PHOTO_CLASSES, SHARED_CIFAR, make_image_archive


@pytest.fixture(scope="session")
def cifar_archive(tmp_path_factory) -> Path:
    """The real CIFAR-10 (JPEG copy) when it lies beside the checkout, else a generated one."""
    if SHARED_CIFAR.exists():
        return SHARED_CIFAR
    return make_image_archive(tmp_path_factory.mktemp("archive") / "cifar-generated.tar.gz")


@pytest.fixture(scope="session")
def data_root(tmp_path_factory, cifar_archive) -> Path:
    """A cache folder, filled once per session so later runs load in a moment."""
    from resnet_lightning.data import load_cifar10

    root = tmp_path_factory.mktemp("data")
    load_cifar10(root, cifar_archive)
    return root


@pytest.fixture
def data_overrides(data_root, cifar_archive) -> list[str]:
    return [f"data.root={data_root}", f"data.path={cifar_archive}"]


@pytest.fixture(scope="session")
def photos(tmp_path_factory, cifar_archive) -> Path:
    """train/<class>/ (80 each) and val/<class>/ (20 each) of three real CIFAR-10 classes,
    enlarged to 64 px: photos larger than 32 px."""
    tree = tmp_path_factory.mktemp("photos")
    wanted = {"train": 80, "val": 20}
    taken: dict[str, int] = {}
    with tarfile.open(cifar_archive) as archive:
        for member in archive:
            *_, split, cls, _ = ["", "", *member.name.split("/")]
            if member.isfile() and split == "train" and cls in PHOTO_CLASSES:
                n = taken[cls] = taken.get(cls, 0) + 1
                into = "train" if n <= wanted["train"] else "val"
                if n <= sum(wanted.values()):
                    image = Image.open(io.BytesIO(archive.extractfile(member).read()))
                    file = tree / into / cls / f"{n:04d}.jpg"
                    file.parent.mkdir(parents=True, exist_ok=True)
                    image.convert("RGB").resize((64, 64), Image.BICUBIC).save(file, quality=90)
            archive.members.clear()
            if len(taken) == len(PHOTO_CLASSES) and min(taken.values()) >= sum(wanted.values()):
                break
    return tree


@pytest.fixture
def offline_wandb(tmp_path, monkeypatch):
    """W&B offline, in this process and the runs it starts, with its own files in the test's
    folder and nothing sent; its service, if a run in this process started it, stopped after."""
    wandb = pytest.importorskip("wandb", reason="pip install -e '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    # Online, it would need a key it does not have, and a server at a closed port.
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))
    yield wandb
    wandb.teardown()
