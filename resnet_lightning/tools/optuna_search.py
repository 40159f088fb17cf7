"""The Optuna sweeper's work (Hydra's plugin class is hydra_plugins/resnet_lightning_sweeper):
a search space from Hydra's override grammar, a study in shared storage, and trials asked
and told one by one (Optuna's ask-and-tell API), each run as a Hydra job.

Several sweeper processes (on one machine, or on several that share the storage) may work
on one study: each asks a trial when one of its own has ended, until the study holds
`n_trials` trials that did not fail. Counting and asking happen under a lock file beside a
journal or SQLite storage, so together they run exactly `n_trials`; a trial's number names its
job directory, so that no two processes write the same one.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
import yaml
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.core.plugins import Plugins
from hydra.core.utils import JobReturn
from hydra.errors import HydraException
from hydra.types import HydraContext, TaskFunction
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)
from optuna.storages.journal import JournalFileOpenLock
from optuna.trial import TrialState

from resnet_lightning.atomic_files import write_atomic
from resnet_lightning.callbacks.optuna_pruning import PRUNED_AFTER_EPOCH, journal_file, open_storage
from resnet_lightning.errors import UsageError, describe_bad_input, one_line
from resnet_lightning.tools.study import JOURNAL_FILE, RESULTS_FILE

log = logging.getLogger(__name__)

DEFAULT_STUDY_NAME = "resnet_lightning"
# A sweeper process stops after this many failed trials in a row: the cause (a bad value
# common to every trial, missing data) is then rarely the sampled hyperparameters.
FAILURES_IN_A_ROW_TO_STOP = 3
GRAMMAR = (
    "write interval(low, high), tag(log, interval(low, high)), tag(int, interval(low, high)), "
    "choice(a, b, ...), range(start, stop, step) or a fixed value"
)
SAMPLERS = (
    "hydra/sweeper/sampler=tpe|random|cmaes|gp|nsgaii, or the _target_ of an optuna.samplers class"
)
PRUNERS = (
    "hydra/sweeper/pruner=median|successive_halving|hyperband, or the _target_ of an "
    "optuna.pruners class, or null"
)
# Values written into an override as they are; others are quoted.
PLAIN_VALUE = re.compile(r"[\w.+\-/]+")


class TrialJobError(Exception):
    """A trial's job ended with the one-line error of bad input (exit code 2): the trial
    failed, the sweep goes on. Other exits (a signal's 128 + n) end the sweep."""


class ExitAsFailure:
    """The task function, with a job's exit code 2 turned into an exception, which Hydra
    records as that job's failure instead of ending the sweeper process (in-process launchers)
    or the launcher's whole batch (joblib)."""

    def __init__(self, task_function: TaskFunction) -> None:
        self.task_function = task_function

    def __call__(self, cfg: DictConfig) -> Any:
        try:
            return self.task_function(cfg)
        except SystemExit as exit_:
            if exit_.code == 2:
                raise TrialJobError("the job ended with an error (its train.log has it)") from None
            raise


class OptunaSearch:
    """What the sweeper does; `hydra.sweeper.*` are its arguments (optuna_sweeper.py lists
    them)."""

    def __init__(
        self,
        params: dict[str, Any] | None = None,
        sampler: Any = None,
        pruner: Any = None,
        direction: Any = "maximize",
        n_trials: int = 20,
        n_jobs: int = 1,
        storage: str | None = None,
        study_name: str | None = None,
    ) -> None:
        self.params = dict(params or {})
        self.sampler_conf = sampler
        self.pruner_conf = pruner
        self.directions = [direction] if isinstance(direction, str) else list(direction)
        self.n_trials = n_trials
        self.n_jobs = n_jobs
        self.storage = storage
        self.study_name = study_name or DEFAULT_STUDY_NAME
        self.hydra_context: HydraContext | None = None
        self.config: DictConfig | None = None
        self.launcher: Any = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.hydra_context = hydra_context
        self.config = config
        self.launcher = Plugins.instance().instantiate_launcher(
            hydra_context=hydra_context, task_function=ExitAsFailure(task_function), config=config
        )

    def sweep(self, arguments: list[str]) -> None:
        assert self.config is not None and self.launcher is not None
        # Every check before anything is written.
        self.check_settings()
        space, fixed = self.search_space(arguments)
        sampler = make_optuna_object("sampler", self.sampler_conf, optuna.samplers.BaseSampler)
        pruner = make_optuna_object("pruner", self.pruner_conf, optuna.pruners.BasePruner)
        self.check_composes(space, fixed)
        # Optuna's own lines (a study created or loaded, warnings) go where the sweep's go.
        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
        sampler = sampler or optuna.samplers.TPESampler()
        # A given storage is opened and checked before the sweep directory is resolved, which
        # creates it (`unique_dir`); the default storage is a file in that directory.
        study = None
        if self.storage is not None:
            url = self.storage_url(None)
            study = self.open_study(url, space, sampler, pruner)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        if study is None:
            url = self.storage_url(sweep_dir)
            study = self.open_study(url, space, sampler, pruner)
        # Atomic: processes sharing the sweep directory write it while their jobs read it.
        write_atomic(sweep_dir / "multirun.yaml", OmegaConf.to_yaml(self.config))

        done = counted_trials(study)
        if done >= self.n_trials:
            log.info(
                "Study '%s' in %s has %d trials of n_trials=%d already: nothing to run (raise "
                "hydra.sweeper.n_trials to run more)",
                study.study_name,
                url,
                done,
                self.n_trials,
            )
        else:
            log.info(
                "Study '%s' in %s: %d of n_trials=%d trials so far (optuna-dashboard %s)",
                study.study_name,
                url,
                done,
                self.n_trials,
                journal_file(url) or url,
            )
            self.run_trials(study, url, space, fixed, sweep_dir)
        with self.ask_lock(url):  # the last process to write sees every trial told
            write_results(study, url, sweep_dir / RESULTS_FILE)

    def check_settings(self) -> None:
        if any(d not in ("maximize", "minimize") for d in self.directions) or not self.directions:
            raise UsageError(
                f"hydra.sweeper.direction={self.directions} must be maximize or minimize, or a "
                "list of them for several objectives"
            )
        metric = self.config.get("optimized_metric")
        metrics = [metric] if isinstance(metric, str) else list(metric or [])
        if len(metrics) != len(self.directions):
            raise UsageError(
                f"optimized_metric={metric} names {len(metrics)} metric(s) but "
                f"hydra.sweeper.direction={self.directions} {len(self.directions)}: give one "
                "direction per metric, e.g. optimized_metric=[val/acc,wall_time_s] "
                "hydra.sweeper.direction=[maximize,minimize]"
            )
        if len(self.directions) > 1 and self.pruner_conf:
            raise UsageError(
                "hydra.sweeper.pruner: Optuna prunes single-objective studies only; "
                "set hydra.sweeper.pruner=null for several objectives"
            )
        for name in ("n_trials", "n_jobs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UsageError(f"hydra.sweeper.{name}={value} must be a positive integer")

    def search_space(
        self, arguments: list[str]
    ) -> tuple[dict[str, tuple[str, BaseDistribution]], list[str]]:
        """The swept keys (Optuna's parameter name -> the override's left side and its
        distribution) and the fixed overrides, from hydra.sweeper.params and then the command
        line, whose values win."""
        lines = [f"{key}={value}" for key, value in self.params.items()] + list(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        by_key: dict[str, Override] = {}
        for line in lines:
            try:
                (override,) = parser.parse_overrides([line])
            except HydraException as err:
                # Hydra's message, less its first line (the override again) and its link.
                reason = " ".join(str(err).splitlines()[1:2]) or one_line(err)
                raise UsageError(
                    f"search space: {line} is malformed ({reason}); {GRAMMAR}"
                ) from None
            by_key[override.get_key_element()] = override
        space, fixed = {}, []
        for key, override in by_key.items():
            if override.is_sweep_override():
                left = override.input_line.partition("=")[0]
                space[key.lstrip("+")] = (left, distribution(override))
            else:
                fixed.append(override.input_line)
        return space, fixed

    def check_composes(self, space: dict[str, tuple[str, Any]], fixed: list[str]) -> None:
        """A job of the first value of each swept key composes (its keys exist, its values
        have the config's types): a typo fails here, not in every trial."""
        first = {key: first_value(dist) for key, (_, dist) in space.items()}
        try:
            self.hydra_context.config_loader.load_sweep_config(
                master_config=self.config, sweep_overrides=[*fixed, *trial_overrides(space, first)]
            )
        except Exception as err:
            reason = describe_bad_input(err)
            if reason is None:
                raise
            raise UsageError(
                f"search space (hydra.sweeper.params and the command line): {reason}"
            ) from None

    def storage_url(self, sweep_dir: Path | None) -> str:
        """The storage as the jobs are given it: a journal file's absolute path, or the URL;
        without hydra.sweeper.storage, the journal in `sweep_dir`."""
        if self.storage is None:
            return str((sweep_dir / JOURNAL_FILE).absolute())
        path = journal_file(self.storage)
        return str(path.absolute()) if path is not None else self.storage

    def open_study(
        self,
        url: str,
        space: dict[str, tuple[str, BaseDistribution]],
        sampler: optuna.samplers.BaseSampler,
        pruner: optuna.pruners.BasePruner | None,
    ) -> optuna.Study:
        try:
            storage = open_storage(url)
            study = optuna.create_study(
                storage=storage,
                study_name=self.study_name,
                sampler=sampler,
                pruner=pruner,
                directions=self.directions,
                load_if_exists=True,
            )
        except Exception as err:  # a bad URL, a missing driver, an unwritable folder, ...
            raise UsageError(
                f"cannot open hydra.sweeper.storage={url} ({one_line(err)}); pass a journal file "
                "in a writable folder (hydra.sweeper.storage=outputs/study.log) or a database URL "
                "(sqlite:///outputs/optuna.db, postgresql://user@host/db)"
            ) from None
        directions = [d.name.lower() for d in study.directions]
        if directions != self.directions:
            raise UsageError(
                f"study '{self.study_name}' in {url} is to {directions}, this sweep to "
                f"{self.directions}; use its direction, or another hydra.sweeper.study_name"
            )
        wanted = {name: dist for name, (_, dist) in space.items()}
        for trial in study.get_trials(deepcopy=False):
            if trial.distributions != wanted:
                raise UsageError(
                    f"study '{self.study_name}' in {url} searches another space than this sweep "
                    f"({space_difference(trial.distributions, wanted)}); sweep its space, or name "
                    "a new study with hydra.sweeper.study_name=<name>"
                )
        return study

    def run_trials(
        self,
        study: optuna.Study,
        url: str,
        space: dict[str, tuple[str, BaseDistribution]],
        fixed: list[str],
        sweep_dir: Path,
    ) -> None:
        """Ask up to n_jobs trials, run them as jobs, tell each its outcome; again until the
        study holds n_trials trials that did not fail."""
        distributions = {name: dist for name, (_, dist) in space.items()}
        failures_in_a_row = 0
        while True:
            with self.ask_lock(url):
                wanted = min(self.n_jobs, self.n_trials - counted_trials(study))
                trials = [study.ask(distributions) for _ in range(max(wanted, 0))]
            if not trials:
                return
            jobs = [
                [
                    *fixed,
                    *trial_overrides(space, trial.params),
                    # The job directory is the trial's number: unique in the study.
                    f"hydra.sweep.subdir={trial.number}",
                    f"+optuna_trial.storage={quoted(url)}",
                    f"+optuna_trial.study_name={quoted(study.study_name)}",
                    f"+optuna_trial.number={trial.number}",
                ]
                for trial in trials
            ]
            try:
                returns = self.launcher.launch(jobs, initial_job_idx=trials[0].number)
            except BaseException:  # interrupted: no trial of this batch stays RUNNING
                for trial in trials:
                    study.tell(trial, state=TrialState.FAIL, skip_if_finished=True)
                raise
            for trial, job in zip(trials, returns, strict=True):
                state = tell(study, trial, job)
                failures_in_a_row = failures_in_a_row + 1 if state == TrialState.FAIL else 0
                if failures_in_a_row >= FAILURES_IN_A_ROW_TO_STOP:
                    raise UsageError(
                        f"the last {failures_in_a_row} trials failed (the last one: "
                        f"{sweep_dir / str(trial.number) / 'train.log'}); fix the cause, then "
                        "the same command continues the study"
                    )

    @contextmanager
    def ask_lock(self, url: str) -> Iterator[None]:
        """Held while counting trials and asking new ones, so that processes sharing the study
        never ask more than n_trials between them: a lock file beside a journal or SQLite file
        (any shared file system). A database server gets none: processes that count at the
        same instant may then ask a few trials more."""
        path = journal_file(url) or sqlite_file(url)
        if path is None:
            yield
            return
        lock = JournalFileOpenLock(f"{path}.ask")
        lock.acquire()
        try:
            yield
        finally:
            lock.release()


def distribution(override: Override) -> BaseDistribution:
    """Optuna's distribution for one swept override (Hydra's grammar)."""
    sweep = override.value()
    key = override.get_key_element()
    log_scale = "log" in sweep.tags
    try:
        if isinstance(sweep, ChoiceSweep):
            choices = list(override.sweep_iterator())
            if any(isinstance(c, dict | list) for c in choices):
                raise ValueError("choices must be single values")
            return CategoricalDistribution(choices)
        if isinstance(sweep, RangeSweep):
            values = list(override.sweep_iterator())
            if not values or sweep.step <= 0:
                raise ValueError("the range must hold values, in increasing order")
            if all(isinstance(v, int) for v in (sweep.start, sweep.stop, sweep.step)):
                return IntDistribution(values[0], values[-1], log=log_scale, step=sweep.step)
            return FloatDistribution(values[0], values[-1], step=sweep.step, log=log_scale)
        if isinstance(sweep, IntervalSweep):
            if "int" in sweep.tags:
                return IntDistribution(int(sweep.start), int(sweep.end), log=log_scale)
            return FloatDistribution(sweep.start, sweep.end, log=log_scale)
    except ValueError as err:
        raise UsageError(
            f"search space: {override.input_line}: {one_line(err)}; {GRAMMAR}"
        ) from None
    raise UsageError(
        f"search space: {override.input_line} is not an Optuna sweep of {key}; {GRAMMAR}"
    )


def first_value(dist: BaseDistribution) -> Any:
    if isinstance(dist, CategoricalDistribution):
        return dist.choices[0]
    return dist.low


def trial_overrides(space: dict[str, tuple[str, Any]], params: dict[str, Any]) -> list[str]:
    return [f"{left}={override_value(params[name])}" for name, (left, _) in space.items()]


def override_value(value: Any) -> str:
    """A sampled value as Hydra's override grammar reads it back."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, int | float):
        return repr(value)
    return value if PLAIN_VALUE.fullmatch(value) else quoted(value)


def quoted(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def space_difference(theirs: dict[str, BaseDistribution], ours: dict[str, BaseDistribution]) -> str:
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            study, here = describe(theirs.get(name)), describe(ours.get(name))
            return f"{name}: {study} in the study, {here} here"
    return "the same"


def describe(dist: BaseDistribution | None) -> str:
    return "not searched" if dist is None else repr(dist)


def sqlite_file(url: str) -> Path | None:
    return Path(url.removeprefix("sqlite:///")) if url.startswith("sqlite:///") else None


def make_optuna_object(kind: str, conf: Any, base: type) -> Any:
    """hydra.sweeper.sampler or .pruner, made from its `_target_`; None when not set."""
    if not conf:
        return None
    choices = SAMPLERS if kind == "sampler" else PRUNERS
    target = conf.get("_target_") if isinstance(conf, DictConfig | dict) else conf
    try:
        made = instantiate(conf)
    except Exception as err:
        cause = one_line(err.__cause__ or err).split(", set env var HYDRA_FULL_ERROR")[0]
        raise UsageError(
            f"hydra.sweeper.{kind}._target_={target} cannot be made ({cause}); use {choices}"
        ) from None
    if not isinstance(made, base):
        raise UsageError(
            f"hydra.sweeper.{kind}._target_={target} is not an Optuna {kind}; use {choices}"
        )
    return made


def counted_trials(study: optuna.Study) -> int:
    """The trials that count towards n_trials: all but the failed ones, which a later trial
    replaces (a job stopped by Ctrl-C, a diverged run)."""
    return sum(t.state != TrialState.FAIL for t in study.get_trials(deepcopy=False))


def tell(study: optuna.Study, trial: optuna.trial.Trial, job: JobReturn) -> TrialState:
    """Record a finished job's outcome in its trial (its value(s), pruned, or failed), and log
    it in one line."""
    try:
        value = job.return_value
    except Exception as err:
        study.tell(trial, state=TrialState.FAIL)
        log.warning("Trial %d failed: %s", trial.number, one_line(err))
        return TrialState.FAIL
    # The job marked its trial in the storage (Trial.user_attrs is this process's copy).
    (stored,) = [t for t in study.get_trials(deepcopy=False) if t.number == trial.number]
    if PRUNED_AFTER_EPOCH in stored.user_attrs:
        study.tell(trial, state=TrialState.PRUNED)
        epoch = stored.user_attrs[PRUNED_AFTER_EPOCH]
        log.info("Trial %d pruned after epoch %d", trial.number, epoch)
        return TrialState.PRUNED
    state = study.tell(trial, value).state  # a NaN value is recorded as a failure
    if state == TrialState.COMPLETE:
        log.info("Trial %d finished with value %s; %s", trial.number, value, best_so_far(study))
    else:
        log.warning("Trial %d failed: its value is %s", trial.number, value)
    return state


def best_so_far(study: optuna.Study) -> str:
    if len(study.directions) > 1:
        return f"{len(study.best_trials)} trial(s) on the Pareto front"
    best = study.best_trial
    return f"best so far: trial {best.number}, {best.value}"


def write_results(study: optuna.Study, url: str, path: Path) -> None:
    """optimization_results.yaml: the best trial (several objectives: the Pareto front) of the
    whole study, and how many trials ended how."""
    trials = study.get_trials(deepcopy=False)
    results: dict[str, Any] = {
        "name": "optuna",
        "study_name": study.study_name,
        "storage": url,
        "trials": {s.name.lower(): sum(t.state == s for t in trials) for s in TrialState},
    }
    if not any(t.state == TrialState.COMPLETE for t in trials):
        results["best_trial"] = None
    elif len(study.directions) == 1:
        best = study.best_trial
        results |= {"best_trial": best.number, "best_params": best.params, "best_value": best.value}
    else:
        results["solutions"] = [
            {"trial": t.number, "params": t.params, "values": t.values} for t in study.best_trials
        ]
    write_atomic(path, yaml.safe_dump(results, sort_keys=False))
