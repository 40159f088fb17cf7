"""`python -m resnet_lightning.export`: each format loads again and gives the checkpoint's
logits on real test images, with any batch size; a mismatch leaves nothing behind."""

from __future__ import annotations

import json

import onnxruntime
import pytest
import torch

from resnet_lightning.tools.evaluate import load_trained_run
from resnet_lightning.tools.export import main as export_main
from resnet_lightning.tools.export import parity_images
from tests.cli_harness import REPO, TINY, run_cli, without_callbacks


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_root, cifar_archive):
    run_dir = tmp_path_factory.mktemp("export") / "run"
    args = [*TINY, *without_callbacks("model_checkpoint", "last_checkpoint"), "model=resnet20"]
    args += ["trainer.max_epochs=1", "module.test_time_flip=true"]
    args += [f"data.root={data_root}", f"data.path={cifar_archive}"]
    run_cli([*args, f"hydra.run.dir={run_dir}"], cwd=REPO)
    return run_dir / "checkpoints" / "last.ckpt"


def load(path, file_format):
    """The exported file as a function of a batch, loaded as a user would."""
    if file_format == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if file_format == "torchscript":
        return torch.jit.load(str(path))
    return torch.export.load(path).module()


@pytest.mark.parametrize("file_format", ["onnx", "torchscript", "exported_program"])
def test_export_gives_the_checkpoint_logits(file_format, checkpoint, tmp_path, capfd):
    out = tmp_path / f"model.{file_format}"
    export_main([f"ckpt_path={checkpoint}", f"format={file_format}", f"out={out}"])
    reported = json.loads(capfd.readouterr().out.strip().splitlines()[-1])
    description = json.loads(out.with_name(out.name + ".json").read_text())
    assert reported["file"] == str(out) and reported["images"] == 64
    assert description["class_names"][:2] == ["airplane", "automobile"]
    assert description["input"]["shape"] == ["batch", 3, 32, 32]
    assert description["test_time_flip"] is True  # stated, not folded in

    cfg, module, _ = load_trained_run(checkpoint)
    images = parity_images(cfg)
    exported = load(out, file_format)
    with torch.inference_mode():
        for batch in (images, images[:5]):  # the batch size is dynamic
            expected = module.net.eval()(batch)
            assert (exported(batch) - expected).abs().max() <= 1e-4


def test_export_beyond_the_tolerance_is_refused_and_leaves_nothing(checkpoint, tmp_path, capfd):
    out = tmp_path / "model.onnx"
    with pytest.raises(SystemExit) as exit_info:
        export_main([f"ckpt_path={checkpoint}", "format=onnx", f"out={out}", "tolerance=0"])
    (line,) = capfd.readouterr().err.strip().splitlines()[-1:]
    assert exit_info.value.code == 2 and line.startswith("error: the onnx export gives logits")
    assert list(tmp_path.iterdir()) == []


def test_export_tolerance_that_is_not_a_number_is_one_line(checkpoint, tmp_path, capfd):
    with pytest.raises(SystemExit) as exit_info:
        export_main([f"ckpt_path={checkpoint}", "format=onnx", "tolerance=abc"])
    line = capfd.readouterr().err.strip()
    assert exit_info.value.code == 2
    assert line == "error: tolerance=abc must be a number >= 0, e.g. tolerance=1e-4"
