"""Never lose a run: a SIGKILLed run resumes to the same result as one that never stopped, every
checkpoint save is atomic, and eval rebuilds the model from the run's own config."""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from resnet_lightning.callbacks.checkpoints import PARTIAL_SUFFIX, remove_partial_checkpoints
from resnet_lightning.callbacks.divergence import DivergenceGuard
from resnet_lightning.data import load_cifar10
from resnet_lightning.tools import evaluate as evaluation
from resnet_lightning.training.module import ImageClassifier
from tests.cli_harness import (
    CLASSES,
    REPO,
    TINY,
    cli_env,
    read_metrics,
    run_cli,
    run_main,
    train_loss_curve,
    weights,
    without_callbacks,
)

# Non-default model options (projection shortcuts change the weights' names), seed 0, and
# deterministic kernels: three epochs of three batches.
RUN = [
    *TINY,
    *without_callbacks("model_checkpoint", "last_checkpoint"),
    "model=resnet20",
    "model.shortcut=B",
]
RUN += ["optimizer.lr=0.05", "seed=0"]
RUN += ["trainer.deterministic=true", "trainer.max_epochs=3", "data.batch_size=8"]
TEST_KEYS = ("test/acc", "test/acc_top5", "test/loss")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root, cifar_archive):
    """A run that was never interrupted: its directory and the CLI's output."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    data = [f"data.root={data_root}", f"data.path={cifar_archive}"]
    result = run_cli([*RUN, *data, f"hydra.run.dir={run_dir}"], cwd=REPO)
    return run_dir, result


def test_seed_zero_is_used(finished_run):
    _, result = finished_run
    assert "Seed set to 0" in result.stderr + result.stdout


@pytest.mark.slow  # make test-all
def test_killed_run_resumes_to_the_same_result(finished_run, tmp_path, data_overrides):
    uninterrupted, _ = finished_run
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "resnet_lightning", *RUN, *data_overrides]
    run = subprocess.Popen(
        [*command, f"hydra.run.dir={run_dir}"],
        cwd=REPO,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.exists():  # the first checkpoint: end of epoch 0
        assert run.poll() is None and time.monotonic() < deadline, "the run ended too soon"
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    run.wait()
    assert not (run_dir / "metrics.json").exists()
    assert torch.load(last, weights_only=True)["epoch"] >= 0  # complete, loadable

    # Only the run directory: resume=auto takes the run's saved overrides.
    run_cli(["resume=auto", f"hydra.run.dir={run_dir}"], cwd=REPO)

    assert read_metrics(run_dir) == read_metrics(uninterrupted)
    final, expected = weights(last), weights(uninterrupted / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)
    # The resumed run's TensorBoard curve continues the killed one's: every step, same values.
    resumed_curve, curve = train_loss_curve(run_dir), train_loss_curve(uninterrupted)
    assert sorted(resumed_curve) == sorted(curve) == list(range(9))
    assert resumed_curve == pytest.approx(curve, rel=1e-6)


def test_kill_during_a_save_never_truncates_the_checkpoint(tmp_path):
    # Saves a 40 MB checkpoint over and over until killed, through the trainer's CheckpointIO.
    saver = (
        "import sys, torch\n"
        "from resnet_lightning.callbacks.checkpoints import AtomicCheckpointIO\n"
        "io, step = AtomicCheckpointIO(), 0\n"
        "while True:\n"
        "    state = {'state_dict': {'w': torch.full((10_000_000,), float(step))}, 'step': step}\n"
        "    io.save_checkpoint(state, sys.argv[1])\n"
        "    step += 1\n"
    )
    last = tmp_path / "last.ckpt"
    process = subprocess.Popen([sys.executable, "-c", saver, str(last)])
    deadline = time.monotonic() + 120
    while not last.exists():
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.01)
    time.sleep(0.5)  # several saves later, most likely in the middle of one
    process.send_signal(signal.SIGKILL)
    process.wait()
    checkpoint = torch.load(last, weights_only=True)
    assert torch.equal(checkpoint["state_dict"]["w"], torch.full((10_000_000,), checkpoint["step"]))
    remove_partial_checkpoints(tmp_path)  # what resume=auto does with a killed save's file
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    assert PARTIAL_SUFFIX not in last.name


def test_eval_rebuilds_the_run_model_and_reproduces_its_test(finished_run, capsys):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # `python -m resnet_lightning.eval ckpt_path=...`, in this process. Built from today's
    # defaults (model=resnet50, shortcut A) the checkpoint would not even load.
    # eval tests the whole test set unless told otherwise; the run tested 2 batches of 8.
    ckpt = f"ckpt_path={metrics['best_checkpoint']}"
    evaluation.main([ckpt, "trainer.limit_test_batches=2", "batch_size=8"])
    reported = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert reported == pytest.approx({k: metrics[k] for k in TEST_KEYS}, rel=1e-6)


def test_eval_tests_in_inference_sized_batches(finished_run, capsys):
    run_dir, _ = finished_run
    ckpt = f"ckpt_path={json.loads((run_dir / 'metrics.json').read_text())['best_checkpoint']}"
    # One batch by default is the first 256 test images (the run trained in batches of 8).
    evaluation.main([ckpt, "trainer.limit_test_batches=1"])
    default = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    evaluation.main([ckpt, "trainer.limit_test_batches=32", "data.batch_size=8"])
    same_images = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert default == pytest.approx(same_images, rel=1e-5)


def write_test_images(folder: Path, arrays, indices: range, suffix: str = ".png") -> list[Path]:
    """Real CIFAR-10 test images (those at `indices`) as files in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    files = [folder / f"test{i:02d}{suffix}" for i in indices]
    for i, file in zip(indices, files, strict=True):
        Image.fromarray(arrays.test_images[i].numpy()).save(file)
    return files


