"""The one memory probe: how many bytes a computation may still allocate on a device.

    CPU:   MemAvailable in /proc/meminfo (else the available physical pages)
    CUDA:  the device's free memory (torch.cuda.mem_get_info)
    $NTKRUN_MEMORY_LIMIT (e.g. 8G, 512M, 2e9 bytes) replaces the probe: a test, a shared node
           or a cgroup the probe does not see gets the verdict of that limit, on any machine.

Used by the preflight memory check of a run (ntkrun.units.check_memory) and by every allocation
that is refused before it is tried (ntkrun.linalg.empty_checked). Imports nothing of ntkrun but
its errors.
"""

from __future__ import annotations

import os
import re

import torch

from ntkrun.errors import SpecError

MEMORY_ENV = "NTKRUN_MEMORY_LIMIT"
GiB = 2**30
_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_bytes(text: str, where: str = MEMORY_ENV) -> int:
    """'8G', '512M', '1.5T', '2e9' -> bytes (K, M, G, T are powers of 1024; an optional 'iB' or 'B')."""
    number = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
    match = re.fullmatch(rf"\s*{number}\s*([KMGT]?)(?:i?B)?\s*", text, re.IGNORECASE)
    if match is None or float(match.group(1)) <= 0:
        raise SpecError(f"{where}: expected a positive size such as 8G, 512M or 2e9, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def gib(n: float) -> str:
    """Bytes in words: '14.4 GiB', '763 MiB', '1 KiB'."""
    if n >= GiB / 10:
        return f"{n / GiB:.3g} GiB"
    return f"{n / 2**20:.3g} MiB" if n >= 2**20 / 10 else f"{n / 2**10:.3g} KiB"


def available(device: torch.device | str = "cpu") -> tuple[int, str] | None:
    """(bytes that may still be allocated on the device, where that number comes from), or None
    if this machine does not say."""
    limit = os.environ.get(MEMORY_ENV)
    if limit:
        return parse_bytes(limit), f"${MEMORY_ENV}"
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free memory of {torch.cuda.get_device_name(device)}"
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024, "MemAvailable in /proc/meminfo"
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "available physical pages"
    except (ValueError, OSError, AttributeError):
        return None
