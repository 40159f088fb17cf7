"""`python -m resnet_lightning.bench` through its real command line, at its smallest sizes."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tests.cli_harness import REPO, SHARED_CIFAR


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
    assert pipelines == {(p, "cpu", s) for p in ("torchvision", "tensor") for s in (32, 224)}
    assert all(r["images_per_s"] > 0 for r in report["pipeline"])
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
