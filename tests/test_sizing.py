"""CPUs and memory as the container gives them, not as the host has them."""

from __future__ import annotations

import os
import platform
from pathlib import Path

import pytest
import yaml

from service import sizing
from service.settings import Settings

REPO = Path(__file__).resolve().parents[1]
AFFINITY = len(os.sched_getaffinity(0))


def _cgroup(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("files", "quota"),
    [
        ({"cpu.max": "150000 100000"}, 2),  # v2: 1.5 CPUs -> 2 workers
        ({"cpu.max": "50000 100000"}, 1),
        ({"cpu.max": "max 100000"}, None),  # v2, unlimited
        ({"cpu/cpu.cfs_quota_us": "100000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({}, None),  # no cgroup files at all
    ],
)
def test_workers_follow_the_cpu_quota_and_the_affinity(
    tmp_path: Path, files: dict, quota: int | None
) -> None:
    expected = AFFINITY if quota is None else min(AFFINITY, quota)
    assert sizing.available_cpus(_cgroup(tmp_path, files)) == expected


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"memory.max": "1073741824"}, 1 << 30),
        ({"memory.max": "max"}, None),
        ({"memory/memory.limit_in_bytes": "536870912"}, 512 << 20),
        ({"memory/memory.limit_in_bytes": "9223372036854771712"}, None),  # v1's "unlimited"
        ({}, None),
    ],
)
def test_the_memory_limit_is_read_from_either_cgroup_version(
    tmp_path: Path, files: dict, limit: int | None
) -> None:
    assert sizing.memory_limit_bytes(_cgroup(tmp_path, files)) == limit


def test_the_default_worker_count_is_the_process_cpus() -> None:
    assert Settings().inference_workers == sizing.available_cpus()


def _compose_service(name: str) -> tuple[Settings, int, int]:
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    service = compose["services"][name]
    limits = service["deploy"]["resources"]["limits"]
    memory = limits["memory"]
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    limit = int(float(memory[:-1]) * units[memory[-1].lower()])
    environment = {**compose["x-cervigate"].get("environment", {}), **service.get("environment", {})}
    cpus = int(float(limits.get("cpus", AFFINITY)))
    settings = Settings(**{k.removeprefix("CERVIGATE_").lower(): v for k, v in environment.items()})
    return settings, limit, cpus


def test_the_compose_settings_fit_the_compose_memory_limit_with_the_largest_accepted_image() -> None:
    settings, limit, cpus = _compose_service("cervigate")
    workers = min(settings.inference_workers, cpus)  # inside the container the quota caps the default
    bound = sizing.memory_bound(
        settings.max_inflight, settings.max_upload_bytes, workers, settings.max_pixels
    )
    assert bound.total <= limit, bound.describe()
    assert sizing.check_memory(settings.max_inflight, settings.max_upload_bytes, workers, settings.max_pixels,
                               limit) is None  # fmt: skip


def test_settings_past_the_limit_get_a_warning_that_names_what_to_lower() -> None:
    warning = sizing.check_memory(32, 20 << 20, 2, 50_000_000, 1 << 30)
    assert warning is not None and "CERVIGATE_MAX_INFLIGHT" in warning and "README" in warning


def test_the_mmap_threshold_is_set_on_glibc_and_left_alone_for_zero() -> None:
    assert sizing.set_mmap_threshold(0) is False
    took = sizing.set_mmap_threshold(Settings().malloc_mmap_threshold_bytes)
    assert took is (platform.libc_ver()[0] == "glibc")
