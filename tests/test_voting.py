from __future__ import annotations

import numpy as np
import pytest

from service.inference.manifest import InputSpec
from service.pipeline.voting import PAPER_WEIGHTS, variant_batch, voting_variants, weighted_vote


def test_paper_weights_sum_to_one() -> None:
    assert sum(PAPER_WEIGHTS.values()) == pytest.approx(1.0)


def test_variants_are_what_the_paper_describes() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 200, (8, 10, 3), dtype=np.uint8)
    lesion = np.zeros((8, 10), np.uint8)
    lesion[:, :5] = 255
    variants = voting_variants(rgb, lesion)
    assert set(variants) == set(PAPER_WEIGHTS)
    only_rgb, _ = variants["lesion_only"]
    np.testing.assert_array_equal(only_rgb[:, :5], rgb[:, :5])
    assert only_rgb[:, 5:].max() == 0, "outside the lesion is blacked out"
    np.testing.assert_array_equal(variants["original_flipped"][0], rgb[:, ::-1])
    np.testing.assert_array_equal(variants["lesion_only_flipped"][1], lesion[:, ::-1])
    assert variants["brighter"][0].astype(int).sum() > rgb.astype(int).sum() > variants["darker"][0].sum()


def test_weighted_vote_and_batch() -> None:
    probs = {name: 0.5 for name in PAPER_WEIGHTS} | {"lesion_only": 1.0}
    assert weighted_vote(probs, PAPER_WEIGHTS) == pytest.approx(0.5 + 0.5 * 0.25)
    with pytest.raises(ValueError, match="lesion_only"):
        weighted_vote({"original": 0.3}, PAPER_WEIGHTS)
    spec = InputSpec(
        name="x", width=10, height=8, channels=("R", "G", "B", "lesion_probability"),
        resize="letterbox", mean=(0.5,) * 4, std=(0.25,) * 4,
    )  # fmt: skip
    variants = voting_variants(np.zeros((8, 10, 3), np.uint8), np.full((8, 10), 255, np.uint8))
    batch = variant_batch(variants, list(PAPER_WEIGHTS), spec)
    assert batch.shape == (6, 4, 8, 10) and batch.dtype == np.float32
    assert batch[:, 3].min() == pytest.approx(2.0)
