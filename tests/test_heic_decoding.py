"""HEIC decoding: an embedded thumbnail stands in for a reduced decode only where it is the same picture and
has the pixels a stage needs; otherwise the photo is decoded in full, as before."""

from __future__ import annotations

import gc
import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pillow_heif
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from service.inference.runtime import ModelSet, load_models
from service.io import decoding
from service.io.decoding import DecodeLimits, RowBuffer, UploadRejected, _decode, decode_upload, register_heif
from service.pipeline.stages import Pipeline
from service.settings import Settings

LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=320)
SIZE = (2048, 1536)


@pytest.fixture(scope="module", autouse=True)
def heif_registered() -> Iterator[None]:
    threads = pillow_heif.options.DECODE_THREADS
    register_heif(1)
    yield
    pillow_heif.options.DECODE_THREADS = threads


def _scene(size: tuple[int, int] = SIZE) -> Image.Image:
    """A smooth picture that no rotation or flip maps onto itself (HEVC would smear pure noise)."""
    y, x = np.mgrid[0 : size[1], 0 : size[0]].astype(np.float64)
    ripple = 40 * np.sin(x / 37.0) * np.cos(y / 23.0)
    red, green = x * 200 / size[0] + ripple, y * 200 / size[1] - ripple
    blue = np.full_like(x, 90.0) + (x > size[0] * 0.7) * 100
    return Image.fromarray(np.clip(np.dstack([red, green, blue]), 0, 255).astype(np.uint8))


