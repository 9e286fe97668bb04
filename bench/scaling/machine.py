"""The machine a study runs on: hardware description and CPU accounting from /proc (Linux).

CPU accounting tells whether the learner was busy, starved or idle, and how
much of the machine other workloads took while a run was timed.
"""

from __future__ import annotations

import os
import platform
import sys
from pathlib import Path

_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_s(pid: int) -> float | None:
    """User + system CPU seconds used so far by process ``pid`` (None if unknown)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / _TICKS_PER_S  # utime, stime (fields 14, 15 of stat)


def machine_cpu_s() -> tuple[float, float] | None:
    """(busy, total) CPU seconds of the whole machine since boot, summed over cores (None if unknown)."""
    try:
        values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, IndexError, ValueError):
        return None
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    total = sum(values[:8])  # guest time is already counted in user
    return (total - idle) / _TICKS_PER_S, total / _TICKS_PER_S


def _cpuinfo() -> dict[str, str]:
    """The first CPU's fields of /proc/cpuinfo ("model name", "cpu family", "model", ...); {} if unknown."""
    fields = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if not line.strip():
                break  # the first processor's block ends
            key, _, value = line.partition(":")
            fields[key.strip()] = value.strip()
    except OSError:
        pass
    return fields


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def hardware() -> dict:
    """CPU, cores, memory, GPU, software versions and the load average right now."""
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    cpu = _cpuinfo()
    return {
        "cpu_model": cpu.get("model name") or platform.processor() or "unknown",
        # Family / model / stepping tell apart CPUs one model name covers ("AMD EPYC"): float kernels differ
        # between them, and so does a start policy behaviour-cloned with the same settings.
        "cpu_id": "/".join(cpu.get(k, "?") for k in ("cpu family", "model", "stepping")) if cpu else None,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": gpu,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
    }
