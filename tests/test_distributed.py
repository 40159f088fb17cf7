"""DDP on the CPU (two gloo processes): inside a Hydra multirun (by `-m`, or by a config that
sets `hydra.mode: MULTIRUN`), as two torchrun "nodes", under ddp_spawn and ddp_fork with every
logger, and stopped by signals.

One multirun of two DDP jobs serves several tests: that each job is a complete DDP run written
by rank 0 alone, that the sweep holds exactly its two jobs, and that the test metrics are
gathered from both ranks. One uninterrupted run is the reference of the signal tests.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
import yaml

from resnet_lightning.tools.evaluate import evaluate
from tests.cli_harness import (
    REPO,
    TINY,
    cli_env,
    free_port,
    run_cli,
    run_together,
    without_callbacks,
)
from tests.test_loggers import mlflow_overrides, the_mlflow_run
from tests.test_resume_eval import read_metrics, weights
from tests.test_train_cli import scalar_tags

# Each test starts several processes: make test-all runs them.
pytestmark = pytest.mark.slow

# Two processes on two CPU cores: one epoch of two batches of 8 per rank.
DDP = [
    *TINY,
    *without_callbacks("model_checkpoint", "last_checkpoint"),
    "trainer=ddp_cpu",
    "trainer.max_epochs=1",
]
DDP += ["trainer.limit_train_batches=2", "data.batch_size=8"]
JOB_FILES = {".hydra", "checkpoints", "metrics.json", "tensorboard", "train.log"}


@pytest.fixture(scope="module")
def ddp_sweep(tmp_path_factory, data_root, cifar_archive):
    """`-m model=resnet20,resnet32 trainer=ddp_cpu`, started in an empty folder."""
    cwd = tmp_path_factory.mktemp("ddp_sweep")
    data = [f"data.root={data_root}", f"data.path={cifar_archive}"]
    args = ["-m", "model=resnet20,resnet32", *DDP, *data, f"hydra.sweep.dir={cwd}/sweep"]
    return cwd, run_cli(args, cwd=cwd)


def test_ddp_multirun_gives_exactly_its_two_jobs(ddp_sweep):
    cwd, result = ddp_sweep
    sweep = cwd / "sweep"
    # Nothing else in the folder it started from: no stray run or sweep directories.
    assert [p.name for p in cwd.iterdir()] == ["sweep"]
    assert sorted(p.name for p in sweep.iterdir()) == ["0", "1", "multirun.yaml"]
    assert result.stdout.count("Launching 2 jobs") + result.stderr.count("Launching 2 jobs") == 1
    for job, model in (("0", "resnet20"), ("1", "resnet32")):
        config = yaml.safe_load((sweep / job / ".hydra" / "config.yaml").read_text())
        assert config["model"]["name"] == model
        # Each job ran once: one metrics line in its log.
        assert (sweep / job / "train.log").read_text().count("metrics: ") == 1


def test_each_ddp_job_is_complete_and_written_by_rank_zero(ddp_sweep):
    cwd, result = ddp_sweep
    output = result.stdout + result.stderr
    assert output.count("GLOBAL_RANK: 1, MEMBER: 2/2") == 2  # one rank 1 per job
    for job in ("0", "1"):
        job_dir = cwd / "sweep" / job
        # Rank 1 writes no .hydra/ folder, log file, checkpoint or metrics of its own.
        assert {p.name for p in job_dir.iterdir()} == JOB_FILES
        metrics = json.loads((job_dir / "metrics.json").read_text())
        assert metrics["steps"] == 2 and metrics["epochs"] == 1
        assert {p.name for p in (job_dir / "checkpoints").iterdir()} == {
            "epoch000.ckpt",
            "last.ckpt",
        }
        hydra = yaml.safe_load((job_dir / ".hydra" / "hydra.yaml").read_text())["hydra"]
        assert "hydra.output_subdir=null" not in hydra["overrides"]["hydra"]


def test_ddp_test_metrics_cover_both_ranks(ddp_sweep):
    cwd, _ = ddp_sweep
    metrics = json.loads((cwd / "sweep" / "0" / "metrics.json").read_text())
    # Each rank tested 2 batches of 8 (DistributedSampler: images 0, 2, ... and 1, 3, ...):
    # one process testing 2 batches of 16 sees the same 32 images.
    alone = evaluate(
        metrics["best_checkpoint"], ["data.batch_size=16", "trainer.limit_test_batches=2"]
    )
    assert alone["test/acc"] == metrics["test/acc"]
    assert alone["test/loss"] == pytest.approx(metrics["test/loss"], rel=1e-5)


# Sweeps that are multiruns by their config, with no `-m`, cut to two jobs. Their configs stay
# selected in each job's overrides, which the ranks Lightning starts are given.
CONFIGURED_SWEEPS = {
    "degradation": ["experiment=degradation", "hydra.sweeper.params.model='resnet20,plain20'"],
    "optuna": ["hparams_search=optuna", "hydra.sweeper.n_trials=2"],
}


def processes_mentioning(text: str) -> list[int]:
    """The processes whose command line holds `text` (Linux's /proc)."""
    found = []
    for cmdline in os.scandir("/proc"):
        if cmdline.name.isdigit() and int(cmdline.name) != os.getpid():
            try:
                with open(f"/proc/{cmdline.name}/cmdline", "rb") as f:
                    if text.encode() in f.read():
                        found.append(int(cmdline.name))
            except OSError:  # it ended meanwhile
                pass
    return found


@pytest.mark.parametrize("search", CONFIGURED_SWEEPS)
def test_ddp_jobs_of_a_configured_sweep_run_their_trial_and_leave_nothing(
    search, tmp_path, data_overrides
):
    # Started in an empty folder, in a session of its own: a rank that swept by itself would
    # write there, and whatever is left of the command can be found and ended.
    sweep = tmp_path / "sweep"
    record = "+callbacks.rank_record._target_=tests.shard_record.RecordRank"
    args = [*CONFIGURED_SWEEPS[search], *DDP, *data_overrides, record, f"hydra.sweep.dir={sweep}"]
    # The ranks start in that folder too: the recording callback is imported from the repository.
    python_path = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    env = {**cli_env(), "PYTHONPATH": python_path}
    with open(tmp_path / "output.txt", "w+") as output:
        command = subprocess.Popen(
            [sys.executable, "-m", "resnet_lightning", *args],
            cwd=tmp_path,
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            code = command.wait(timeout=300)
        except subprocess.TimeoutExpired:
            code = "none: it had not returned after 300 s"
        try:
            # A finished rank may take a moment to exit; one that swept waits forever.
            for _ in range(30):
                if not (left := processes_mentioning(str(sweep))):
                    break
                time.sleep(1)
        finally:
            for pid in processes_mentioning(str(sweep)):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # the rest of its session
                os.killpg(command.pid, signal.SIGKILL)
            command.wait()
        output.seek(0)
        log = output.read()[-3000:]
    assert code == 0, log
    assert not left, f"processes of the sweep left running: {left}"
    # Nothing written outside the sweep, as a rank that swept by itself would, and no empty
    # folder: the default sweep directory that composing each job's config created (OmegaConf's
    # merge resolves the unique_dir that the search's hydra.sweep.dir replaces) is removed.
    written = [p for p in tmp_path.rglob("*") if p != sweep and sweep not in p.parents]
    assert written == [tmp_path / "output.txt"]
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    swept = set()
    for job in jobs:
        assert json.loads((job / "metrics.json").read_text())["steps"] == 2
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        # Rank 1 ran this job: the same overrides (the sweep's values) in the same directory.
        for rank in (0, 1):
            ranked = json.loads((job / f"rank{rank}.json").read_text())
            assert ranked == {"overrides": overrides, "output_dir": str(job)}
        swept.add(tuple(o for o in overrides if o not in args))
    assert len(swept) == 2  # each job its own values


def torchrun_two_nodes(args: list[str]) -> list[str]:
    """`python -m resnet_lightning ARGS` as two single-process torchrun "nodes" over localhost;
    their outputs, after both succeeded."""
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1"]
    torchrun += ["--master-addr=127.0.0.1", f"--master-port={port}"]
    nodes = [[*torchrun, f"--node-rank={rank}", "-m", "resnet_lightning", *args] for rank in (0, 1)]
    return run_together(nodes, 300)


def test_two_torchrun_nodes_train_one_run(ddp_sweep, tmp_path, data_overrides):
    run_dir = tmp_path / "run"
    args = [*DDP, "model=resnet20", "trainer.num_nodes=2", "trainer.devices=1", *data_overrides]
    outputs = torchrun_two_nodes([*args, f"hydra.run.dir={run_dir}"])
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in outputs[1]
    assert {p.name for p in run_dir.iterdir()} == JOB_FILES
    assert (run_dir / "train.log").read_text().count("metrics: ") == 1  # rank 0's alone
    # The same two-process training as the single-machine DDP job of the sweep.
    metrics = json.loads((run_dir / "metrics.json").read_text())
    single_machine = json.loads((ddp_sweep[0] / "sweep" / "0" / "metrics.json").read_text())
    assert metrics["steps"] == 2
    assert metrics["test/loss"] == pytest.approx(single_machine["test/loss"], rel=1e-3)


@pytest.mark.parametrize("strategy", ["ddp_spawn", "ddp_fork"])
def test_spawned_ranks_train_test_and_report_like_ddp_to_every_logger(
    strategy, ddp_sweep, tmp_path, data_overrides, offline_wandb
):
    # ddp_spawn/ddp_fork start the ranks as worker processes, for trainer.fit and again for
    # trainer.test, and hand rank 0's weights back through the checkpoint plugin; the loop
    # counters and best score come back too. Each logger gets the fit's metrics and the test's.
    run_dir, temp = tmp_path / "run", tmp_path / "tmp"
    temp.mkdir()
    loggers = ["csv", "tensorboard", *(n for n in ("mlflow", "wandb") if find_spec(n))]
    uri, mlflow_store = mlflow_overrides(tmp_path)
    args = [*DDP, "model=resnet20", f"trainer.strategy={strategy}", *data_overrides]
    args += [f"logger=[{','.join(loggers)}]", *mlflow_store]
    result = subprocess.run(
        [sys.executable, "-m", "resnet_lightning", *args, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env={**cli_env(), "TMPDIR": str(temp)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert {p.name for p in run_dir.iterdir()} == JOB_FILES | {"csv"} | {"wandb"} & {*loggers}
    metrics = json.loads((run_dir / "metrics.json").read_text())
    launched = json.loads((ddp_sweep[0] / "sweep" / "0" / "metrics.json").read_text())
    assert (metrics["epochs"], metrics["steps"]) == (1, 2)
    assert metrics["val/acc"] == launched["val/acc"]  # the best checkpoint's score
    assert metrics["test/loss"] == pytest.approx(launched["test/loss"], rel=1e-3)
    assert not list(temp.rglob("*.ckpt"))  # the weights handed back are not left behind

    fit, test = {"train/loss", "train/loss_epoch", "val/acc"}, {"test/acc", "test/loss"}
    with (run_dir / "csv" / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert fit | test <= rows[0].keys() and any(row["train/loss_epoch"] for row in rows)
    tested = float(next(r for r in rows if r["test/loss"])["test/loss"])
    assert tested == pytest.approx(metrics["test/loss"])
    assert {"train/loss", "val/acc", "test/acc"} <= scalar_tags(run_dir)
    if "mlflow" in loggers:  # one MLflow run, logged to by the fit's and the test's ranks
        client, run = the_mlflow_run(uri)
        assert run.info.status == "FINISHED" and fit | test <= run.data.metrics.keys()
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [0, 1]
        assert run.data.metrics["test/loss"] == pytest.approx(metrics["test/loss"])
    if "wandb" in loggers:  # one offline W&B run, holding both
        (offline_run,) = (run_dir / "wandb").glob("offline-run-*")
        (records,) = offline_run.glob("run-*.wandb")
        assert all(key.encode() in records.read_bytes() for key in fit | test)


def photo_shard_args(photos, tmp_path) -> list[str]:
    """A DDP run on the 64 px image folder whose ranks write the files of their shards."""
    return [
        *TINY,
        *without_callbacks(),
        "data=imagefolder",
        f"data.path={photos}",
        f"data.root={tmp_path / 'cache'}",
        "data.image_size=64",
        "data.resize_size=72",
        "data.batch_size=8",
        "model=resnet20",
        "trainer.max_epochs=1",
        "trainer.limit_train_batches=2",
        "logger=[]",
        "module.lr_reference_batch=32",
        "+callbacks.shard_record._target_=tests.shard_record.RecordShard",
        f"+callbacks.shard_record.folder={tmp_path / 'shards'}",
    ]


def assert_disjoint_shards(folder, photos) -> None:
    # The learning rate follows the global batch: 8 images a process, two processes.
    log = (folder.parent / "run" / "train.log").read_text()
    assert "Learning rate x0.5: a global batch of 16 (8 x 2 processes x 1 accumulated)" in log
    shards = [json.loads((folder / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [s["world_size"] for s in shards] == [2, 2]
    files = [set(s["files"]) for s in shards]
    assert len(files[0]) == len(files[1]) == 120  # 240 training photos, half each
    assert not files[0] & files[1]
    assert files[0] | files[1] == {str(p) for p in (photos / "train").rglob("*.jpg")}


def test_ddp_ranks_read_disjoint_shards_of_an_image_folder(photos, tmp_path):
    args = [*photo_shard_args(photos, tmp_path), "trainer=ddp_cpu"]
    run_cli([*args, f"hydra.run.dir={tmp_path / 'run'}"], cwd=REPO)
    assert_disjoint_shards(tmp_path / "shards", photos)


def test_torchrun_nodes_read_disjoint_shards_of_an_image_folder(photos, tmp_path):
    args = [*photo_shard_args(photos, tmp_path), "trainer=ddp_cpu", "trainer.num_nodes=2"]
    torchrun_two_nodes([*args, "trainer.devices=1", f"hydra.run.dir={tmp_path / 'run'}"])
    assert_disjoint_shards(tmp_path / "shards", photos)


# Preemption: one epoch of four batches, deterministic; a signal while the second batch trains.
PREEMPTED = [*DDP, "model=resnet20", "seed=0"]
PREEMPTED += ["trainer.limit_train_batches=4", "trainer.deterministic=true"]
PREEMPTED += ["trainer.num_sanity_val_steps=0", "trainer.limit_val_batches=1"]
SIGNALLED_AT = 1  # the run stops after the batch of this step, with last.ckpt at the next one


@pytest.fixture(scope="module")
def uninterrupted_ddp_run(tmp_path_factory, data_root, cifar_archive):
    run_dir = tmp_path_factory.mktemp("uninterrupted_ddp") / "run"
    data = [f"data.root={data_root}", f"data.path={cifar_archive}"]
    run_cli([*PREEMPTED, *data, f"hydra.run.dir={run_dir}"], cwd=REPO)
    return run_dir


def is_running(pid: int) -> bool:
    """Whether the process exists and is not a zombie waiting to be reaped."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    status = Path(f"/proc/{pid}/status")
    return not (status.exists() and "State:\tZ" in status.read_text())


@pytest.mark.parametrize(
    ("signum", "rank"),
    [(signal.SIGTERM, 0), (signal.SIGINT, 0), (signal.SIGTERM, 1)],
    ids=["SIGTERM-launcher", "SIGINT-launcher", "SIGTERM-rank1"],
)
def test_signal_to_a_ddp_run_stops_every_rank_at_one_step_and_resumes_exactly(
    signum, rank, uninterrupted_ddp_run, tmp_path, data_overrides
):
    run_dir, pause = tmp_path / "run", tmp_path / "pause"
    pause_at = (
        f"+callbacks.pause_at_step={{_target_:tests.pause_at_step.PauseAtStep,"
        f"folder:'{pause}',step:{SIGNALLED_AT},rank:{rank}}}"
    )
    command = [sys.executable, "-m", "resnet_lightning", *PREEMPTED, *data_overrides, pause_at]
    errors = tmp_path / "stderr.txt"  # a file, not a pipe that nobody reads while it trains
    with errors.open("w") as stderr:
        launcher = subprocess.Popen(
            [*command, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            start_new_session=True,  # its ranks and nothing else in one process group
        )
    try:
        deadline = time.monotonic() + 300
        while not (pause / "paused").exists():  # rank `rank` waits before step 1's batch
            assert launcher.poll() is None and time.monotonic() < deadline, "ended too soon"
            time.sleep(0.05)
        pids = [int((pause / f"rank{r}.pid").read_text()) for r in (0, 1)]
        assert pids[0] == launcher.pid  # Lightning's launcher: rank 0 is the launching process
        os.kill(pids[rank], signum)
        (pause / "go").touch()
        launcher.wait(timeout=300)
        assert launcher.returncode == 128 + signum, errors.read_text()[-3000:]
        assert not any(is_running(pid) for pid in pids)  # the launcher waited for rank 1
    finally:  # whatever a failure left running
        with contextlib.suppress(ProcessLookupError):
            os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()
    last = run_dir / "checkpoints" / "last.ckpt"
    said = errors.read_text().strip().splitlines()[-1]
    name, step = signal.Signals(signum).name, SIGNALLED_AT + 1
    assert said.startswith(f"error: stopped by {name} at step {step} (epoch 0); saved {last}")
    assert torch.load(last, weights_only=True)["global_step"] == SIGNALLED_AT + 1
    assert not (run_dir / "metrics.json").exists()

    # The pause callback is a test's, not a trusted class: the resumed run goes without it.
    run_cli(["resume=auto", f"hydra.run.dir={run_dir}", "+callbacks.pause_at_step=null"], REPO)
    assert read_metrics(run_dir) == read_metrics(uninterrupted_ddp_run)
    final, expected = weights(last), weights(uninterrupted_ddp_run / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
