"""Time budgets (`budget=30m`): the schedule runs on the budget's position, training ends when
it is spent, the whole command fits in it."""

from __future__ import annotations

import json
import math
import re
import signal
import subprocess
import sys
import time

import pytest

from resnet_lightning.callbacks import time_budget
from resnet_lightning.callbacks.time_budget import duration
from resnet_lightning.training import train as train_module
from tests.budget_clock import FakeClock, StepSeconds
from tests.cli_harness import REPO, TINY, cli_env, run_cli, run_main, without_callbacks

LR = 0.1


def fake_clock_run(tmp_path, data_overrides, capfd, monkeypatch, *extra: str) -> dict:
    """A tiny run under a budget timed by FakeClock (StepSeconds moves it each step); its
    metrics.json."""
    monkeypatch.setattr(time_budget, "wall_clock", FakeClock.read)
    monkeypatch.setattr(train_module, "job_start_time", FakeClock.read)
    run_dir = tmp_path / "run"
    args = [
        *TINY,
        *without_callbacks(),
        *data_overrides,
        "model=resnet20",
        "logger=[]",
        "scheduler=linear_to_zero",
        f"optimizer.lr={LR}",
        "data.pipeline=tensor",
        "data.batch_size=8",
        # 25 steps an epoch of at most 100 epochs: the budget, not the epochs, ends the run.
        "trainer.max_epochs=100",
        "trainer.limit_train_batches=25",
        "trainer.limit_val_batches=0",
        "trainer.limit_test_batches=1",
        "+callbacks.clock._target_=tests.budget_clock.StepSeconds",
        f"hydra.run.dir={run_dir}",
        *extra,
    ]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    return json.loads((run_dir / "metrics.json").read_text())


def test_learning_rate_follows_the_budget_position(tmp_path, data_overrides, capfd, monkeypatch):
    metrics = fake_clock_run(tmp_path, data_overrides, capfd, monkeypatch, "budget=1m")
    assert metrics["budget_s"] == 60
    # Start-up took no fake time; the final evaluation's reserve was measured for real.
    available = 60 - metrics["budget_reserve_s"]
    steps = StepSeconds.steps
    # Each step takes 1 s: step k trains at the position after k seconds of the time.
    for k, (step, position, lr) in enumerate(steps):
        assert step == k
        assert position == pytest.approx(k / available, rel=1e-3)  # reserve_s is rounded
        # Linear to zero over the positions (tabulated over the 2,500 steps of max_epochs).
        assert lr == pytest.approx(LR * (1 - position), abs=LR / 2500)
    # At 0, 25, 50 and 100% of the budget (the nearest step: one is 1 s of it).
    for target in (0.0, 0.25, 0.5, 1.0):
        _, position, lr = min(steps, key=lambda s: abs(s[1] - target))
        assert abs(position - target) <= 1 / available
        assert lr == pytest.approx(LR * (1 - target), abs=LR / available + LR / 2500)
    # Training stopped at the step that spent the time: the schedule ended there, at zero.
    assert len(steps) == metrics["steps"] == math.ceil(available)
    assert steps[-1][2] <= LR / available + LR / 2500  # the last second of a linear fall
    assert metrics["budget_train_s"] == pytest.approx(len(steps))
    # The evaluation took no fake time; testing a checkpoint does not count the time twice.
    assert metrics["budget_used_s"] == pytest.approx(len(steps))
    assert metrics["epochs_done"] == pytest.approx(len(steps) / 25, abs=1e-3)


def test_slower_steps_still_end_annealed_at_the_budget(
    tmp_path, data_overrides, capfd, monkeypatch
):
    # trainer.max_time (Lightning's DD:HH:MM:SS) is the same budget.
    metrics = fake_clock_run(
        tmp_path,
        data_overrides,
        capfd,
        monkeypatch,
        "trainer.max_time=00:00:01:00",
        "+callbacks.clock.slow_from=20",
        "+callbacks.clock.slow_seconds=3",
    )
    assert metrics["budget_s"] == 60
    available = 60 - metrics["budget_reserve_s"]
    steps = StepSeconds.steps
    # 20 steps of 1 s, then 3 s a step: the position moves three times as fast...
    assert steps[22][1] - steps[21][1] == pytest.approx(3 / available, rel=1e-3)
    # ...and the run ends when the time is spent, annealed, whatever the steps did.
    assert len(steps) == 20 + math.ceil((available - 20) / 3)
    assert steps[-1][1] > 1 - 3 / available
    assert steps[-1][2] < 3 * LR / available + LR / 2500


