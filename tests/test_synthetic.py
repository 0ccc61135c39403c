"""The procedural colposcopy generator: determinism, label consistency, stage looks, size independence."""

from __future__ import annotations

import numpy as np
import pytest

from training.data import synthetic
from training.data.records import EXAM_STAGES, Box, LabelledImage, Severity
from training.data.synthetic import generate_scene, generate_subject, render, sample_subject

SMALL = (160, 120)  # (width, height): fast, and not square on purpose


def _mask(li: LabelledImage) -> np.ndarray:
    assert li.labels.lesion_mask is not None  # synthetic scenes always know the lesion mask
    return li.labels.lesion_mask


def _box(li: LabelledImage) -> Box:
    assert li.labels.cervix_box is not None
    return li.labels.cervix_box


def _lesion_subject(severity: Severity) -> int:
    return next(s for s in range(200) if sample_subject(s).severity is severity)


def _check_labels(li: LabelledImage, size: tuple[int, int]) -> None:
    w, h = size
    assert li.image.shape == (h, w, 3) and li.image.dtype == np.uint8
    mask = _mask(li)
    assert mask.shape == (h, w) and mask.dtype == np.uint8
    assert set(np.unique(mask)) <= {0, 1}
    assert li.source == "synthetic"
    assert li.labels.exam_stage in EXAM_STAGES
    assert isinstance(li.labels.severity, Severity)
    if li.labels.cervix_present:
        x0, y0, x1, y1 = _box(li)
        assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
        ys, xs = np.nonzero(mask)
        if xs.size:  # the lesion lies on the cervix, so inside its box
            assert xs.min() >= x0 and xs.max() < x1 and ys.min() >= y0 and ys.max() < y1
    else:
        assert li.labels.cervix_box is None
        assert not mask.any()


def test_same_seed_same_bytes() -> None:
    a = generate_scene(7, SMALL)
    synthetic._fbm_cached.cache_clear()  # the anatomy cache must not change what is drawn
    b = generate_scene(7, SMALL)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.labels == b.labels
    assert np.array_equal(_mask(a), _mask(b))
    assert sample_subject(7) == sample_subject(7)
    p = sample_subject(3)
    first, again = render(p, "iodine", SMALL, seed=5), render(p, "iodine", SMALL, seed=5)
    assert first.image.tobytes() == again.image.tobytes()


def test_different_seeds_differ() -> None:
    images = [generate_scene(s, SMALL).image for s in range(4)]
    for i in range(len(images)):
        for j in range(i + 1, len(images)):
            assert np.abs(images[i].astype(int) - images[j].astype(int)).mean() > 3.0
    p = sample_subject(11)
    a, b = render(p, "acetic", SMALL, seed=0), render(p, "acetic", SMALL, seed=1)
    assert a.image.tobytes() != b.image.tobytes()  # another shot of the same subject
    assert a.subject == b.subject == "synthetic-11"


def test_global_rng_untouched() -> None:
    np.random.seed(123)
    before = np.random.random()
    np.random.seed(123)
    generate_scene(5, SMALL)
    assert np.random.random() == before


@pytest.mark.parametrize("seed", range(12))
def test_labels_are_consistent(seed: int) -> None:
    li = generate_scene(seed, SMALL)
    _check_labels(li, SMALL)
    assert li.subject == f"synthetic-{seed}"
    if li.labels.severity is Severity.NORMAL:
        assert not _mask(li).any()


def test_cervix_box_frames_the_cervix() -> None:
    for seed in range(6):
        li = render(sample_subject(seed), "saline", SMALL, seed=seed)
        assert li.labels.cervix_present
        x0, y0, x1, y1 = _box(li)
        # Colposcopy frames the cervix close: it takes a good share of the picture.
        assert (x1 - x0) * (y1 - y0) > 0.15 * SMALL[0] * SMALL[1]
        # The box is tight: its border rows/columns hold cervix, so it is no bigger than the visible cervix.
        assert x1 - x0 < SMALL[0] or x0 == 0


def test_no_cervix_scenes() -> None:
    scenes = [generate_scene(s, (64, 48)) for s in range(160)]
    absent = [li for li in scenes if not li.labels.cervix_present]
    assert 0.07 <= len(absent) / len(scenes) <= 0.25
    for li in absent:
        assert li.labels.cervix_box is None
        assert not _mask(li).any()
        assert li.labels.cervix_present is False


