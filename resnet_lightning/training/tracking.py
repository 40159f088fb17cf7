"""The runs of the tracking loggers (MLflow, W&B), which live in a store of their own: a run
resumed with `resume=auto` continues the run its checkpoint logged to (`RunRecord` saves the
ids), so that the metrics go on from the resumed step in one run, not in a new one each time."""

from __future__ import annotations

import logging
from argparse import Namespace
from typing import Any

from hydra.utils import get_object
from lightning.pytorch.loggers import Logger, MLFlowLogger
from omegaconf import DictConfig, OmegaConf

from resnet_lightning.callbacks.checkpoints import RunRecord
from resnet_lightning.training.config import instantiate_group

log = logging.getLogger(__name__)


class ResumableMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, which can continue a run (`run_id`): that run keeps the
    parameters it started with, as MLflow refuses to change a parameter's value and a resumed
    run's config differs at least in `resume` (and in whatever else was given with it)."""

    def __init__(self, *args: Any, run_id: str | None = None, **kwargs: Any):
        super().__init__(*args, run_id=run_id, **kwargs)
        self._continues_run = run_id is not None

    def log_hyperparams(self, params: dict[str, Any] | Namespace) -> None:
        if not self._continues_run:
            super().log_hyperparams(params)


def tracking_runs(cfg: DictConfig, checkpoint: dict[str, Any]) -> dict[str, str]:
    """The tracking runs (ids by logger class) that a run resumed from `checkpoint` continues:
    under `resume=auto`, those the checkpoint logged to; none under `resume=<path>`, which
    starts a new run directory, and so new tracking runs."""
    if cfg.get("resume") != "auto":
        return {}
    return dict(checkpoint.get(RunRecord.TRACKING_KEY, {}))


def instantiate_logger(cfg: DictConfig, key: str, runs: dict[str, str]) -> Logger:
    """The logger `key` (`logger.mlflow`, ...) of conf/logger/, continuing the run that `runs`
    (`tracking_runs`) names for its class, if any."""
    target = OmegaConf.select(cfg, f"{key}._target_")
    # resume=auto has checked every _target_ (check_targets): each can be imported.
    kind = get_object(target) if runs and target else None
    for logger_class, argument in RunRecord.TRACKING_LOGGERS.items():
        run_id = runs.get(logger_class.__name__)
        if not (run_id and isinstance(kind, type) and issubclass(kind, logger_class)):
            continue
        logger = instantiate_group(cfg, key, **{argument: run_id})
        if isinstance(logger, MLFlowLogger) and not _reopen_mlflow_run(logger, run_id):
            return instantiate_group(cfg, key)
        log.info("resume=auto: continuing the %s run %s", logger_class.__name__, run_id)
        return logger
    return instantiate_group(cfg, key)


def _reopen_mlflow_run(logger: MLFlowLogger, run_id: str) -> bool:
    """Mark the MLflow run as running again (a run stopped by a signal ended FAILED); False
    when its store does not hold it (a run directory copied from elsewhere, a store moved)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        logger.experiment.update_run(run_id, status="RUNNING")
    except MlflowException as err:
        log.warning(
            "resume=auto: the MLflow store %s holds no run %s (%s); logging to a new run",
            mlflow.get_tracking_uri(),
            run_id,
            str(err).splitlines()[0],
        )
        return False
    return True