def _heic(image: Image.Image, thumbnails: list[int], **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(
        buffer, "HEIF", quality=90, tile_size=512, thumbnails=thumbnails,
        enc_params={"preset": "ultrafast"}, **options,
    )  # fmt: skip
    return buffer.getvalue()


def _full_decode(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def _shrunk(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize(size, Image.Resampling.BOX)).astype(np.int16)


@pytest.fixture(scope="module")
def phone_heic() -> bytes:
    """Grid tiles plus a 320x240 thumbnail, as an iPhone writes, and a 1024x768 preview."""
    return _heic(_scene(), [320, 1024])


def test_the_thumbnail_serves_the_whole_photo_and_the_crop(phone_heic: bytes) -> None:
    image = decode_upload(phone_heic, LIMITS)
    assert image.original_size == SIZE
    # 320x240 is short of 320 px: the 1024x768 thumbnail is decoded, then halved for the whole-photo stage.
    assert image.rgb.shape == (384, 512, 3)
    full = _full_decode(phone_heic)
    assert np.abs(image.rgb - _shrunk(full, (512, 384))).mean() < 3
    # A crop of 1000 px needs 0.45 of the original's pixels for 448: the thumbnail's 0.5 are enough.
    crop = image.region((500, 300, 1700, 1300), min_side=448)
    assert crop.shape == (500, 600, 3)
    assert np.abs(crop - _shrunk(full[300:1300, 500:1700], (600, 500))).mean() < 3


def test_a_crop_the_thumbnail_cannot_serve_is_cut_from_the_full_decode(phone_heic: bytes) -> None:
    image = decode_upload(phone_heic, LIMITS)
    crop = image.region((100, 100, 700, 700), min_side=448)  # needs 0.75 of the pixels: full resolution
    np.testing.assert_array_equal(crop, _full_decode(phone_heic)[100:700, 100:700])


def test_an_iphone_thumbnail_too_small_for_the_detector_is_not_used() -> None:
    data = _heic(_scene(), [320])  # 320x240: under the 320 px short side
    image = decode_upload(data, LIMITS)
    full = _full_decode(data)
    np.testing.assert_array_equal(image.rgb, np.asarray(Image.fromarray(full).reduce(4)))
    # Cut from the full decode, then reduced by a whole factor (1000 // 448 = 2) as JPEG's DCT scaling does.
    expected = np.asarray(Image.fromarray(full[:1000, :1000]).reduce(2))
    np.testing.assert_array_equal(image.region((0, 0, 1000, 1000), min_side=448), expected)


def test_a_heic_decoded_in_full_stays_in_libheifs_buffer() -> None:
    """No full-size Pillow copy (4 bytes a pixel) beside libheif's picture (3): the whole-photo stage and
    the crop are reduced from libheif's rows, and give what Pillow's own full decode gives."""
    data = _heic(_scene(), [320])
    picture, _, drafted = _decode(data, draft_side=320)
    assert isinstance(picture, RowBuffer) and not drafted
    assert picture.size == SIZE and picture.stride >= 3 * SIZE[0]
    gc.collect()  # the Pillow image and pillow-heif's file are gone: the view alone keeps libheif's picture
    full = Image.fromarray(_full_decode(data))
    np.testing.assert_array_equal(np.asarray(picture.reduce(4)), np.asarray(full.reduce(4)))
    np.testing.assert_array_equal(
        np.asarray(picture.crop((7, 5, 901, 633))), np.asarray(full.crop((7, 5, 901, 633)))
    )


def test_a_heic_smaller_than_the_reduced_decode_is_kept_whole() -> None:
    data = _heic(_scene((400, 300)), [])  # short side 300 < decode_min_side 320: nothing to reduce
    image = decode_upload(data, LIMITS)
    assert isinstance(image._full, RowBuffer)
    np.testing.assert_array_equal(image.rgb, _full_decode(data))


def test_a_heic_that_libheif_fails_to_decode_in_full_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Whatever libheif raises while it decodes the picture is the client's file: a 422, never a 500."""

    def fails(image: Image.Image, orientation: int) -> RowBuffer:
        raise RuntimeError("Invalid input: Unspecified: Bitstream not supported by this decoder")

    monkeypatch.setattr(decoding, "_heif_rows", fails)
    with pytest.raises(UploadRejected, match="could not be decoded"):
        decode_upload(_heic(_scene((800, 600)), []), LIMITS)


def test_a_row_buffer_refuses_a_box_outside_its_picture() -> None:
    buffer = RowBuffer(memoryview(bytes(3 * 4 * 4)), (4, 4), 12)
    assert np.asarray(buffer.crop((1, 1, 4, 4))).shape == (3, 3, 3)
    with pytest.raises(ValueError, match="not inside"):
        buffer.crop((1, 1, 5, 4))


@settings(max_examples=60, deadline=None)
@given(
    width=st.integers(1, 300),
    height=st.integers(1, 300),
    padding=st.integers(0, 9),
    factor=st.integers(1, 7),
    corners=st.tuples(*[st.floats(0, 1)] * 4),
)
def test_row_buffer_reduces_and_crops_as_pillow_does(
    width: int, height: int, padding: int, factor: int, corners: tuple[float, float, float, float]
) -> None:
    """Any size, any row padding (libheif pads its rows), any box: the same pixels as Pillow's reduce and
    crop of the whole picture, strips and all."""
    pixels = np.random.default_rng(width * 1000 + height).integers(0, 256, (height, width, 3), np.uint8)
    stride = 3 * width + padding
    rows = np.zeros((height, stride), np.uint8)
    rows[:, : 3 * width] = pixels.reshape(height, -1)
    buffer = RowBuffer(memoryview(rows.tobytes()), (width, height), stride)
    x0, x1 = sorted(round(c * width) for c in corners[:2])
    y0, y1 = sorted(round(c * height) for c in corners[2:])
    box = (x0, y0, max(x1, x0 + 1), max(y1, y0 + 1))
    box = (min(box[0], width - 1), min(box[1], height - 1), min(box[2], width), min(box[3], height))
    image = Image.fromarray(pixels)
    np.testing.assert_array_equal(np.asarray(buffer.reduce(factor)), np.asarray(image.reduce(factor)))
    np.testing.assert_array_equal(
        np.asarray(buffer.reduce(factor, box=box)), np.asarray(image.reduce(factor, box=box))
    )
    np.testing.assert_array_equal(np.asarray(buffer.crop(box)), np.asarray(image.crop(box)))


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_rotated_heic_decoded_in_full_comes_out_upright(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _heic(_scene((1024, 768)), [], exif=exif.tobytes())  # no thumbnail: decoded in full
    image = decode_upload(data, LIMITS)
    full = _full_decode(data)  # libheif applies the rotation: the reference is upright
    upright = (768, 1024) if orientation in (6, 8) else (1024, 768)
    assert image.original_size == upright
    assert isinstance(image._full, RowBuffer)  # libheif's buffer is upright already
    np.testing.assert_array_equal(image.rgb, np.asarray(Image.fromarray(full).reduce(2)))


def test_a_heic_with_alpha_is_composited_on_black_by_pillow() -> None:
    scene = _scene((800, 600)).convert("RGBA")
    alpha = np.full((600, 800), 255, np.uint8)
    alpha[:, :200] = 0  # a transparent left border
    scene.putalpha(Image.fromarray(alpha))
    data = _heic(scene, [])
    picture, _, _ = _decode(data, draft_side=None)
    assert isinstance(picture, Image.Image)  # libheif's RGBA rows are not what to_rgb makes of them
    assert np.asarray(picture)[:, :190].max() < 16


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_a_rotated_heic_and_its_thumbnail_come_out_upright(orientation: int) -> None:
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _heic(_scene((1024, 768)), [512], exif=exif.tobytes())  # pillow-heif stores it as irot/imir
    image = decode_upload(data, LIMITS)
    full = _full_decode(data)  # libheif applies the rotation: the reference is upright
    upright = (768, 1024) if orientation in (6, 8) else (1024, 768)
    assert image.original_size == upright and full.shape[1::-1] == upright
    assert image.rgb.shape[1::-1] == tuple(v // 2 for v in upright)  # the 512 px thumbnail, same turn
    assert np.abs(image.rgb - _shrunk(full, image.rgb.shape[1::-1])).mean() < 3


def test_a_thumbnail_of_another_shape_is_never_used(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a buggy writer might store: a square thumbnail of a 4:3 photo (built with pillow-heif's own
    encoder internals, since its public API only writes true scaled copies)."""
    from pillow_heif.constants import HeifCompressionFormat
    from pillow_heif.misc import MODE_INFO, CtxEncode, _add_planes

    pixels = np.asarray(_scene((1024, 768)))
    encoder = CtxEncode(HeifCompressionFormat.HEVC, quality=90)
    encoder.add_image((1024, 768), "RGB", pixels.tobytes(), tile_size=512, primary=True)
    square = encoder.ctx_write.create_image((600, 600), MODE_INFO["RGB"][2], MODE_INFO["RGB"][3], 0)
    _add_planes(square, (600, 600), "RGB", np.zeros((600, 600, 3), np.uint8).tobytes(), 0, 8)
    encoder._grid_images[-1].encode_thumbnail(encoder.ctx_write, 500, 1, square)
    buffer = io.BytesIO()
    encoder.save(buffer)
    data = buffer.getvalue()
    assert Image.open(io.BytesIO(data)).info["thumbnails"] == [500]  # it is there...
    reference = np.asarray(Image.fromarray(_full_decode(data)).reduce(2))
    np.testing.assert_array_equal(decode_upload(data, LIMITS).rgb, reference)  # ...and pillow-heif skips it
    # Should pillow-heif ever take it, the service's own check still decodes the photo in full.
    monkeypatch.setattr("pillow_heif.as_plugin._is_scaled_copy", lambda *_: True)
    with Image.open(io.BytesIO(data)) as image:
        image.draft("RGB", (320, 320))
        assert image.size == (500, 500)
    np.testing.assert_array_equal(decode_upload(data, LIMITS).rgb, reference)


def test_a_truncated_heic_is_undecodable_not_a_server_error(phone_heic: bytes) -> None:
    ftyp = int.from_bytes(phone_heic[:4], "big")
    meta_end = ftyp + int.from_bytes(phone_heic[ftyp : ftyp + 4], "big")  # the boxes that describe the items
    for cut in (meta_end // 2, meta_end + 100):  # in the item boxes; just after them, in the image data
        with pytest.raises(UploadRejected) as rejected:
            decode_upload(phone_heic[:cut], LIMITS).region((0, 0, 2048, 1536), min_side=1536)
        assert rejected.value.code == "undecodable_image" and rejected.value.status == 422


@pytest.mark.parametrize(
    ("cores", "workers", "overlap", "threads"),
    [
        (2, 2, True, 2),
        (2, 2, False, 1),
        (16, 16, True, 2),
        (16, 4, True, 8),
        (16, 4, False, 4),
        (2, 1, True, 2),
    ],
)
def test_heif_decode_threads_follow_the_workers(
    monkeypatch: pytest.MonkeyPatch, cores: int, workers: int, overlap: bool, threads: int
) -> None:
    monkeypatch.setattr("service.settings.available_cpus", lambda: cores)
    settings = Settings(inference_workers=workers, overlap_stages=overlap)
    assert settings.heif_decode_threads == threads


def test_register_heif_sets_libheif_threads() -> None:
    register_heif(3)
    assert pillow_heif.options.DECODE_THREADS == 3
    register_heif(1)


# --- the decisions, on a real atlas photo ---------------------------------------------------------------


@pytest.fixture(scope="module")
def models() -> ModelSet:
    return load_models(Settings())


@pytest.mark.slow
def test_an_atlas_photo_gets_the_same_answer_from_thumbnails_as_decoded_in_full(
    atlas_root: Path, models: ModelSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    photo = Image.open(sorted(atlas_root.glob("images_*/case_*/*cetic*.jpg"))[0]).convert("RGB")
    data = _heic(photo.resize((2400, 1800), Image.Resampling.LANCZOS), [320, 1024])
    pipeline = Pipeline(models, Settings())
    served = pipeline.assess(data, diagnose=True)
    monkeypatch.setattr(pillow_heif.options, "THUMBNAILS", False)  # the file decoded in full, as before
    full = pipeline.assess(data, diagnose=True)
    assert served.decision == full.decision and served.reasons == full.reasons
    assert served.quality is not None and full.quality is not None
    assert abs(served.quality.sharpness - full.quality.sharpness) < 0.05
    assert served.detection.box is not None and full.detection.box is not None
    np.testing.assert_allclose(served.detection.box, full.detection.box, atol=0.02 * 2400)
