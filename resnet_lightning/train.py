"""Hydra entry point: compose the config, train, test the best checkpoint, write metrics.json."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from resnet_lightning.errors import UsageError

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test one run as configured; return the metrics written to metrics.json."""
    start = time.perf_counter()
    L.seed_everything(cfg.seed, workers=True)
    torch.set_float32_matmul_precision(cfg.matmul_precision)

    datamodule = instantiate(cfg.data)
    net = instantiate(cfg.model)
    scheduler = instantiate(cfg.scheduler) if cfg.scheduler else None
    module = instantiate(cfg.module, net=net, optimizer=instantiate(cfg.optimizer), scheduler=scheduler)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c]
    loggers = [instantiate(c) for c in cfg.logger.values() if c]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    for logger in trainer.loggers:
        logger.log_hyperparams(OmegaConf.to_container(cfg, resolve=True))

    trainer.fit(module, datamodule=datamodule)
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    (test,) = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)

    best_val = checkpoint.best_model_score if checkpoint and best_path else None
    if best_val is None:
        best_val = trainer.callback_metrics.get("val/acc")
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
        _write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps(metrics))
    return metrics


def find_usage_error(err: BaseException | None) -> UsageError | None:
    """The UsageError behind `err`, looking through Hydra's InstantiationException wrapper."""
    while err is not None and not isinstance(err, UsageError):
        err = err.__cause__
    return err


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        metrics = train(cfg)
    except Exception as err:
        usage_error = find_usage_error(err)
        if usage_error is None:
            raise
        # Bad input the user can fix: one line, no traceback, non-zero exit.
        print(f"error: {usage_error}", file=sys.stderr)
        sys.exit(2)
    # Hydra sweepers (Optuna, ...) optimize the value returned here.
    return metrics[cfg.optimized_metric]
