"""End to end through the real CLI and configs: a tiny run, a multirun, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hydra.utils import instantiate
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.cli_harness import REPO, TINY, cli_env, compose_config, run_cli, without_callbacks

METRIC_KEYS = {"test/acc", "test/acc_top5", "test/loss", "val/acc", "epochs", "wall_time_s"}


def scalar_tags(run_dir) -> set[str]:
    tags = set()
    for events in (run_dir / "tensorboard").glob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    return tags


def test_tiny_run_writes_metrics_tensorboard_and_checkpoints(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = ["model=resnet18", *TINY, *data_overrides, "callbacks.run_estimate.steps=1"]
    done = run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=REPO)
    shown = done.stdout + done.stderr
    # The start says where the run goes and, on a CPU, names the quick CPU recipe; the time
    # estimate follows the first timed step, and again the first epoch.
    assert f"Run directory: {run_dir}" in shown
    assert (
        "Training on the CPU" in shown
        and "python -m resnet_lightning experiment=cpu_quick" in shown
    )
    assert "Estimated training time:" in shown and "4 steps to go" in shown
    assert "Epoch took" in shown and "with validation; the 1 epoch to go" in shown
    assert "Epoch 0/" not in shown  # epochs count from 1 on the progress bar
    assert "Total FLOPs: 0" not in shown and "Tip" not in shown
    log = (run_dir / "train.log").read_text()
    assert "Estimated training time:" in log

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert METRIC_KEYS <= metrics.keys()
    assert metrics["epochs"] == 2 and metrics["steps"] == 6
    assert 0.0 <= metrics["test/acc"] <= metrics["test/acc_top5"] <= 1.0
    assert metrics["params"] == 11_173_962  # ResNet-18, CIFAR stem, 10 classes

    tags = scalar_tags(run_dir)
    expected = {"train/loss", "train/acc", "val/loss", "val/acc", "val/acc_top5", "test/acc"}
    assert expected <= tags, tags
    assert any(tag.startswith("lr-SGD") for tag in tags), tags

    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert metrics["best_checkpoint"].startswith(str(run_dir / "checkpoints"))
    saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert saved["model"]["name"] == "resnet18"


def test_multirun_gives_one_complete_directory_per_job(tmp_path, data_overrides):
    sweep_dir = tmp_path / "sweep"
    run_cli(
        [
            "-m",
            "model=resnet20",
            "optimizer.lr=0.1,0.05",
            *TINY,
            *data_overrides,
            *without_callbacks(),
            "trainer.max_epochs=1",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        cwd=REPO,
    )
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and (p / ".hydra").exists())
    assert len(jobs) == 2, list(sweep_dir.iterdir())
    lrs = set()
    for job in jobs:
        metrics = json.loads((job / "metrics.json").read_text())
        assert metrics.keys() >= METRIC_KEYS
        # No checkpoint callback here: val/acc is the last validation's, read before testing.
        assert 0.0 <= metrics["val/acc"] <= 1.0, metrics
        lr = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())["optimizer"]["lr"]
        lrs.add(lr)
        # TensorBoard names the job by its model and the override the sweep varies.
        assert [p.name for p in (job / "tensorboard").iterdir()] == [f"resnet20,optimizer.lr={lr}"]
        assert list((job / "tensorboard" / f"resnet20,optimizer.lr={lr}").glob("events.out.*"))
    assert lrs == {0.1, 0.05}


@pytest.mark.slow  # make test-all
def test_missing_data_is_one_line_and_nonzero(tmp_path):
    result = run_cli(
        [
            "trainer=cpu",
            f"data.root={tmp_path}/empty",
            f"data.path={tmp_path}/missing.tar.gz",
            f"hydra.run.dir={tmp_path}/run",
        ],
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: data.path=")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_bad_batch_size_is_one_line_and_nonzero(tmp_path, data_overrides):
    result = run_cli(
        ["trainer=cpu", "data.batch_size=0", *data_overrides, f"hydra.run.dir={tmp_path}/run"],
        cwd=REPO,
        check=False,
    )
    assert result.returncode == 2
    assert "data.batch_size=0 must be positive" in result.stderr


def test_defaults_are_the_seed_recipe():
    cfg = compose_config()
    assert cfg.model.name == "resnet50" and cfg.model.stem == "cifar"
    assert (cfg.optimizer.lr, cfg.optimizer.momentum, cfg.optimizer.weight_decay) == (
        0.1,
        0.9,
        1e-4,
    )
    assert cfg.scheduler.milestones == [30, 60, 90] and cfg.scheduler.gamma == 0.1
    assert cfg.data.batch_size == 128 and cfg.trainer.max_epochs == 100
    seed = compose_config(["experiment=seed_resnet50"])
    assert seed.model.stem == "imagenet" and seed.data.image_size == 224
    assert seed.data.normalization == "imagenet"


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("scheduler", ["multistep", "cosine", "onecycle", "none"])
def test_every_optimizer_and_scheduler_config_builds(optimizer, scheduler):
    cfg = compose_config([f"optimizer={optimizer}", f"scheduler={scheduler}"])
    params = [torch.nn.Parameter(torch.zeros(3))]
    opt = instantiate(cfg.optimizer)(params)
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr
    if scheduler == "none":
        assert cfg.scheduler is None
        return
    factory = instantiate(cfg.scheduler)
    kwargs = {"total_steps": 10} if scheduler == "onecycle" else {}
    lr_scheduler = factory(opt, **kwargs)
    opt.step()
    lr_scheduler.step()
    assert cfg.module.scheduler_interval == ("step" if scheduler == "onecycle" else "epoch")


def test_onecycle_is_sized_from_the_real_step_count(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    run_cli(
        [
            "model=resnet20",
            "scheduler=onecycle",
            *TINY,
            *data_overrides,
            *without_callbacks("model_checkpoint", "last_checkpoint"),
            f"hydra.run.dir={run_dir}",
        ],
        cwd=REPO,
    )
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["lr_schedulers"][0]["total_steps"] == 6  # 2 epochs x 3 batches


@pytest.mark.slow  # make test-all
def test_runs_started_at_once_never_share_a_directory(tmp_path, data_overrides):
    # Each names its directory as conf/hydra/default.yaml does, by a time stamp that is the
    # same for all of them here: they start in the same second.
    quick = [*TINY, *without_callbacks("model_checkpoint", "last_checkpoint"), "model=resnet20"]
    quick += ["trainer.max_epochs=1", "trainer.limit_train_batches=1", *data_overrides]
    runs = [
        [*quick, f"seed={i}", f"hydra.run.dir=${{unique_dir:{tmp_path}/run}}"] for i in (1, 2, 3)
    ]
    sweeps = [
        ["-m", *quick, "seed=1,2", f"hydra.sweep.dir=${{unique_dir:{tmp_path}/sweep}}"]
        for _ in (1, 2)
    ]
    processes = [
        subprocess.Popen(
            [sys.executable, "-m", "resnet_lightning", *args],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in [*runs, *sweeps]
    ]
    for process in processes:
        assert process.wait(timeout=600) == 0, process.stderr.read()

    run_dirs = sorted(p.name for p in tmp_path.glob("run*"))
    assert run_dirs == ["run", "run-1", "run-2"]
    seeds = set()
    for name in run_dirs:
        overrides = yaml.safe_load((tmp_path / name / ".hydra" / "overrides.yaml").read_text())
        seeds |= {o for o in overrides if o.startswith("seed=")}
        metrics = json.loads((tmp_path / name / "metrics.json").read_text())
        assert Path(metrics["best_checkpoint"]).parent == tmp_path / name / "checkpoints"
        assert sorted(p.name for p in (tmp_path / name / "checkpoints").iterdir()) == [
            "epoch000.ckpt",
            "last.ckpt",
        ]
    assert seeds == {"seed=1", "seed=2", "seed=3"}  # each run wrote its own directory
    assert sorted(p.name for p in tmp_path.glob("sweep*")) == ["sweep", "sweep-1"]
    for sweep in tmp_path.glob("sweep*"):
        assert sorted(p.name for p in sweep.iterdir() if p.is_dir()) == ["0", "1"]
        assert all((sweep / job / "metrics.json").is_file() for job in ("0", "1"))


@pytest.mark.parametrize(
    "no_logger",
    ["logger=[]", *(pytest.param(a, marks=pytest.mark.slow) for a in ("~logger", "logger=null"))],
)
def test_runs_without_a_logger_still_write_metrics(no_logger, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    quick = [*TINY, "model=resnet20", "trainer.max_epochs=1", *data_overrides]
    run_cli([*quick, no_logger, f"hydra.run.dir={run_dir}"], cwd=REPO)
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1
    assert not (run_dir / "tensorboard").exists() and not (run_dir / "csv").exists()


def test_a_group_without_a_choice_is_one_line(tmp_path):
    result = run_cli(["model=null", f"hydra.run.dir={tmp_path}/run"], cwd=REPO, check=False)
    assert result.returncode == 2
    (line,) = result.stderr.strip().splitlines()
    prefix = "error: model=null: model needs a choice, one of: "
    assert line.startswith(prefix)
    choices = line.removeprefix(prefix).split(", ")
    assert choices == sorted(choices) and {"airbench94", "resnet50", "wrn28_10"} <= set(choices)


@pytest.mark.slow  # make test-all
def test_train_log_holds_what_the_console_showed(tmp_path, data_overrides):
    run_dir, failed_dir = tmp_path / "run", tmp_path / "failed"
    quick = [*TINY, "model=resnet20", "trainer.max_epochs=1", *data_overrides]
    result = run_cli([*quick, f"hydra.run.dir={run_dir}"], cwd=REPO)
    log = (run_dir / "train.log").read_text()
    for line in ("Seed set to 42", "GPU available: False", "`Trainer.fit` stopped", "metrics: "):
        assert line in log, log  # Lightning's lines and this package's
    assert f"Run directory: {run_dir}" in result.stdout  # said at the start and the end
    assert log.count(f"Run directory: {run_dir}") == 2

    failed = run_cli(
        [*quick, "data.batch_size=0", f"hydra.run.dir={failed_dir}"], cwd=REPO, check=False
    )
    error = failed.stderr.strip().splitlines()[-1]
    assert error.startswith("error: data.batch_size=0 must be positive")
    assert (failed_dir / "train.log").read_text().strip().splitlines()[-1].endswith(error)


@pytest.mark.slow  # make test-all
def test_console_has_the_model_summary_flops_and_no_noise(tmp_path, data_overrides):
    quick = [a for a in TINY if a != "callbacks.model_summary=null"]
    quick += ["model=resnet20", "trainer.max_epochs=1", *data_overrides]
    result = run_cli([*quick, f"hydra.run.dir={tmp_path}/run"], cwd=REPO)
    output = result.stdout + result.stderr
    assert "Total FLOPs: 81.1 M" in output  # resnet20 at 32 px: 40.6 M multiply-adds
    for noise in ("💡 Tip", "LeafSpec` is deprecated", "Total FLOPs: 0"):
        assert noise not in output
