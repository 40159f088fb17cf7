"""Fixtures: real CIFAR-10 images, cached once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.cli_harness import SHARED_CIFAR, make_image_archive


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
