"""What a benchmark ran on: software, device, CPU model and the vector ISA XLA could use.

Timings from different CPUs are not one population: XLA:CPU compiles for the host's vector
instructions (capped by ``XLA_FLAGS=--xla_cpu_max_isa=...``), and which dot layout is fastest
differs between an AVX2 and an AVX-512 machine. Every benchmark's JSON carries
:func:`machine_info` and its table header :func:`describe`, so figures from two machines are never
read as one.
"""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

import jax

__all__ = ["cpu_isa", "cpu_model", "describe", "machine_info", "xla_max_isa"]

# The x86 vector extensions XLA:CPU's --xla_cpu_max_isa names, widest first, with the
# /proc/cpuinfo flag that shows each.
_X86_ISAS = (("AVX512", "avx512f"), ("AVX2", "avx2"), ("AVX", "avx"), ("SSE4_2", "sse4_2"))
_ARM_ISAS = (("SVE", "sve"), ("NEON", "asimd"))


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux), else ``platform.processor()``."""
    for line in _cpuinfo().splitlines():
        if line.startswith(("model name", "Model")):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_isa() -> str:
    """The widest vector extension the host CPU reports (``AVX512``, ``AVX2``, ..., ``NEON``).

    ``"unknown"`` where ``/proc/cpuinfo`` has no flags (not Linux).
    """
    flags: set[str] = set()
    for line in _cpuinfo().splitlines():
        if line.startswith(("flags", "Features")):
            flags.update(line.split(":", 1)[1].split())
            break
    for name, flag in _X86_ISAS + _ARM_ISAS:
        if flag in flags:
            return name
    return "unknown"


def xla_max_isa() -> str | None:
    """The cap ``--xla_cpu_max_isa=...`` in ``XLA_FLAGS``, or ``None`` (XLA uses the host's)."""
    match = re.search(r"--xla_cpu_max_isa=(\S+)", os.environ.get("XLA_FLAGS", ""))
    return match.group(1).upper() if match else None


def _jaxlib_version() -> str | None:
    try:
        import jaxlib
    except ImportError:
        return None
    return getattr(jaxlib, "__version__", None)


def machine_info() -> dict[str, Any]:
    """The software and hardware the timings were taken on (JSON-ready)."""
    device = jax.devices()[0]
    affinity = getattr(os, "sched_getaffinity", None)
    return {
        "jax": jax.__version__,
        "jaxlib": _jaxlib_version(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "device": f"{device.platform}:{device.device_kind}",
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(affinity(0)) if affinity else None,
        "machine": f"{platform.system()} {platform.machine()} {platform.processor()}".strip(),
        "cpu_model": cpu_model(),
        "cpu_isa": cpu_isa(),
        "xla_max_isa": xla_max_isa(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def describe(info: dict[str, Any]) -> str:
    """One line for a table header: the CPU model, its ISA and XLA's cap on it, the cores."""
    isa = info.get("cpu_isa", "unknown")
    cap = info.get("xla_max_isa")
    isa_text = f"{isa}, XLA capped at {cap}" if cap else f"{isa} (XLA uses the host's)"
    return (
        f"{info.get('cpu_model', 'unknown CPU')} [{isa_text}], {info.get('cpu_count')} CPUs "
        f"({info.get('cpus_usable')} usable), {info.get('device')}"
    )
