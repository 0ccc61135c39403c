from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from training.data.adapters import DEFAULT_ATLAS


@pytest.fixture(scope="session")
def atlas_root() -> Path:
    """The real IARC atlas beside the checkout (CI always has it at ../shared)."""
    if not DEFAULT_ATLAS.is_dir():
        pytest.skip(f"IARC atlas not found at {DEFAULT_ATLAS}: put ../shared beside the checkout as CI does")
    return DEFAULT_ATLAS


STRICT = os.environ.get("CI", "").lower() in {"1", "true", "yes"}


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Under CI (`CI=true`, set by .ci/run) a skipped test is a failed run: there the atlas, the outlines and
    every tool a test needs must be present, so a skip can only mean a broken set-up that would otherwise
    pass unnoticed. Locally a skip stays a skip, with its reason saying how to get what is missing."""
    report = yield
    if STRICT and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, where nothing may be missing: {reason}"
    return report