def test_the_run_estimate_speaks_in_budget_terms(tmp_path, data_overrides, capfd, monkeypatch):
    """RunTimeEstimate under a budget: the training time left and the epochs it holds, after
    the first timed steps and after the first epoch, whose time holds no validation here."""
    monkeypatch.setattr(time_budget, "evaluation_seconds", lambda *a, **kw: 10.0)
    estimate = "resnet_lightning.callbacks.run_estimate.RunTimeEstimate"
    metrics = fake_clock_run(
        tmp_path,
        data_overrides,
        capfd,
        monkeypatch,
        "budget=2m",
        f"+callbacks.estimate._target_={estimate}",
        "+callbacks.estimate.steps=2",
    )
    log = (tmp_path / "run" / "train.log").read_text()
    assert re.search(
        r"Time budget: [\d a-z]+ of training left, about \d+ steps more at [\d.e-]+ s a step "
        r"\([\d.]+ epochs in all\); then the final evaluation",
        log,
    ), log
    # The first epoch ended after 25 fake seconds (one a step) of the 2 minutes less the reserve.
    left = duration(120 - metrics["budget_reserve_s"] - 25)
    assert re.search(
        rf"Epoch took [\d a-z]+; the budget's {left} of training left are about [\d.]+ epochs "
        "more",
        log,
    ), log


MEASURED_TEST_S = 10.0


def slowed_run(tmp_path, data_overrides, capfd, monkeypatch, slow_from, slow_seconds, *extra):
    """A 2-minute fake-clock run whose final evaluation measures MEASURED_TEST_S before the
    first step; its steps take `slow_seconds` from step `slow_from` on (1 s before), and the
    test runs at the machine's speed at the end (MEASURED_TEST_S x slow_seconds)."""
    monkeypatch.setattr(time_budget, "evaluation_seconds", lambda *a, **kw: MEASURED_TEST_S)
    return fake_clock_run(
        tmp_path,
        data_overrides,
        capfd,
        monkeypatch,
        "budget=2m",
        f"+callbacks.clock.slow_from={slow_from}",
        f"+callbacks.clock.slow_seconds={slow_seconds}",
        f"+callbacks.clock.test_seconds={MEASURED_TEST_S * slow_seconds}",
        *extra,
    )


@pytest.mark.parametrize(
    ("slow_from", "speed_change", "factor"),
    [(30, 2.0, 2.2), (85, 2.0, 2.2), (30, 0.8, 1.1)],
)
def test_the_reserve_grows_when_the_steps_slow_down(
    slow_from, speed_change, factor, tmp_path, data_overrides, capfd, monkeypatch
):
    """A machine that slows down mid-run (2 s a step from step 30 or 85 on, not 1) runs the
    final test slower too: the reserve grows with the step time and the whole run still
    ends inside the budget. A reserve fixed at the start would overrun it (30 + 38 steps, or
    85 + 11, then a 20 s test: 126 s of 120), and so would one that noticed the late
    slowdown only after half of 25 steps. The reserve keeps its 1.1 margin over the drift; a
    speed-up gives nothing back."""
    metrics = slowed_run(tmp_path, data_overrides, capfd, monkeypatch, slow_from, speed_change)
    measured, test_seconds = MEASURED_TEST_S, MEASURED_TEST_S * speed_change
    assert metrics["budget_drift"] == pytest.approx(speed_change)
    reserve = measured * factor + time_budget.FIXED_MARGIN_S
    assert metrics["budget_reserve_s"] == pytest.approx(reserve, abs=0.01)
    # Training ended at the first step past budget - reserve; then the test ran.
    ended = 120 - reserve + test_seconds
    assert ended - 0.01 <= metrics["budget_used_s"] <= min(ended + speed_change + 0.01, 120)
    positions = [position for _, position, _ in StepSeconds.steps]
    assert positions == sorted(positions)
    assert StepSeconds.steps[-1][2] < LR * speed_change / (120 - reserve) + LR / 2500


