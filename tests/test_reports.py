"""Reports and TensorBoard figures, on a real sweep: `experiment=degradation` run tiny.

One module-scoped sweep (plain20, plain56, resnet20, resnet56, a few steps each) feeds the
TensorBoard assertions, the summary and the degradation report; a sweep of two time budgets
and two seeds feeds the summary's time-to-accuracy table and figure.
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2
from torchvision.models import get_model_weights

from resnet_lightning.callbacks.figures import plot_parameter_counts
from resnet_lightning.models import create_model
from resnet_lightning.models.complexity import count_macs, count_parameters, parameter_counts
from resnet_lightning.tools.report import compare
from resnet_lightning.tools.report.cli import main as report_main
from resnet_lightning.tools.report.runs import find_runs
from resnet_lightning.tools.report.study_figures import study_sections
from resnet_lightning.tools.report.summary import plot_validation_curves, time_to_accuracy_section
from tests.cli_harness import REPO, TINY, run_cli, without_callbacks

DEGRADATION_MODELS = ["plain20", "plain56", "resnet20", "resnet56"]
# TINY with one batch per evaluation: 2 epochs x 3 steps of 16 images per job.
SWEEP_OVERRIDES = [
    *TINY,
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=1",
    "trainer.num_sanity_val_steps=0",
]


def run_sweep(sweep_dir, overrides: list[str], data_root, cifar_archive):
    """A multirun through the CLI into `sweep_dir`, on the session's data."""
    data = [f"data.root={data_root}", f"data.path={cifar_archive}"]
    run_cli([*overrides, *data, f"hydra.sweep.dir={sweep_dir}"], cwd=REPO)
    return sweep_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, data_root, cifar_archive):
    """The degradation experiment as one command (it is a multirun by itself), made tiny."""
    overrides = ["experiment=degradation", *SWEEP_OVERRIDES]
    return run_sweep(tmp_path_factory.mktemp("degradation"), overrides, data_root, cifar_archive)


# Each job of a budget sweep gets its own budget, counted from the job's start; the first job's
# also pays for the interpreter's imports, and a budget that leaves nothing to train after
# start-up and the final test kept back is refused: hence not less than 30 s. 20 steps an epoch
# of up to 1,000 epochs: the budget, not the epochs, ends training.
BUDGETS_S = [30, 40]
BUDGET_SWEEP_OVERRIDES = [
    *TINY,
    "model=resnet20",
    "data.pipeline=tensor",
    "scheduler=linear_to_zero",
    "trainer.max_epochs=1000",
    "trainer.limit_train_batches=20",
    "trainer.limit_val_batches=0",
    "trainer.limit_test_batches=2",
    "budget=" + ",".join(f"{s}s" for s in BUDGETS_S),
    "seed=0,1",
]


@pytest.fixture(scope="module")
def budget_sweep(tmp_path_factory, data_root, cifar_archive):
    """Two time budgets by two seeds: four jobs of a multirun."""
    overrides = ["-m", *BUDGET_SWEEP_OVERRIDES, *without_callbacks()]
    return run_sweep(tmp_path_factory.mktemp("budgets"), overrides, data_root, cifar_archive)


