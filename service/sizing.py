"""What the process really has: CPUs from its affinity and cgroup quota (a container limited to 2 CPUs on a
64-core host must not start 64 workers), and the memory bound its settings imply, checked against the
cgroup's memory limit at start-up.

The memory bound (README "Sizing"): every admitted request may hold its upload (`max_inflight` x
`max_upload_bytes`: queued requests hold nothing else), and every running one also holds its decode buffers,
at most `DECODE_BYTES_PER_PIXEL` x `max_pixels` for the largest accepted image (`inference_workers` of them),
on top of the resident models and runtime (`BASELINE_BYTES`). Both constants are measured (bench/memory.py).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import math
import os
from dataclasses import dataclass
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
MB = 1 << 20
# Measured (README "Sizing"): bench/memory.py's peak RSS growth while one 50 MP upload is assessed, the worst
# format counting (WebP 16.0 bytes per pixel, inside Pillow's decoder; HEIC 7.3, PNG 4.0, JPEG 0.2), and the
# resident size at the end of `make loadtest`'s 10,000-request soak (322 MB), rounded up.
DECODE_BYTES_PER_PIXEL = 16.0
BASELINE_BYTES = 330 * MB


def available_cpus(root: Path = CGROUP_ROOT) -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 `cpu.max` or v1 CFS quota."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    quota = _cpu_quota(root)
    return max(1, min(cpus, math.ceil(quota)) if quota is not None else cpus)


def _cpu_quota(root: Path) -> float | None:
    v2 = _read(root / "cpu.max")
    if v2 is not None:
        limit, _, v2_period = v2.partition(" ")
        return None if limit == "max" else int(limit) / int(v2_period or 100_000)
    for controller in ("cpu", "cpu,cpuacct"):
        quota = _read(root / controller / "cpu.cfs_quota_us")
        period = _read(root / controller / "cpu.cfs_period_us")
        if quota is not None and period is not None:
            return None if int(quota) < 0 else int(quota) / int(period)
    return None


def memory_limit_bytes(root: Path = CGROUP_ROOT) -> int | None:
    """The cgroup's memory limit (v2 `memory.max`, v1 `memory.limit_in_bytes`); None when unlimited."""
    for path in (root / "memory.max", root / "memory" / "memory.limit_in_bytes"):
        value = _read(path)
        if value is not None:
            # v1 reports "unlimited" as a page-rounded 2^63.
            return None if value == "max" or int(value) >= 1 << 62 else int(value)
    return None


@dataclass(frozen=True)
class MemoryBound:
    baseline: int
    uploads: int  # max_inflight x max_upload_bytes
    decoding: int  # inference_workers x the largest accepted image's decode buffers

    @property
    def total(self) -> int:
        return self.baseline + self.uploads + self.decoding

    def describe(self) -> str:
        return (
            f"{self.total / MB:.0f} MB = {self.baseline / MB:.0f} MB resident + {self.uploads / MB:.0f} MB "
            f"of uploads + {self.decoding / MB:.0f} MB of decoding"
        )


def memory_bound(
    max_inflight: int, max_upload_bytes: int, inference_workers: int, max_pixels: int
) -> MemoryBound:
    return MemoryBound(
        baseline=BASELINE_BYTES,
        uploads=max_inflight * max_upload_bytes,
        decoding=round(inference_workers * max_pixels * DECODE_BYTES_PER_PIXEL),
    )


_M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """Have glibc serve allocations of at least `threshold_bytes` with their own mappings, returned to the
    system when freed. By default glibc raises that threshold after the first large free, and later photo
    buffers (a full HEIC decode is ~50 MB) then come from the heap, which fragments and stays resident.
    Measured at 16 MB, two servers interleaved, 12 MP JPEG at 1-2 clients and 12 MP HEIC at 8: peak RSS 690 ->
    567 MB, JPEG p50 unchanged (README "Sizing"). Returns whether glibc took it: False elsewhere (musl, macOS)
    or for 0 (leave glibc's own threshold)."""
    if threshold_bytes <= 0:
        return False
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        return bool(libc is not None and libc.mallopt(_M_MMAP_THRESHOLD, threshold_bytes))
    except (OSError, AttributeError):  # not glibc: no mallopt
        return False


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, ValueError):
        return None


def check_memory(max_inflight: int, max_upload_bytes: int, inference_workers: int, max_pixels: int,
                 limit: int | None) -> str | None:  # fmt: skip
    """A warning when the settings' memory bound exceeds the container's limit (None when it fits): the
    service still starts, since the bound is a worst case, but the operator learns what to lower."""
    bound = memory_bound(max_inflight, max_upload_bytes, inference_workers, max_pixels)
    if limit is None or bound.total <= limit:
        return None
    spare = limit - bound.baseline - bound.decoding
    fits = max(0, spare // max_upload_bytes)
    return (
        f"the worst-case memory use, {bound.describe()}, exceeds the container's {limit / MB:.0f} MB limit: "
        f"set CERVIGATE_MAX_INFLIGHT to {fits} or less, or lower CERVIGATE_MAX_UPLOAD_BYTES / "
        "CERVIGATE_MAX_PIXELS / CERVIGATE_INFERENCE_WORKERS (README: Sizing)"
    )
