"""`trainer.precision=auto`: bf16 autocast where the hardware computes bf16 natively, else fp32.

Lightning takes no "auto", so the run's config is resolved here before the Trainer is built.
bf16 needs no loss scaling, so wherever it is native it is the safe fast choice. fp16 is not
picked: on pre-Ampere GPUs it is faster than fp32 but needs loss scaling and can overflow, so it
stays a choice a user makes (`trainer.precision=16-mixed`). Without native bf16 a CPU emulates
it, and autocast then trains several times slower than fp32 (docs/performance.md).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator, XLAAccelerator
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# x86 flags of bf16 arithmetic in hardware, as torch.cpu.get_capabilities() and /proc/cpuinfo
# name them: AVX-512 BF16 (Cooper Lake, Zen 4, Sapphire Rapids) and AMX (Sapphire Rapids on).
CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
CPUINFO = Path("/proc/cpuinfo")


def resolve_auto_precision(cfg: DictConfig) -> None:
    """Replace `trainer.precision=auto` in `cfg` by what it stands for on this machine, and say
    which and why in one log line; any other value is left as it is, silently."""
    if OmegaConf.select(cfg, "trainer.precision") != "auto":
        return
    accelerator = OmegaConf.select(cfg, "trainer.accelerator", default="auto")
    precision, reason = auto_precision(accelerator)
    cfg.trainer.precision = precision
    log.info("trainer.precision=auto: %s (%s)", precision, reason)


def auto_precision(accelerator: str) -> tuple[str, str]:
    """The precision `auto` stands for with the Trainer's `accelerator`, and why. Every DDP
    rank on a machine gets the same answer: it depends on the hardware alone."""
    device = trainer_device(accelerator)
    if device == "cuda":
        name = torch.cuda.get_device_name()
        # Without including_emulation=False, pre-Ampere GPUs count as bf16 GPUs.
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16-mixed", f"{name} computes bf16 natively"
        return "32-true", (
            f"{name} has no native bf16 (compute capability below 8.0); 16-mixed may be faster, "
            "with loss scaling: set it explicitly"
        )
    if device == "cpu":
        flags = cpu_bf16_flags()
        if flags:
            return "bf16-mixed", f"this CPU computes bf16 natively: {', '.join(flags)}"
        return "32-true", (
            "this CPU has no native bf16: AVX-512 BF16/AMX missing, bf16 would be emulated"
        )
    return "32-true", f"the {device} accelerator: bf16 is not measured there"


def trainer_device(accelerator: str) -> str:
    """The device type Lightning's Trainer picks for `accelerator`: "auto" and "gpu" as its
    accelerator connector resolves them (TPU, then Apple's MPS, then CUDA, then the CPU)."""
    accelerator = str(accelerator).lower()
    if accelerator == "auto" and XLAAccelerator.is_available():
        return "tpu"
    if accelerator in ("auto", "gpu") and MPSAccelerator.is_available():
        return "mps"
    if accelerator in ("auto", "gpu") and CUDAAccelerator.is_available():
        return "cuda"
    return "cpu" if accelerator == "auto" else accelerator


def cpu_bf16_flags() -> list[str]:
    """Which of CPU_BF16_FLAGS this CPU has, by torch's own CPU detection, or by /proc/cpuinfo
    where torch has none (older versions)."""
    if hasattr(torch.cpu, "get_capabilities"):
        have = {flag for flag, value in torch.cpu.get_capabilities().items() if value is True}
    else:
        have = cpuinfo_flags()
    return [flag for flag in CPU_BF16_FLAGS if flag in have]


def cpuinfo_flags() -> set[str]:
    """The instruction-set flags the kernel lists for the first CPU (none off Linux)."""
    lines = CPUINFO.read_text().splitlines() if CPUINFO.is_file() else []
    flags = [line.split(":", 1)[1] for line in lines if line.startswith("flags")]
    return set(flags[0].split()) if flags else set()
