from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.adapters import (
    atlas_severity,
    atlas_stage,
    coco_boxes,
    iarc_atlas,
    image_mask_pairs,
    mobileodt,
    plain_csv,
    skimage_negatives,
)
from training.data.records import Severity


def _write_image(
    path: Path, size: tuple[int, int] = (40, 30), colour: tuple[int, int, int] = (200, 80, 90)
) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


@pytest.mark.parametrize(
    ("filename", "stage"),
    [
        ("3_After_acetic_acid.jpg", "acetic"),
        ("2_After_normal_saline.jpg", "saline"),
        ("5_After_Lugols_iodine.jpg", "iodine"),
        ("4_After_acetic_acid_with_green_filter.jpg", "green"),
        ("3_After_normal_saline_with_green_filter.jpg", "green"),
        ("6_After_acetic_acid_with_higher_magnification.jpg", "acetic"),
        ("1_Speculum_examination.jpg", "saline"),
        ("7_Visualization_of_the_SCJ.jpg", None),
    ],
)
def test_atlas_stage_from_filename(filename: str, stage: str | None) -> None:
    assert atlas_stage(filename) == stage


def test_atlas_severity_parses_histology() -> None:
    assert atlas_severity("HSIL-CIN2.") is Severity.HIGH_GRADE
    assert atlas_severity("HSIL-CIN3") is Severity.HIGH_GRADE
    assert atlas_severity("LSIL-CIN1.") is Severity.LOW_GRADE
    with pytest.raises(ValueError, match="unrecognised"):
        atlas_severity("inconclusive")


def test_real_atlas_has_every_case_labelled(atlas_root: Path) -> None:
    records = iarc_atlas(atlas_root)
    assert len(records) == 209
    cases = {r.subject for r in records}
    assert len(cases) == 45
    grade_per_case = {r.subject: r.labels.severity for r in records if r.labels.severity is not None}
    assert Counter(grade_per_case.values()) == {Severity.HIGH_GRADE: 33, Severity.LOW_GRADE: 12}
    stages = Counter(r.labels.exam_stage for r in records)
    assert stages["acetic"] > 60 and stages["iodine"] > 30 and stages["green"] > 30
    first = records[0].load()
    assert first.image.shape == (600, 800, 3) and first.image.dtype == np.uint8


def test_atlas_vulva_photos_are_not_cervix(atlas_root: Path) -> None:
    vulva = [r for r in iarc_atlas(atlas_root) if "vulva" in r.path.name.lower()]
    assert vulva and all(r.labels.cervix_present is False and r.labels.severity is None for r in vulva)


def test_atlas_missing_folder_names_the_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"shared/README\.md"):
        iarc_atlas(tmp_path / "nowhere")


def test_mobileodt_type_folders(tmp_path: Path) -> None:
    _write_image(tmp_path / "train" / "Type_1" / "10.jpg")
    _write_image(tmp_path / "train" / "Type_3" / "11.jpg")
    _write_image(tmp_path / "additional_Type_2_v2" / "12.jpg")
    records = mobileodt(tmp_path / "train") + mobileodt(tmp_path)
    by_name = {r.path.name: r for r in records}
    assert by_name["10.jpg"].labels.transformation_zone == 1
    assert by_name["11.jpg"].labels.transformation_zone == 3
    assert by_name["12.jpg"].labels.transformation_zone == 2
    assert all(r.labels.cervix_present and r.labels.severity is None for r in records)


def test_coco_boxes_union_and_negatives(tmp_path: Path) -> None:
    _write_image(tmp_path / "a.jpg")
    _write_image(tmp_path / "b.jpg")
    coco = {
        "images": [
            {"id": 1, "file_name": "a.jpg", "patient_id": "P1"},
            {"id": 2, "file_name": "b.jpg"},
        ],
        "categories": [{"id": 7, "name": "cervix"}, {"id": 8, "name": "os"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 10]},
            {"id": 2, "image_id": 1, "category_id": 7, "bbox": [8, 1, 20, 5]},
            {"id": 3, "image_id": 2, "category_id": 8, "bbox": [0, 0, 5, 5]},
        ],
    }
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    a, b = coco_boxes(tmp_path / "ann.json")
    assert a.labels.cervix_box == (2, 1, 28, 13) and a.subject == "coco-P1"
    assert b.labels.cervix_present is False and b.labels.cervix_box is None and b.subject == "coco-b"
    assert a.load().image.shape == (30, 40, 3)


