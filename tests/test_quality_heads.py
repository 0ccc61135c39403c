"""The quality task's nested choice of head strengths: chosen on inner folds only, by the stated rule."""

from __future__ import annotations

import numpy as np
import pytest

from training.tasks.quality import (
    EXAM_STAGES,
    Pools,
    StageCandidate,
    _consistency,
    choose,
    get_args_parser,
    not_acetic_threshold,
)

FOLDS = 4
PER_FOLD = 120


def _pool(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Focus features where one column carries the label and many noisy ones do not, so the L2 strength
    changes the ranking; stage features where the first column tells acetic from the rest, more clearly in
    one view (turns112) than in the other (crop224)."""
    sharp = rng.integers(0, 2, n).astype(float)
    focus = rng.normal(size=(n, 40))
    focus[:, 0] += 1.2 * sharp
    focus[:, 1:6] += 0.4 * sharp[:, None] * rng.normal(size=(1, 5))  # weak, shared across candidates
    stage = rng.integers(0, len(EXAM_STAGES), n)
    clear, faint = rng.normal(size=(n, 30)), rng.normal(size=(n, 30))
    clear[:, 0] += 1.5 * (stage == 0)
    faint[:, 0] += 0.5 * (stage == 0)
    labels = {
        "sharp": sharp,
        "blur_kind": np.where(sharp == 1, 0, 1),
        "stage": stage,
        "blur_extent": np.zeros(n),
        "exposure_ok": np.ones(n, bool),
    }
    return {"focus": focus, "pooled_crop224": faint, "pooled_turns112": clear}, labels


@pytest.fixture
def pools() -> Pools:
    rng = np.random.default_rng(3)
    real_feats, real_labels = _pool(rng, FOLDS * PER_FOLD)
    synthetic_feats, synthetic_labels = _pool(rng, 60)
    real_fold = np.repeat(np.arange(FOLDS), PER_FOLD)
    return Pools(real_feats, real_labels, real_fold, synthetic_feats, synthetic_labels)


def _args(*extra: str):
    views = ["--stage-views", "crop224", "turns112"]  # the views the pools have, the weaker one first
    return get_args_parser().parse_args(["--output-dir", "unused", *views, *extra])


def test_the_strength_with_the_best_inner_figure_is_chosen(pools: Pools) -> None:
    args = _args("--focus-c", "0.0001", "100", "--stage-c", "0.0001", "10")
    choice = choose(pools, {0}, [1, 2, 3], args)
    figures, flagged = choice.focus_specificity, choice.stage_flagged
    assert set(figures) == {0.0001, 100.0}
    assert set(flagged) == {StageCandidate(v, c) for v in ("crop224", "turns112") for c in (0.0001, 10.0)}
    # The candidates really differ here, and the better one is listed last: "take the first" would fail.
    assert figures[100.0] > figures[0.0001]
    assert flagged[StageCandidate("turns112", 10.0)] > flagged[StageCandidate("crop224", 10.0)]
    assert choice.strengths.focus == max(figures, key=lambda c: figures[c])
    assert choice.strengths.stage == max(flagged, key=lambda k: flagged[k])
    assert choice.strengths.stage.view == "turns112"


def test_the_outer_fold_never_informs_the_choice(pools: Pools) -> None:
    args = _args("--focus-c", "0.0001", "0.01", "100")
    before = choose(pools, {0}, [1, 2, 3], args)
    scrambled = Pools(
        {k: np.where((pools.real_fold == 0)[:, None], 0.0, v) for k, v in pools.real_feats.items()},
        pools.real_labels,
        pools.real_fold,
        pools.synthetic_feats,
        pools.synthetic_labels,
    )
    after = choose(scrambled, {0}, [1, 2, 3], args)
    assert after.focus_specificity == before.focus_specificity
    assert after.stage_flagged == before.stage_flagged
    assert after.thresholds == before.thresholds


def test_not_acetic_threshold_flags_at_most_the_allowed_share_of_acetic_crops() -> None:
    p_acetic = np.linspace(0.05, 0.95, 50)
    p_stage = np.stack([p_acetic, 1 - p_acetic, np.zeros(50), np.zeros(50)], axis=1)
    threshold = not_acetic_threshold(p_stage, np.zeros(50, int), 0.10)
    assert np.mean(p_acetic < threshold) <= 0.10
    assert np.mean(p_acetic <= threshold) > 0.10  # the largest such threshold: one more crop would pass it


def test_decision_consistency_names_the_check_that_flips() -> None:
    """Two clean photos under two transforms: photo 0 turns not sharp when rotated, photo 1 never changes;
    both are flagged not acetic throughout. Whole decisions agree for one photo of two, each check alone
    says which one flipped."""
    n = 4  # (photo 0, photo 1) as taken, then rotated
    pooled = {
        "variant": np.zeros(n, int),
        "photo": np.array([0, 1, 0, 1]),
        "transform": np.array(["as_taken", "as_taken", "rotate90", "rotate90"]),
        "p_sharp": np.array([0.9, 0.9, 0.2, 0.9]),
        "threshold_not_sharp_balanced": np.full(n, 0.5),
        "p_stage": np.tile([0.1, 0.9, 0.0, 0.0], (n, 1)),
        "threshold_not_acetic": np.full(n, 0.3),
        "exposure_ok": np.ones(n, bool),
    }
    out = _consistency(pooled)
    assert out["all_transforms"] == 0.5
    by_reason = out["by_reason"]
    assert by_reason["not_sharp"]["all_transforms"] == 0.5  # type: ignore[index]
    assert by_reason["not_acetic"]["all_transforms"] == 1.0  # type: ignore[index]
    assert by_reason["exposure_or_glare"]["rotate90"] == 1.0  # type: ignore[index]
