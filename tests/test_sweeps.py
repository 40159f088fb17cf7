"""Sweeps for real, through the CLI: an Optuna search and the parallel launcher (the `sweep`
extra, which `make test` installs)."""

from __future__ import annotations

import json

import pytest
import yaml

from resnet_lightning.tools.report.cli import main as report_main
from resnet_lightning.tools.report.runs import find_runs
from resnet_lightning.tools.report.summary import plot_validation_curves
from tests.cli_harness import REPO, TINY, run_cli, without_callbacks

pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[sweep]'")
pytest.importorskip("hydra_plugins.hydra_joblib_launcher", reason="pip install -e '.[sweep]'")

QUICK = [*TINY, *without_callbacks("model_checkpoint"), "model=resnet20", "trainer.max_epochs=1"]


def test_optuna_search_runs_its_trials_and_reports_the_best(tmp_path, data_overrides):
    sweep = tmp_path / "search"
    # The recipe's search space, three trials (two random, one from TPE's model).
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=3"]
    args.append("hydra.sweeper.sampler.n_startup_trials=2")  # data.batch_size: TINY fixes it
    run_cli([*args, *QUICK, *data_overrides, f"hydra.sweep.dir={sweep}"], cwd=REPO)

    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
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