def test_image_mask_pairs_group_by_subject_and_load_masks(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "P017_acetic.jpg")
    _write_image(tmp_path / "images" / "P017_iodine.jpg")
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:20] = 255
    (tmp_path / "masks").mkdir()
    for stem in ("P017_acetic", "P017_iodine"):
        Image.fromarray(mask).save(tmp_path / "masks" / f"{stem}.png")
    records = image_mask_pairs(tmp_path / "images", tmp_path / "masks")
    assert {r.subject for r in records} == {"pairs-P017"}
    loaded = records[0].load()
    assert loaded.labels.lesion_mask is not None
    assert loaded.labels.lesion_mask.sum() == 5 * 15 and set(np.unique(loaded.labels.lesion_mask)) == {0, 1}


def test_image_mask_pairs_report_a_missing_mask(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "P1_x.jpg")
    (tmp_path / "masks").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no mask for P1_x\.jpg"):
        image_mask_pairs(tmp_path / "images", tmp_path / "masks")


def test_mask_size_mismatch_is_refused(tmp_path: Path) -> None:
    _write_image(tmp_path / "images" / "P1_x.jpg", size=(40, 30))
    _write_image(tmp_path / "masks" / "P1_x.png", size=(20, 15))
    (record,) = image_mask_pairs(tmp_path / "images", tmp_path / "masks")
    with pytest.raises(ValueError, match="pixel for pixel"):
        record.load()


def test_plain_csv_reads_every_column(tmp_path: Path) -> None:
    _write_image(tmp_path / "img" / "1.jpg")
    _write_image(tmp_path / "img" / "2.jpg")
    (tmp_path / "labels.csv").write_text(
        "path,subject,cervix_present,x0,y0,x1,y1,severity,exam_stage\n"
        "img/1.jpg,W01,,1,2,30,25,HSIL,acetic\n"
        "img/2.jpg,W02,no,,,,,,\n"
    )
    first, second = plain_csv(tmp_path / "labels.csv")
    assert first.labels.cervix_present is True and first.labels.cervix_box == (1.0, 2.0, 30.0, 25.0)
    assert first.labels.severity is Severity.HIGH_GRADE and first.labels.exam_stage == "acetic"
    assert first.subject == "csv-W01"
    assert second.labels.cervix_present is False and second.labels.severity is None


@pytest.mark.parametrize(
    ("row", "message"),
    [("img.jpg,W1,,,,,,bad,", "unknown severity"), ("img.jpg,W1,,,,,,,vinegar", "unknown exam_stage")],
)
def test_plain_csv_errors_name_the_line(tmp_path: Path, row: str, message: str) -> None:
    (tmp_path / "l.csv").write_text(
        "path,subject,cervix_present,x0,y0,x1,y1,severity,exam_stage\n" + row + "\n"
    )
    with pytest.raises(ValueError, match=rf"l.csv:2: {message}"):
        plain_csv(tmp_path / "l.csv")


def test_plain_csv_requires_path_and_subject(tmp_path: Path) -> None:
    (tmp_path / "l.csv").write_text("path,label\nx.jpg,1\n")
    with pytest.raises(ValueError, match="subject"):
        plain_csv(tmp_path / "l.csv")


def test_skimage_negatives_are_real_photos_without_cervix() -> None:
    records = skimage_negatives()
    assert len(records) >= 20 and len({r.subject for r in records}) == len(records)
    astronaut = next(r for r in records if r.subject == "skimage-astronaut").load()
    assert astronaut.image.shape == (512, 512, 3) and astronaut.labels.cervix_present is False


def test_atlas_marks_are_removed_on_load_unless_asked_not_to(atlas_root: Path) -> None:
    from training.data.annotations import annotation_mask

    # The most-marked of the first dozen atlas images (many carry drawn arrows or outlines).
    raw_records = iarc_atlas(atlas_root, remove_marks=False)
    marked = max(raw_records[:12], key=lambda r: annotation_mask(r.load().image).mean())
    raw = marked.load().image
    assert annotation_mask(raw).mean() > 0.001, "expected a marked image among the first atlas records"
    clean_record = next(r for r in iarc_atlas(atlas_root) if r.path == marked.path)
    clean = clean_record.load().image
    assert annotation_mask(clean).mean() < annotation_mask(raw).mean() / 4
    changed = np.any(clean != raw, axis=2)
    assert changed.mean() < 0.05, "removal repaints the marks, not the tissue"
