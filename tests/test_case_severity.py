"""The case-level severity model: the measures graph on constructed crops, per-case pooling, nested CV that
never lets a held-out case into a fit, and the service's case model (numpy, as served)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
from sklearn.pipeline import Pipeline

from service.pipeline.case_risk import CASE_FEATURES, PHOTO_MEASURES, CaseModel, case_features, stage_means
from service.pipeline.exams import ExamPhoto, summarise
from service.pipeline.stages import Assessment, Detection, Diagnosis
from service.render.reasons import Reason
from training import case_severity
from training.case_severity import PhotoTable, SwedeMeasures, measure_photos

SIDE = 64
AT = {name: i for i, name in enumerate(PHOTO_MEASURES)}


def _measure(rgb: np.ndarray, lesion: np.ndarray | None = None) -> np.ndarray:
    lesion = np.zeros(rgb.shape[:2], np.uint8) if lesion is None else lesion
    return measure_photos(SwedeMeasures(), rgb[None], lesion[None])[0]


def _flat(colour: tuple[int, int, int]) -> np.ndarray:
    return np.full((SIDE, SIDE, 3), colour, np.uint8)


def _square_lesion(lo: int = 16, hi: int = 48) -> np.ndarray:
    lesion = np.zeros((SIDE, SIDE), np.uint8)
    lesion[lo:hi, lo:hi] = 255
    return lesion


# --- the measures graph ----------------------------------------------------------------------------------


def test_acetowhite_tissue_is_whiter_than_red_tissue_whatever_the_exposure() -> None:
    red, white = _flat((200, 90, 80)), _flat((215, 200, 195))
    assert _measure(white)[AT["whiteness"]] > _measure(red)[AT["whiteness"]] + 0.3
    darker = (red * 0.6).astype(np.uint8)  # the same tissue under less light: saturation barely moves
    assert _measure(darker)[AT["whiteness"]] == pytest.approx(_measure(red)[AT["whiteness"]], abs=0.02)


def test_acetowhite_area_counts_tissue_only_and_density_is_the_lesions_extra_whiteness() -> None:
    rgb = _flat((200, 90, 80))
    rgb[:, : SIDE // 2] = 0  # a dark surround (letterbox padding, speculum shadow) is not tissue
    lesion = np.zeros((SIDE, SIDE), np.uint8)
    lesion[:, SIDE // 2 : SIDE // 2 + SIDE // 4] = 255  # half of the tissue
    flat = _measure(rgb, lesion)
    assert flat[AT["acetowhite_area"]] == pytest.approx(0.5, abs=0.01)
    assert flat[AT["acetowhite_density"]] == pytest.approx(0.0, abs=1e-6)  # the lesion looks like the rest
    rgb[lesion > 0] = (215, 200, 195)
    assert _measure(rgb, lesion)[AT["acetowhite_density"]] > 0.3


def test_iodine_non_uptake_is_mustard_yellow_not_mahogany_brown() -> None:
    yellow, brown = _flat((225, 185, 70)), _flat((120, 55, 30))
    assert _measure(yellow)[AT["iodine_yellow"]] == pytest.approx(1.0)
    assert _measure(brown)[AT["iodine_yellow"]] == pytest.approx(0.0)
    half = brown.copy()
    half[: SIDE // 2] = (225, 185, 70)
    assert _measure(half)[AT["iodine_yellow"]] == pytest.approx(0.5, abs=0.01)


def test_a_sharp_lesion_margin_scores_higher_than_a_feathered_one() -> None:
    lesion = _square_lesion()
    sharp = _flat((200, 90, 80))
    sharp[lesion > 0] = (215, 200, 195)
    # The same patch fading in over 10 px: whiteness changes gently across the lesion border.
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    inside = np.minimum.reduce([x - 16, 47 - x, y - 16, 47 - y]).astype(np.float32)
    blend = np.clip(0.5 + inside / 10.0, 0.0, 1.0)[..., None]
    feathered = (np.array([200, 90, 80]) * (1 - blend) + np.array([215, 200, 195]) * blend).astype(np.uint8)
    noise = np.random.default_rng(0).integers(-4, 5, (SIDE, SIDE, 1))  # some texture everywhere
    sharp, feathered = (np.clip(im + noise, 0, 255).astype(np.uint8) for im in (sharp, feathered))
    assert (
        _measure(sharp, lesion)[AT["margin_sharpness"]]
        > 1.5 * _measure(feathered, lesion)[AT["margin_sharpness"]]
    )


def test_a_photo_without_a_lesion_border_has_an_undefined_margin_not_a_made_up_one() -> None:
    out = _measure(_flat((200, 90, 80)))
    assert np.isnan(out[AT["margin_sharpness"]])
    assert out[AT["acetowhite_area"]] == 0.0 and out[AT["acetowhite_density"]] == 0.0


def test_a_speck_of_lesion_has_no_density_or_margin_so_resolution_cannot_flip_them() -> None:
    """A lesion under 1 % of the tissue reads as none: a finer copy of a photo can grow such a speck where
    the coarser one has nothing, and the exam's P(CIN2+) must not jump with it."""
    rgb = _flat((200, 90, 80))
    speck = _square_lesion(20, 24)  # 16 px: 0.4 % of a 64 px crop
    rgb[speck > 0] = (215, 200, 195)
    out = _measure(rgb, speck)
    assert 0 < out[AT["acetowhite_area"]] < case_severity.MIN_LESION_SHARE
    assert out[AT["acetowhite_density"]] == 0.0 and np.isnan(out[AT["margin_sharpness"]])


