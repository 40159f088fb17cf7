"""Soak: a tiny run killed with SIGKILL at 20 seeded random moments (start-up, training,
checkpoint writes, testing), restarted with resume=auto after each, ends as a run that never
stopped: bit-identical weights, the same metrics, one run's files and no temporaries left."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
import torch

from resnet_lightning.callbacks.checkpoints import PARTIAL_SUFFIX
from resnet_lightning.training.resume import resume_checkpoint
from tests.cli_harness import (
    REPO,
    TINY,
    cli_env,
    compose_config,
    read_metrics,
    train_loss_curve,
    weights,
    without_callbacks,
)

# Ten epochs of four steps, last.ckpt every two steps (a SIGKILL leaves no time to save: the
# run continues from the last one written), validations that take a share of the time.
RUN = [
    *TINY,
    *without_callbacks("model_checkpoint", "last_checkpoint"),
    "model=resnet20",
    "seed=0",
    "trainer.deterministic=true",
    "trainer.max_epochs=10",
    "trainer.limit_train_batches=4",
    "data.batch_size=8",
    "callbacks.last_checkpoint.every_n_train_steps=2",
]
STEPS = 40
KILLS = 20
# Moments of the kills, in a seeded order: the testing ones last, since reaching the test
# means finishing the training.
PLAN = ["start-up"] * 5 + ["checkpoint"] * 5 + ["training"] * 6
random.Random(0).shuffle(PLAN)
PLAN += ["testing"] * 4


class Attempt:
    """One start of the run's command, the same every time (as a job script that restarts it
    would run it), its output in `log`."""

    def __init__(self, command: list[str], run_dir: Path, log: Path):
        self.run_dir, self.train_log = run_dir, run_dir / "train.log"
        # Where this attempt's lines of train.log begin (every start appends to it).
        self.log_start = self.train_log.stat().st_size if self.train_log.exists() else 0
        self.started = time.monotonic()
        with log.open("w") as out:
            self.process = subprocess.Popen(
                command, cwd=REPO, env=cli_env(), stdout=out, stderr=subprocess.STDOUT
            )

    def logged(self, text: str) -> bool:
        """Whether this attempt has written `text` to train.log."""
        if not self.train_log.exists():
            return False
        with self.train_log.open("rb") as log:
            log.seek(self.log_start)
            return text.encode() in log.read()

    def wait_for(self, reached, poll_s: float = 0.001, timeout: float = 300) -> bool:
        """Poll until `reached()` (True) or the process has ended (False)."""
        deadline = time.monotonic() + timeout
        while self.process.poll() is None:
            if reached():
                return True
            assert time.monotonic() < deadline, "the run hangs"
            time.sleep(poll_s)
        return False

    def wait_to_log(self, text: str) -> bool:
        return self.wait_for(lambda: self.logged(text), poll_s=0.01)

    def sleep(self, seconds: float) -> bool:
        """Sleep while the process runs; whether it still does after `seconds`."""
        end = time.monotonic() + seconds
        return self.wait_for(lambda: time.monotonic() >= end)

    def saving(self) -> bool:
        """Whether this process is writing a checkpoint (its temporary file exists)."""
        pid = self.process.pid
        return any(self.run_dir.glob(f"checkpoints/.*.{pid}{PARTIAL_SUFFIX}"))

    def kill(self) -> bool:
        """SIGKILL now, if it still runs; whether it did."""
        alive = self.process.poll() is None
        if alive:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait()
        return alive


def milestones(attempt: Attempt) -> dict[str, float]:
    """Seconds from launch to each phase of an uninterrupted run, and to its end."""
    times = {}
    for phase, line in (("training", "Starting training"), ("testing", "Starting testing")):
        assert attempt.wait_to_log(line)
        times[phase] = time.monotonic() - attempt.started
    assert attempt.process.wait() == 0
    times["end"] = time.monotonic() - attempt.started
    return times


def kill_at(kind: str, attempt: Attempt, times: dict[str, float], rng: random.Random) -> bool:
    """Kill `attempt` at a random moment of phase `kind`; whether it was still running."""
    step_s = (times["testing"] - times["training"]) / STEPS  # validation and saves included
    if kind == "start-up":
        reached = attempt.sleep(rng.uniform(0, times["training"]))
    elif kind == "training":  # within the next few steps, wherever training resumed
        reached = attempt.wait_to_log("Starting training")
        reached = reached and attempt.sleep(rng.uniform(0, 4 * step_s))
    elif kind == "checkpoint":  # in the middle of writing one
        reached = attempt.wait_to_log("Starting training")
        reached = reached and attempt.wait_for(attempt.saving)
    else:
        reached = attempt.wait_to_log("Starting testing")
        reached = reached and attempt.sleep(rng.uniform(0, times["end"] - times["testing"]))
    return attempt.kill() if reached else False


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_root, cifar_archive):
    """A run of RUN that never stopped, through the CLI: its directory, and the seconds from
    its launch to the start of training, of testing and to its end."""
    reference = tmp_path_factory.mktemp("soak") / "uninterrupted"
    data = [f"data.root={data_root}", f"data.path={cifar_archive}"]
    command = [sys.executable, "-m", "resnet_lightning", *RUN, *data]
    log = reference.parent / "uninterrupted.log"
    return reference, milestones(Attempt([*command, f"hydra.run.dir={reference}"], reference, log))


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """The uninterrupted run's result: metrics, every weight, the training curve."""
    assert read_metrics(run_dir) == read_metrics(reference)
    last = weights(run_dir / "checkpoints" / "last.ckpt")
    expected = weights(reference / "checkpoints" / "last.ckpt")
    assert all(torch.equal(last[k], expected[k]) for k in expected)
    curve = train_loss_curve(run_dir)
    assert sorted(curve) == list(range(STEPS))
    assert curve == pytest.approx(train_loss_curve(reference), rel=1e-6)


