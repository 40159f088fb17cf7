"""`trainer.precision=auto` (training/precision.py): bf16 autocast only where the hardware
computes bf16 natively, said in one log line; and the CPU's bf16 convolutions are right."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.accelerators import CUDAAccelerator

from resnet_lightning.training import precision
from resnet_lightning.training.precision import auto_precision, resolve_auto_precision
from tests.cli_harness import TINY, compose_config, run_main, without_callbacks

NO_BF16 = "this CPU has no native bf16: AVX-512 BF16/AMX missing, bf16 would be emulated"


@pytest.fixture
def cpu_flags(monkeypatch):
    """Make torch's CPU detection report the given flags (and no GPU): a function of them."""
    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))

    def set_flags(*flags: str) -> None:
        capabilities = {"architecture": "x86_64", "avx2": True, "avx512_f": True}
        capabilities |= {flag: True for flag in flags}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)

    return set_flags


def resolved(overrides: list[str], caplog) -> tuple[str, list[str]]:
    """trainer.precision after resolve_auto_precision, and the lines it logged."""
    cfg = compose_config(overrides)
    with caplog.at_level(logging.INFO, logger=precision.__name__):
        resolve_auto_precision(cfg)
    return cfg.trainer.precision, [r.getMessage() for r in caplog.records]


@pytest.mark.parametrize(
    ("flags", "expected", "reason"),
    [
        ((), "32-true", NO_BF16),
        (("avx512_bf16",), "bf16-mixed", "this CPU computes bf16 natively: avx512_bf16"),
        (("avx512_bf16", "amx_bf16"), "bf16-mixed", "natively: avx512_bf16, amx_bf16"),
        (("amx_bf16",), "bf16-mixed", "this CPU computes bf16 natively: amx_bf16"),
    ],
)
@pytest.mark.parametrize("trainer", ["default", "cpu"])  # accelerator auto without a GPU, cpu
def test_auto_on_the_cpu_is_bf16_only_where_it_is_native(
    trainer, flags, expected, reason, cpu_flags, caplog
):
    cpu_flags(*flags)
    value, lines = resolved([f"trainer={trainer}"], caplog)
    assert value == expected
    assert len(lines) == 1 and lines[0].startswith(f"trainer.precision=auto: {expected} (")
    assert reason in lines[0]


def test_cpu_flags_come_from_proc_cpuinfo_without_torch_detection(monkeypatch, tmp_path):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    cpuinfo = tmp_path / "cpuinfo"
    monkeypatch.setattr(precision, "CPUINFO", cpuinfo)
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f avx512_vnni\n")
    assert precision.cpu_bf16_flags() == []
    cpuinfo.write_text("model name\t: Some CPU\nflags\t\t: fpu avx2 avx512f amx_bf16 avx512_bf16\n")
    assert precision.cpu_bf16_flags() == ["avx512_bf16", "amx_bf16"]


@pytest.mark.parametrize(
    ("major", "expected"), [(9, "bf16-mixed"), (8, "bf16-mixed"), (7, "32-true"), (6, "32-true")]
)
def test_auto_on_a_gpu_is_bf16_from_ampere_on(major, expected, monkeypatch):
    """torch's check counts older GPUs as bf16 GPUs too unless emulation is excluded."""

    def is_bf16_supported(including_emulation: bool = True) -> bool:
        return major >= 8 or including_emulation

    monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: True))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *_: f"GPU sm_{major}0")
    for accelerator in ("auto", "gpu", "cuda"):
        value, reason = auto_precision(accelerator)
        assert value == expected, reason
        assert reason.startswith(f"GPU sm_{major}0 ")


def test_auto_elsewhere_is_fp32():
    assert auto_precision("mps") == ("32-true", "the mps accelerator: bf16 is not measured there")


@pytest.mark.parametrize("given", ["32-true", "bf16-mixed", "16-mixed", "64-true"])
def test_an_explicit_precision_is_kept_and_nothing_is_said(given, cpu_flags, caplog):
    cpu_flags("amx_bf16")
    assert resolved([f"trainer.precision={given}"], caplog) == (given, [])


def test_recipes_that_name_a_precision_keep_it():
    assert compose_config().trainer.precision == "auto"
    assert compose_config(["experiment=seed_resnet50"]).trainer.precision == "32-true"
    assert compose_config(["experiment=resnet9_dawnbench"]).trainer.precision == "bf16-mixed"
    # The airbench recipes leave it to the hardware: bf16 where it is native.
    assert compose_config(["experiment=fast94"]).trainer.precision == "auto"
    assert compose_config(["experiment=cpu_quick"]).trainer.precision == "auto"


