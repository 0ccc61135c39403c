from __future__ import annotations

from pathlib import Path

import pytest

from training.data.adapters import DEFAULT_ATLAS


@pytest.fixture(scope="session")
def atlas_root() -> Path:
    """The real IARC atlas beside the checkout (CI always has it at ../shared)."""
    if not DEFAULT_ATLAS.is_dir():
        pytest.skip(f"IARC atlas not found at {DEFAULT_ATLAS}: put ../shared beside the checkout as CI does")
    return DEFAULT_ATLAS