@pytest.mark.slow  # about 2 minutes: 22 starts of the CLI
def test_run_killed_20_times_ends_as_an_uninterrupted_run(uninterrupted, tmp_path, data_overrides):
    reference, times = uninterrupted
    command = [sys.executable, "-m", "resnet_lightning", *RUN, *data_overrides]
    run_dir = tmp_path / "run"
    restart = [*command, "resume=auto", f"hydra.run.dir={run_dir}"]
    rng = random.Random(0)
    killed: Counter[str] = Counter()
    for number in range(2 * KILLS):
        if killed.total() == KILLS:
            break
        finished = (run_dir / "metrics.json").exists()  # only start-up and testing are left
        kind = PLAN[number] if number < len(PLAN) and not finished else "testing"
        log = tmp_path / f"attempt{number}.log"
        attempt = Attempt(restart, run_dir, log)
        if kill_at(kind, attempt, times, rng):
            killed[kind] += 1
        else:  # it ended before the moment came: it must have ended well
            assert attempt.process.returncode == 0, log.read_text()[-3000:]
    assert killed.total() == KILLS and set(killed) == set(PLAN), killed
    final = Attempt(restart, run_dir, tmp_path / "final.log")
    assert final.process.wait() == 0, (tmp_path / "final.log").read_text()[-3000:]

    assert_same_run(run_dir, reference)
    # One run's files, and nothing half-written.
    files = sorted(str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file())
    temporary = [f for f in files if f.endswith((".tmp", ".temp", PARTIAL_SUFFIX))]
    assert not temporary, temporary
    once = [f for f in files if Path(f).name in ("metrics.json", "train.log", "overrides.yaml")]
    assert once == [".hydra/overrides.yaml", "metrics.json", "train.log"], files
    reference_checkpoints = sorted(str(p.relative_to(reference)) for p in reference.rglob("*.ckpt"))
    assert [f for f in files if f.endswith(".ckpt")] == reference_checkpoints, files
    events = {str(Path(f).parent) for f in files if "tfevents" in f}
    assert events == {"tensorboard"}, files


def test_resume_auto_removes_what_killed_writes_left(tmp_path):
    """A process killed while it wrote metrics.json (or any file written whole) leaves its
    temporary file; resume=auto deletes it, as it deletes a killed save's checkpoint."""
    run_dir = tmp_path / "run"
    writer = (
        "import sys, time\n"
        "from resnet_lightning.atomic_files import write_atomic\n"
        "write_atomic(sys.argv[1], lambda file: (file.write(b'{'), file.flush(), time.sleep(60)))\n"
    )
    process = subprocess.Popen([sys.executable, "-c", writer, str(run_dir / "metrics.json")])
    deadline = time.monotonic() + 60
    while not list(run_dir.glob(".metrics.json.*.tmp")):
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    (left,) = run_dir.glob(".metrics.json.*.tmp")
    # Files of the same suffix that write_atomic did not name are the user's.
    kept = [run_dir / "notes.tmp", run_dir / ".notes.tmp"]
    for path in kept:
        path.touch()

    cfg = compose_config(["resume=auto", f"paths.output_dir={run_dir}"])
    assert resume_checkpoint(cfg) is None  # no last.ckpt: a fresh start, in a clean directory
    assert not left.exists() and all(path.exists() for path in kept)
