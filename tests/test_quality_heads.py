"""The quality task's nested choice of head strengths: chosen on inner folds only, by the stated rule."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from training.tasks.quality import (
    EXAM_STAGES,
    LinearHead,
    Pools,
    StageCandidate,
    _consistency,
    _fit_stage,
    choose,
    get_args_parser,
    not_acetic_threshold,
    not_sharp_threshold,
)

FOLDS = 4
PER_FOLD = 120
SERVED_PER_FOLD = 60


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
    served_feats, served_labels = _pool(rng, FOLDS * SERVED_PER_FOLD)
    served_fold = np.repeat(np.arange(FOLDS), SERVED_PER_FOLD)
    return Pools(
        real_feats,
        real_labels,
        real_fold,
        synthetic_feats,
        synthetic_labels,
        served_feats,
        served_labels,
        served_fold,
    )


def _args(*extra: str):
    views = ["--stage-views", "crop224", "turns112"]  # the views the pools have, the weaker one first
    return get_args_parser().parse_args(["--output-dir", "unused", *views, *extra])


def test_the_strength_with_the_best_inner_figure_is_chosen(pools: Pools) -> None:
    only = ("--stage-weighting", "none", "--stage-synthetic", "with")
    args = _args("--focus-c", "0.0001", "100", "--stage-c", "0.0001", "10", *only)
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


def test_weightings_and_pools_are_candidates_beside_views_and_strengths(pools: Pools) -> None:
    choice = choose(pools, {0}, [1, 2, 3], _args("--stage-c", "0.01"))
    assert set(choice.stage_flagged) == {
        StageCandidate(v, 0.01, w, s)
        for v in ("crop224", "turns112")
        for w in ("none", "balanced")
        for s in (True, False)
    }
    assert choice.strengths.stage == max(choice.stage_flagged, key=lambda k: choice.stage_flagged[k])


def test_a_real_only_stage_head_never_sees_a_synthetic_crop(pools: Pools) -> None:
    """Synthetic crops whose stage features are pure noise change a head fitted with them, and must not
    change one fitted without them."""
    feats, labels = pools.training({0})
    assert labels["real"].sum() == (FOLDS - 1) * PER_FOLD and (~labels["real"]).sum() == 60
    noisy = {
        k: np.where(labels["real"][:, None], v, 50 * np.random.default_rng(1).normal(size=v.shape)).astype(
            v.dtype
        )
        for k, v in feats.items()
    }
    real_only, with_synthetic = (
        StageCandidate("crop224", 1.0, synthetic=False),
        StageCandidate("crop224", 1.0),
    )
    probe = feats["pooled_crop224"][:20]
    np.testing.assert_allclose(
        _fit_stage(noisy, labels, real_only).proba(probe), _fit_stage(feats, labels, real_only).proba(probe)
    )
    assert not np.allclose(
        _fit_stage(noisy, labels, with_synthetic).proba(probe),
        _fit_stage(feats, labels, with_synthetic).proba(probe),
    )


def test_a_balanced_head_weighs_the_rare_stage_up() -> None:
    """With acetic crops nine in ten, weighing each stage alike must raise the rare stage's probability."""
    rng = np.random.default_rng(5)
    stage = (rng.random(2000) < 0.1).astype(int)
    x = rng.normal(size=(2000, 5))
    x[:, 0] += 0.8 * stage
    plain, balanced = LinearHead.fit(x, stage, 1.0), LinearHead.fit(x, stage, 1.0, "balanced")
    rare = stage == 1
    assert balanced.proba(x[rare])[:, 1].mean() > plain.proba(x[rare])[:, 1].mean() + 0.2
    assert balanced.proba(x)[:, 1].mean() == pytest.approx(0.5, abs=0.1)  # what "alike" means


