"""The project's Hydra configs (conf/), composed as the CLI composes them, for the tools that
build what a command line would without running it (reports, the benchmark)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig

from resnet_lightning.errors import UsageError

CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def compose_config(overrides: Sequence[str] = ()) -> DictConfig:
    """conf/config.yaml with `overrides`; a bad override is a UsageError naming it."""
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            return compose(config_name="config", overrides=list(overrides))
    except HydraException as err:
        # Hydra's message continues with every option and the search path: keep its first part.
        message = " ".join(str(err).strip().split("\n\n")[0].split())
        raise UsageError(f"{' '.join(overrides)}: {message}") from None
