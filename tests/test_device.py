"""Other-device looks (training.data.device) and the evaluation suite (training.device_suite): labels
follow the pixels, every effect stays in its stated range, uploads decode as the service decodes them."""

from __future__ import annotations

import dataclasses
import io

import numpy as np
import pytest
from PIL import Image

from service.io.decoding import decode_upload
from training import device_suite
from training.data.device import DeviceLook, apply_look, orient, plan_framing, sample_look
from training.data.records import LabelledImage, Labels


def marked_photo(width: int = 400, height: int = 300) -> LabelledImage:
    """Grey photo with a saturated red square: the 'cervix' whose box the labels must follow."""
    image = np.full((height, width, 3), 90, np.uint8)
    image[100:200, 150:250] = (230, 20, 20)
    return LabelledImage(
        image, Labels(cervix_present=True, cervix_box=(150.0, 100.0, 250.0, 200.0)), "s", "test"
    )


def red_box(image: np.ndarray) -> tuple[float, float, float, float]:
    red = (image[..., 0] > 150) & (image[..., 1] < 90) & (image[..., 2] < 90)
    ys, xs = np.nonzero(red)
    return float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)


@pytest.mark.parametrize("seed", range(12))
def test_the_cervix_box_follows_the_pixels_through_any_look(seed: int) -> None:
    rng = np.random.default_rng(seed)
    # No speculum, aperture, cast or strong tone: the red square must stay findable by colour.
    plain = {
        "speculum": "none",
        "aperture": 0.0,
        "gains": (1.0, 1.0, 1.0),
        "vignette": 0.0,
        "gamma": 1.0,
        "feather": 0.0,
        "round_paste": False,
        "cervix_fraction": float(rng.uniform(0.3, 0.9)),
    }
    look = dataclasses.replace(sample_look(rng), **plain)
    out = apply_look(marked_photo(), look, rng=rng)
    assert out.labels.cervix_present and out.labels.cervix_box is not None
    found = red_box(out.image)
    # The whole square is in the box the labels give (within resampling and JPEG blur).
    assert np.allclose(found, out.labels.cervix_box, atol=3.0), (found, out.labels.cervix_box)


def test_the_cervix_spans_the_asked_fraction_of_the_frame() -> None:
    look = DeviceLook(frame_aspect=3 / 4, cervix_fraction=0.5)
    framing = plan_framing((400, 300), (150.0, 100.0, 250.0, 200.0), look, max_short_side=10_000)
    width, height = framing.frame_size
    assert width < height  # portrait
    x0, y0, x1, y1 = framing.box_to_frame((150.0, 100.0, 250.0, 200.0))
    assert max(x1 - x0, y1 - y0) == pytest.approx(0.5 * min(width, height), rel=0.02)


def test_a_large_frame_shrinks_to_the_working_size_with_the_photo() -> None:
    look = DeviceLook(cervix_fraction=0.15)
    framing = plan_framing((800, 600), (0.0, 0.0, 800.0, 600.0), look, max_short_side=640)
    assert min(framing.frame_size) == pytest.approx(640, abs=1)
    assert framing.scale < 1


@pytest.mark.parametrize("turns", range(4))
@pytest.mark.parametrize("mirror", [False, True])
def test_orientation_moves_the_box_with_the_pixels(turns: int, mirror: bool) -> None:
    photo = marked_photo(400, 300)
    photo.image[100:200, 150:160] = (20, 230, 20)  # a green stripe makes the square's orientation visible
    image, box = orient(photo.image, photo.labels.cervix_box, turns, mirror)
    assert image.shape[:2] == ((300, 400) if turns % 2 == 0 else (400, 300))
    assert box is not None
    x0, y0, x1, y1 = (round(v) for v in box)
    inside = image[y0:y1, x0:x1]
    assert ((inside[..., 0] > 150) | (inside[..., 1] > 150)).all()  # the box holds only the square


def test_looks_are_reproducible_and_cover_every_effect() -> None:
    assert sample_look(np.random.default_rng(3)) == sample_look(np.random.default_rng(3))
    looks = [sample_look(np.random.default_rng(seed)) for seed in range(400)]
    assert {look.quarter_turns for look in looks} == {0, 1, 2, 3}
    assert {look.speculum for look in looks} == {"none", "metal", "plastic"}
    assert {look.frame_aspect < 1 for look in looks} == {True, False}
    fractions = [look.cervix_fraction for look in looks]
    assert 0.15 <= min(fractions) < 0.2 and 1.2 < max(fractions) <= 1.35
    assert any(look.aperture > 0 for look in looks) and any(look.denoise > 0 for look in looks)
    assert all(min(look.gains) >= 0.7 and max(look.gains) <= 1.3 for look in looks)


def test_a_photo_without_a_cervix_stays_without_one() -> None:
    photo = marked_photo()
    negative = LabelledImage(photo.image, Labels(cervix_present=False), "s", "test")
    out = apply_look(negative, sample_look(np.random.default_rng(1)))
    assert out.labels.cervix_present is False and out.labels.cervix_box is None


@pytest.mark.parametrize("name", list(device_suite.SUITE))
def test_every_suite_transform_is_an_upload_the_service_decodes(name: str) -> None:
    photo = marked_photo(800, 600).image
    data = device_suite.SUITE[name](photo, 0)
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "JPEG"
        size = image.size
    decoded = decode_upload(data, device_suite.SERVED_DECODE)
    expected = {"rotate90": (600, 800), "rotate270": (600, 800), "portrait_3x4": (450, 600),
                "phone_12mp": (4032, 3024), "phone_framed": (2448, 3264),
                "preview_640x480": (640, 480)}.get(name, (800, 600))  # fmt: skip
    assert size == expected and decoded.original_size == expected
    if name == "phone_12mp":
        assert decoded.scale < 1  # a phone-size upload is DCT-reduced, as served


def test_consistency_counts_photos_whose_decision_never_changes() -> None:
    decisions = {"as_taken": ["a", "b", "a"], "x": ["a", "b", "b"], "y": ["a", "a", "a"]}
    out = device_suite.consistency(decisions)
    assert out["x"] == pytest.approx(2 / 3) and out["y"] == pytest.approx(2 / 3)
    assert out["all_transforms"] == pytest.approx(1 / 3)
