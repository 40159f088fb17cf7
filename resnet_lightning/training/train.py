"""`python -m resnet_lightning`: compose the config, train, test the best checkpoint, write
metrics.json. `train()` is the whole run, top to bottom."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import LearningRateMonitor, ModelSummary, ProgressBar
from lightning.pytorch.loggers import MLFlowLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from resnet_lightning.atomic_files import write_json
from resnet_lightning.callbacks.checkpoints import (
    AtomicCheckpointIO,
    RunRecord,
    check_checkpoint_fits,
    load_checkpoint_file,
)
from resnet_lightning.callbacks.divergence import DivergenceGuard
from resnet_lightning.callbacks.fit_outcome import BEST_SCORE, EPOCHS, STEPS, FitOutcome
from resnet_lightning.callbacks.optuna_pruning import OptunaPruning
from resnet_lightning.callbacks.preemption import CheckpointOnSignal
from resnet_lightning.callbacks.reseed import ReseedEachEpoch
from resnet_lightning.callbacks.time_budget import TimeBudget, process_start_time
from resnet_lightning.errors import (
    DISK_FULL,
    NOT_WRITABLE,
    UsageError,
    log_to_files,
    one_line_errors,
)
from resnet_lightning.training.config import (
    CONFIG_DIR,
    build_module,
    check_config,
    check_targets,
    instantiate_group,
    take_time_budget,
)
from resnet_lightning.training.launch import hydra_job, process_overrides, remove_half_written_run
from resnet_lightning.training.precision import resolve_auto_precision
from resnet_lightning.training.resume import last_checkpoint_path, resume_checkpoint
from resnet_lightning.training.tracking import instantiate_logger, tracking_runs

log = logging.getLogger(__name__)
# Columns of TensorBoard's HPARAMS tab besides the model, optimizer, scheduler, seed and overrides.
HPARAM_KEYS = (
    "model.stem",
    "data.batch_size",
    "data.image_size",
    "data.augment",
    "module.label_smoothing",
    "trainer.max_epochs",
    "trainer.max_steps",
    "trainer.precision",
    "trainer.devices",
)
# What an MLflow run keeps of the run directory, as artifacts (checkpoints: log_model).
RUN_FILES = ("metrics.json", "train.log", ".hydra")


def train(cfg: DictConfig) -> dict[str, float]:
    """Fit and test one run as configured; return the metrics written to metrics.json."""
    start = time.perf_counter()
    started_at = job_start_time()
    log.info("Run directory: %s", cfg.paths.output_dir)
    check_config(cfg)
    budget_minutes = take_time_budget(cfg)
    # Before the config is saved anywhere: checkpoints and loggers record the precision used.
    resolve_auto_precision(cfg)
    if cfg.get("resume") == "auto":  # the config holds the run directory's saved overrides
        check_targets(cfg, f"resume=auto of {cfg.paths.output_dir}")
    resume_path = resume_checkpoint(cfg)
    seed = L.seed_everything(cfg.seed, workers=True)
    set_torch_threads(cfg)

    log.info("Instantiating datamodule <%s>", cfg.data._target_)
    datamodule = instantiate_group(cfg, "data")
    log.info("Instantiating model <%s> (%s)", cfg.model._target_, cfg.model.name)
    net = instantiate_group(cfg, "model")
    module = build_module(cfg, net)
    # The model summary counts FLOPs on it (without one it prints "Total FLOPs: 0").
    size = int(cfg.data.image_size)
    module.example_input_array = torch.zeros(1, 3, size, size)
    runs = {}  # resume=auto: the MLflow and W&B runs to continue
    if resume_path:  # a checkpoint that cannot continue this run stops it before any output
        # Memory-mapped: the check reads shapes, fit() then loads the file for real.
        saved = load_checkpoint_file(resume_path, mmap=True)
        check_checkpoint_fits(module, saved, resume_path)
        runs = tracking_runs(cfg, saved)

    resolved = OmegaConf.to_container(cfg, resolve=True)
    loggers = [instantiate_logger(cfg, key, runs) for key in group_entries(cfg, "logger")]
    # The guard first, so that its checks fall inside other callbacks' per-batch windows; the
    # budget next (not in conf/callbacks: no override switches it off), so that the position
    # a step ends at is known to the callbacks after it (lookahead's last pull, checkpoints).
    budget = TimeBudget(budget_minutes, started_at) if budget_minutes else None
    callbacks = [DivergenceGuard(), *([budget] if budget else [])]
    callbacks += configured_callbacks(cfg, with_loggers=bool(loggers))
    on_signal = CheckpointOnSignal(last_checkpoint_path(cfg))
    callbacks += [RunRecord(resolved), ReseedEachEpoch(seed), on_signal, FitOutcome()]
    pruning = trial_pruning(cfg)  # an Optuna sweep's trial reports to its study
    callbacks += [pruning] if pruning else []
    # Atomic saves and code-free loads are not optional: they are added here, not in conf/.
    plugins = [AtomicCheckpointIO(), *(instantiate_group(cfg, "trainer.plugins") or [])]
    log.info("Instantiating trainer <%s>", cfg.trainer._target_)
    trainer: L.Trainer = instantiate_group(
        cfg, "trainer", callbacks=callbacks, logger=loggers or False, plugins=plugins
    )
    for logger in trainer.loggers:  # the whole config, as the loggers' hparams.yaml
        logger.log_hyperparams(resolved)

    log.info("Starting training")
    with exit_on_signal(on_signal, trainer, cfg):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_path)
    # Read before testing clears callback_metrics; without a best checkpoint, the last
    # validation's accuracy.
    outcome = dict(trainer.callback_metrics)
    best_val = outcome.get(BEST_SCORE, outcome.get("val/acc"))
    checkpoint = trainer.checkpoint_callback
    best_path = checkpoint.best_model_path if checkpoint else ""
    log.info("Starting testing (%s)", best_path or "the last weights")
    with exit_on_signal(on_signal, trainer, cfg):
        (test,) = trainer.test(module, datamodule=datamodule, ckpt_path=best_path or None)

    metrics = {
        **{k: float(v) for k, v in test.items()},
        "val/acc": float(best_val) if best_val is not None else float("nan"),
        "epochs": int(outcome[EPOCHS]),
        "steps": int(outcome[STEPS]),
        "params": sum(p.numel() for p in net.parameters()),
        "wall_time_s": round(time.perf_counter() - start, 2),
        "best_checkpoint": best_path,
    }
    if budget is not None:
        metrics |= budget.summary(metrics["steps"])
    if pruning is not None:
        metrics["pruned"] = pruning.pruned_after_epoch is not None
        if metrics["pruned"]:
            metrics["pruned_after_epoch"] = pruning.pruned_after_epoch
    if (rss := resident_memory_mb()) is not None:
        metrics["rss_mb"] = rss
    if trainer.is_global_zero:
        write_json(Path(cfg.paths.output_dir) / "metrics.json", metrics)
        log.info("metrics: %s", json.dumps(metrics))
        log.info("Run directory: %s", cfg.paths.output_dir)
        finish_loggers(trainer, Path(cfg.paths.output_dir))
    log_final_hparams(trainer, cfg, metrics)
    return metrics


@contextmanager
def exit_on_signal(on_signal: CheckpointOnSignal, trainer: L.Trainer, cfg: DictConfig):
    """A run stopped by a signal exits with 128 + its number (what shells and job schedulers
    read as "killed by it"), after one line saying what was kept and how to continue; not
    with 0, as Lightning's own stop would."""
    try:
        yield
    except SIGTERMException:
        signum = on_signal.signum or signal.SIGTERM
        if trainer.is_global_zero:
            resume = f"python -m resnet_lightning resume=auto hydra.run.dir={cfg.paths.output_dir}"
            if on_signal.stopped_during == "testing":
                what = (
                    "during testing, after training; test the best checkpoint with: python -m "
                    f"resnet_lightning.eval ckpt_path={trainer.checkpoint_callback.best_model_path}"
                )
            elif on_signal.saved_at is not None:
                step, epoch = on_signal.saved_at
                what = f"at step {step} (epoch {epoch}); saved {on_signal.path}"
                what += f"; continue with: {resume}"
            else:  # during validation, or before training started
                what = (
                    f"during {on_signal.stopped_during or 'start-up'}; kept the last epoch's "
                    f"{on_signal.path} (if any); continue with: {resume}"
                )
            line = f"error: stopped by {signal.Signals(signum).name} {what}"
            print(line, file=sys.stderr, flush=True)
            log_to_files(line)
        raise SystemExit(128 + signum) from None


