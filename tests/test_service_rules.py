"""Decision rules, reason vocabulary, language negotiation and upload decoding, without the models."""

from __future__ import annotations

import io
import zlib

import anyio
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from service.api.handling import Admission
from service.io.decoding import DecodeLimits, TooManyPixels, UnsupportedImageType, decode_upload
from service.pipeline import measures
from service.pipeline.rules import Rules, framing_reasons, quality_reasons, shown_stage
from service.pipeline.stages import Quality
from service.render.problems import ProblemError
from service.render.reasons import ADVICE, LANGUAGES, MESSAGES, PRIORITY, Reason, negotiate_language, ordered
from service.settings import Settings
from service.telemetry import Metrics

RULES = Rules(
    cervix_present=0.5,
    not_sharp=0.1,
    not_acetic=0.2,
    exposure=measures.ExposureRule(),
    glare_max=0.1,
    lesion=0.25,
    cin2plus=0.14,
    crop_margin=0.1,
    min_area_fraction=1 / 16,
    min_crop_px=128,
    cut_off_max_extent=0.6,
)
GOOD = Quality(
    sharpness=0.99, not_sharp=False, blur_kind="none", exposure="ok", luma=0.5, glare_fraction=0.01,
    exam_stage="acetic", p_acetic=0.8, likeliest_other_stage="saline",
)  # fmt: skip


def test_every_reason_has_a_message_and_advice_in_every_language() -> None:
    for language in LANGUAGES:
        assert set(MESSAGES[language]) == set(Reason) == set(ADVICE[language])
        for reason in Reason:
            advice = ADVICE[language][reason]
            assert advice.endswith(".") and advice.count(".") - advice.count("5 %.") <= 1  # one sentence
    assert list(PRIORITY) == list(Reason)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, "en"),
        ("", "en"),
        ("pt-BR", "pt"),
        ("fr-CA,fr;q=0.9,en;q=0.8", "fr"),
        ("en;q=0.2, sw;q=0.9", "sw"),
        ("de, ja", "en"),
        ("es;q=0, fr;q=0.1", "fr"),
        ("es;q=oops", "en"),
        ("*", "en"),
    ],
)
def test_language_negotiation(header: str | None, expected: str) -> None:
    assert negotiate_language(header) == expected


@given(st.text(max_size=200))
def test_language_negotiation_never_fails(header: str) -> None:
    assert negotiate_language(header) in LANGUAGES


def test_reasons_are_ordered_by_priority() -> None:
    assert ordered({Reason.NOT_ACETIC, Reason.TOO_DARK, Reason.CERVIX_CUT_OFF}) == [
        Reason.CERVIX_CUT_OFF,
        Reason.TOO_DARK,
        Reason.NOT_ACETIC,
    ]


@pytest.mark.parametrize(
    ("box", "expected"),
    [
        ((200, 150, 600, 450), []),  # centred, a quarter of the frame
        ((0, 0, 800, 600), []),  # fills the frame: close-up, not cut off
        ((0, 100, 400, 500), [Reason.CERVIX_CUT_OFF]),  # runs into the left edge, half the width
        ((500, 0, 800, 250), [Reason.CERVIX_CUT_OFF]),  # runs into the top and right edges
        ((0, 100, 700, 500), []),  # touches one edge but is most of the width: in view
        ((380, 280, 460, 350), [Reason.CERVIX_TOO_SMALL]),  # tiny
        ((0, 280, 90, 350), [Reason.CERVIX_CUT_OFF, Reason.CERVIX_TOO_SMALL]),
    ],
)
def test_framing_rules(box: tuple[float, float, float, float], expected: list[Reason]) -> None:
    assert framing_reasons(box, (800, 600), RULES) == expected


