"""`python -m resnet_lightning.bench` through its real command line, at its smallest sizes."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from tests.cli_harness import REPO, SHARED_CIFAR

# Each test times a whole benchmark section: make test-all runs them.
pytestmark = pytest.mark.slow


def test_quick_bench_prints_tables_and_writes_every_figure(tmp_path, data_root, cifar_archive):
    out = tmp_path / "bench.json"
    env = {k: v for k, v in os.environ.items() if k != "CIFAR10_PATH"}
    command = [
        sys.executable,
        "-m",
        "resnet_lightning.bench",
        "--quick",
        "--data-root",
        str(data_root),
        "--data-path",
        str(cifar_archive),
        "--json",
        str(out),
    ]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(out.read_text())
    assert report["machine"]["cpu_cores"] >= 1 and report["command"].endswith(str(out))
    pipelines = {(r["pipeline"], r["device"], r["image_size"]) for r in report["pipeline"]}
    folders = {
        (p, "cpu", 224) for p in ("imagefolder (JPEG 500x375)", "imagefolder tensor (cache 256)")
    }
    assert (
        pipelines == {(p, "cpu", s) for p in ("torchvision", "tensor") for s in (32, 224)} | folders
    )
    assert all(r["images_per_s"] > 0 for r in report["pipeline"])
    policies = {(r["pipeline"], r["policy"], r["random_erasing"]) for r in report["pipeline"]}
    assert {
        (p, "trivialaugment", e) for p in ("torchvision", "tensor") for e in (0, 0.25)
    } <= policies
    tensor_rows = [r for r in report["pipeline"] if r["pipeline"] == "tensor"]
    if cifar_archive == SHARED_CIFAR:
        assert all(r["dataset_mb"] == 176 for r in tensor_rows)  # 60,000 uint8 images, once
    formats = {r["memory_format"] for r in report["train"]}
    assert formats == {"NCHW", "channels_last"}
    assert all(r["images_per_s"] > 0 and r["device"] == "cpu" for r in report["train"])
    overhead = report["overhead"]
    assert [len(run) for run in overhead["plain_epoch_s"] + overhead["framework_epoch_s"]] == [2, 2]

    lines = result.stdout.splitlines()
    assert any(line.startswith("| tensor | cpu | 32 |") for line in lines)
    assert any(line.startswith("| resnet20 (cifar stem, 32 px) | tensor |") for line in lines)
    assert any(line.startswith("| framework overhead |") for line in lines)
    assert f"wrote {out}" in result.stdout


def bench_section(section: str, *args: str) -> subprocess.CompletedProcess:
    """`python -m resnet_lightning.bench --sections SECTION ARGS` in a subprocess."""
    command = [sys.executable, "-m", "resnet_lightning.bench", "--sections", section, *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_inference_section_times_every_backend_at_every_batch(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_section(
        "inference", "--quick", "--inference-batches", "1", "3", "--json", str(out)
    )
    assert result.returncode == 0, result.stderr[-3000:]

    rows = json.loads(out.read_text())["inference"]
    backends = ["eager", "torchscript"]  # compiled only with --compile: it takes minutes
    if importlib.util.find_spec("onnxruntime"):
        backends.append("onnxruntime")
    model = "resnet20 (cifar stem, 32 px)"
    assert [(r["model"], r["backend"], r["batch"]) for r in rows] == [
        (model, backend, batch) for backend in backends for batch in (1, 3)
    ]
    assert all(r["images_per_s"] > 0 and r["ms_per_call"] > 0 and r["calls"] == 2 for r in rows)
    table = [line for line in result.stdout.splitlines() if line.startswith(f"| {model} |")]
    assert [line.split(" | ")[1:3] for line in table] == [
        [backend, str(batch)] for backend in backends for batch in (1, 3)
    ]


def test_cpu_train_section_times_every_setting(tmp_path):
    out = tmp_path / "bench.json"
    result = bench_section("cpu_train", "--quick", "--cpu-batches", "2", "3", "--json", str(out))
    assert result.returncode == 0, result.stderr[-3000:]

    report = json.loads(out.read_text())
    rows = report["cpu_train"]
    precisions, formats = ("32-true", "bf16-mixed"), ("NCHW", "channels_last")
    # The grid with oneDNN's defaults, then the other oneDNN settings at the first batch size
    # (bf32 in fp32 only: it changes fp32 math); compiled rows only with --compile.
    expected = [(p, f, b, "on") for p in precisions for f in formats for b in (2, 3)]
    expected += [(p, f, 2, "off") for p in precisions for f in formats]
    expected += [("32-true", f, 2, "bf32") for f in formats]
    assert [(r["precision"], r["memory_format"], r["batch"], r["onednn"]) for r in rows] == expected
    assert all(r["model"] == "resnet20" and r["threads"] == 1 and r["run"] == "eager" for r in rows)
    assert all(r["images_per_s"] > 0 and r["timed_steps"] == 2 for r in rows)
    assert set(report["machine"]["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16"}

    lines = result.stdout.splitlines()
    assert any(line.startswith("CPU flags: ") for line in lines)
    assert f"command: {report['command']}" in lines
    table = [line for line in lines if line.startswith("| resnet20 |")]
    assert [line.split(" | ")[1:7] for line in table] == [
        [p, f, str(b), "1", onednn, "eager"] for p, f, b, onednn in expected
    ]


def test_cpu_train_refuses_a_batch_of_zero_in_one_line():
    result = bench_section("cpu_train", "--cpu-batches", "0")
    assert result.returncode == 2
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .endswith("argument --cpu-batches: 0 is not a positive whole number")
    )
