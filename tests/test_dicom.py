"""DICOM decoding (service.io.dicom) without the models: every encoding gives the photo's pixels, every odd
file its own refusal, and a huge header costs nothing. Fixtures are built here from an atlas photo."""

from __future__ import annotations

import io
import tracemalloc
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from service.io import dicom
from service.io.decoding import DecodeLimits, UploadRejected, decode_upload
from tests import dicom_inputs as make

LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=320)


@pytest.fixture(scope="module")
def atlas_jpeg(atlas_root: Path) -> bytes:
    return sorted(atlas_root.glob("images_*/case_*/*cetic*.jpg"))[0].read_bytes()


@pytest.fixture(scope="module")
def rgb(atlas_jpeg: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(atlas_jpeg)).convert("RGB"))


def test_a_wrapped_jpeg_decodes_exactly_as_the_jpeg(atlas_jpeg: bytes, rgb: np.ndarray) -> None:
    """Baseline JPEG pixel data is the JPEG file: the same DCT-scaled decode, the same pixels."""
    wrapped = make.jpeg(atlas_jpeg, (rgb.shape[1], rgb.shape[0]))
    from_dicom, from_jpeg = dicom.decode_dicom(wrapped, LIMITS), decode_upload(atlas_jpeg, LIMITS)
    assert from_dicom.media_type == dicom.DICOM_MEDIA_TYPE
    assert from_dicom.original_size == from_jpeg.original_size == (rgb.shape[1], rgb.shape[0])
    assert np.array_equal(from_dicom.rgb, from_jpeg.rgb)
    box = (100, 80, 700, 560)
    assert np.array_equal(from_dicom.region(box, 448), from_jpeg.region(box, 448))


@pytest.mark.parametrize(
    "encoding", ["native", "rle", "jpeg_ls", "jpeg_2000", "jpeg_2000_rgb", "secondary_capture"]
)
def test_lossless_encodings_give_the_photo_s_pixels(rgb: np.ndarray, encoding: str) -> None:
    data = {
        "native": lambda: make.native(rgb),
        "rle": lambda: make.compressed(rgb, make.RLE_LOSSLESS),
        "jpeg_ls": lambda: make.compressed(rgb, make.JPEG_LS_LOSSLESS),
        "jpeg_2000": lambda: make.jpeg_2000(rgb),
        "jpeg_2000_rgb": lambda: make.jpeg_2000(rgb, "RGB"),
        "secondary_capture": lambda: make.native(rgb, sop_class=make.SECONDARY_CAPTURE, modality=None),
    }[encoding]()
    image = dicom.decode_dicom(data, LIMITS)
    assert image.original_size == (rgb.shape[1], rgb.shape[0])
    # The same pixels as the same photo sent as a PNG (decoded in full, then the same box reduction).
    as_png = decode_upload(_png(rgb), LIMITS)
    assert np.array_equal(image.rgb, as_png.rgb)
    assert np.array_equal(image.region((0, 0, rgb.shape[1], rgb.shape[0]), rgb.shape[0]), rgb)


def test_a_large_native_photo_is_reduced_for_the_whole_photo_stages(rgb: np.ndarray) -> None:
    big = np.ascontiguousarray(np.tile(rgb, (2, 2, 1)))  # 1600x1200
    image = dicom.decode_dicom(make.native(big), LIMITS)
    assert image.rgb.shape == (400, 534, 3)  # reduced by 3 (1200 // 320), as a PNG would be
    box = (800, 600, 1600, 1200)
    assert np.array_equal(image.region(box, 600), big[600:1200, 800:1600])


def _png(rgb: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "PNG")
    return buffer.getvalue()


def test_ybr_full_422_is_converted_to_rgb(rgb: np.ndarray) -> None:
    image = dicom.decode_dicom(make.ybr_full_422(rgb), LIMITS)
    full = image.region((0, 0, rgb.shape[1], rgb.shape[0]), rgb.shape[0]).astype(np.int16)
    # Only chroma was halved horizontally: the colours stay within a few levels of the photo's.
    assert np.abs(full - rgb).mean() < 3, np.abs(full - rgb).mean()