def test_predict_prints_the_top5_classes(finished_run, data_root, cifar_archive, tmp_path, capsys):
    run_dir, _ = finished_run
    arrays = load_cifar10(data_root, cifar_archive)
    files = write_test_images(tmp_path, arrays, range(2))
    # A picture of another size is brought to 32 px first.
    Image.fromarray(arrays.test_images[2].numpy()).resize((80, 60)).save(tmp_path / "large.jpg")
    files.append(tmp_path / "large.jpg")

    images = f"predict=[{','.join(map(str, files))}]"
    evaluation.main([f"ckpt_path={run_dir}/checkpoints/last.ckpt", images])
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == list(map(str, files))
    for line in lines:
        pairs = [entry.rsplit(" ", 1) for entry in line.split(": ", 1)[1].split(", ")]
        names, probabilities = [n for n, _ in pairs], [float(p) for _, p in pairs]
        assert len(names) == 5 and set(names) <= set(CLASSES)
        assert probabilities == sorted(probabilities, reverse=True) and sum(probabilities) <= 1.001
    assert not (tmp_path / "predictions.csv").exists()  # image files: the console only


def test_predict_folder_writes_a_csv_of_the_top5(finished_run, data_root, cifar_archive, tmp_path):
    run_dir, _ = finished_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    arrays = load_cifar10(data_root, cifar_archive)
    photos = tmp_path / "photos"
    # 20 JPEGs, two in a subfolder: batches of 8 leave a last one of 4.
    files = write_test_images(photos, arrays, range(18), ".jpg")
    files += write_test_images(photos / "more", arrays, range(18, 20), ".jpg")
    (photos / "notes.txt").write_text("not an image")  # skipped: not an image suffix

    result = run_cli(
        [f"ckpt_path={ckpt}", "predict=photos", "batch_size=8"],
        cwd=tmp_path,
        command="resnet_lightning.eval",
    )
    csv_path = tmp_path / "predictions.csv"  # the default: in the current directory
    assert result.stdout.strip().splitlines()[-1] == (
        f"predicted 20 images: top-5 classes in {csv_path}"
    )
    with csv_path.open(newline="") as file:
        rows = list(csv.DictReader(file))
    header = ["file"] + [f"{key}{rank}" for rank in range(1, 6) for key in ("class", "prob")]
    assert list(rows[0]) == header
    assert sorted(row["file"] for row in rows) == sorted(
        str(f.relative_to(tmp_path)) for f in files
    )
    # predict(), one image at a time, agrees with the CSV's batches of 8.
    expected = {
        str(p.file.relative_to(tmp_path)): p.top5
        for p in evaluation.predict(ckpt, files, batch_size=1)
    }
    for row in rows:
        names = [row[f"class{rank}"] for rank in range(1, 6)]
        probabilities = [float(row[f"prob{rank}"]) for rank in range(1, 6)]
        assert len(set(names)) == 5 and set(names) <= set(CLASSES)
        assert probabilities == sorted(probabilities, reverse=True)
        assert 0 < sum(probabilities) <= 1 + 1e-5
        top1, p1 = expected[row["file"]][0]
        assert names[0] == top1 and probabilities[0] == pytest.approx(p1, rel=1e-4)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_predict_folder_with_an_unreadable_image_writes_nothing(
    finished_run, data_root, cifar_archive, tmp_path, capfd
):
    run_dir, _ = finished_run
    arrays = load_cifar10(data_root, cifar_archive)
    write_test_images(tmp_path / "photos", arrays, range(3), ".jpg")
    broken = tmp_path / "photos" / "test02.jpg"  # in the second batch
    broken.write_bytes(broken.read_bytes()[:20])  # truncated
    out = tmp_path / "out" / "predictions.csv"
    args = [f"ckpt_path={run_dir}/checkpoints/last.ckpt", f"predict={tmp_path / 'photos'}"]

    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([*args, f"output={out}", "batch_size=2"])
    (line,) = capfd.readouterr().err.strip().splitlines()[-1:]
    assert exit_info.value.code == 2
    assert (
        line.startswith(f"error: could not read image {broken} (") and "nothing was written" in line
    )
    assert not out.parent.exists() or list(out.parent.iterdir()) == []

    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([*args, "batch_size=0"])
    assert exit_info.value.code == 2 and capfd.readouterr().err.strip() == (
        "error: batch_size=0 must be a positive whole number, e.g. batch_size=256"
    )