def proc_cpuinfo_flags() -> set[str]:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


@pytest.mark.parametrize("cpu", ["this machine's", "with amx_bf16"])
def test_a_run_with_auto_trains_in_the_precision_it_logged(
    cpu, tmp_path, data_overrides, capfd, monkeypatch
):
    """The whole run in this process: the log line, the Trainer's own precision line, and the
    precision saved in the checkpoint's config (which eval and resume=<ckpt> read)."""
    if cpu == "this machine's":
        if not Path("/proc/cpuinfo").is_file():
            pytest.skip("needs /proc/cpuinfo to know what to expect")
        # The kernel's flags, read independently of torch's detection.
        native = bool(proc_cpuinfo_flags() & {"avx512_bf16", "amx_bf16"})
        monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
    else:
        native = True
        monkeypatch.setattr(CUDAAccelerator, "is_available", staticmethod(lambda: False))
        capabilities = {"architecture": "x86_64", "amx_bf16": True}
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    expected = "bf16-mixed" if native else "32-true"
    run_dir = tmp_path / "run"
    args = [*TINY, *without_callbacks("last_checkpoint"), "model=resnet20", "data.batch_size=8"]
    args += ["trainer.max_epochs=1", "trainer.limit_val_batches=1", "trainer.limit_test_batches=1"]
    args += [*data_overrides, "trainer.accelerator=auto", "trainer.precision=auto"]
    code, stderr = run_main([*args, f"hydra.run.dir={run_dir}"], capfd, monkeypatch)
    assert code == 0, stderr

    log = (run_dir / "train.log").read_text()
    assert log.count("trainer.precision=auto: ") == 1
    assert f"trainer.precision=auto: {expected} (" in log
    # Lightning's own line about the precision plugin it built, or none for fp32.
    assert ("Using bfloat16 Automatic Mixed Precision (AMP)" in log) == native
    assert "not supported by the model summary" not in log  # its weights are fp32: no news
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["run_config"]["trainer"]["precision"] == expected


# Input size, channels in and out, stride. 2x2 convolutions in bf16 gave wrong results through
# oneDNN in some torch versions (https://github.com/pytorch/pytorch/issues/163347: a 2x2 kernel
# of ones over a 2x2 input of ones gave 1, not 4); the first case is that issue's.
CONV_CASES = [
    (2, 1, 1, 1),
    (2, 1, 1, 2),
    (8, 3, 8, 1),
    (8, 3, 8, 2),
    (16, 16, 32, 1),
    (16, 16, 32, 2),
]


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize(("size", "c_in", "c_out", "stride"), CONV_CASES)
def test_2x2_convolution_in_cpu_bf16_autocast_matches_fp32(
    size, c_in, c_out, stride, channels_last
):
    """Forward and both gradients under bf16 autocast against fp32, element by element, within
    the rounding of bf16 (8 significant bits). Without native bf16 this checks the emulation."""
    torch.manual_seed(0)
    if size == 2:  # the case: ones
        x, weight = torch.ones(1, c_in, 2, 2), torch.ones(c_out, c_in, 2, 2)
    else:
        x, weight = torch.randn(4, c_in, size, size), torch.randn(c_out, c_in, 2, 2)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
        weight = weight.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(c_out)
    grad_out = torch.randn(F.conv2d(x, weight, stride=stride).shape)

    def forward_backward(x, weight, bias, grad_out, bf16: bool):
        x, weight = x.clone().requires_grad_(), weight.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = F.conv2d(x, weight, bias, stride=stride)
        y.backward(grad_out)
        return y, x.grad, weight.grad

    low = forward_backward(x, weight, bias, grad_out, bf16=True)
    assert low[0].dtype == torch.bfloat16  # autocast ran the convolution in bf16
    exact = forward_backward(x, weight, bias, grad_out, bf16=False)
    # Each result is a sum of products whose factors bf16 rounds by at most 2^-9 of themselves,
    # and the result too: the error stays within 2^-7 of the same sum over absolute values.
    bounds = forward_backward(x.abs(), weight.abs(), bias.abs(), grad_out.abs(), bf16=False)
    names = ("output", "input grad", "weight grad")
    for name, a, b, bound in zip(names, low, exact, bounds, strict=True):
        error = (a.float() - b).abs()
        assert (error <= 2**-7 * bound + 1e-6).all(), f"{name}: max error {error.max():.4g}"
