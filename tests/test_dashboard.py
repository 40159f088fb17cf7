"""`python -m resnet_lightning.dashboard`: optuna-dashboard over a sweep's study, looked at in a
real headless browser (Debian's Chromium, which .ci/run installs)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from resnet_lightning.tools.dashboard import main as dashboard_main
from tests.cli_harness import REPO, cli_env, free_port

optuna = pytest.importorskip("optuna", reason="pip install -e '.[sweep]'")
pytest.importorskip("optuna_dashboard", reason="pip install -e '.[sweep]'")

# A study's trials: the learning rate each tried and the validation accuracy it reached.
TRIALS = [(0.05, 0.6125), (0.2, 0.7342), (0.01, 0.5518)]


@pytest.fixture
def chromium() -> str:
    """Chromium's executable; in CI it must be there (.ci/run installs it)."""
    path = shutil.which("chromium")
    if path is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed: apt-get install chromium")
    return path


def make_sweep_study(sweep) -> None:
    """The study an Optuna sweep keeps in its directory when given no storage of its own."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    sweep.mkdir()
    storage = JournalStorage(JournalFileBackend(str(sweep / "optuna_journal.log")))
    study = optuna.create_study(storage=storage, study_name="lr_search", direction="maximize")
    space = {"optimizer.lr": optuna.distributions.FloatDistribution(0.001, 1.0, log=True)}
    for lr, accuracy in TRIALS:
        trial = optuna.trial.create_trial(
            params={"optimizer.lr": lr}, distributions=space, value=accuracy
        )
        study.add_trial(trial)


def page_text(chromium: str, url: str) -> str:
    """The page at `url` after its scripts ran: the DOM as Chromium renders it."""
    done = subprocess.run(
        [
            chromium,
            "--headless",
            "--disable-gpu",
            "--no-sandbox",
            "--virtual-time-budget=15000",
            "--dump-dom",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dashboard_shows_the_study_and_its_trials_in_a_browser(chromium, tmp_path):
    sweep = tmp_path / "sweep"
    make_sweep_study(sweep)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "resnet_lightning.dashboard", str(sweep), "--port", str(port)],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert server.poll() is None, server.stdout.read()
            try:
                with urllib.request.urlopen(f"{base}/api/studies", timeout=5) as answer:
                    (study,) = json.load(answer)["study_summaries"]
                break
            except OSError:
                assert time.monotonic() < deadline, "the dashboard did not answer in 60 s"
                time.sleep(0.5)
        # The study's page of trials, all of them selected: its name, each trial's value.
        numbers = ",".join(str(number) for number in range(len(TRIALS)))
        page = f"{base}/dashboard/studies/{study['study_id']}/trials?numbers={numbers}"
        shown = page_text(chromium, page)
        assert "lr_search" in shown
        for _, accuracy in TRIALS:
            assert str(accuracy) in shown
    finally:
        server.terminate()
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("location", "message"),
    [
        ("{tmp}", "{tmp} holds no Optuna study"),
        ("{tmp}/nothing.log", "{tmp}/nothing.log does not exist"),
        ("sqlite:///{tmp}/none.db", "sqlite:///{tmp}/none.db: no such database file"),
    ],
)
def test_a_location_without_a_study_is_one_line(location, message, tmp_path, capsys):
    assert dashboard_main([location.format(tmp=tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message.format(tmp=tmp_path)}") and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []  # nothing created where nothing was