def test_checkpoint_of_another_model_is_refused(
    finished_run, tmp_path, data_overrides, capfd, monkeypatch
):
    run_dir, _ = finished_run
    last = run_dir / "checkpoints" / "last.ckpt"
    message = f"checkpoint {last} is for model=resnet20 but this run builds model=resnet32"

    args = [*RUN, *data_overrides, "model=resnet32", f"resume={last}", f"hydra.run.dir={tmp_path}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert (
        code == 2
        and stderr.strip().splitlines()[-1]
        == f"error: {message}; pass model=resnet20 or a checkpoint of resnet32"
    )
    assert not (tmp_path / "metrics.json").exists()

    with pytest.raises(SystemExit) as exit_info:
        evaluation.main([f"ckpt_path={last}", "model.name=resnet32"])
    assert exit_info.value.code == 2 and message in capfd.readouterr().err


# The `_target_`s a checkpoint's config named before the package took its layered layout.
TARGETS_BEFORE_LAYERS = {
    "data": "resnet_lightning.datamodule.CifarDataModule",
    "module": "resnet_lightning.module.ImageClassifier",
    "callbacks.confusion_matrix": "resnet_lightning.tensorboard_figures.ConfusionMatrixFigure",
    "callbacks.augmented_images": "resnet_lightning.tensorboard_figures.AugmentedImageGrid",
    "callbacks.stage_grad_norms": "resnet_lightning.tensorboard_figures.StageGradientNorms",
    "callbacks.parameter_distribution": (
        "resnet_lightning.tensorboard_figures.ParameterDistribution"
    ),
    "callbacks.epoch_timer": "resnet_lightning.timing.EpochTimer",
    "callbacks.host_syncs": "resnet_lightning.host_syncs.HostSyncCounter",
}


def test_checkpoint_written_before_the_layered_layout_evaluates_and_resumes(
    finished_run, tmp_path, data_overrides, capfd, monkeypatch
):
    run_dir, _ = finished_run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    checkpoint = torch.load(metrics["best_checkpoint"], weights_only=True)
    config = checkpoint["run_config"]
    for key, target in TARGETS_BEFORE_LAYERS.items():
        group, _, name = key.partition(".")
        if name:  # the run switched its callbacks off: an old config names them all the same
            config[group][name] = {**(config[group].get(name) or {}), "_target_": target}
        else:
            config[group]["_target_"] = target
    old = tmp_path / "old.ckpt"
    torch.save(checkpoint, old)

    evaluation.main([f"ckpt_path={old}", "trainer.limit_test_batches=2", "batch_size=8"])
    reported = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert reported == pytest.approx({k: metrics[k] for k in TEST_KEYS}, rel=1e-6)

    # resume=<old checkpoint> continues it for one more epoch.
    args = [*RUN, *data_overrides, "trainer.max_epochs=4", f"resume={old}"]
    code, stderr = run_main([*args, f"hydra.run.dir={tmp_path / 'resumed'}"], capfd, monkeypatch)
    assert code == 0, stderr
    assert json.loads((tmp_path / "resumed" / "metrics.json").read_text())["epochs"] == 4


