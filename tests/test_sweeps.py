"""Sweeps for real, through the CLI: an Optuna search (this project's sweeper,
hydra_plugins/resnet_lightning_sweeper), pruning, one study shared by two processes, and the
parallel launcher (the `sweep` extra, which `make test` installs)."""

from __future__ import annotations

import csv
import json
import sys

import pytest
import yaml

from resnet_lightning.callbacks.checkpoints import load_checkpoint_file
from resnet_lightning.tools.report.cli import main as report_main
from resnet_lightning.tools.report.runs import find_runs
from resnet_lightning.tools.report.summary import plot_validation_curves
from tests.cli_harness import (
    REPO,
    TINY,
    run_cli,
    run_main,
    run_together,
    without_callbacks,
)

optuna = pytest.importorskip("optuna", reason="pip install -e '.[sweep]'")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[sweep]'")

QUICK = [*TINY, *without_callbacks("model_checkpoint"), "model=resnet20", "trainer.max_epochs=1"]
# The recipe's search space with the batch size fixed (TINY's), so that trials stay tiny.
SEARCH = ["hparams_search=optuna", "hydra.sweeper.sampler.n_startup_trials=2"]


def load_study(journal):
    """The sweeper's study (its default name) in a journal file."""
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    storage = JournalStorage(JournalFileBackend(str(journal)))
    return optuna.load_study(study_name="resnet_lightning", storage=storage)


def load_trials(journal) -> list:
    """The trials of the sweeper's study in a journal file, by number."""
    return sorted(load_study(journal).get_trials(), key=lambda t: t.number)