def test_too_small_counts_original_pixels() -> None:
    # The same relative box in a 12 MP photo has enough pixels; in a thumbnail it does not.
    assert framing_reasons((1000, 750, 3000, 2250), (4032, 3024), RULES) == []
    assert framing_reasons((25, 19, 75, 56), (100, 75), RULES) == [Reason.CERVIX_TOO_SMALL]


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({}, set()),
        ({"exposure": "dark"}, {Reason.TOO_DARK}),
        ({"exposure": "over", "glare_fraction": 0.3}, {Reason.OVEREXPOSED, Reason.GLARE}),
        ({"not_sharp": True, "blur_kind": "motion"}, {Reason.MOTION_BLUR}),
        ({"not_sharp": True, "blur_kind": "defocus"}, {Reason.OUT_OF_FOCUS}),
        ({"not_sharp": True, "blur_kind": "none"}, {Reason.OUT_OF_FOCUS}),
        ({"p_acetic": 0.05}, {Reason.NOT_ACETIC}),
    ],
)
def test_quality_rules(change: dict, expected: set[Reason]) -> None:
    from dataclasses import replace

    assert quality_reasons(replace(GOOD, **change), RULES) == expected


def test_an_exam_view_of_another_stage_is_not_sent_back_for_not_acetic() -> None:
    from dataclasses import replace

    saline = replace(GOOD, exam_stage="saline", p_acetic=0.05)
    assert quality_reasons(saline, RULES, expect_acetic=False) == set()
    assert quality_reasons(replace(saline, not_sharp=True), RULES, expect_acetic=False) == {
        Reason.OUT_OF_FOCUS
    }


@pytest.mark.parametrize(
    ("p_acetic", "other", "expected"),
    [
        (0.8, "saline", "acetic"),
        (0.2, "iodine", "acetic"),
        (0.19, "iodine", "iodine"),
        (0.0, "green", "green"),
    ],
)
def test_the_shown_stage_uses_the_not_acetic_threshold(p_acetic: float, other: str, expected: str) -> None:
    assert shown_stage(p_acetic, other, RULES) == expected  # RULES.not_acetic is 0.2


class _StageModel:
    """The shipped quality manifest's input, with stage probabilities of our choosing."""

    def __init__(self, stage_p: list[float]) -> None:
        from pathlib import Path

        from service.inference.manifest import read_manifest

        self.manifest = read_manifest(Path(__file__).parents[1] / "models" / "quality", verify=False)
        self.stage_p = np.array([stage_p], np.float32)

    def run(self, tensor: np.ndarray) -> dict[str, np.ndarray]:
        return {
            "sharp_logit": np.array([[4.0]], np.float32),
            "blur_kind_logits": np.array([[2.0, 0.0, 0.0]], np.float32),
            "stage_logits": np.log(self.stage_p),
        }


@pytest.mark.parametrize(
    ("stage_p", "expected"),
    [([0.4, 0.1, 0.05, 0.45], "acetic"), ([0.15, 0.1, 0.05, 0.7], "green"), ([0.1, 0.2, 0.6, 0.1], "iodine")],
)
def test_an_answer_shows_the_stage_its_not_acetic_rule_sees(stage_p: list[float], expected: str) -> None:
    """Green is likeliest in the first, but P(acetic) 0.4 passes the 0.2 threshold: the photo is accepted,
    so its answer must not say "green"."""
    from service.pipeline.stages import check_quality

    crop = np.full((300, 300, 3), 140, np.uint8)
    quality = check_quality(_StageModel(stage_p), crop, RULES)
    assert quality.exam_stage == expected
    assert (Reason.NOT_ACETIC in quality_reasons(quality, RULES)) == (expected != "acetic")


def _jpeg(width: int, height: int, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(
        buffer, "JPEG", **options
    )
    return buffer.getvalue()


LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=600)


def test_the_exposure_rule_says_where_and_how_tissue_is_measured() -> None:
    image = np.full((100, 100, 3), 120, np.uint8)
    image[40:60, 40:60] = 250  # a bright, clipped centre
    default = measures.measure_tissue(image)
    narrow = measures.measure_tissue(image, measures.ExposureRule(tissue_semi_axes=(0.1, 0.1)))
    assert narrow.glare_fraction == 1.0 and default.glare_fraction < 1.0 and narrow.luma > default.luma
    lenient = measures.ExposureRule(tissue_semi_axes=(0.1, 0.1), saturated_level=251)
    assert measures.measure_tissue(image, lenient).glare_fraction == 0.0


