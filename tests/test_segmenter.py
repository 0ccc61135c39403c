"""The lesion segmenter's data and parts: clinician outlines aligned with their atlas photos, the one cervix
of AAHO and AACG never split, training views that keep image and mask together, the decoder's output, the
letterbox interior the service reports and the threshold rule."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch

from service.inference.preprocess import fit
from training import presets
from training.data import catalog
from training.data.adapters import lesion_outline_extras, lesion_outlines
from training.data.records import LabelledImage, Labels
from training.data.splits import assert_disjoint
from training.models import LesionDecoder, LesionSegmenter, segmenter_taps
from training.tasks import segmenter


@pytest.fixture(scope="module")
def outlines_root(atlas_root: Path) -> Path:
    root = catalog.outlines_root(atlas_root)
    if not (root / "index.csv").is_file():
        pytest.skip(f"lesion outlines not found at {root}")
    return root


def test_outline_records_are_atlas_photos_with_their_masks(atlas_root: Path, outlines_root: Path) -> None:
    records = lesion_outlines(outlines_root, atlas_root, remove_marks=False)
    with (outlines_root / "index.csv").open(newline="", encoding="utf-8") as stream:
        rows = list(csv.DictReader(stream))
    assert len(records) == len(rows) == 65
    assert len({r.subject for r in records}) == 27
    stages = [r.labels.exam_stage for r in records]
    # The higher-magnification photo after acetic acid counts as acetic.
    assert (stages.count("acetic"), stages.count("green"), stages.count("iodine")) == (32, 13, 20)
    for record, row in zip(records, rows, strict=True):
        assert record.path == atlas_root / row["atlas_image"] and record.path.is_file()
        assert record.subject == f"iarc-{row['case_id']}"
        assert record.mask_path is not None and record.mask_path.is_relative_to(outlines_root)
    # Decoded pairs: the mask has the photo's size and the share of lesion pixels the index states.
    for record, row in list(zip(records, rows, strict=True))[::8]:
        loaded = record.load()
        mask = loaded.labels.lesion_mask
        assert mask is not None and mask.shape == loaded.image.shape[:2]
        assert set(np.unique(mask)) <= {0, 1}
        assert mask.mean() == pytest.approx(float(row["lesion_fraction"]), abs=5e-4)


def test_outline_photos_load_with_marks_inpainted_and_the_mask_untouched(
    atlas_root: Path, outlines_root: Path
) -> None:
    raw = lesion_outlines(outlines_root, atlas_root, remove_marks=False)
    clean = lesion_outlines(outlines_root, atlas_root)
    changed = 0
    for before, after in list(zip(raw, clean, strict=True))[:12]:
        a, b = before.load(), after.load()
        assert np.array_equal(a.labels.lesion_mask, b.labels.lesion_mask)  # type: ignore[arg-type]
        changed += int(not np.array_equal(a.image, b.image))
    assert changed > 0, "the atlas photos carry IARC's marks: some must be inpainted"


def test_the_extra_cancer_cases_are_cases_of_their_own(outlines_root: Path, atlas_root: Path) -> None:
    extras = lesion_outline_extras(outlines_root)
    assert len(extras) == 5
    assert {r.subject for r in extras} == {"outlines-SCC1", "outlines-SCC8"}
    assert not {r.subject for r in extras} & set(catalog.fold_of_subject_for("segmenter", atlas_root))
    loaded = extras[0].load()
    assert loaded.labels.lesion_mask is not None
    assert loaded.labels.lesion_mask.shape == loaded.image.shape[:2]


def test_aaho_and_aacg_are_never_split_and_every_other_case_keeps_its_fold(atlas_root: Path) -> None:
    data = catalog.task_data("segmenter", atlas_root)
    fold_of = catalog.fold_of_subject_for("segmenter", atlas_root)
    shared = catalog.real_fold_of_subject(atlas_root)
    subjects = [r.subject for r in data.real]
    assert {"iarc-AAHO", "iarc-AACG"} <= set(subjects)
    for split in catalog.real_folds(data.real, fold_of):
        assert_disjoint(split, subjects)
        for side in ("train", "val"):
            held = split.subjects(subjects, side)
            assert ("iarc-AAHO" in held) == ("iarc-AACG" in held), f"{split.name} splits AAHO and AACG"
    moved = {s for s in set(subjects) if fold_of[s] != shared[s]}
    assert moved <= set(catalog.SAME_CERVIX)


def _ramp_photo(height: int = 300, width: int = 400) -> LabelledImage:
    """A photo whose red channel is 255 exactly on the mask, with an off-centre cervix box."""
    mask = np.zeros((height, width), np.uint8)
    mask[60:150, 40:130] = 1
    image = np.full((height, width, 3), 60, np.uint8)
    image[..., 0] = mask * 255
    labels = Labels(cervix_present=True, cervix_box=(20.0, 30.0, 260.0, 230.0), lesion_mask=mask)
    return LabelledImage(image, labels, subject="test", source="test")


def test_training_views_keep_photo_and_mask_aligned_through_flips_and_box_jitter() -> None:
    photo = _ramp_photo()
    flipped_any = False
    for seed in range(12):
        rgb, mask = presets.segmentation_view(photo, np.random.default_rng(seed))
        assert rgb.shape[:2] == mask.shape == (224, 224)
        red = rgb[..., 0].astype(int) - rgb[..., 1].astype(int)  # colour jitter scales both alike
        on, off = red[mask > 0], red[(mask == 0) & (rgb.sum(axis=2) > 0)]
        assert mask.any() and on.mean() > off.mean() + 60, f"seed {seed}: mask and photo drifted apart"
        centre = np.argwhere(mask > 0).mean(axis=0)[1]
        flipped_any |= bool(centre > 112)  # the lesion sits left of the box centre unless flipped
    assert flipped_any


def test_decoder_gives_one_logit_map_at_input_size() -> None:
    for top in ("s16", "s32"):
        model = LesionSegmenter(top=top).eval()
        with torch.inference_mode():
            out = model(torch.zeros(2, 3, 224, 224))["lesion_logits"]
        assert out.shape == (2, 1, 224, 224)
        assert torch.isfinite(out).all()
    decoder = LesionDecoder(segmenter_taps("s16"))
    features = {
        "s4": torch.zeros(1, 24, 56, 56),
        "s8": torch.zeros(1, 40, 28, 28),
        "s16": torch.zeros(1, 112, 14, 14),
    }
    assert decoder(features).shape == (1, 1, 224, 224)


@pytest.mark.parametrize("size", [(600, 800), (800, 600), (333, 517)])
def test_letterbox_interior_is_the_one_the_service_reports(size: tuple[int, int]) -> None:
    height, width = size
    _, placement = fit(np.zeros((height, width, 3), np.uint8), presets.INPUT_SPECS["segmenter"])
    left, top, right, bottom = segmenter._inside(width, height)
    assert (left, top, right, bottom) == placement.interior(width, height)  # service.pipeline.segment's cut
    resized = fit(np.full((height, width, 3), 255, np.uint8), presets.INPUT_SPECS["segmenter"])[0][..., 0]
    assert (resized[top:bottom, left:right] == 255).all()  # the crop's own pixels, no padding
    assert resized.sum() == (bottom - top) * (right - left) * 255  # and all of them


def test_threshold_rule_takes_the_threshold_that_recovers_the_outline() -> None:
    mask = np.zeros((1, 224, 224), np.uint8)
    mask[0, 80:140, 80:140] = 1
    probability = np.full((1, 224, 224), 0.2, np.float32)
    probability[0, 70:150, 70:150] = 0.5  # a halo a low threshold would include
    probability[0, 80:140, 80:140] = 0.8
    views = segmenter.Views(
        np.zeros((1, 224, 224, 3), np.uint8), mask, np.array([[0, 0, 224, 224]]), np.zeros(1, int)
    )
    threshold, dice = segmenter.best_threshold(probability, views)
    assert 0.5 < threshold <= 0.8
    assert dice == pytest.approx(1.0)
    _, low_dice = segmenter.inside_scores(probability, views, 0.45)
    assert low_dice[0] < 0.8


@pytest.mark.slow  # one ONNX export with its parity check and latency runs
def test_an_outer_fold_model_exports_as_the_severity_task_loads_it(tmp_path: Path) -> None:
    from training.tasks import severity

    args = segmenter.get_args_parser().parse_args(["--output-dir", str(tmp_path), "--atlas", str(tmp_path)])
    args.command = "python -m training train segmenter --output-dir x"
    summary = {
        "threshold": 0.3,
        "variant": "all_stages",
        "real_split": "real-gkf5-s0",
        "fold_model": {"fold": 2, "held_out_cases": ["iarc-B"], "trained_on_cases": ["iarc-A"], "rule": "t"},
    }
    segmenter.export_fold_model(tmp_path / "fold2", LesionDecoder(segmenter_taps("s16")), args, summary)
    lesion = severity.LesionChannel(tmp_path / "fold2")  # reads the manifest as the service does
    assert (lesion.fold, lesion.trained_on) == (2, frozenset({"iarc-A"}))
    assert lesion.manifest.thresholds == {"lesion": 0.3} and lesion.manifest.name == "segmenter"
    probability = lesion(np.zeros((300, 400, 3), np.uint8))
    assert probability.shape == (224, 224) and probability.dtype == np.uint8
