"""Hydra entry point: compose the config, train, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelSummary, ProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, ListConfig, OmegaConf

from resnet_lightning.checkpointing import (
    AtomicCheckpointIO,
    RunRecord,
    check_checkpoint_fits,
    load_checkpoint_file,
)
from resnet_lightning.cli import hydra_job, one_line_errors, process_argv
from resnet_lightning.config import CONFIG_DIR
from resnet_lightning.config_checks import check_config
from resnet_lightning.files import write_json
from resnet_lightning.resume import ReseedEachEpoch, resume_checkpoint

log = logging.getLogger(__name__)
# Columns of TensorBoard's HPARAMS tab besides the model, optimizer, scheduler, seed and overrides.
HPARAM_KEYS = (
    "model.stem", "data.batch_size", "data.image_size", "data.augment", "module.label_smoothing",
    "trainer.max_epochs", "trainer.max_steps", "trainer.precision", "trainer.devices",
)  # fmt: skip


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test one run as configured; return the metrics written to metrics.json."""
    start = time.perf_counter()
    check_config(cfg)
    resume_path = resume_checkpoint(cfg)
    seed = L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    if (threads := cfg.get("num_threads")) is not None:
        # OMP_NUM_THREADS too: the DDP ranks Lightning starts inherit it, and it keeps Lightning
        # from dividing the cores among them by itself.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)

    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler else None
    module = instantiate(
        cfg.module, net=net, optimizer=instantiate(cfg.optimizer), scheduler=scheduler
    )
    if resume_path:  # a checkpoint that cannot continue this run stops it before any output
        # Memory-mapped: the check reads shapes, fit() then loads the file for real.
        check_checkpoint_fits(module, load_checkpoint_file(resume_path, mmap=True), resume_path)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    # The Trainer's switches turn off the configured callbacks too, not only its defaults.
    for kind, switch in (
        (ProgressBar, "enable_progress_bar"),
        (ModelSummary, "enable_model_summary"),
    ):
        if not cfg.trainer.get(switch, True):
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    callbacks += [RunRecord(resolved), ReseedEachEpoch(seed)]
    loggers = [instantiate(c) for c in cfg.logger.values() if c]
    # Atomic saves and code-free loads are not optional: they are added here, not in conf/.
    plugins = [AtomicCheckpointIO(), *instantiate(cfg.trainer.get("plugins") or [])]
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    for logger in trainer.loggers:  # the whole config, as the loggers' hparams.yaml
        logger.log_hyperparams(resolved)

    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    best_val = checkpoint.best_model_score if checkpoint and best_path else None
    if best_val is None:  # the last validation's, read before testing clears callback_metrics
        best_val = trainer.callback_metrics.get("val/acc")
    (test,) = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)

    metrics = {
        **{k: float(v) for k, v in test.items()},
        "val/acc": float(best_val) if best_val is not None else float("nan"),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "params": sum(p.numel() for p in net.parameters()),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "best_checkpoint": best_path,
    }
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps(metrics))
    log_final_hparams(trainer, cfg, metrics)
    return metrics


def tensorboard_hparams(cfg: DictConfig) -> dict[str, Any]:
    """A flat, readable set of hyperparameters: the recipe's main knobs and every command-line
    or sweep override, so that sweep jobs line up column by column in the HPARAMS tab."""
    params: dict[str, Any] = {"model": cfg.model.name, "seed": cfg.seed}
    for group in ("optimizer", "scheduler"):
        node = cfg.get(group)
        params[group] = node._target_.rsplit(".", 1)[-1] if node else "none"
        params |= {f"{group}.{k}": v for k, v in (node or {}).items() if not k.startswith("_")}
    params |= {key: OmegaConf.select(cfg, key) for key in HPARAM_KEYS}
    overrides = HydraConfig.get().overrides.task if HydraConfig.initialized() else []
    for override in overrides:
        key, _, value = override.partition("=")
        key = key.lstrip("+~")
        if not key.startswith("hydra."):
            selected = OmegaConf.select(cfg, key, default=value)
            # A group choice (model=plain56) or a list reads best as written.
            params[key] = value if isinstance(selected, DictConfig | ListConfig) else selected
    return {k: v if isinstance(v, bool | int | float | str) else str(v) for k, v in params.items()}


def log_final_hparams(trainer: L.Trainer, cfg: DictConfig, metrics: dict[str, Any]) -> None:
    """TensorBoard's HPARAMS tab: the run's hyperparameters beside its final metrics (hp/*)."""
    final = {f"hp/{k.replace('/', '_')}": v for k, v in metrics.items() if not isinstance(v, str)}
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            # trainer.test closed the writer: this writes a second events file, then closes it.
            logger.log_hyperparams(tensorboard_hparams(cfg), final, step=trainer.global_step)
            logger.finalize("success")


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def run(cfg: DictConfig) -> float:
    """One Hydra job: a run, or one job of a multirun."""
    # Inside the job too: Hydra would print its own "Error executing job" line before ours.
    with hydra_job(), one_line_errors():
        metrics = train(cfg)
    # Hydra sweepers (Optuna, ...) optimize the value returned here.
    return metrics[cfg.optimized_metric]


def main() -> None:
    """`python -m resnet_lightning [overrides]`; bad input ends it with one line and exit 2."""
    sys.argv[1:] = process_argv(sys.argv[1:])
    with one_line_errors():
        run()
