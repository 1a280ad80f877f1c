"""Which class of CPU this is, and how to make a bigger CPU behave like a smaller one for measurements.

tunelab's speed depends on the CPU class more than on anything else: on AVX-512 BF16 (or AMX) CPUs bf16
matmuls run ~4x faster than fp32 and tunelab trains in bf16 autocast; on AVX2-only CPUs there is no fast
bf16 and it trains in fp32. Every figure bench/ prints names the class, and the AVX2 class can be emulated
on a bigger CPU with the kernel-selection variables of PyTorch, MKL and oneDNN:

    python -m bench.train --emulate avx2          # = ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ...
    ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 tunelab study ...

Under that emulation `cpu_has_fast_bf16()` answers False, so tunelab picks fp32 as on a real AVX2 machine.
"""

from __future__ import annotations

import os
from pathlib import Path

from tunelab.errors import TunelabError, closest

FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # the ones that decide the class
EMULATIONS = {  # name -> environment that restricts torch (ATen), MKL and oneDNN kernels to that ISA
    "avx2": {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
}


def cpu_flags(cpuinfo: str | None = None) -> list[str]:
    """The deciding ISA flags this CPU reports (/proc/cpuinfo), in FLAGS order; [] where unknown."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return []
    line = next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "")
    present = set(line.split(":", 1)[-1].split())
    return [f for f in FLAGS if f in present]


def emulated() -> str | None:
    """The emulation in force in this process's environment (e.g. "avx2"), None without one."""
    return next((name for name, env in EMULATIONS.items()
                 if all(os.environ.get(k, "").lower() == v.lower() for k, v in env.items())), None)


def cpu_class(flags: list[str] | None = None, emulation: str | None = None) -> str:
    """"AVX-512 BF16", "AVX-512", "AVX2" or "older than AVX2" (+ " (emulated)" under an emulation)."""
    if emulation:
        return f"{emulation.upper()} (emulated)"
    flags = cpu_flags() if flags is None else flags
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return "AVX-512 BF16" + (" + AMX" if "amx_bf16" in flags else "")
    if "avx512f" in flags:
        return "AVX-512"
    return "AVX2" if "avx2" in flags else "older than AVX2"


def emulation_env(name: str) -> dict[str, str]:
    """The environment that emulates CPU class `name`; an unknown name is an error naming the valid ones."""
    if name not in EMULATIONS:
        raise TunelabError(f"unknown CPU emulation '{name}': {closest(name, list(EMULATIONS))}")
    return dict(EMULATIONS[name])


def cpu_has_fast_bf16() -> bool:
    """Whether this CPU does bf16 matmuls natively (AVX512-BF16 or AMX) and no emulation hides it."""
    import torch

    if emulated():
        return False
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