_JOBS_STARTED = 0


def job_start_time() -> float:
    """When this job's time began (`time.time()` scale): the process's start for its first job,
    so that a budget counts imports and start-up; now for later jobs of a multirun."""
    global _JOBS_STARTED
    _JOBS_STARTED += 1
    return process_start_time() if _JOBS_STARTED == 1 else time.time()


def resident_memory_mb() -> float | None:
    """The process's resident memory now, in MB; None where /proc is not there (not Linux).
    Read at the end of a job, it shows what a multirun's jobs leave behind."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 1e6, 1)


def quiet_noise() -> None:
    """Drop the lines that say nothing about the run: Lightning's advertisement for its
    cloud logger, a deprecation inside Lightning that users cannot act on, and the model
    summary's note that it counts mixed precision's weights in 32 bits (which they are)."""
    tips = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    if not any(isinstance(f, _NoTips) for f in tips.filters):
        tips.addFilter(_NoTips())
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")
    warnings.filterwarnings("ignore", message=r"Precision .*-mixed is not supported by the model")


class _NoTips(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("💡 Tip")


def set_torch_threads(cfg: DictConfig) -> None:
    torch.set_float32_matmul_precision(cfg.matmul_precision)
    if (threads := cfg.get("num_threads")) is not None:
        # OMP_NUM_THREADS too: the DDP ranks Lightning starts inherit it, and it keeps Lightning
        # from dividing the cores among them by itself.
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def trial_pruning(cfg: DictConfig) -> OptunaPruning | None:
    """The pruning callback of an Optuna sweep's trial job (`optuna_trial`, which the sweeper
    adds to the job's overrides), with the sweep's pruner (`hydra.sweeper.pruner`); None outside
    a sweep, and with several objectives, which Optuna does not prune."""
    trial = cfg.get("optuna_trial")
    if not trial or not isinstance(cfg.optimized_metric, str):
        return None
    sweeper = HydraConfig.get().sweeper if HydraConfig.initialized() else {}
    pruner = sweeper.get("pruner")
    return OptunaPruning(
        storage=trial.storage,
        study_name=trial.study_name,
        number=trial.number,
        monitor=cfg.optimized_metric,
        pruner=hydra.utils.instantiate(pruner) if pruner else None,
    )


def group_entries(cfg: DictConfig, group: str) -> list[str]:
    """The keys of a group of named objects (`logger`, `callbacks`) that are set, e.g.
    `callbacks.lr_monitor`; none for `group=[]`, `~group` or `group=null`."""
    node = cfg.get(group)
    if not node:
        return []
    if not isinstance(node, DictConfig):
        raise UsageError(
            f"{group}={OmegaConf.to_yaml(node).strip()} is not a set of {group}; pass a choice "
            f"from conf/{group}/ (e.g. {group}=[tensorboard,csv]), or {group}=[] for none"
        )
    return [f"{group}.{name}" for name, entry in node.items() if entry]


def configured_callbacks(cfg: DictConfig, with_loggers: bool) -> list[L.Callback]:
    """conf/callbacks/ less those set to null, less those the Trainer's switches turn off
    (`trainer.enable_progress_bar=false` drops the configured bar too, not only its default),
    and without loggers (`logger=[]`) less the learning-rate monitor, which logs nothing else."""
    callbacks = [instantiate_group(cfg, key) for key in group_entries(cfg, "callbacks")]
    if not with_loggers:
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    for kind, switch in (
        (ProgressBar, "enable_progress_bar"),
        (ModelSummary, "enable_model_summary"),
    ):
        if not cfg.trainer.get(switch, True):
            callbacks = [c for c in callbacks if not isinstance(c, kind)]
    return callbacks


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


def finish_loggers(trainer: L.Trainer, run_dir: Path) -> None:
    """What Lightning's loggers leave undone at the end of a run: MLflow gets the run
    directory's files, and the W&B run is closed, as the next job of a multirun would
    otherwise log into it."""
    for logger in trainer.loggers:
        if isinstance(logger, MLFlowLogger):
            for path in (run_dir / name for name in RUN_FILES):
                if path.is_dir():
                    logger.experiment.log_artifacts(logger.run_id, str(path), path.name)
                elif path.exists():
                    logger.experiment.log_artifact(logger.run_id, str(path))
        elif isinstance(logger, WandbLogger):
            logger.experiment.finish()


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def run(cfg: DictConfig) -> float | list[float]:
    """One Hydra job: a run, or one job of a multirun."""
    quiet_noise()
    logging.captureWarnings(True)  # warnings go to the console and train.log like the rest
    # Inside the job too: Hydra would log its own "Error executing job" report before ours.
    with hydra_job(), one_line_errors():
        metrics = train(cfg)
    # What Hydra sweepers (Optuna, ...) optimize: a list of metrics for several objectives.
    wanted = cfg.optimized_metric
    return metrics[wanted] if isinstance(wanted, str) else [metrics[key] for key in wanted]


def main() -> None:
    """`python -m resnet_lightning [overrides]`; bad input ends it with one line and exit 2."""
    with one_line_errors():
        sys.argv[1:] = argv = process_overrides(sys.argv[1:])
        try:
            run()
        except OSError as err:
            if err.errno in DISK_FULL + NOT_WRITABLE:  # Hydra could not write the run's files
                remove_half_written_run(argv)
            raise