def _zeroed(feats: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {k: np.where(rows[:, None], 0.0, v) for k, v in feats.items()}


@pytest.mark.parametrize("inner_crops", ["served", "training"])
def test_the_outer_fold_never_informs_the_choice(pools: Pools, inner_crops: str) -> None:
    args = _args("--focus-c", "0.0001", "0.01", "100", "--inner-crops", inner_crops)
    before = choose(pools, {0}, [1, 2, 3], args)
    scrambled = replace(
        pools,
        real_feats=_zeroed(pools.real_feats, pools.real_fold == 0),
        served_feats=_zeroed(pools.served_feats, pools.served_fold == 0),
    )
    after = choose(scrambled, {0}, [1, 2, 3], args)
    assert after.focus_specificity == before.focus_specificity
    assert after.stage_flagged == before.stage_flagged
    assert after.thresholds == before.thresholds


def test_inner_folds_are_scored_on_the_crops_the_rule_names(pools: Pools) -> None:
    """Served crops on which every head is less sure of "acetic" (the stage signal cut to 30 %) move the
    not_acetic threshold down when inner folds are scored on served crops, and leave it where it was when
    they are scored on training crops; the training crops alone fit the heads either way."""
    faint = {k: v.copy() for k, v in pools.served_feats.items()}
    acetic = pools.served_labels["stage"] == 0
    for view in ("pooled_crop224", "pooled_turns112"):
        faint[view][acetic, 0] *= 0.3
    dimmed = replace(pools, served_feats=faint)
    for crops, moves in (("served", True), ("training", False)):
        args = _args("--focus-c", "1", "--stage-c", "0.01", "--inner-crops", crops)
        before, after = choose(pools, {0}, [1, 2, 3], args), choose(dimmed, {0}, [1, 2, 3], args)
        assert (after.thresholds["not_acetic"] < before.thresholds["not_acetic"] - 0.01) is moves, crops
        assert after.strengths.stage in before.stage_flagged


def test_scoring_on_served_crops_needs_them(pools: Pools) -> None:
    empty = replace(pools, served_fold=np.full_like(pools.served_fold, 9))
    with pytest.raises(ValueError, match="--inner-crops training"):
        choose(empty, {0}, [1, 2, 3], _args("--focus-c", "1", "--stage-c", "0.01", "--inner-crops", "served"))


def test_not_acetic_threshold_flags_at_most_the_allowed_share_of_acetic_crops() -> None:
    p_acetic = np.linspace(0.05, 0.95, 50)
    p_stage = np.stack([p_acetic, 1 - p_acetic, np.zeros(50), np.zeros(50)], axis=1)
    threshold = not_acetic_threshold(p_stage, np.zeros(50, int), 0.10)
    assert np.mean(p_acetic < threshold) <= 0.10
    assert np.mean(p_acetic <= threshold) > 0.10  # the largest such threshold: one more crop would pass it


def test_the_acetic_bound_holds_in_every_transform_that_has_acetic_crops() -> None:
    # Turned crops look less acetic than upright ones; iodine crops (stage 2) come only upright.
    p_acetic = np.concatenate([np.linspace(0.4, 0.95, 50), np.linspace(0.1, 0.65, 50), np.full(10, 0.2)])
    stage = np.concatenate([np.zeros(100, int), np.full(10, 2)])
    transform = np.array(["as_taken"] * 50 + ["rotate90"] * 50 + ["as_taken"] * 5 + ["iodine_only"] * 5)
    p_stage = np.stack([p_acetic, 1 - p_acetic, np.zeros(110), np.zeros(110)], axis=1)
    pooled = not_acetic_threshold(p_stage, stage, 0.10)
    each = not_acetic_threshold(p_stage, stage, 0.10, transform)
    turned = (transform == "rotate90") & (stage == 0)
    assert np.mean(p_acetic[turned] < pooled) > 0.10  # pooled, the turned crops pay for the upright ones
    for name in ("as_taken", "rotate90"):
        assert np.mean(p_acetic[(transform == name) & (stage == 0)] < each) <= 0.10
    assert each > 0.0  # the group with no acetic crops sets no bound


def test_choose_bounds_acetic_crops_per_transform_only_when_asked(pools: Pools) -> None:
    # Half of each fold's served crops are "turned", and their acetic signal is fainter.
    turned = np.tile([False, True], pools.served_fold.size // 2)
    faint = {k: v.copy() for k, v in pools.served_feats.items()}
    for view in ("pooled_crop224", "pooled_turns112"):
        faint[view][turned & (pools.served_labels["stage"] == 0), 0] -= 1.0
    looks = replace(pools, served_feats=faint, served_transform=np.where(turned, "rotate90", "as_taken"))
    one_head = (
        "--stage-views",
        "turns112",
        "--stage-c",
        "1",
        "--stage-weighting",
        "none",
        "--stage-synthetic",
        "with",
    )

    def not_acetic(*extra: str) -> float:
        return choose(looks, {0}, [1, 2, 3], _args("--focus-c", "1", *one_head, *extra)).thresholds[
            "not_acetic"
        ]

    assert not_acetic("--acetic-bound", "each-transform") < not_acetic("--acetic-bound", "pooled") - 0.01
    # Without transforms (training crops) the two bounds are one rule.
    training = ("--inner-crops", "training", "--acetic-bound")
    assert not_acetic(*training, "each-transform") == not_acetic(*training, "pooled")


def test_the_not_sharp_sensitivity_holds_in_every_transform_that_has_blurred_crops() -> None:
    # Blurred 8 MP framed crops score less "not sharp" than blurred upright ones; "sharp_only" has none.
    score = np.concatenate([np.linspace(0.4, 0.95, 50), np.linspace(0.1, 0.65, 50), np.full(10, 0.05)])
    not_sharp = np.concatenate([np.ones(100, int), np.zeros(10, int)])
    transform = np.array(["as_taken"] * 50 + ["framed_8mp"] * 50 + ["as_taken"] * 5 + ["sharp_only"] * 5)
    pooled = not_sharp_threshold(not_sharp, score, 0.98)
    each = not_sharp_threshold(not_sharp, score, 0.98, transform)
    blurred = {name: (transform == name) & (not_sharp == 1) for name in ("as_taken", "framed_8mp")}
    assert np.mean(score[blurred["framed_8mp"]] >= pooled) < 0.98  # pooled, the framed crops pay
    for rows in blurred.values():
        assert np.mean(score[rows] >= each) >= 0.98
    assert each == not_sharp_threshold(not_sharp[blurred["framed_8mp"]], score[blurred["framed_8mp"]], 0.98)


def test_choose_bounds_not_sharp_crops_per_transform_only_when_asked(pools: Pools) -> None:
    # Half of each fold's served crops are "framed", and their blur shows less in the focus features.
    framed = np.tile([False, True], pools.served_fold.size // 2)
    faint = {k: v.copy() for k, v in pools.served_feats.items()}
    faint["focus"][framed & (pools.served_labels["sharp"] == 0), 0] += 1.0
    looks = replace(pools, served_feats=faint, served_transform=np.where(framed, "framed_8mp", "as_taken"))
    one_head = ("--stage-c", "1", "--stage-weighting", "none", "--stage-synthetic", "with")

    def not_sharp(*extra: str) -> float:
        return choose(looks, {0}, [1, 2, 3], _args("--focus-c", "1", *one_head, *extra)).thresholds[
            "not_sharp"
        ]

    assert not_sharp("--focus-bound", "each-transform") < not_sharp("--focus-bound", "pooled")
    # Without transforms (training crops) the two bounds are one rule.
    training = ("--inner-crops", "training", "--focus-bound")
    assert not_sharp(*training, "each-transform") == not_sharp(*training, "pooled")


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
        "threshold_not_sharp": np.full(n, 0.5),  # the service's default point
        "threshold_not_sharp_balanced": np.full(n, 0.95),  # would flag nothing
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


def test_stage_variants_score_each_outer_fold_with_its_own_nested_head() -> None:
    from training.stage_variants import describe, flagged_and_scores

    rng = np.random.default_rng(11)
    saved: dict[str, np.ndarray] = {}
    for pool, n in (("real", FOLDS * PER_FOLD), ("synthetic", 60), ("served", FOLDS * 40)):
        feats, labels = _pool(rng, n)
        feats["pooled_crop224"][:, 0] += 2.0 * (labels["stage"] == 0)  # a clear stage signal here
        saved |= {f"{pool}.{k}": v for k, v in (feats | labels).items() if k != "pooled_turns112"}
    saved["real_fold"] = np.repeat(np.arange(FOLDS), PER_FOLD)
    saved["served_fold"] = np.repeat(np.arange(FOLDS), 40)
    saved["served_photo"] = np.repeat(np.arange(FOLDS * 20), 2)  # each photo as taken and turned
    saved["served_transform"] = np.tile(["as_taken", "rotate90"], FOLDS * 20)
    saved["served_variant"] = np.zeros(FOLDS * 40, int)
    flagged, p_acetic = flagged_and_scores(saved, ["--stage-weighting", "none", "--stage-synthetic", "with"])
    acetic = saved["served.stage"] == 0
    # Column 0 tells acetic crops apart: the nested threshold flags few of them and most of the others.
    assert flagged[acetic].mean() < 0.25 < 0.5 < flagged[~acetic].mean()
    assert p_acetic[acetic].mean() > p_acetic[~acetic].mean()
    line = describe(saved, flagged, p_acetic)
    assert "flagged as taken" in line and f"of {FOLDS * 20} photos" in line


def test_focus_bounds_replay_both_rules_on_each_outer_fold() -> None:
    from training.focus_bounds import describe, flags_by_bound

    rng = np.random.default_rng(12)
    saved: dict[str, np.ndarray] = {}
    for pool, n in (("real", FOLDS * PER_FOLD), ("synthetic", 60), ("served", FOLDS * 40)):
        feats, labels = _pool(rng, n)
        saved |= {f"{pool}.{k}": v for k, v in (feats | labels).items()}
    turned = np.tile([False, True], FOLDS * 20)
    saved["served.focus"][turned & (saved["served.sharp"] == 0), 0] += 1.0  # blur shows less turned
    saved["real_fold"] = np.repeat(np.arange(FOLDS), PER_FOLD)
    saved["served_fold"] = np.repeat(np.arange(FOLDS), 40)
    saved["served_photo"] = np.repeat(np.arange(FOLDS * 20), 2)  # each photo as taken and turned
    saved["served_transform"] = np.where(turned, "rotate90", "as_taken")
    saved["served_variant"] = np.zeros(FOLDS * 40, int)
    one_strength = ("--focus-c", "1")
    pooled = flags_by_bound(saved, "pooled", one_strength)["not_sharp"]
    each = flags_by_bound(saved, "each-transform", one_strength)["not_sharp"]
    # The same heads with thresholds no higher: every crop the pooled bound calls, the per-transform one
    # calls too, and it catches more of the turned blurred crops.
    assert np.all(each[pooled])
    turned_blurred = turned & (saved["served.sharp"] == 0)
    assert each[turned_blurred].mean() > pooled[turned_blurred].mean()
    line = describe(saved, each)
    assert "as taken" in line and "rotate90" in line and f"of {FOLDS * 20}" in line


def test_focus_points_report_the_inner_folds_figures_without_the_outer_fold(pools: Pools) -> None:
    from training.focus_points import inner_specificities

    args = _args("--focus-c", "0.0001", "100", "--stage-c", "0.01", "--stage-weighting", "none")
    c, specificity = inner_specificities(pools, {0}, [1, 2, 3], args)
    # The balanced figure is the one choose() ranks strengths by, and asking 98 % sensitivity of the
    # same predictions cannot buy specificity.
    assert specificity["not_sharp_balanced"] == pytest.approx(
        choose(pools, {0}, [1, 2, 3], args).focus_specificity[c]
    )
    assert 0.0 < specificity["not_sharp"] <= specificity["not_sharp_balanced"] < 1.0
    real, served = pools.real_fold == 0, pools.served_fold == 0
    blanked = replace(
        pools,
        real_feats={k: np.where(real[:, None], 0.0, v) for k, v in pools.real_feats.items()},
        served_feats={k: np.where(served[:, None], 0.0, v) for k, v in pools.served_feats.items()},
    )
    assert inner_specificities(blanked, {0}, [1, 2, 3], args) == (c, specificity)