def test_run_directory_written_before_the_layered_layout_evaluates_and_resumes(
    finished_run, tmp_path, capfd, monkeypatch
):
    run_dir = tmp_path / "old_run"
    shutil.copytree(finished_run[0], run_dir)
    # Its config names the classes where they were; its checkpoint carries no config of its own.
    config = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    config["data"]["_target_"] = TARGETS_BEFORE_LAYERS["data"]
    config["module"]["_target_"] = TARGETS_BEFORE_LAYERS["module"]
    (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    last = run_dir / "checkpoints" / "last.ckpt"
    checkpoint = torch.load(last, weights_only=True)
    del checkpoint["run_config"]
    torch.save(checkpoint, last)
    # The benchmark used to add its epoch timer by its old name; resume=auto reads it back.
    timer = (
        f"{{_target_:{TARGETS_BEFORE_LAYERS['callbacks.epoch_timer']},path:'{tmp_path}/t.json'}}"
    )
    overrides = yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text())
    overrides.append(f"+callbacks.epoch_timer={timer}")
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))

    evaluation.main([f"ckpt_path={last}", "trainer.limit_test_batches=2"])
    reported = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    assert set(reported) == set(TEST_KEYS)

    args = ["resume=auto", f"hydra.run.dir={run_dir}", "trainer.max_epochs=4"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 4
    assert len(json.loads((tmp_path / "t.json").read_text())["epoch_s"]) == 1


# Options whose random draws a mid-epoch resume must repeat: Mixup and CutMix (drawn per
# batch on the training device), and loader workers (each image's crop and flip drawn in a
# worker process). The tensor pipeline has no workers: it ignores data.num_workers.
MIXING = ["data.mixup_alpha=0.4", "data.cutmix_alpha=1.0"]
WORKERS = ["data.num_workers=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`run(args, capfd, monkeypatch)`: the directory of a run with `args` that was never
    interrupted, made once per module for all the tests that compare against it."""
    runs: dict[tuple[str, ...], Path] = {}

    def run(args: list[str], capfd, monkeypatch) -> Path:
        if tuple(args) not in runs:
            run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
            code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
            assert code == 0, stderr
            runs[tuple(args)] = run_dir
        return runs[tuple(args)]

    return run


@pytest.mark.parametrize(
    ("pipeline", "signum", "options"),
    [
        pytest.param("torchvision", signal.SIGTERM, [], marks=pytest.mark.slow),
        ("tensor", signal.SIGUSR1, []),
        pytest.param("tensor", signal.SIGINT, [], marks=pytest.mark.slow),
        pytest.param("torchvision", signal.SIGTERM, MIXING, marks=pytest.mark.slow),
        pytest.param("tensor", signal.SIGTERM, MIXING, marks=pytest.mark.slow),
        pytest.param("torchvision", signal.SIGTERM, WORKERS, marks=pytest.mark.slow),
    ],
    ids=[
        "torchvision-SIGTERM",
        "tensor-SIGUSR1",
        "tensor-SIGINT",
        "torchvision-mixing",
        "tensor-mixing",
        "torchvision-workers",
    ],
)
def test_signal_mid_epoch_checkpoints_and_resumes_to_the_uninterrupted_result(
    pipeline, signum, options, uninterrupted, tmp_path, data_overrides, capfd, monkeypatch
):
    # Five batches an epoch; the signal arrives while the third batch of epoch 1 trains.
    plain = [a for a in RUN if not a.startswith("trainer.limit_train_batches=")]
    plain += ["trainer.limit_train_batches=5", f"data.pipeline={pipeline}", *data_overrides]
    args = [*plain, *options]
    reference, run_dir = uninterrupted(args, capfd, monkeypatch), tmp_path / "run"

    start_batch = DivergenceGuard.on_train_batch_start
    seen = []  # (soft targets, loader workers) of each batch trained on

    def signal_at_step_7(self, trainer, pl_module, batch, batch_idx):
        start_batch(self, trainer, pl_module, batch, batch_idx)
        seen.append((batch[1].ndim == 2, getattr(trainer.train_dataloader, "num_workers", 0)))
        if trainer.global_step == 7 and signal_armed:
            os.kill(os.getpid(), signum)  # a real signal, as `kill` or SLURM send it

    monkeypatch.setattr(DivergenceGuard, "on_train_batch_start", signal_at_step_7)
    signal_armed = True
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert code == 128 + signum, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: stopped by {signal.Signals(signum).name} at step 8 (epoch 1); saved {last}; "
        f"continue with: python -m resnet_lightning resume=auto hydra.run.dir={run_dir}"
    )
    assert not (run_dir / "metrics.json").exists()
    progress = torch.load(last, weights_only=True)["loops"]["fit_loop"]
    assert progress["epoch_loop.batch_progress"]["current"]["completed"] == 3  # mid-epoch

    signal_armed = False
    code, stderr = run_main(["resume=auto", f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 0, stderr
    assert len(seen) == 15  # 8 steps, then the 7 left
    assert read_metrics(run_dir) == read_metrics(reference)
    final, expected = weights(last), weights(reference / "checkpoints" / "last.ckpt")
    assert all(torch.equal(final[k], expected[k]) for k in expected)

    # The options took effect, before and after the resume.
    assert all(mixed == (options == MIXING) for mixed, _ in seen)
    assert all(workers == (2 if options == WORKERS else 0) for _, workers in seen)
    if options:
        without = weights(uninterrupted(plain, capfd, monkeypatch) / "checkpoints" / "last.ckpt")
        same_as_without = all(torch.equal(final[k], without[k]) for k in expected)
        # Mixing changes what is learnt; workers change nothing: each image's augmentation is
        # drawn from (seed, epoch, index), whichever process makes it.
        assert same_as_without == (options == WORKERS)


def test_resume_of_a_run_saved_every_n_steps_trains_no_step_more(
    tmp_path, data_overrides, capfd, monkeypatch
):
    # Three batches an epoch and last.ckpt every 3 steps: each save falls on an epoch's last
    # batch, as the kill soak's last one did. resume=auto of the finished run (as after a kill
    # during its test) must test the same weights, not train a step more.
    run_dir = tmp_path / "run"
    args = [*RUN, *data_overrides, "trainer.max_epochs=2"]
    args += ["callbacks.last_checkpoint.every_n_train_steps=3", f"hydra.run.dir={run_dir}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    finished, trained = read_metrics(run_dir), weights(run_dir / "checkpoints" / "last.ckpt")
    assert finished["steps"] == 6

    code, stderr = run_main(["resume=auto", f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 0, stderr
    assert read_metrics(run_dir) == finished
    resumed = weights(run_dir / "checkpoints" / "last.ckpt")
    assert all(torch.equal(resumed[k], trained[k]) for k in trained)


@pytest.mark.parametrize("during", ["validation", "testing"])
def test_signal_outside_training_steps_exits_non_zero_and_says_what_was_kept(
    during, tmp_path, data_overrides, capfd, monkeypatch
):
    run_dir = tmp_path / "run"
    step = ImageClassifier.validation_step if during == "validation" else ImageClassifier.test_step

    def signal_at_first_batch(self, batch, batch_idx):
        if batch_idx == 0 and (during == "testing" or self.current_epoch == 1):
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, batch, batch_idx)

    name = "validation_step" if during == "validation" else "test_step"
    with monkeypatch.context() as patch:
        patch.setattr(ImageClassifier, name, signal_at_first_batch)
        code, stderr = run_main(
            [*RUN, *data_overrides, f"hydra.run.dir={run_dir}"], capfd, monkeypatch
        )
    line = stderr.strip().splitlines()[-1]
    assert code == 128 + signal.SIGTERM, stderr
    assert not (run_dir / "metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    if during == "validation":  # a half-validated epoch is not saved: epoch 0's end is kept
        assert line.startswith(
            f"error: stopped by SIGTERM during validation; kept the last epoch's {last}"
        )
        assert torch.load(last, weights_only=True)["epoch"] == 0
    else:
        assert line.startswith("error: stopped by SIGTERM during testing, after training; test the")
        assert "python -m resnet_lightning.eval ckpt_path=" in line