# --- pooling photos into cases ---------------------------------------------------------------------------


def _photos(rows: list[tuple[str, str, int, float]]) -> PhotoTable:
    case, stage, fold, label = zip(*rows, strict=True)
    return PhotoTable(np.array(case), np.array(stage), np.array(fold), np.array(label))


def test_case_features_pool_per_case_and_stage_and_leave_a_missing_stage_missing() -> None:
    photos = _photos(
        [("a", "acetic", 0, 1.0), ("a", "acetic", 0, 1.0), ("a", "saline", 0, 1.0), ("b", "acetic", 1, 0.0)]
    )
    table = np.zeros((4, len(PHOTO_MEASURES)))
    table[:, AT["whiteness"]] = [0.6, 0.8, 0.5, 0.9]
    table[:, AT["acetowhite_area"]] = [0.1, 0.3, 0.99, 0.2]  # the saline photo's map is never read
    features = case_severity.measured_case_features(table, photos, ["a", "b"])
    at = CASE_FEATURES.index
    assert features[0, at("whitening")] == pytest.approx(0.7 - 0.5)
    assert features[0, at("acetowhite_area")] == pytest.approx(0.2)
    assert features[1, at("acetowhite_area")] == pytest.approx(0.2)
    assert np.isnan(features[1, at("whitening")]) and np.isnan(features[:, at("iodine_yellow")]).all()


def test_a_case_whose_photos_straddle_folds_is_refused() -> None:
    photos = _photos([("a", "acetic", 0, 1.0), ("a", "saline", 1, 1.0)])
    with pytest.raises(ValueError, match="case a"):
        case_severity.case_table(photos, ["a"])


def test_a_segmenter_fold_model_that_learned_a_case_it_maps_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.tasks import severity

    class FoldModel:  # what LesionChannel reads from a fold model's manifest (extra.fold_model)
        def __init__(self, path: Path) -> None:
            self.fold = int(path.name.removeprefix("fold"))
            self.trained_on = frozenset({"iarc-A"} if self.fold == 1 else {"iarc-B"})

    monkeypatch.setattr(severity, "LesionChannel", FoldModel)
    args = argparse.Namespace(segmenter_folds=str(tmp_path), segmenter_dir=tmp_path / "shipped")
    assert set(severity.lesion_source(args, {0: {"iarc-A"}, 1: {"iarc-B"}})) == {0, 1}
    with pytest.raises(ValueError, match="learned the outlines of"):
        severity.lesion_source(args, {0: {"iarc-B"}, 1: {"iarc-A"}})


