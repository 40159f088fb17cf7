"""The optional loggers through the real CLI: MLflow into a local SQLite store, read back with
its own client; W&B offline, with nothing sent; several loggers at once; a stopped run resumed
into the same MLflow and W&B runs; the one-line error when a logger's package is missing; and
a metrics.csv that another process appends to."""

from __future__ import annotations

import csv
import json
import pickle
import signal

import pytest
import torch

from resnet_lightning.callbacks.checkpoints import RunRecord
from resnet_lightning.training.config import instantiate_group
from resnet_lightning.training.tracking import instantiate_logger
from tests.cli_harness import (
    REPO,
    TINY,
    compose_config,
    run_cli,
    run_main,
    signal_at_step,
    without_callbacks,
)

QUICK = [*TINY, "model=resnet20", "trainer.max_epochs=1", *without_callbacks("lr_monitor")]


def mlflow_overrides(tmp_path) -> tuple[str, list[str]]:
    """A store of the test's own, so that no test writes outputs/mlflow.db."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    return uri, [
        f"logger.mlflow.tracking_uri={uri}",
        f"logger.mlflow.artifact_location={tmp_path}/mlflow-artifacts",
    ]


def the_mlflow_run(uri: str):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    (experiment,) = client.search_experiments(filter_string="name = 'resnet-lightning'")
    (run,) = client.search_runs([experiment.experiment_id])
    return client, run


def test_mlflow_store_holds_params_metrics_and_run_files(tmp_path, data_overrides):
    pytest.importorskip("mlflow", reason="pip install -e '.[mlflow]'")
    run_dir = tmp_path / "run"
    uri, store = mlflow_overrides(tmp_path)
    run_cli(
        [*QUICK, *data_overrides, "logger=mlflow", *store, f"hydra.run.dir={run_dir}"], cwd=REPO
    )

    client, run = the_mlflow_run(uri)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "resnet20"
    assert run.data.tags["run_dir"] == str(run_dir)
    params = run.data.params
    assert params["model/name"] == "resnet20" and float(params["optimizer/lr"]) == 0.1
    assert params["label_smoothing"] == "0.0"  # the module's own hparams, logged by Lightning

    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == [0, 1, 2]  # every step of the 3-batch epoch
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert {"val/acc", "train/loss_epoch"} <= run.data.metrics.keys()
    assert any(key.startswith("lr-SGD") for key in run.data.metrics)

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"metrics.json", "train.log", ".hydra"} <= artifacts
    hydra_files = {a.path for a in client.list_artifacts(run.info.run_id, ".hydra")}
    assert ".hydra/config.yaml" in hydra_files
    local = client.download_artifacts(run.info.run_id, "metrics.json", str(tmp_path))
    assert json.loads(open(local).read()) == metrics


@pytest.mark.slow  # make test-all
def test_tensorboard_and_mlflow_together(tmp_path, data_overrides):
    pytest.importorskip("mlflow", reason="pip install -e '.[mlflow]'")
    run_dir = tmp_path / "run"
    uri, store = mlflow_overrides(tmp_path)
    both = ["logger=[tensorboard,mlflow]", *store]
    run_cli([*QUICK, *data_overrides, *both, f"hydra.run.dir={run_dir}"], cwd=REPO)

    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    _, run = the_mlflow_run(uri)
    assert "test/acc" in run.data.metrics and run.info.status == "FINISHED"


@pytest.mark.slow  # make test-all
def test_wandb_writes_an_offline_run_into_each_run_directory(
    tmp_path, data_overrides, offline_wandb
):
    sweep_dir = tmp_path / "sweep"
    # Two jobs in one process: the second must start a W&B run of its own, not reuse the first.
    args = ["-m", "seed=1,2", *QUICK, *data_overrides, "logger=wandb"]
    run_cli([*args, f"hydra.sweep.dir={sweep_dir}"], cwd=REPO)

    for run_dir in (sweep_dir / "0", sweep_dir / "1"):
        (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
        assert list(offline_run.glob("run-*.wandb"))
        assert not list((run_dir / "wandb").glob("run-*"))  # no online run was started
        assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.slow  # make test-all
def test_resume_auto_continues_the_mlflow_wandb_and_csv_logs(
    tmp_path, data_overrides, offline_wandb, capfd, monkeypatch
):
    pytest.importorskip("mlflow", reason="pip install -e '.[mlflow]'")
    # In this process W&B would wrap stdout and stderr, which pytest reads.
    monkeypatch.setenv("WANDB_CONSOLE", "off")
    run_dir = tmp_path / "run"
    uri, store = mlflow_overrides(tmp_path)
    # Two epochs of three steps; SIGTERM while step 1 trains: saved at step 2, mid-epoch.
    args = [*TINY, *without_callbacks("last_checkpoint"), "model=resnet20", *data_overrides]
    args += ["data.batch_size=4", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    args += ["trainer.num_sanity_val_steps=0", "num_threads=1"]
    args += ["logger=[mlflow,wandb,csv]", *store, f"hydra.run.dir={run_dir}"]
    with monkeypatch.context() as patch:
        signal_at_step(patch, 1)
        code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 128 + signal.SIGTERM, stderr
    offline_wandb.finish(exit_code=code)  # what the exit does; this test's process goes on
    _, stopped = the_mlflow_run(uri)
    assert stopped.info.status == "FAILED"
    last = run_dir / "checkpoints" / "last.ckpt"
    saved = torch.load(last, weights_only=True)
    assert saved["global_step"] == 2
    runs = saved[RunRecord.TRACKING_KEY]

    code, stderr = run_main(["resume=auto", f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 0, stderr

    # One MLflow run, the checkpoint's, finished, its loss curve every step once: 0-1 logged
    # before the signal, 2-5 after the resume.
    client, run = the_mlflow_run(uri)
    assert run.info.run_id == runs["MLFlowLogger"]
    assert run.info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
    assert steps == list(range(6))
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert run.data.metrics["test/acc"] == pytest.approx(metrics["test/acc"])
    assert run.data.params["resume"] == "None"  # the parameters it started with, unchanged
    # metrics.csv: the rows of both processes, the loss of every step once (Lightning's writer
    # deleted the file it found, and with it steps 0-1).
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        logged = [int(row["step"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert logged == list(range(6))
    # W&B offline: each process wrote its own folder, both of the checkpoint's run, which
    # `wandb sync` uploads as one run.
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert [folder.name.rsplit("-", 1)[1] for folder in offline] == [runs["WandbLogger"]] * 2
    assert all((folder / f"run-{runs['WandbLogger']}.wandb").is_file() for folder in offline)

    # The logger that continues a run marks it running, and leaves its parameters alone.
    cfg = compose_config(["logger=mlflow", *store, f"paths.output_dir={run_dir}", "resume=auto"])
    logger = instantiate_logger(cfg, "logger.mlflow", runs)
    assert logger.run_id == run.info.run_id
    assert client.get_run(run.info.run_id).info.status == "RUNNING"
    logger.log_hyperparams({"resume": "auto", "new": 1})  # MLflow would refuse the change
    assert client.get_run(run.info.run_id).data.params == run.data.params
    # A store without the run (a run directory copied from another machine): a new run.
    logger = instantiate_logger(cfg, "logger.mlflow", {"MLFlowLogger": "0" * 32})
    assert logger.run_id not in ("0" * 32, run.info.run_id)
    assert len(client.search_runs([run.info.experiment_id])) == 2


@pytest.mark.parametrize(
    ("logger", "module", "flag"),
    [("mlflow", "mlflow", "_MLFLOW_AVAILABLE"), ("wandb", "wandb", "_WANDB_AVAILABLE")],
)
def test_a_missing_logger_package_names_its_extra(
    logger, module, flag, tmp_path, capfd, monkeypatch
):
    # What Lightning's logger does when its package is not installed.
    monkeypatch.setattr(f"lightning.pytorch.loggers.{module}.{flag}", False)
    code, err = run_main(
        ["trainer=cpu", "model=resnet20", f"logger={logger}", f"hydra.run.dir={tmp_path}/run"],
        capfd,
        monkeypatch,
    )
    assert code == 2
    (line,) = err.strip().splitlines()
    name = {"mlflow": "ResumableMLFlowLogger", "wandb": "WandbLogger"}[logger]
    assert line == (
        f"error: logger.{logger} ({name}) needs a package that is not installed; "
        f"pip install -e '.[{logger}]'"
    )


def test_csv_metrics_keep_the_fit_columns_when_another_process_appends_the_test(tmp_path):
    # What ddp_spawn and ddp_fork do: the logger set up in the main process (hparams.yaml) is
    # copied into the fit's processes, and the same main-process logger into the test's.
    cfg = compose_config(["logger=csv", f"paths.output_dir={tmp_path}"])
    main = instantiate_group(cfg, "logger.csv")
    main.log_hyperparams({"seed": 0})
    fit = pickle.loads(pickle.dumps(main))
    fit.log_metrics({"train/loss": 2.3, "epoch": 0}, step=0)
    fit.log_metrics({"val/acc": 0.1, "epoch": 0}, step=1)
    fit.save()
    test = pickle.loads(pickle.dumps(main))
    test.log_metrics({"test/acc": 0.2, "epoch": 0}, step=2)
    test.save()

    with (tmp_path / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [(r["step"], r["train/loss"], r["val/acc"], r["test/acc"]) for r in rows] == [
        ("0", "2.3", "", ""),
        ("1", "", "0.1", ""),
        ("2", "", "", "0.2"),
    ]
