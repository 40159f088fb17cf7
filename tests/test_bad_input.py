"""Every kind of bad input ends the run with one `error:` line naming the fix, exit code 2, no
traceback and no metrics.json or checkpoint. Most go through the CLI's entry point in this
process (no interpreter start-up); one case runs as a real subprocess."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import pickle
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml

from resnet_lightning.models import create_model
from tests.cli_harness import REPO, TINY, run_cli, run_main, without_callbacks

# Batches of 8, one validation and test batch, and no callbacks but the checkpoints.
FAST = [
    *TINY,
    *without_callbacks("model_checkpoint", "last_checkpoint"),
    "model=resnet20",
    "data.batch_size=8",
]
FAST += ["trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]


class RunsCodeWhenLoaded:
    """What a malicious checkpoint holds: unpickling it runs a shell command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def assert_one_line_error(code: int, stderr: str, expected: str, run_dir: Path) -> str:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 2, stderr
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    assert expected in errors[0], errors[0]
    assert "Traceback" not in stderr, stderr
    assert not (run_dir / "metrics.json").exists()
    assert not list(run_dir.glob("checkpoints/*"))
    return errors[0]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=resnet999", "model=resnet999 is unknown"),
        ("model.nonsense=1", "model.nonsense is not an option"),
        ("+model.nonsense=1", "unexpected keyword argument 'nonsense'"),
        ("optimizer.lr=0", "optimizer.lr=0 must be positive"),
        ("optimizer.lr=-0.1", "optimizer.lr=-0.1 must be positive"),
        ("trainer.max_epochs=0", "trainer.max_epochs=0 must be positive"),
        ("trainer.max_epochs=ten", "trainer.max_epochs='ten' must be a number"),
        ("data.batch_size=-8", "data.batch_size=-8 must be positive"),
        ("data.mixup_alpha=-0.2", "data.mixup_alpha=-0.2 is negative; 0 turns it off"),
        ("data.mix_prob=1.5", "data.mix_prob=1.5 is a probability: it must be in [0, 1]"),
        ("model.drop_path=1.0", "drop_path must be in [0, 1) (0: off), got 1.0"),
        ("data.policy=autoaugmnet", "data.policy='autoaugmnet' is unknown; use one of none,"),
        ("data.randaugment_m=31", "data.randaugment_m=31 must be a bin in 0..30"),
        ("data.random_erasing=1.5", "data.random_erasing=1.5 must be a probability in [0, 1]"),
        ("data.flip=alternating", "data.flip='alternating' needs data.pipeline=tensor; set it"),
        ("data.pad_mode=edge", "data.pad_mode='edge' is unknown; use one of zeros, reflect"),
        ("module.norm_bias_lr_scale=0", "module.norm_bias_lr_scale=0 must be positive"),
        ("module.test_time_translate=-1", "module.test_time_translate=-1 must be >= 0 pixels"),
        ("module.progressive_min_size=-8", "module.progressive_min_size=-8 must be >= 0 pixels"),
        (
            "module.progressive_ramp=[0.8,0.4]",
            "module.progressive_ramp=[0.8, 0.4] must be two positions 0 <= start <= end <= 1",
        ),
        ("trainer.devices=0", "Trainer(devices=0)"),
        ("trainer.precision=bf17-mixed", "trainer: Precision 'bf17-mixed' is invalid. Allowed"),
        ("trainer=ddp", "no CUDA GPU; use trainer=cpu, or trainer=ddp_cpu for DDP on the CPU"),
        ("resume=/no/such/last.ckpt", "resume=/no/such/last.ckpt: no such checkpoint file"),
    ],
)
def test_bad_value_is_one_line(override, expected, tmp_path, data_overrides, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    args = [*FAST, *data_overrides, override, f"hydra.run.dir={run_dir}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert_one_line_error(code, stderr, expected, run_dir)


@pytest.mark.slow  # make test-all
def test_unknown_model_from_the_shell_lists_the_models(tmp_path):
    result = run_cli(["model=resnet999", f"hydra.run.dir={tmp_path}/run"], cwd=REPO, check=False)
    # Fails while composing the config: the error line is all that is printed.
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert line.startswith("error: model=resnet999 is unknown") and "resnet50," in line


def test_corrupt_checkpoint(tmp_path, data_overrides, capfd, monkeypatch):
    state = {"state_dict": create_model("resnet20").state_dict()}
    torch.save(state, tmp_path / "whole.ckpt")
    data = (tmp_path / "whole.ckpt").read_bytes()
    (tmp_path / "half.ckpt").write_bytes(data[: len(data) // 2])  # a copy cut short
    run_dir = tmp_path / "run"
    args = [*FAST, *data_overrides, f"resume={tmp_path}/half.ckpt"]
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert_one_line_error(code, stderr, "half.ckpt is corrupt or incomplete", run_dir)


@pytest.mark.parametrize("given_as", ["resume", "model.pretrained"])
@pytest.mark.parametrize("layout", ["torch.save", "raw pickle"])
def test_file_that_runs_code_is_refused(
    given_as, layout, tmp_path, data_overrides, capfd, monkeypatch
):
    marker, crafted = tmp_path / "code-ran", tmp_path / "crafted.pth"
    payload = {"state_dict": {}, "epoch": RunsCodeWhenLoaded(marker)}
    if layout == "torch.save":
        torch.save(payload, crafted)
    else:
        crafted.write_bytes(pickle.dumps(payload, protocol=2))  # what torch.load expects
    run_dir = tmp_path / "run"
    args = [*FAST, *data_overrides, f"{given_as}={crafted}", f"hydra.run.dir={run_dir}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    line = assert_one_line_error(code, stderr, "refusing to load", run_dir)
    assert "(posix.system)" in line
    assert not marker.exists()


def test_archive_with_unsafe_entry_is_refused(tmp_path, capfd, monkeypatch):
    archive = tmp_path / "evil.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("../../outside.png")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"\x89PNG"))
    run_dir = tmp_path / "run"
    args = [*FAST, f"data.path={archive}", f"data.root={tmp_path}/cache"]
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert_one_line_error(code, stderr, "unsafe entry '../../outside.png'", run_dir)
    assert not (tmp_path.parent / "outside.png").exists()


def test_nan_loss_stops_at_once_naming_the_step(tmp_path, data_overrides, capfd, monkeypatch):
    run_dir = tmp_path / "run"
    # Without the default run's warm-up, which starts from lr / 100 and so delays the blow-up.
    args = [*FAST, *data_overrides, "optimizer.lr=1e10", "module.warmup_epochs=0"]
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    line = assert_one_line_error(code, stderr, "the training loss became nan at step", run_dir)
    assert "lower optimizer.lr (it was 1e+10)" in line


def mounted_tmpfs(folder: Path, options: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    mount = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)]
    if sys.platform != "linux" or subprocess.run(mount, capture_output=True).returncode != 0:
        pytest.skip("needs permission to mount a tmpfs")
    return folder


@pytest.fixture
def full_disk(tmp_path):
    """A 1 MB tmpfs: a ResNet-20 checkpoint (2 MB) does not fit."""
    disk = mounted_tmpfs(tmp_path / "disk", "size=1m")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a log file may stay open


@pytest.fixture
def read_only_disk(tmp_path):
    """A read-only file system: even root cannot write there (unlike a chmod'ed folder)."""
    disk = mounted_tmpfs(tmp_path / "read_only", "ro,size=1m")
    yield disk
    subprocess.run(["umount", "--lazy", str(disk)], check=True)  # a log file may stay open


def test_disk_full_at_start_is_one_line_and_leaves_nothing(full_disk, capfd, monkeypatch):
    (full_disk / "fill").write_bytes(bytes(2**20 - 4096))  # as full as it gets
    with open(full_disk / "fill", "ab") as fill, contextlib.suppress(OSError):
        fill.write(bytes(2**20))
    run_dir = full_disk / "run"
    code, stderr = run_main(["trainer=cpu", f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 2 and stderr.strip().splitlines()[-1].startswith("error: the disk is full")
    assert "Traceback" not in stderr, stderr
    assert not run_dir.exists()  # no empty config.yaml or train.log left behind


def test_read_only_run_directory_is_one_line(read_only_disk, capfd, monkeypatch):
    run_dir = read_only_disk / "run"
    code, stderr = run_main(["trainer=cpu", f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 2 and "Traceback" not in stderr, stderr
    assert stderr.strip().splitlines()[-1] == (
        f"error: cannot write {run_dir} (Read-only file system); make it writable, or point "
        "hydra.run.dir (and data.root) at a writable folder"
    )


def test_read_only_checkpoint_folder_is_one_line(
    read_only_disk, tmp_path, data_overrides, capfd, monkeypatch
):
    run_dir = tmp_path / "run"
    args = [*FAST, *data_overrides, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"]
    args.append(f"callbacks.model_checkpoint.dirpath={read_only_disk}")
    code, stderr = run_main(args, capfd, monkeypatch)
    line = assert_one_line_error(code, stderr, "cannot write (Read-only file system)", run_dir)
    assert f"checkpoint {read_only_disk}/" in line


@pytest.mark.parametrize("damage", ["truncated", "not a torch file"])
def test_bad_pretrained_file_is_one_line(damage, tmp_path, data_overrides, capfd, monkeypatch):
    weights = tmp_path / "weights.pth"
    torch.save(create_model("resnet20").state_dict(), weights)
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"hello" * 100)
    run_dir = tmp_path / "run"
    args = [*FAST, *data_overrides, f"model.pretrained={weights}", f"hydra.run.dir={run_dir}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert_one_line_error(code, stderr, f"model: weights file {weights} is corrupt", run_dir)


def test_full_disk_while_writing_a_checkpoint(
    full_disk, tmp_path, data_overrides, capfd, monkeypatch
):
    run_dir = tmp_path / "run"
    args = [*FAST, *data_overrides, "trainer.max_epochs=1"]
    args += [f"callbacks.model_checkpoint.dirpath={full_disk}", f"hydra.run.dir={run_dir}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert_one_line_error(
        code, stderr, f"the disk is full: could not write checkpoint {full_disk}", run_dir
    )
    assert list(full_disk.iterdir()) == []  # no partial file left behind


def test_pretrained_weights_offline_is_one_line(tmp_path, data_overrides, capfd, monkeypatch):
    # An empty torch hub cache and no network: the download fails at once.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    run_dir = tmp_path / "run"
    fast = [arg for arg in FAST if not arg.startswith("model=")]
    args = ["experiment=finetune_pretrained", *fast, *data_overrides]
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    line = assert_one_line_error(code, stderr, "could not download IMAGENET1K_V", run_dir)
    assert "model.pretrained=/path/to/weights.pth" in line


@pytest.mark.parametrize(
    ("override", "module", "expected"),
    [
        # The sweeper is this project's; Optuna is what the extra brings.
        ("hparams_search=optuna", "optuna", "hparams_search=optuna needs Optuna"),
        ("hydra/launcher=parallel", "hydra_plugins.hydra_joblib_launcher", "needs a Hydra plugin"),
    ],
)
def test_missing_sweep_package_names_the_install(override, module, expected, tmp_path):
    try:
        installed = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # no hydra_plugins package at all
        installed = False
    if installed:
        pytest.skip(f"{module} is installed")
    result = run_cli(["-m", override, f"hydra.sweep.dir={tmp_path}/sweep"], cwd=REPO, check=False)
    (line,) = result.stderr.strip().splitlines()
    assert result.returncode == 2
    assert expected in line and "is not installed; pip install -e '.[sweep]'" in line


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (
            "hydra.sweeper.sampler._target_=optuna.samplers.Nope",
            "hydra.sweeper.sampler._target_=optuna.samplers.Nope cannot be made",
        ),
        (
            "hydra.sweeper.pruner={_target_:optuna.pruners.Nope}",
            "hydra.sweeper.pruner._target_=optuna.pruners.Nope cannot be made",
        ),
        (
            "hydra.sweeper.params={optimizer.lr:'interval(1)'}",
            "search space: optimizer.lr=interval(1) is malformed",
        ),
        ("optimizer.nesterov_typo=choice(true,false)", "optimizer.nesterov_typo is not an option"),
        ("hydra.sweeper.storage=/proc/no/study.log", "cannot open hydra.sweeper.storage=/proc/no"),
        ("hydra.sweeper.storage=nope://x", "cannot open hydra.sweeper.storage=nope://x"),
    ],
)
def test_bad_optuna_search_is_one_line(override, expected, tmp_path, capfd, monkeypatch):
    pytest.importorskip("optuna", reason="pip install -e '.[sweep]'")
    sweep = tmp_path / "sweep"
    args = ["hparams_search=optuna", override, f"hydra.sweep.dir={sweep}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert_one_line_error(code, stderr, expected, sweep)
    assert not sweep.exists()  # no study, no job started


def test_a_study_searched_over_another_space_is_one_line(tmp_path, capfd, monkeypatch):
    optuna = pytest.importorskip("optuna", reason="pip install -e '.[sweep]'")
    from optuna.storages.journal import JournalFileBackend, JournalStorage

    journal = tmp_path / "study.log"
    storage = JournalStorage(JournalFileBackend(str(journal)))
    # A study of the same name whose trial searched the learning rate over another interval.
    study = optuna.create_study(
        study_name="resnet_lightning", storage=storage, direction="maximize"
    )
    lr = optuna.distributions.FloatDistribution(0.001, 1.0, log=True)
    study.add_trial(
        optuna.trial.create_trial(
            params={"optimizer.lr": 0.1}, distributions={"optimizer.lr": lr}, value=0.5
        )
    )
    sweep = tmp_path / "sweep"
    args = ["hparams_search=optuna", f"hydra.sweeper.storage={journal}", f"hydra.sweep.dir={sweep}"]
    code, stderr = run_main(args, capfd, monkeypatch)
    line = assert_one_line_error(code, stderr, "searches another space than this sweep", sweep)
    assert "data.batch_size: not searched in the study" in line
    assert len(study.get_trials()) == 1 and not sweep.exists()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, data_root, cifar_archive) -> Path:
    """The last.ckpt of a tiny real run, to be tampered with."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    data = [f"data.root={data_root}", f"data.path={cifar_archive}"]
    run_cli([*FAST, *data, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}"], cwd=REPO)
    return run_dir / "checkpoints" / "last.ckpt"


def write_file_with(marker: Path) -> dict:
    """What an attacker puts in a saved config: print(..., file=open(marker, 'w'))."""
    opened = {"_target_": "builtins.open", "file": str(marker), "mode": "w"}
    return {"_target_": "builtins.print", "_args_": ["import os"], "file": opened}


@pytest.mark.parametrize(
    "where",
    ["group", "nested", "imported class", "list element", "interpolation", "hydra config.yaml"],
)
def test_checkpoint_config_cannot_call_arbitrary_targets(
    where, trained_checkpoint, tmp_path, capfd, monkeypatch
):
    from resnet_lightning.tools.evaluate import main as evaluate_main

    checkpoint = torch.load(trained_checkpoint, weights_only=True)
    config, marker = checkpoint["run_config"], tmp_path / "evil.pth"
    if where == "group":  # the crafted file of the report: the optimizer writes a file
        config["optimizer"] = write_file_with(marker)
        key = "optimizer"
    elif where == "nested":  # a trusted class whose argument is built from an untrusted one
        config["optimizer"]["weight_decay"] = write_file_with(marker)
        key = "optimizer.weight_decay"
    elif where == "imported class":  # a class a trusted module imports, not one it defines
        target = "resnet_lightning.data.cifar.zipfile.ZipFile"
        config["optimizer"]["weight_decay"] = {"_target_": target, "file": str(marker), "mode": "w"}
        key = "optimizer.weight_decay"
    elif where == "list element":
        config["trainer"]["plugins"] = [write_file_with(marker)]
        key = "trainer.plugins[0]"
    else:  # an interpolation that resolves to the target
        config["notes"] = "builtins.print"
        config["optimizer"]["_target_"] = "${notes}"
        key = "optimizer"
    ckpt = tmp_path / "crafted.ckpt"
    if where == "hydra config.yaml":  # a checkpoint without its own config: the run's is read
        del checkpoint["run_config"]
        run_dir = tmp_path / "run"
        (run_dir / ".hydra").mkdir(parents=True)
        config["optimizer"] = write_file_with(marker)
        (run_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
        hydra = {"hydra": {"runtime": {"cwd": str(REPO)}}}
        (run_dir / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump(hydra))
        (run_dir / "checkpoints").mkdir()
        ckpt = run_dir / "checkpoints" / "crafted.ckpt"
        key = "optimizer"
    torch.save(checkpoint, ckpt)

    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main([f"ckpt_path={ckpt}", "trainer.limit_test_batches=1"])
    (line,) = capfd.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2
    assert line.startswith("error: refusing ") and f" at {key}, " in line, line
    assert "builtins." in line or "zipfile.ZipFile" in line
    assert not marker.exists()


def test_resume_auto_refuses_saved_overrides_that_call_arbitrary_targets(
    trained_checkpoint, tmp_path, data_overrides, capfd, monkeypatch
):
    marker = tmp_path / "evil.pth"
    run_dir = trained_checkpoint.parent.parent
    saved = run_dir / ".hydra" / "overrides.yaml"
    original = saved.read_text()
    evil = f"+callbacks.evil={{_target_:builtins.open,file:'{marker}',mode:w}}"
    try:
        for crafted, expected in (
            (evil, "its config names _target_ 'builtins.open' at callbacks.evil"),
            ("hydra.searchpath=[file:///tmp]", "it sets Hydra's own hydra.searchpath"),
            # A Hydra flag: --experimental-rerun unpickles the file it names.
            (f"--experimental-rerun={marker}", "it holds --experimental-rerun"),
        ):
            saved.write_text(yaml.safe_dump([*yaml.safe_load(original), crafted]))
            args = ["resume=auto", f"hydra.run.dir={run_dir}", *data_overrides]
            code, stderr = run_main(args, capfd, monkeypatch)
            assert code == 2 and "error: refusing " in stderr and expected in stderr, stderr
            assert not marker.exists()
    finally:
        saved.write_text(original)


@pytest.mark.parametrize("holds", ["checkpoints", "nothing"])
def test_resume_auto_without_saved_overrides_is_refused(holds, tmp_path, capfd, monkeypatch):
    # Killed before Hydra wrote .hydra/: resuming would silently run the default config.
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    if holds == "checkpoints":
        torch.save({"state_dict": {}}, run_dir / "checkpoints" / "last.ckpt")
    code, stderr = run_main(["resume=auto", f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    expected = (
        "has checkpoints but no saved config" if holds == "checkpoints" else "no run to resume"
    )
    assert code == 2 and stderr.strip().splitlines() == [stderr.strip()], stderr
    assert stderr.startswith("error: resume=auto: ") and expected in stderr, stderr
    assert not (run_dir / ".hydra").exists() and not (run_dir / "metrics.json").exists()


def test_resume_auto_in_a_new_directory_starts_fresh(tmp_path, data_overrides, capfd, monkeypatch):
    run_dir = tmp_path / "new"
    args = [
        *FAST,
        *data_overrides,
        "trainer.max_epochs=1",
        "resume=auto",
        f"hydra.run.dir={run_dir}",
    ]
    code, stderr = run_main(args, capfd, monkeypatch)
    assert code == 0, stderr
    assert json.loads((run_dir / "metrics.json").read_text())["epochs"] == 1


@pytest.mark.parametrize(
    ("config", "extra"),
    [("hydra/sweeper/optuna", "sweep"), ("hydra/launcher/submitit_slurm", "slurm")],
)
def test_a_missing_plugin_config_names_its_extra(config, extra):
    # What Hydra raises when the plugin that brings the config is not installed.
    from hydra.errors import MissingConfigException

    from resnet_lightning.errors import describe_bad_input

    err = MissingConfigException("not found", missing_cfg_file=config, options=["basic"])
    group, _, name = config.rpartition("/")
    assert describe_bad_input(err) == (
        f"{group}={name} needs a Hydra plugin that is not installed; pip install -e '.[{extra}]'"
    )