def test_no_fit_for_an_outer_fold_ever_sees_that_folds_cases(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(0)
    n = 30
    cases = case_severity.CaseTable(
        np.array([f"c{i}" for i in range(n)]), np.arange(n) % 3, (np.arange(n) % 4 != 0).astype(float)
    )
    ids = np.arange(n, dtype=float)[:, None]  # column 0 names the case, so a fit's rows can be traced
    x = np.hstack([ids, rng.normal(size=(n, 2))])
    seen: list[set[int]] = []
    original = case_severity.logistic

    def recording(c: float) -> Pipeline:
        pipeline = original(c)
        fit = pipeline.fit

        def traced(xs: np.ndarray, y: np.ndarray) -> Pipeline:
            seen.append({int(v) for v in xs[:, 0]})
            return fit(xs, y)

        pipeline.fit = traced  # type: ignore[method-assign]
        return pipeline

    monkeypatch.setattr(case_severity, "logistic", recording)
    folds = case_severity.nested_case_cv(
        {"x": x}, cases, (0.1, 1.0), target_sensitivity=0.9, inner_folds=3, repeats=1
    )
    per_fold = len(seen) // len(folds)  # each outer fold: the inner fits, then its refit, in order
    assert per_fold > 0, "no fit went through the patched logistic: the leak check would check nothing"
    assert per_fold * len(folds) == len(seen)
    for k, fold in enumerate(folds):
        held_out = set(np.flatnonzero(cases.fold == fold.fold).tolist())
        assert set(fold.held_out.tolist()) == held_out
        assert all(not (fit & held_out) for fit in seen[k * per_fold : (k + 1) * per_fold])
        assert 0.0 <= fold.threshold <= 1.0
    scored = np.concatenate([f.held_out for f in folds])
    assert sorted(scored.tolist()) == list(range(n))  # every case scored once, by the one fold holding it out


# --- the service's case model ------------------------------------------------------------------------------


def _model() -> CaseModel:
    extra = {
        "case_model": {
            "features": list(CASE_FEATURES),
            "photo_measures": list(PHOTO_MEASURES),
            "impute": [0.2, 0.05, 0.05, 0.1, 1.2],
            "weight": [0.0, 10.0, 10.0, 0.0, 0.0],
            "bias": -1.0,
        }
    }
    return CaseModel.from_extra(extra)


def _measures(whiteness: float, density: float) -> np.ndarray:
    out = np.full(len(PHOTO_MEASURES), np.nan)
    out[AT["whiteness"]], out[AT["acetowhite_density"]] = whiteness, density
    return out


def test_missing_stages_take_the_training_median_and_undefined_measures_are_skipped() -> None:
    model = _model()
    acetic = _measures(0.7, 0.1)
    # No saline photo: whitening imputed (0.05), so logit = 10 * 0.1 + 10 * 0.05 - 1.
    assert model.logit(case_features(stage_means({"acetic": [acetic]}))) == pytest.approx(0.5)
    with_saline = model.probability({"acetic": [acetic], "saline": [_measures(0.4, np.nan)]})
    assert with_saline == pytest.approx(1 / (1 + np.exp(-(1.0 + 3.0 - 1.0))))
    # A photo whose density is undefined does not drag the stage mean.
    assert (
        stage_means({"acetic": [acetic, _measures(0.7, np.nan)]})["acetic"][AT["acetowhite_density"]] == 0.1
    )


def test_a_case_model_for_other_features_is_refused() -> None:
    with pytest.raises(ValueError, match="not the ones"):
        CaseModel.from_extra({"case_model": {"features": ["a"], "photo_measures": list(PHOTO_MEASURES)}})


def _photo(index: int, stage: str, measures: np.ndarray, *, usable: bool = True) -> ExamPhoto:
    assessment = Assessment(
        reasons=[] if usable else [Reason.MOTION_BLUR],
        image_size=(100, 100),
        detection=Detection(True, 1.0, (0.0, 0.0, 100.0, 100.0)),
        stage=stage,
        measures=measures,
        diagnosis=Diagnosis(0.5, False) if stage == "acetic" and usable else None,
    )
    return ExamPhoto(index=index, stage_hint=stage, assessment=assessment)


def test_an_exam_pools_its_usable_acetic_and_saline_photos_and_ignores_a_retaken_one() -> None:
    model = _model()
    photos = [
        _photo(0, "saline", _measures(0.4, np.nan)),
        _photo(1, "acetic", _measures(0.7, 0.1)),
        _photo(2, "acetic", _measures(0.99, 0.9), usable=False),
    ]
    exam = summarise(photos, model, cin2plus_threshold=0.5)
    assert exam.diagnosis is not None and exam.diagnosis.photos_used == [0, 1]
    assert exam.diagnosis.probability == pytest.approx(
        model.probability(
            {"acetic": [photos[1].assessment.measures], "saline": [photos[0].assessment.measures]}
        )  # type: ignore[union-attr]
    )
    assert exam.retake == [2] and exam.review == 1
    assert summarise(photos[:1], model, 0.5).diagnosis is None  # no acetic-acid photo: no diagnosis
