"""The machine a benchmark ran on: CPU model, the vector / matrix extensions that decide low-precision speed, load.

bfloat16 and float16 matmuls on a CPU are only fast with hardware support: AVX-512 BF16 or AMX-BF16 (Intel
Cooper Lake / Sapphire Rapids and later, AMD Zen 4 and later for AVX-512 BF16), AVX-512 FP16 or AMX-FP16 for
float16. Without it PyTorch converts and computes in scalar / AVX2 loops, tens of times below the float32
rate, so every low-precision number is reported beside these flags (flag names of Linux's
``/proc/cpuinfo``, see the kernel's ``arch/x86/include/asm/cpufeatures.h``).
"""

from __future__ import annotations

import os
import platform
from pathlib import Path

__all__ = ["cpu_description", "cpu_flags", "cpu_model", "load_average"]

#: /proc/cpuinfo flag -> name used in reports
_EXTENSIONS = {
    "avx2": "AVX2",
    "avx512f": "AVX-512",
    "avx512_bf16": "AVX-512 BF16",
    "avx512_fp16": "AVX-512 FP16",
    "amx_bf16": "AMX-BF16",
    "amx_fp16": "AMX-FP16",
}


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or :func:`platform.processor` elsewhere."""
    for line in _cpuinfo().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


def cpu_flags() -> set[str]:
    """The CPU flags of the first processor in ``/proc/cpuinfo`` (empty where that file does not exist)."""
    for line in _cpuinfo().splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_description() -> str:
    """Model and low-precision extensions, e.g. ``"AMD EPYC (AVX2; no AVX-512, no AVX-512 BF16, no AMX)"``.

    Example:
        >>> "AMX" in cpu_description() or not cpu_flags()
        True
    """
    flags = cpu_flags()
    if not flags:
        return cpu_model()
    present = [name for flag, name in _EXTENSIONS.items() if flag in flags]
    absent = []
    if "avx512f" not in flags:
        absent.append("no AVX-512")
    if "avx512_bf16" not in flags:
        absent.append("no AVX-512 BF16")
    if "amx_bf16" not in flags:
        absent.append("no AMX")
    parts = ", ".join(present) if present else "no AVX2"
    return f"{cpu_model()} ({parts}{'; ' + ', '.join(absent) if absent else ''})"


def load_average() -> float:
    """One-minute load average of the machine (other processes compete for the cores when it exceeds them)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")