def test_severity_mix_and_normal_has_no_lesion() -> None:
    params = [sample_subject(s) for s in range(400)]
    counts = {sev: sum(p.severity is sev for p in params) / len(params) for sev in Severity}
    assert abs(counts[Severity.NORMAL] - 0.35) < 0.08
    assert abs(counts[Severity.LOW_GRADE] - 0.30) < 0.08
    assert abs(counts[Severity.HIGH_GRADE] - 0.35) < 0.08
    assert all((p.severity is Severity.NORMAL) == (not p.lesions) for p in params)
    normal = next(p for p in params if p.severity is Severity.NORMAL)
    for stage in EXAM_STAGES:
        assert not _mask(render(normal, stage, SMALL)).any()


def test_lesions_are_labelled_in_every_stage() -> None:
    seed = _lesion_subject(Severity.HIGH_GRADE)
    shots = generate_subject(seed, SMALL)
    assert [li.labels.exam_stage for li in shots] == list(EXAM_STAGES)
    assert {li.subject for li in shots} == {f"synthetic-{seed}"}
    assert {li.labels.severity for li in shots} == {Severity.HIGH_GRADE}
    areas = [int(_mask(li).sum()) for li in shots]
    assert min(areas) > 0  # anatomy: labelled even where the stage does not show it
    assert max(areas) < 1.6 * min(areas)  # same lesion, only the framing jitters
    for li in shots:
        _check_labels(li, SMALL)


def test_generate_subject_custom_stages() -> None:
    shots = generate_subject(4, SMALL, stages=("iodine", "acetic"))
    assert [li.labels.exam_stage for li in shots] == ["iodine", "acetic"]


def _mean_rgb(li: LabelledImage) -> np.ndarray:
    return li.image.reshape(-1, 3).astype(float).mean(axis=0)


def test_stage_looks() -> None:
    ratios: dict[str, list[float]] = {"saline": [], "iodine": []}
    for seed in range(6):
        p = sample_subject(seed)
        for stage in ratios:
            rgb = _mean_rgb(render(p, stage, SMALL, seed=1))
            ratios[stage].append(rgb[2] / rgb[0])
        green = _mean_rgb(render(p, "green", SMALL, seed=1))
        # Green (red-free) filter: green is the dominant channel in every shot.
        assert green[1] > green[0] and green[1] > green[2]
    # Lugol's iodine stains mahogany and mustard: far less blue per unit of red than saline's pink.
    assert np.mean(ratios["iodine"]) < np.mean(ratios["saline"]) - 0.12
    assert sum(i < s for i, s in zip(ratios["iodine"], ratios["saline"], strict=True)) >= 5


def test_acetowhite_shows_after_acetic_only() -> None:
    seed = _lesion_subject(Severity.HIGH_GRADE)
    p = sample_subject(seed)
    size = (256, 192)
    lum = {}
    for stage in ("acetic", "saline"):
        li = render(p, stage, size, seed=2)
        m = _mask(li).astype(bool)
        assert m.sum() > 50
        grey = li.image.astype(float).mean(axis=2)
        lum[stage] = grey[m].mean() - grey[_mask(li) == 0].mean()
    assert lum["acetic"] > lum["saline"] + 15.0


def test_render_is_size_independent() -> None:
    for seed in (1, 2, 5):
        p = sample_subject(seed)
        a = render(p, "acetic", (200, 200), seed=3)
        b = render(p, "acetic", (320, 240), seed=3)
        ba = np.asarray(_box(a)) / [200, 200, 200, 200]
        bb = np.asarray(_box(b)) / [320, 240, 320, 240]
        assert np.abs(ba - bb).max() < 0.02
        if _mask(a).any():
            # Nearest-neighbour resample the smaller mask onto the larger grid and compare.
            ys = (np.arange(240) + 0.5) * 200 / 240
            xs = (np.arange(320) + 0.5) * 200 / 320
            ma = _mask(a)[ys.astype(int)][:, xs.astype(int)].astype(bool)
            mb = _mask(b).astype(bool)
            assert (ma & mb).sum() / (ma | mb).sum() > 0.85


def test_rejects_bad_arguments() -> None:
    p = sample_subject(0)
    with pytest.raises(ValueError):
        render(p, "lugol", SMALL)
    with pytest.raises(ValueError):
        render(p, "acetic", (4, 4))