# The 32 px steps of the progressive-resizing runs below start near step 207 (16 px steps to
# 31% of the 106 s, then 20, 24 and 28 px ones): a slowdown from step 225 comes after their
# reference steps, one from step 50 among the 16 px ones.
LATE, EARLY = 225, 50


@pytest.mark.parametrize(("slow_from", "slow_seconds"), [(LATE, 1.0), (LATE, 2.0), (EARLY, 2.0)])
def test_progressive_resizing_grows_the_images_over_the_budget(
    slow_from, slow_seconds, tmp_path, data_overrides, capfd, monkeypatch
):
    """module.progressive_min_size=16: the network trains on images scaled down to 16 px until
    25% of the budget, growing in 4 px steps to the full 32 px at 75%; validation and test see
    full-size images. A step on smaller images takes less time (16 px: a quarter of a 32 px
    step): the reserve's drift does not take the larger images' longer steps for a slowdown
    (it would have kept 3 x the measured test), and a real one still grows it, whether it
    comes among the 32 px steps or among the 16 px ones and lasts through every later size
    (twice the seconds a step from step 225 or 50 on)."""
    metrics = slowed_run(
        tmp_path,
        data_overrides,
        capfd,
        monkeypatch,
        slow_from,
        slow_seconds,
        "module.progressive_min_size=16",
        "module.progressive_ramp=[0.25,0.75]",
        "+callbacks.clock.per_pixel=true",
    )
    steps, sizes = StepSeconds.steps, StepSeconds.sizes
    assert len(sizes) == len(steps) == metrics["steps"]
    for (_, position, _), (height, width) in zip(steps, sizes, strict=True):
        ramp = min(max((position - 0.25) / 0.5, 0.0), 1.0)
        assert height == width == 4 * round((16 + 16 * ramp) / 4), position
    assert [height for height, _ in sizes] == sorted(height for height, _ in sizes)
    assert {height for height, _ in sizes} == {16, 20, 24, 28, 32}
    if slow_from == LATE:
        assert set(sizes[LATE - 12 :]) == {(32, 32)}
    else:
        assert sizes[EARLY - 12 : EARLY + 12] == [(16, 16)] * 24
    assert StepSeconds.eval_sizes == {(32, 32)}
    assert metrics["budget_drift"] == pytest.approx(slow_seconds)
    reserve = MEASURED_TEST_S * slow_seconds * time_budget.EVAL_MARGIN
    reserve += time_budget.FIXED_MARGIN_S
    assert metrics["budget_reserve_s"] == pytest.approx(reserve, abs=0.01)
    assert metrics["budget_used_s"] <= 120


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("budget=0", "budget.minutes=0 must be a positive duration"),
        ("budget=-5m", "must be a positive duration"),
        ("budget=soon", "budget=soon is not a duration; e.g. budget=30m"),
        ("budget.minutes=abc", "budget.minutes='abc' is not a duration"),
    ],
)
def test_bad_budgets_are_one_line(override, message, tmp_path, data_overrides, capfd, monkeypatch):
    args = [*TINY, *data_overrides, override, f"hydra.run.dir={tmp_path / 'run'}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 2
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and message in lines[0], stderr
    assert not (tmp_path / "run" / "metrics.json").exists()


def test_budget_and_max_time_that_disagree(tmp_path, data_overrides, capfd, monkeypatch):
    args = [*TINY, *data_overrides, "budget=30m", "trainer.max_time=00:01:00:00"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 2
    assert "budget.minutes=30 and trainer.max_time=00:01:00:00 disagree" in stderr


def test_a_budget_too_short_to_train_names_the_minimum(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [*TINY, *data_overrides, "budget=3s", f"hydra.run.dir={run_dir}"]
    result = run_cli(args, cwd=tmp_path, check=False)
    assert result.returncode == 2
    (line,) = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert "budget.minutes=0.05 (3 s) leaves no time to train: start-up took" in line
    assert "give at least budget.minutes=" in line
    assert not (run_dir / "metrics.json").exists()


REAL_BUDGET = [
    *TINY,
    "model=resnet20",
    "data.pipeline=tensor",
    "data.batch_size=64",
    "trainer.max_epochs=1000",
    "trainer.limit_train_batches=null",
    "trainer.limit_val_batches=0",
    "trainer.limit_test_batches=null",
    "scheduler=linear_to_zero",
]


@pytest.mark.slow
def test_a_real_budget_holds_for_the_whole_command(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    start = time.perf_counter()
    run_cli([*REAL_BUDGET, *data_overrides, "budget=60s", f"hydra.run.dir={run_dir}"], tmp_path)
    wall = time.perf_counter() - start  # the whole process, measured outside it
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert wall <= 60 * 1.05, metrics
    assert wall >= 60 * 0.8, metrics  # it trained for the time it had, not less
    assert metrics["steps"] > 20 and metrics["test/acc"] > 0.2


@pytest.mark.slow
def test_a_run_stopped_mid_budget_resumes_the_same_budget(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [*REAL_BUDGET, *data_overrides, "budget=120s", f"hydra.run.dir={run_dir}"]
    command = [sys.executable, "-m", "resnet_lightning", *args]
    start = time.perf_counter()
    first = subprocess.Popen(command, cwd=tmp_path, env=cli_env(), stderr=subprocess.PIPE)
    time.sleep(45)
    first.send_signal(signal.SIGTERM)
    _, stderr = first.communicate(timeout=120)
    first_wall = time.perf_counter() - start
    assert first.returncode == 128 + signal.SIGTERM, stderr.decode()[-2000:]
    start = time.perf_counter()
    run_cli(["resume=auto", f"hydra.run.dir={run_dir}"], tmp_path)
    second_wall = time.perf_counter() - start
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # The two processes together took the budget (the gap between them is not counted).
    assert first_wall + second_wall <= 120 * 1.05
    # Both processes are counted, up to what neither can record: each one's exit after its
    # last write (2 s each on a slow 2-core machine), far less than the first one's 45 s.
    walls = first_wall + second_wall
    assert walls - 10 <= metrics["budget_used_s"] <= walls
    assert metrics["budget_used_s"] <= 120 * 1.05


@pytest.mark.slow
def test_ddp_ranks_stop_at_the_same_step(tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [
        *REAL_BUDGET,
        *data_overrides,
        "trainer=ddp_cpu",
        "budget=75s",
        "+callbacks.final_step._target_=tests.budget_clock.RecordFinalStep",
        f"+callbacks.final_step.directory={run_dir}",
        f"hydra.run.dir={run_dir}",
    ]
    run_cli(args, REPO)  # the ranks import the test callback from tests/
    steps = {path.name: json.loads(path.read_text()) for path in run_dir.glob("final_step_*")}
    assert set(steps) == {"final_step_0.json", "final_step_1.json"}
    assert steps["final_step_0.json"] == steps["final_step_1.json"]
    assert steps["final_step_0.json"]["step"] > 5
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["budget_used_s"] <= 75 * 1.05


def test_budget_shorthand_becomes_minutes():
    from resnet_lightning.training.config import with_budget_shorthand

    assert with_budget_shorthand(["budget=30m", "model=resnet20"]) == [
        "budget.minutes=30",
        "model=resnet20",
    ]
    assert with_budget_shorthand(["budget=90s"]) == ["budget.minutes=1.5"]
    assert with_budget_shorthand(["budget=1.5h"]) == ["budget.minutes=90"]
    assert with_budget_shorthand(["budget=5m,10m,15"]) == ["budget.minutes=5,10,15"]
    assert with_budget_shorthand(["budget=null"]) == ["budget.minutes=null"]


def test_a_budget_run_without_a_length_is_refused(tmp_path, data_overrides, capfd, monkeypatch):
    args = [
        *TINY,
        *data_overrides,
        "budget=10m",
        "trainer.max_epochs=-1",
        "trainer.max_steps=-1",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 2, stderr