def test_large_jpeg_is_decoded_at_reduced_scale_and_crops_at_the_scale_they_need() -> None:
    image = decode_upload(_jpeg(4032, 3024), LIMITS)
    assert image.original_size == (4032, 3024)
    assert image.rgb.shape == (756, 1008, 3)  # 1/4 DCT scale keeps a 600 px short side
    assert image.region((0, 0, 2000, 2000), min_side=256).shape[:2] == (500, 500)
    # A small region would have too few pixels at 1/4 scale: it comes from a 1/2-scale decode (300 >= 256).
    assert image.region((100, 100, 700, 700), min_side=256).shape[:2] == (300, 300)
    # ... and a tiny one from full resolution, never upsampled.
    assert image.region((100, 100, 200, 200), min_side=256).shape[:2] == (100, 100)


def test_huge_jpeg_reduced_past_the_dct_scales_still_crops_enough_pixels() -> None:
    limits = DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=64)
    data = _jpeg(2048, 2048)
    image = decode_upload(data, limits)
    assert image.rgb.shape == (64, 64, 3)  # 1/8 DCT scale (256 px), then a 4x box reduction
    region = image.region((1024, 1024, 2048, 2048), min_side=256)
    with Image.open(io.BytesIO(data)) as reference:
        reference.draft("RGB", (512, 512))  # 1/4 scale: the smallest that keeps 256 px on this region
        quarter = np.asarray(reference.convert("RGB"))
    np.testing.assert_array_equal(region, quarter[256:512, 256:512])


def test_png_is_reduced_for_the_whole_photo_and_cropped_from_full() -> None:
    pixels = np.random.default_rng(1).integers(0, 255, (1300, 1400, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    image = decode_upload(buffer.getvalue(), LIMITS)
    assert image.rgb.shape == (650, 700, 3) and image.original_size == (1400, 1300)
    np.testing.assert_array_equal(image.region((0, 0, 500, 400), min_side=256), pixels[:400, :500])


def test_a_crop_from_a_full_decode_is_reduced_to_what_the_stage_needs_and_no_further() -> None:
    pixels = np.random.default_rng(2).integers(0, 255, (2600, 2800, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    image = decode_upload(buffer.getvalue(), LIMITS)  # the whole photo at 1/4: too coarse for this crop
    reduced = image.region((0, 0, 2400, 2200), min_side=700)
    # 2200 // 700 = 3: reduced by a whole factor (as JPEG's DCT scaling would), short side still >= 700.
    np.testing.assert_array_equal(reduced, np.asarray(Image.fromarray(pixels[:2200, :2400]).reduce(3)))
    assert min(reduced.shape[:2]) >= 700


def test_exif_rotation_swaps_the_reported_size() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode_upload(_jpeg(1200, 800, exif=exif), LIMITS)
    assert image.original_size == (800, 1200) and image.rgb.shape[:2] == (1200, 800)


def test_pixel_limit_is_checked_before_decoding() -> None:
    # A PNG header claiming 40000 x 40000 pixels, with no pixel data behind it.
    header = Image.new("1", (1, 1))
    buffer = io.BytesIO()
    header.save(buffer, "PNG")
    data = bytearray(buffer.getvalue())
    data[16:24] = (40000).to_bytes(4, "big") * 2  # IHDR width and height
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")  # a valid chunk: only the size is wrong
    with pytest.raises(TooManyPixels, match="pixels"):
        decode_upload(bytes(data), LIMITS)


def test_unsupported_format_is_named() -> None:
    buffer = io.BytesIO()
    Image.new("RGB", (100, 100)).save(buffer, "BMP")
    with pytest.raises(UnsupportedImageType, match="BMP"):
        decode_upload(buffer.getvalue(), LIMITS)


def test_admission_sheds_load_beyond_its_bound() -> None:
    admission = Admission(Settings(max_inflight=1, retry_after_s=2), Metrics())

    async def scenario() -> None:
        async with admission.slot():
            with pytest.raises(ProblemError) as refused:
                async with admission.slot():
                    pass
            assert refused.value.status == 503 and refused.value.headers == {"Retry-After": "2"}
        async with admission.slot():  # capacity is given back
            assert admission.inflight == 1

    anyio.run(scenario)
    assert admission.inflight == 0
