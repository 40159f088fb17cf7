"""`hydra/sweeper=optuna` (what `hparams_search=optuna` selects): a Hydra sweeper on Optuna's
ask-and-tell API, with pruning and studies shared by several processes or machines.

Hydra imports this module whenever it starts, for its config and its plugin class; the search
itself (resnet_lightning/tools/optuna_search.py) and Optuna are imported when a sweep starts.
"""

# No `from __future__ import annotations`: Hydra's plugin scan runs this module before it is in
# sys.modules, where dataclasses look up string annotations. typing's Optional and Dict: the
# types OmegaConf reads from structured configs.
from dataclasses import dataclass
from typing import Any, Dict, Optional  # noqa: UP035

from hydra.core.config_store import ConfigStore
from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


@dataclass
class OptunaSweeperConf:
    """`hydra.sweeper.*`; docs/experiments.md ("Hyperparameter search (Optuna) and parallel
    jobs") says what each does."""

    _target_: str = "hydra_plugins.resnet_lightning_sweeper.optuna_sweeper.OptunaSweeper"
    # The sampler and pruner are made by the sweep, which names a bad `_target_` in one line.
    _recursive_: bool = False
    # Search space in Hydra's override grammar: interval(lo, hi), tag(log, interval(lo, hi)),
    # tag(int, interval(lo, hi)), choice(a, b, ...), range(start, stop, step), or a fixed value.
    params: Optional[Dict[str, Any]] = None  # noqa: UP006, UP045
    # An Optuna sampler and pruner by `_target_` (hydra/sweeper/sampler=, hydra/sweeper/pruner=).
    sampler: Any = None  # null: TPE
    pruner: Any = None  # null: no pruning
    # "maximize" or "minimize", or a list of them for several objectives (optimized_metric a list).
    direction: Any = "maximize"
    # Trials of the whole study, over every process working on it.
    n_trials: int = 20
    # Trials launched together (with a launcher that runs jobs side by side).
    n_jobs: int = 1
    # A journal file (`journal:///path/study.log` or a path ending .log) or a database URL
    # (sqlite:///..., postgresql://...); null: <sweep dir>/optuna_journal.log.
    storage: Optional[str] = None  # noqa: UP045
    study_name: Optional[str] = None  # noqa: UP045 (null: "resnet_lightning")


ConfigStore.instance().store(
    group="hydra/sweeper", name="optuna", node=OptunaSweeperConf, provider="resnet_lightning"
)


class OptunaSweeper(Sweeper):
    """Hydra's plugin class; `OptunaSearch` does the work."""

    def __init__(self, **conf: Any) -> None:
        try:
            from resnet_lightning.tools.optuna_search import OptunaSearch
        except ModuleNotFoundError as err:
            if err.name != "optuna":
                raise
            from resnet_lightning.errors import UsageError

            raise UsageError(
                "hparams_search=optuna needs Optuna, which is not installed; "
                "pip install -e '.[sweep]'"
            ) from None
        self.search = OptunaSearch(**conf)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.search.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> Any:
        return self.search.sweep(arguments)
