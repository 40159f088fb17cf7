"""Which checkpoint a run resumes from, and with which settings.

`resume=auto` continues from `<run dir>/checkpoints/last.ckpt` (a fresh run when there is none)
with the overrides the run was started with; `resume=<path>` from that checkpoint. Lightning
restores the weights, optimizer, scheduler and loop counters; the data's epoch-seeded
shuffling (data/sampling.py) and callbacks/reseed.py make the epochs after a resume draw the
random numbers an uninterrupted run would have drawn. The MLflow and W&B runs it logged to are
continued too (training/tracking.py).
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from resnet_lightning.atomic_files import remove_leftovers
from resnet_lightning.callbacks.checkpoints import remove_partial_checkpoints
from resnet_lightning.errors import UsageError
from resnet_lightning.training.config import MOVED_TARGETS

log = logging.getLogger(__name__)
LAST_CHECKPOINT = ModelCheckpoint.CHECKPOINT_NAME_LAST + ModelCheckpoint.FILE_EXTENSION


def resume_checkpoint(cfg: DictConfig) -> str | None:
    """The checkpoint `cfg.resume` names, or None to start fresh."""
    resume = cfg.get("resume")
    if resume is None:
        return None
    if resume == "auto":
        last = last_checkpoint_path(cfg)
        # What a killed run was writing: checkpoints, metrics.json, the callbacks' files.
        remove_partial_checkpoints(last.parent)
        remove_leftovers(cfg.paths.output_dir)
        if not last.is_file():
            log.info("resume=auto: no %s yet, starting a fresh run", last)
            return None
        log.info("resume=auto: continuing from %s", last)
        return str(last)
    path = Path(str(resume)).expanduser()
    if not path.is_file():
        raise UsageError(
            f"resume={resume}: no such checkpoint file; pass a .ckpt path, or resume=auto "
            "with hydra.run.dir=<the run's directory>"
        )
    return str(path)


def last_checkpoint_path(cfg: DictConfig) -> Path:
    """Where the run's last.ckpt is written, and where resume=auto looks for it."""
    folder = OmegaConf.select(cfg, "callbacks.last_checkpoint.dirpath")
    return Path(folder or Path(cfg.paths.output_dir) / "checkpoints") / LAST_CHECKPOINT


def with_saved_overrides(argv: list[str]) -> list[str]:
    """`resume=auto hydra.run.dir=<run>`: put the run's own overrides (.hydra/overrides.yaml)
    before `argv`, so the run continues with the settings it started with. Overrides given on
    the command line win; a multirun repeats its sweep arguments itself."""
    resume = [a.partition("=")[2].strip("'\"") for a in argv if _override_key(a) == "resume"]
    if resume[-1:] != ["auto"] or {"-m", "--multirun"} & set(argv):
        return argv
    run_dir = given_run_dir(argv)
    if run_dir is None or not run_dir.exists():
        return argv  # a new run directory: a fresh run, which resume=auto can continue later
    saved_file = run_dir / ".hydra" / "overrides.yaml"
    if not saved_file.is_file():
        # Without its overrides the run would silently continue as the defaults.
        if any((run_dir / "checkpoints").glob("*.ckpt")):
            raise UsageError(
                f"resume=auto: {run_dir} has checkpoints but no saved config (.hydra/"
                "overrides.yaml), so the settings it ran with are unknown; continue it with "
                f"resume={run_dir / 'checkpoints' / LAST_CHECKPOINT} and its original overrides"
            )
        raise UsageError(
            f"resume=auto: {run_dir} holds no run to resume (no .hydra/overrides.yaml, no "
            "checkpoints); start a fresh run without resume=auto, or in a new hydra.run.dir"
        )
    saved = yaml.safe_load(saved_file.read_text()) or []
    if not isinstance(saved, list) or not all(isinstance(o, str) for o in saved):
        raise UsageError(f"{saved_file} is not a list of overrides; start a fresh run instead")
    for override in saved:
        if override.startswith("-"):  # a Hydra flag, never an override: --experimental-rerun
            raise UsageError(  # unpickles the file it names
                f"refusing {saved_file}: it holds {override.split('=', 1)[0]}, which is not an "
                "override; use only run directories from a source you trust"
            )
        # Hydra's own settings are never saved there; one could add a config search path.
        if _override_key(override).startswith("hydra"):
            raise UsageError(
                f"refusing {saved_file}: it sets Hydra's own {_override_key(override)}, which "
                "no run saves; use only run directories from a source you trust"
            )
    given = {_override_key(a) for a in argv}
    saved = [_with_moved_targets(o) for o in saved]
    return [*(o for o in saved if _override_key(o) not in given), *argv]


def _with_moved_targets(override: str) -> str:
    """An override saved by an older version (`+callbacks.x={_target_:...}`), with the
    classes that have moved since named where they are now."""
    for old, new in MOVED_TARGETS.items():
        override = override.replace(old, new)
    return override


def given_run_dir(argv: list[str]) -> Path | None:
    """The `hydra.run.dir=` of a command line (the last one), if any."""
    run_dirs = [a.split("=", 1)[1].strip("'\"") for a in argv if a.startswith("hydra.run.dir=")]
    return Path(run_dirs[-1]) if run_dirs else None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")
