"""
How many CPUs this process may use, for ``WORKERS=auto``: the CPUs of its affinity
mask (``sched_getaffinity``, which ``taskset`` and cpusets narrow), fewer when a
cgroup CPU quota allows less (a container's ``--cpus``, a Kubernetes CPU limit):
``cpu.max`` on cgroup v2, ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` on v1,
rounded up to whole CPUs.
"""

from __future__ import annotations

import math
import os
from typing import Callable, Optional

#: Where the cgroup quota files are (v2 first, then v1).
CGROUP_V2_CPU_MAX = "/sys/fs/cgroup/cpu.max"
CGROUP_V1_QUOTA = "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"
CGROUP_V1_PERIOD = "/sys/fs/cgroup/cpu/cpu.cfs_period_us"


def _read(path: str) -> Optional[str]:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit(read: Callable[[str], Optional[str]] = _read) -> Optional[float]:
    """
    The CPUs the cgroup quota allows (``quota / period``, may be fractional), or
    None when there is no quota (``max``, ``-1``) or no cgroup file to read.
    """
    v2 = read(CGROUP_V2_CPU_MAX)
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2 and fields[0] != "max":
            try:
                quota, period = int(fields[0]), int(fields[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None
    quota_text, period_text = read(CGROUP_V1_QUOTA), read(CGROUP_V1_PERIOD)
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def usable_cpus(
    read: Callable[[str], Optional[str]] = _read,
    affinity: Optional[Callable[[], int]] = None,
) -> int:
    """
    Whole CPUs this process may use: the affinity mask's size, capped by the cgroup
    quota rounded up; at least 1.
    """
    if affinity is None:
        if hasattr(os, "sched_getaffinity"):
            count = len(os.sched_getaffinity(0))
        else:  # pragma: no cover - not Linux
            count = os.cpu_count() or 1
    else:
        count = affinity()
    limit = cgroup_cpu_limit(read)
    if limit is not None:
        count = min(count, math.ceil(limit))
    return max(1, count)
