"""What a sweep summary adds for a sweep with an Optuna study: the optimization history and the
parameter importances, as tables and as Optuna's own (matplotlib) figures."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matplotlib.figure import Figure

from resnet_lightning.errors import UsageError
from resnet_lightning.tools.study import load_study, sweep_study

from .output import Section

if TYPE_CHECKING:
    import optuna

VALUE_FORMATS = dict.fromkeys(("value", "best so far"), "{:.4g}".format)
IMPORTANCE_FORMATS = {"importance": "{:.3f}".format}


def study_sections(directory: Path) -> tuple[list[Section], str]:
    """The sections of the sweep's study, and a note when there is a study the report cannot
    draw (its storage is gone, Optuna is not installed, too few trials); nothing for a sweep
    without one."""
    location = sweep_study(directory)
    if location is None:
        return [], ""
    try:
        import optuna
    except ImportError:
        return [], f"The Optuna study in {location.storage} needs: pip install -e '.[sweep]'."
    try:
        study = load_study(location)
    except UsageError as err:
        return [], f"The Optuna study is not drawn: {err}."
    completed = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not completed:
        return [], f"The Optuna study {study.study_name} has no completed trial yet."
    # Of several objectives, the first; named as the sweep named it (e.g. val/acc).
    target = None if len(study.directions) == 1 else lambda trial: trial.values[0]
    target_name = (study.metric_names or ["value"])[0]
    where = f"study {study.study_name} in {location.storage}"
    sections = [history_section(study, target, target_name, where)]
    if len(completed) < 2:
        return sections, "Parameter importances need two completed trials."
    return [*sections, importance_section(study, target_name, where)], ""


def history_section(
    study: optuna.Study, target: Callable | None, target_name: str, where: str
) -> Section:
    """Every trial in order: its state, value, the best value so far and its parameters."""
    from optuna.study import StudyDirection
    from optuna.trial import TrialState
    from optuna.visualization.matplotlib import plot_optimization_history

    maximize = study.directions[0] == StudyDirection.MAXIMIZE
    rows, best = [], None
    for trial in study.get_trials(deepcopy=False):
        value = None
        if trial.state == TrialState.COMPLETE:
            value = target(trial) if target else trial.value
            if best is None or (value > best if maximize else value < best):
                best = value
        row = {"trial": trial.number, "state": trial.state.name, "value": value}
        rows.append(row | {"best so far": best} | trial.params)
    figure = optuna_figure(plot_optimization_history, study, target=target, target_name=target_name)
    text = f"Each trial's {target_name} and the best so far, {where}."
    caption = f"optimization history of {target_name}"
    heading = "Optimization history"
    return Section(
        "summary_optimization_history", heading, text, rows, VALUE_FORMATS, figure, caption
    )


def importance_section(study: optuna.Study, target_name: str, where: str) -> Section:
    """How much each parameter matters for reaching the best tenth of the trials' values."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.visualization.matplotlib import plot_param_importances

    # PED-ANOVA: Optuna's own, deterministic; its default, fANOVA, needs scikit-learn. Of
    # several objectives it weighs the Pareto front (no target), as the figure does.
    evaluator = PedAnovaImportanceEvaluator()
    importances = get_param_importances(study, evaluator=evaluator)
    figure = optuna_figure(plot_param_importances, study, evaluator=evaluator)
    rows = [{"parameter": name, "importance": value} for name, value in importances.items()]
    text = (
        f"How much each parameter matters for reaching the best 10% of {target_name} (PED-ANOVA,\n"
        f"Optuna's evaluator; the importances add up to 1), {where}."
    )
    caption = f"parameter importances for {target_name}"
    heading = "Parameter importances"
    return Section(
        "summary_param_importances", heading, text, rows, IMPORTANCE_FORMATS, figure, caption
    )


def optuna_figure(plot: Callable[..., Any], study: optuna.Study, **kwargs: Any) -> Figure:
    """The figure of one of Optuna's matplotlib plots, which pyplot then forgets (saving it
    still works), without the warning that the plots are experimental."""
    import matplotlib
    import matplotlib.pyplot as plt
    from optuna.exceptions import ExperimentalWarning

    # The plots switch pyplot to the ggplot style for good: for them alone here.
    with matplotlib.rc_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", ExperimentalWarning)
        figure = plot(study, **kwargs).figure
    plt.close(figure)
    return figure