def events(run_dir, model) -> EventAccumulator:
    # A sweep's job logs to tensorboard/<model>/: the model is what the degradation sweep varies.
    assert [p.name for p in (run_dir / "tensorboard").iterdir()] == [model]
    accumulator = EventAccumulator(
        str(run_dir / "tensorboard" / model),
        size_guidance={"scalars": 0, "images": 0, "histograms": 0},
    )
    accumulator.Reload()
    return accumulator


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(data: bytes) -> tuple[int, int]:
    """A real PNG that decodes; returns its size."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    image = Image.open(io.BytesIO(data))
    image.load()
    assert image.width > 50 and image.height > 50
    return image.size


def test_degradation_runs_all_four_networks_in_one_command(sweep):
    jobs = sorted(p for p in sweep.iterdir() if (p / "metrics.json").exists())
    assert [p.name for p in jobs] == ["0", "1", "2", "3"]
    configs = [yaml.safe_load((p / ".hydra" / "config.yaml").read_text()) for p in jobs]
    assert [c["model"]["name"] for c in configs] == DEGRADATION_MODELS
    for job, config in zip(jobs, configs, strict=True):
        assert config["trainer"]["max_steps"] == 64000  # paper_cifar, cut short by TINY
        assert config["scheduler"]["milestones"] == [32000, 48000]
        assert json.loads((job / "metrics.json").read_text())["steps"] == 6


@pytest.mark.parametrize("job, model", [("1", "plain56"), ("3", "resnet56")])
def test_tensorboard_has_scalars_hparams_and_figures(sweep, job, model):
    run = events(sweep / job, model)
    tags = run.Tags()
    stages = ["conv1", "bn1", "layer1", "layer2", "layer3", "fc"]
    expected_scalars = {
        "train/loss",
        "train/acc",
        "train/acc_top5",
        "val/loss",
        "val/acc",
        "val/acc_top5",
        "test/acc",
        "test/acc_top5",
        "lr-SGD",
        "hp/test_acc",
        "hp/val_acc",
        "hp/params",
        *(f"grad_norm/{s}" for s in stages),
    }
    assert expected_scalars <= set(tags["scalars"]), tags["scalars"]
    # Gradient norms at every optimizer step (log_every_n_steps=1), positive and finite.
    norms = run.Scalars("grad_norm/layer1")
    assert [e.step for e in norms] == list(range(6))
    assert all(0 < e.value < float("inf") for e in norms)

    images = {
        "test/confusion_matrix",
        "train/augmented_images",
        "grad_norm/stages",
        "model/parameters",
    }
    assert images <= set(tags["images"]), tags["images"]
    for tag in images:
        assert_png(run.Images(tag)[-1].encoded_image_string)
    # 16 images of 32 px, 8 a row, 2 px padding: make_grid's 274 x 70.
    grid = run.Images("train/augmented_images")[0]
    assert (grid.width, grid.height) == (274, 70)
    assert {f"weights/{s}" for s in ("conv1", "layer1", "layer3", "fc")} <= set(tags["histograms"])

    metrics = json.loads((sweep / job / "metrics.json").read_text())
    assert run.Scalars("hp/test_acc")[-1].value == pytest.approx(metrics["test/acc"])
    content = run.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    hparams = start.session_start_info.hparams
    assert hparams["model"].string_value == model
    assert hparams["experiment"].string_value == "degradation"
    assert hparams["optimizer.lr"].number_value == 0.1
    assert hparams["data.batch_size"].number_value == 16
    assert hparams["scheduler"].string_value == "MultiStepLR"
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"])
    metric_tags = {m.name.tag for m in experiment.experiment.metric_infos}
    assert {"hp/test_acc", "hp/test_acc_top5", "hp/val_acc", "hp/wall_time_s"} <= metric_tags


def test_summary_is_a_sorted_table_and_a_plot(sweep, tmp_path, capsys):
    assert report_main([str(sweep), "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed == [
        str(tmp_path / f) for f in ("summary.md", "summary.csv", "summary_val_acc.png")
    ]

    rows = read_csv(tmp_path / "summary.csv")
    assert list(rows[0]) == [
        "job",
        "model",
        "test/acc",
        "test/acc_top5",
        "val/acc",
        "params",
        "wall_time_s",
    ]  # (model is the only override that differs between the jobs)
    assert sorted(r["model"] for r in rows) == sorted(DEGRADATION_MODELS)
    accuracies = [float(r["test/acc"]) for r in rows]
    assert accuracies == sorted(accuracies, reverse=True)
    for row in rows:
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["test/acc"]) == pytest.approx(metrics["test/acc"])
        assert int(row["params"]) == count_parameters(create_model(row["model"]))

    markdown = (tmp_path / "summary.md").read_text()
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(DEGRADATION_MODELS)  # header + one row per job
    assert "![validation accuracy](summary_val_acc.png)" in markdown
    assert_png((tmp_path / "summary_val_acc.png").read_bytes())
    # Two validations per job: one curve each, with markers.
    (ax,) = plot_validation_curves(find_runs(sweep)).axes
    assert len(ax.lines) == 4 and all(len(line.get_xdata()) == 2 for line in ax.lines)
    assert {line.get_marker() for line in ax.lines} == {"o"}


def test_summary_of_a_sweep_with_an_optuna_study_draws_its_history_and_importances(
    sweep, tmp_path, capsys
):
    optuna = pytest.importorskip("optuna", reason="pip install -e '.[sweep]'")
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    # The sweep's jobs as the trials of a study, in a journal that the sweep's
    # optimization_results.yaml names, beside another study.
    swept = tmp_path / "sweep"
    shutil.copytree(sweep, swept, ignore=shutil.ignore_patterns("checkpoints", "summary*"))
    journal = tmp_path / "studies" / "journal.log"
    journal.parent.mkdir()
    storage = JournalStorage(JournalFileBackend(str(journal)))
    optuna.create_study(storage=storage, study_name="another")
    study = optuna.create_study(storage=storage, study_name="degradation", direction="maximize")
    study.set_metric_names(["val/acc"])
    space = {"model": optuna.distributions.CategoricalDistribution(DEGRADATION_MODELS)}
    runs = find_runs(swept)
    for run in runs:
        params, value = {"model": run.model}, run.metrics["val/acc"]
        study.add_trial(optuna.trial.create_trial(params=params, distributions=space, value=value))
    results = {"storage": str(journal), "study_name": "degradation"}
    (swept / "optimization_results.yaml").write_text(yaml.safe_dump(results))

    out = tmp_path / "report"
    assert report_main([str(swept), "--out", str(out)]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[3:] == [
        str(out / f"summary_{name}.{ext}")
        for name in ("optimization_history", "param_importances")
        for ext in ("csv", "png")
    ]
    history = read_csv(out / "summary_optimization_history.csv")
    values = [run.metrics["val/acc"] for run in runs]
    assert [float(row["value"]) for row in history] == values
    assert [float(row["best so far"]) for row in history] == list(itertools.accumulate(values, max))
    assert [row["model"] for row in history] == [run.model for run in runs]
    # One parameter: it explains everything.
    assert read_csv(out / "summary_param_importances.csv") == [
        {"parameter": "model", "importance": "1.0"}
    ]
    for name in ("optimization_history", "param_importances"):
        assert_png((out / f"summary_{name}.png").read_bytes())
        assert f"](summary_{name}.png)" in (out / "summary.md").read_text()
    # Optuna's figure draws the trials' values, and leaves later figures their own style.
    (history_section, _), _ = study_sections(swept)
    points = history_section.figure.axes[0].collections[0].get_offsets()
    assert [float(y) for y in points[:, 1]] == values
    assert plot_validation_curves(runs).axes[0].get_facecolor() == (1.0, 1.0, 1.0, 1.0)

    # A study the report cannot open is a note, not a failed summary.
    journal.unlink()
    assert report_main([str(swept), "--out", str(tmp_path / "gone")]) == 0
    summary = (tmp_path / "gone" / "summary.md").read_text()
    assert f"The Optuna study is not drawn: no study journal at {journal}" in summary
    assert not list((tmp_path / "gone").glob("summary_param*"))


@pytest.mark.slow  # make test-all
def test_summary_is_the_default_report_and_bad_directories_are_one_line(sweep, tmp_path):
    command = [sys.executable, "-m", "resnet_lightning.report"]
    done = subprocess.run([*command, str(sweep)], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert (sweep / "summary.md").exists()

    empty = tmp_path / "empty"
    empty.mkdir()
    failed = subprocess.run([*command, str(empty)], capture_output=True, text=True, cwd=REPO)
    assert failed.returncode == 2
    assert failed.stderr.strip().splitlines()[-1].startswith(f"error: {empty} holds no runs")
    assert "Traceback" not in failed.stderr
    assert list(empty.iterdir()) == []


@pytest.mark.slow  # four jobs of 30 s and 40 s
def test_summary_of_a_budget_sweep_plots_accuracy_against_the_budget(budget_sweep, tmp_path):
    assert report_main([str(budget_sweep), "--out", str(tmp_path)]) == 0
    jobs = [p for p in budget_sweep.iterdir() if (p / "metrics.json").is_file()]
    metrics = {p.name: json.loads((p / "metrics.json").read_text()) for p in jobs}
    assert sorted(metrics) == ["0", "1", "2", "3"]
    assert sorted(m["budget_s"] for m in metrics.values()) == [30, 30, 40, 40]

    # The table: one row per job, with its budget, the time it used and the epochs it trained.
    rows = read_csv(tmp_path / "summary.csv")
    assert list(rows[0])[-3:] == ["budget_min", "budget_used_s", "epochs_done"]
    for row in rows:
        job = metrics[row["job"]]
        assert float(row["budget_min"]) == pytest.approx(job["budget_s"] / 60)
        assert float(row["budget_used_s"]) == job["budget_used_s"]
        assert float(row["epochs_done"]) == job["epochs_done"]

    # Accuracy against the budget: one row per budget (the model does not vary), the mean of
    # the two seeds' test/acc, their lowest and highest.
    by_budget = {
        s: [m["test/acc"] for m in metrics.values() if m["budget_s"] == s] for s in BUDGETS_S
    }
    table = read_csv(tmp_path / "summary_time_to_accuracy.csv")
    assert list(table[0]) == ["budget_min", "test/acc mean", "test/acc min", "test/acc max", "n"]
    assert [float(r["budget_min"]) for r in table] == pytest.approx([s / 60 for s in BUDGETS_S])
    for row, accuracies in zip(table, by_budget.values(), strict=True):
        assert float(row["test/acc mean"]) == pytest.approx(sum(accuracies) / 2)
        assert float(row["test/acc min"]) == min(accuracies)
        assert float(row["test/acc max"]) == max(accuracies)
        assert row["n"] == "2"

    markdown = (tmp_path / "summary.md").read_text()
    assert "![validation accuracy](summary_val_acc.png)" in markdown
    section = markdown.split("## Time to accuracy", 1)[1]
    lines = [line.split(" | ") for line in section.splitlines() if line.startswith("| ")]
    assert lines[0][0] == "| budget_min" and len(lines) == 1 + len(BUDGETS_S)
    for cells, budget_s, accuracies in zip(lines[1:], BUDGETS_S, by_budget.values(), strict=True):
        assert cells[0] == f"| {budget_s / 60:.4g}"
        assert cells[1] == f"{100 * sum(accuracies) / 2:.2f}%"
        assert cells[-1] == "2 |"
    caption = "test accuracy against the time budget: mean over seeds, bars from min to max"
    assert f"![{caption}](summary_time_to_accuracy.png)" in section
    width, height = assert_png((tmp_path / "summary_time_to_accuracy.png").read_bytes())
    assert width > 500 and height > 300

    # One line, a point per budget, its error bar from the lowest seed to the highest.
    (ax,) = time_to_accuracy_section(find_runs(budget_sweep)).figure.axes
    (errorbar,) = ax.containers
    line, _, (bars,) = errorbar
    assert list(line.get_xdata()) == pytest.approx([s / 60 for s in BUDGETS_S])
    assert errorbar.get_label() == "all jobs (n=2 seeds)"
    for (low, high), accuracies in zip(bars.get_segments(), by_budget.values(), strict=True):
        assert [low[1], high[1]] == pytest.approx([100 * min(accuracies), 100 * max(accuracies)])


def test_degradation_report_plots_plain_against_residual(sweep, tmp_path):
    assert report_main(["degradation", str(sweep), "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "degradation.csv")
    assert [r["model"] for r in rows] == DEGRADATION_MODELS
    assert [r["family"] for r in rows] == ["Plain (CIFAR)"] * 2 + ["ResNet (CIFAR)"] * 2
    for row in rows:
        assert row["iterations"] == "6"
        for column in ("train error", "val error", "test error"):
            assert 0.0 <= float(row[column]) <= 1.0
        metrics = json.loads((sweep / row["job"] / "metrics.json").read_text())
        assert float(row["test error"]) == pytest.approx(1 - metrics["test/acc"])
    width, height = assert_png((tmp_path / "degradation.png").read_bytes())
    assert width > height  # two panels side by side
    assert (
        "![training and validation error](degradation.png)"
        in (tmp_path / "degradation.md").read_text()
    )


def test_params_report_counts_the_real_model(tmp_path):
    assert report_main(["params", "model=resnet56", "--out", str(tmp_path)]) == 0
    rows = read_csv(tmp_path / "params_resnet56.csv")
    assert [r["stage"] for r in rows] == [
        "conv1",
        "bn1",
        "layer1",
        "layer2",
        "layer3",
        "fc",
        "total",
    ]
    assert list(rows[0]) == ["stage", "Conv2d", "BatchNorm2d", "Linear", "parameters", "share"]
    model = create_model("resnet56")
    assert int(rows[-1]["parameters"]) == count_parameters(model)
    assert int(rows[-1]["Linear"]) == count_parameters(model.fc)
    for row in rows[:-1]:
        assert int(row["parameters"]) == count_parameters(getattr(model, row["stage"]))
    assert_png((tmp_path / "params_resnet56.png").read_bytes())
    assert "| layer3 |" in (tmp_path / "params_resnet56.md").read_text()


def test_params_reports_of_one_model_are_named_by_their_overrides(tmp_path):
    assert report_main(["params", "model=resnet50", "--out", str(tmp_path)]) == 0
    args = ["params", "model=resnet50", "model.stem=imagenet", "--out", str(tmp_path)]
    assert report_main(args) == 0
    cifar = read_csv(tmp_path / "params_resnet50.csv")
    imagenet = read_csv(tmp_path / "params_resnet50_stem-imagenet.csv")
    # The ImageNet stem's 7x7 conv1 has more weights than the CIFAR stem's 3x3.
    assert int(imagenet[0]["parameters"]) > int(cifar[0]["parameters"])
    assert "model.stem=imagenet" in (tmp_path / "params_resnet50_stem-imagenet.md").read_text()


def test_parameter_chart_leaves_room_for_the_tallest_label():
    counts = parameter_counts(create_model("resnet50", stem="imagenet"))
    (ax,) = plot_parameter_counts(counts, "resnet50").axes
    tallest = max(sum(c.values()) for c in counts.values()) / 1e6
    assert ax.get_ylim()[1] >= 1.1 * tallest


def test_params_report_rejects_an_unknown_model_in_one_line(tmp_path, capsys):
    assert report_main(["params", "model=resnet57", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model=resnet57:") and "\n" not in err
    assert not tmp_path.exists() or list(tmp_path.iterdir()) == []


def test_compared_networks_match_torchvision_published_counts():
    # The zoo builds the same networks torchvision published accuracy for: same parameters,
    # same MACs as the weights' metadata (GFLOPS there counts multiply-accumulates).
    for name in compare.MODELS:
        with torch.device("meta"):
            model = create_model(name, num_classes=1000)
        published = compare.published_accuracy(name)
        assert count_parameters(model) == published["params"], name
        weights = get_model_weights(compare.TORCHVISION_NAMES.get(name, name))[compare.WEIGHTS]
        assert round(count_macs(model, 224) / 1e9, 3) == weights.meta["_ops"], name
        assert 50 < published["top1"] < published["top5"] < 100


def test_compare_report_measures_on_this_machine(tmp_path):
    # Two networks at 64 px keep this quick; the defaults measure all five at 224 px.
    args = [
        "compare",
        "--models",
        "resnet50,alexnet",
        "--image-size",
        "64",
        "--batch-size",
        "2",
        "--iters",
        "1",
        "--device",
        "cpu",
        "--out",
        str(tmp_path),
    ]
    assert report_main(args) == 0
    rows = read_csv(tmp_path / "compare.csv")
    assert [r["model"] for r in rows] == ["resnet50", "alexnet"]
    for row in rows:
        published = compare.published_accuracy(row["model"])
        assert int(row["params"]) == published["params"]
        assert float(row["ImageNet top-1 %"]) == published["top1"]
        assert float(row["inference img/s"]) > 0 and float(row["training img/s"]) > 0
    assert_png((tmp_path / "compare.png").read_bytes())
    assert "64 px, batch 2" in (tmp_path / "compare.md").read_text()
    # One timed iteration: the report says its speeds are noise.
    assert "speeds are noise" in (tmp_path / "compare.md").read_text()