def _odd(rgb: np.ndarray, atlas_jpeg: bytes) -> dict[str, tuple[bytes, int, str]]:
    size = (rgb.shape[1], rgb.shape[0])
    return {
        "missing photometric interpretation": (
            make.without(rgb, "PhotometricInterpretation"), 422, "incomplete_pixel_module"),
        "missing rows": (make.without(rgb, "Rows"), 422, "incomplete_pixel_module"),
        "no pixel data": (make.without(rgb, "PixelData"), 422, "missing_pixel_data"),
        "two frames": (make.frames(rgb, 2), 422, "multi_frame_dicom"),
        "CT modality": (make.native(rgb, sop_class=make.CT_IMAGE, modality="CT"), 422, "wrong_modality"),
        "CT class as XC": (make.native(rgb, sop_class=make.CT_IMAGE), 422, "unsupported_dicom_class"),
        "truncated native": (make.native(rgb)[: len(make.native(rgb)) // 2], 422, "truncated_dicom"),
        "truncated jpeg": (make.jpeg(atlas_jpeg, size)[:30_000], 422, "truncated_dicom"),
        "200000x200000 header": (make.header_claiming(200_000, 200_000), 413, "too_many_pixels"),
        "65535x65535 header": (make.header_claiming(65_535, 65_535), 413, "too_many_pixels"),
        "40x40": (make.native(rgb[:40, :40]), 422, "image_too_small"),
        "monochrome": (make.monochrome(rgb[..., 0]), 422, "unsupported_pixel_format"),
        "YBR_RCT, native": (_relabelled(make.native(rgb), "YBR_RCT"), 422, "unsupported_pixel_format"),
        "JPEG lossless (no decoder)": (
            make.with_syntax(rgb, make.JPEG_LOSSLESS_SV1), 415, "unsupported_transfer_syntax"),
        "no DICM prefix": (atlas_jpeg, 422, "not_dicom"),
        "corrupt JPEG frame": (make.jpeg(b"\xff\xd8" + bytes(5000), size), 422, "undecodable_image"),
    }  # fmt: skip


def _relabelled(data: bytes, interpretation: str) -> bytes:
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PhotometricInterpretation = interpretation
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_each_odd_file_gets_its_own_refusal(rgb: np.ndarray, atlas_jpeg: bytes) -> None:
    for name, (data, status, code) in _odd(rgb, atlas_jpeg).items():
        with pytest.raises(UploadRejected) as caught:
            dicom.decode_dicom(data, LIMITS)
        assert (caught.value.status, caught.value.code) == (status, code), (name, str(caught.value))
        for marker in (make.PATIENT_NAME, make.PATIENT_ID, "CLINIC-MARKER"):
            assert marker not in str(caught.value), name


def test_a_huge_header_is_refused_without_allocating_its_pixels() -> None:
    data = make.header_claiming(200_000, 200_000)  # 120 GB of RGB if decoded
    tracemalloc.start()
    try:
        with pytest.raises(UploadRejected, match="200000x200000"):
            dicom.decode_dicom(data, LIMITS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 1024 * 1024, peak


def test_the_context_carries_the_header_identifiers(rgb: np.ndarray) -> None:
    context = dicom.read_context(make.native(rgb[:100, :100]))
    assert (context.patient_id, context.patient_id_issuer) == (make.PATIENT_ID, "CLINIC-MARKER")
    assert (context.accession_number, context.admission_id) == ("ACC-MARKER-7", "ADM-MARKER-9")
    assert context.modality == "XC" and context.sop_class_uid == dicom.VL_PHOTOGRAPHIC
    assert context.study_uid and context.sop_instance_uid
    assert context.acquired == "2026-03-15T10:15:00+01:00"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("20260315101500+0100", "2026-03-15T10:15:00+01:00"),
        ("20260315101500.123-0500", "2026-03-15T10:15:00-05:00"),
        ("20260315101500", "2026-03-15"),  # local time, zone unknown: the date only
        ("20260315", "2026-03-15"),
        ("2026", None),
        ("garbage!", None),
    ],
)
def test_dicom_datetimes_become_fhir_datetimes(value: str, expected: str | None) -> None:
    assert dicom._fhir_datetime(value) == expected
