"""How many DataLoader worker processes a request may really start: at most the CPU cores this process may use."""
from __future__ import annotations

import logging
import os

__all__ = ["usable_cores", "usable_workers"]

log = logging.getLogger(__name__)
_warned: set[tuple[str, int, int]] = set()


def usable_cores() -> int:
    """CPU cores this process may run on: its affinity mask (``os.sched_getaffinity``, which follows taskset,
    cgroup cpusets and Slurm bindings) where the platform has one, else ``os.cpu_count()``; at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def usable_workers(requested: int, setting: str = "num_workers") -> int:
    """``requested`` DataLoader workers capped at ``usable_cores()``; 0 (load in the main process) stays 0.

    A cap is reported once per (setting, requested, cores) as a logging warning naming ``setting``, e.g.
    ``data.num_workers=8 asks for more workers than the 2 CPU cores this process may use; using 2``.
    Raises ``ValueError`` for a negative ``requested``.
    """
    if requested < 0:
        raise ValueError(f"{setting}={requested}: the number of workers must be >= 0.")
    cores = usable_cores()
    if requested <= cores:
        return requested
    key = (setting, requested, cores)
    if key not in _warned:
        _warned.add(key)
        log.warning("%s=%d asks for more workers than the %d CPU cores this process may use; using %d.",
                    setting, requested, cores, cores)
    return cores