def test_optuna_search_runs_its_trials_and_reports_the_best(tmp_path, data_overrides):
    sweep = tmp_path / "search"
    # The recipe's search space, three trials (two random, one from TPE's model).
    args = [*SEARCH, "hydra.sweeper.n_trials=3"]
    run_cli([*args, *QUICK, *data_overrides, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    # Nothing beside the sweep: composing each trial's config creates the default sweep
    # directory (OmegaConf's merge resolves the unique_dir that hydra.sweep.dir replaces), and
    # the job removes it again.
    assert list(tmp_path.iterdir()) == [sweep]

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    # Without hydra.sweeper.storage the study is a journal file in the sweep directory; each
    # job directory is its trial's number.
    study_trials = load_trials(sweep / "optuna_journal.log")
    assert [(t.number, t.state.name) for t in study_trials] == [(n, "COMPLETE") for n in (0, 1, 2)]
    for trial in study_trials:
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert trial.value == metrics["val/acc"] and metrics["pruned"] is False
    trials = []
    for job in ("0", "1", "2"):
        overrides = yaml.safe_load((sweep / job / ".hydra" / "overrides.yaml").read_text())
        values = dict(o.split("=", 1) for o in overrides if "=" in o)
        val_acc = json.loads((sweep / job / "metrics.json").read_text())["val/acc"]
        trials.append((val_acc, float(values["optimizer.lr"])))
    assert set(results["best_params"]) == {
        "optimizer.lr",
        "optimizer.weight_decay",
        "module.label_smoothing",
    }
    assert results["best_value"] == max(acc for acc, _ in trials)
    assert len({lr for _, lr in trials}) == 3  # each trial drew its own learning rate
    assert report_main([str(sweep)]) == 0
    assert len((sweep / "summary.csv").read_text().splitlines()) == 1 + 3
    # One validation per job: bars, which cannot hide each other as single points do.
    (ax,) = plot_validation_curves(find_runs(sweep)).axes
    assert len(ax.patches) == 3 and not ax.lines
    assert [round(b.get_height(), 4) for b in ax.patches] == [
        round(100 * json.loads((sweep / j / "metrics.json").read_text())["val/acc"], 4)
        for j in ("0", "1", "2")
    ]


def test_parallel_launcher_runs_jobs_side_by_side_with_loader_workers(tmp_path, data_overrides):
    sweep = tmp_path / "parallel"
    # Loader workers as by default (2), and the models swept here.
    quick = [a for a in QUICK if not a.startswith(("data.num_workers", "model="))]
    args = ["-m", "hydra/launcher=parallel", "model=resnet20,resnet32", *quick, *data_overrides]
    run_cli([*args, f"hydra.sweep.dir={sweep}"], cwd=REPO)
    for job, model in (("0", "resnet20"), ("1", "resnet32")):
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["name"] == model and config["data"]["num_workers"] == 2
        assert json.loads((sweep / job / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("a=interval(0.0, 0.2)", "FloatDistribution(high=0.2, log=False, low=0.0, step=None)"),
        ("a=tag(log, interval(1e-5, 1e-3))", "FloatDistribution(high=0.001, log=True, low=1e-05"),
        ("a=tag(int, interval(1, 5))", "IntDistribution(high=5, log=False, low=1, step=1)"),
        ("a=range(16, 65, 16)", "IntDistribution(high=64, log=False, low=16, step=16)"),
        ("a=choice(64, 128, 256)", "CategoricalDistribution(choices=(64, 128, 256))"),
        ("model=resnet20,resnet32", "CategoricalDistribution(choices=('resnet20', 'resnet32'))"),
    ],
)
def test_hydra_sweep_grammar_becomes_optuna_distributions(override, expected):
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from resnet_lightning.tools.optuna_search import distribution

    (parsed,) = OverridesParser.create().parse_overrides([override])
    assert repr(distribution(parsed)).startswith(expected)


@pytest.mark.slow  # make test-all
def test_pruned_trials_stop_keep_their_checkpoint_and_the_study_continues(
    tmp_path, data_overrides, capfd, monkeypatch
):
    # A pruner that prunes every trial at its first validation (accuracy is never 1.1), so the
    # outcome does not hang on what two epochs of three batches learn.
    sweep = tmp_path / "pruned"
    pruner = "hydra.sweeper.pruner={_target_:optuna.pruners.ThresholdPruner,lower:1.1}"
    args = [*SEARCH, pruner, *TINY, *without_callbacks("model_checkpoint"), "model=resnet20"]
    args += [*data_overrides, f"hydra.sweep.dir={sweep}"]
    assert run_main([*args, "hydra.sweeper.n_trials=1"], capfd, monkeypatch)[0] == 0
    # The same command with more trials continues the study in the same storage.
    assert run_main([*args, "hydra.sweeper.n_trials=2"], capfd, monkeypatch)[0] == 0

    trials = load_trials(sweep / "optuna_journal.log")
    assert [(t.number, t.state.name) for t in trials] == [(0, "PRUNED"), (1, "PRUNED")]
    for trial in trials:
        job = sweep / str(trial.number)
        metrics = json.loads((job / "metrics.json").read_text())
        # Stopped after the first of two epochs, its validation reported as step 0.
        assert metrics["pruned"] is True and metrics["pruned_after_epoch"] == 1
        assert metrics["epochs"] == 1 and list(trial.intermediate_values) == [0]
        assert trial.intermediate_values[0] == pytest.approx(metrics["val/acc"])
        # The checkpoint of the epoch it stopped at was written whole and tested.
        checkpoint = load_checkpoint_file(metrics["best_checkpoint"])
        assert checkpoint["epoch"] == 0 and "test/acc" in metrics
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_trial"] is None and results["trials"]["pruned"] == 2
    # The sweep's summary says which trials were pruned, and after which epoch.
    assert report_main([str(sweep)]) == 0
    with (sweep / "summary.csv").open(newline="") as f:
        assert {row["job"]: row["pruned_after_epoch"] for row in csv.DictReader(f)} == {
            "0": "1",
            "1": "1",
        }


@pytest.mark.slow  # make test-all
def test_two_sweepers_share_one_study_in_a_journal_file(tmp_path, data_overrides):
    sweep, journal = tmp_path / "shared", tmp_path / "study.log"
    args = [*SEARCH, "hydra.sweeper.n_trials=4", f"hydra.sweeper.storage={journal}"]
    args += [*QUICK, *data_overrides, f"hydra.sweep.dir={sweep}"]
    # Two processes at once, each with its own sampler seed (else they draw the same trials).
    command = [sys.executable, "-m", "resnet_lightning", *args]
    outputs = run_together([[*command, f"hydra.sweeper.sampler.seed={s}"] for s in (1, 2)], 600)

    trials = load_trials(journal)
    assert [(t.number, t.state.name) for t in trials] == [(n, "COMPLETE") for n in range(4)]
    # Each trial ran once, in one process, in the job directory of its number.
    ran = [
        {n for n in range(4) if f"Trial {n} finished with value" in output} for output in outputs
    ]
    assert ran[0] | ran[1] == set(range(4)) and not ran[0] & ran[1], outputs
    assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1", "2", "3"]
    for trial in trials:
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert metrics["val/acc"] == trial.value

    # The best trial is the same in the storage, optimization_results.yaml and the report.
    study = load_study(journal)
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert (results["best_trial"], results["best_value"]) == (
        study.best_trial.number,
        study.best_value,
    )
    assert results["best_params"] == study.best_params
    assert report_main([str(sweep)]) == 0
    with (sweep / "summary.csv").open(newline="") as f:
        table = list(csv.DictReader(f))
    rows = {row["job"]: float(row["val/acc"]) for row in table}
    assert "pruned_after_epoch" not in table[0]  # no pruner, no column
    assert len(rows) == 4 and rows[str(study.best_trial.number)] == max(rows.values())

    # The same command again: the study has its 4 trials, one line says so, nothing runs.
    again = run_cli([*args, "hydra.sweeper.sampler.seed=1"], cwd=REPO)
    assert "has 4 trials of n_trials=4 already: nothing to run" in again.stdout
    assert len(load_trials(journal)) == 4


@pytest.mark.slow  # make test-all
@pytest.mark.parametrize("sampler", ["cmaes", "gp"])
def test_model_based_samplers_draw_the_trials_of_a_search(sampler, tmp_path, data_overrides):
    sweep = tmp_path / sampler
    # One random start-up trial, then two that the sampler's model proposes.
    args = ["hparams_search=optuna", f"hydra/sweeper/sampler={sampler}"]
    args += ["hydra.sweeper.sampler.n_startup_trials=1", "hydra.sweeper.n_trials=3"]
    run_cli([*args, *QUICK, *data_overrides, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)
    trials = load_trials(sweep / "optuna_journal.log")
    assert [t.state.name for t in trials] == ["COMPLETE"] * 3

    # The same sampler (the config's class and seed), told the same values, proposes the same
    # trials: the search's trials were drawn by it, not by the default TPE.
    cls = {"cmaes": optuna.samplers.CmaEsSampler, "gp": optuna.samplers.GPSampler}[sampler]
    replay = optuna.create_study(direction="maximize", sampler=cls(seed=1234, n_startup_trials=1))
    for trial in trials:
        proposed = replay.ask(trial.distributions)
        assert proposed.params == pytest.approx(trial.params)
        replay.tell(proposed, trial.value)


@pytest.mark.slow  # make test-all
def test_two_objectives_in_a_sqlite_study_with_jobs_side_by_side(tmp_path, data_overrides):
    sweep, database = tmp_path / "pareto", tmp_path / "study.db"
    args = ["hparams_search=optuna", "hydra/sweeper/sampler=nsgaii", "hydra/launcher=parallel"]
    args += ["hydra.sweeper.n_trials=2", "hydra.sweeper.n_jobs=2"]
    args += ["optimized_metric=[val/acc,wall_time_s]"]
    args += ["hydra.sweeper.direction=[maximize,minimize]"]
    args += [f"hydra.sweeper.storage=sqlite:///{database}"]
    run_cli([*args, *QUICK, *data_overrides, f"hydra.sweep.dir={sweep}"], cwd=tmp_path)

    study = optuna.load_study(study_name="resnet_lightning", storage=f"sqlite:///{database}")
    assert [d.name for d in study.directions] == ["MAXIMIZE", "MINIMIZE"]
    trials = sorted(study.get_trials(), key=lambda t: t.number)
    assert [(t.number, t.state.name) for t in trials] == [(0, "COMPLETE"), (1, "COMPLETE")]
    for trial in trials:
        metrics = json.loads((sweep / str(trial.number) / "metrics.json").read_text())
        assert trial.values == pytest.approx([metrics["val/acc"], metrics["wall_time_s"]])
    # optimization_results.yaml lists the Pareto front, as the study has it.
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    front = {t.number: t.values for t in study.best_trials}
    assert {s["trial"]: s["values"] for s in results["solutions"]} == front
    assert results["storage"] == f"sqlite:///{database}"
    assert not (sweep / "optuna_journal.log").exists()
