"""Training tools of the modern recipes, through the real CLI on real CIFAR-10 images: the
exponential moving average of the weights (`callbacks=ema`). The warm-up's schedule is checked
in test_schedules.py."""

from __future__ import annotations

import json

import pytest
import torch

from resnet_lightning.tools import evaluate as evaluation
from tests.cli_harness import REPO, TINY, run_cli, run_main


def test_ema_weights_are_what_checkpoints_test_and_eval_use(tmp_path, data_overrides, capsys):
    run_dir = tmp_path / "ema"
    args = ["model=resnet20", "callbacks=ema", "callbacks.ema.decay=0.9"]
    run_cli([*args, *TINY, *data_overrides, f"hydra.run.dir={run_dir}"], cwd=REPO)
    metrics = json.loads((run_dir / "metrics.json").read_text())

    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    average, trained = last["state_dict"], last["current_model_state"]
    assert int(last["averaging_state"]["n_averaged"]) == metrics["steps"] == 6  # every step
    assert average.keys() == trained.keys()
    for key in ("net.conv1.weight", "net.fc.weight", "net.bn1.running_mean"):
        assert not torch.equal(average[key], trained[key]), key  # BN statistics averaged too
    assert torch.equal(
        average["net.bn1.num_batches_tracked"], trained["net.bn1.num_batches_tracked"]
    )

    # The run tested its best checkpoint, whose state_dict is the average: eval of that file
    # reproduces the run's test, on the same 2 batches of 16.
    best = f"ckpt_path={metrics['best_checkpoint']}"
    evaluation.main([best, "trainer.limit_test_batches=2", "batch_size=16"])
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reported["test/acc"] == pytest.approx(metrics["test/acc"])
    assert reported["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


def test_ema_decay_out_of_range_is_one_line(tmp_path, data_overrides, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    args = ["callbacks=ema", "callbacks.ema.decay=1.5", *TINY, *data_overrides]
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 2
    assert stderr.strip().splitlines()[-1] == (
        "error: callbacks.ema.decay=1.5 must be in (0, 1), e.g. 0.999"
    )
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "checkpoints").exists()
