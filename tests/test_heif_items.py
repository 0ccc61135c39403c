"""A damaged HEIC is refused before decoding: libheif alone would conceal the damage and decode noise."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.heic_damage import media_data
from service.io.decoding import (
    THUMBNAIL_DISAGREEMENT,
    DecodeLimits,
    UploadRejected,
    _decode,
    decode_upload,
    thumbnail_disagreement,
)
from service.io.heif_items import DamagedHeif, _check_nal_units, check_heif_items
from tests.heic_inputs import damaged_inside_a_slice, heic

LIMITS = DecodeLimits(max_pixels=50_000_000, min_side=64, decode_min_side=320)
SLICE = bytes([0x26, 0x01]) + b"\xaf\x10\x80"  # an IDR slice's NAL header, a payload ending in a stop bit
PARAMETERS = bytes([0x40, 0x01]) + b"\x0c\x01"  # a VPS


def _nal(*units: bytes, length_size: int = 4) -> bytes:
    return b"".join(len(unit).to_bytes(length_size, "big") + unit for unit in units)


@pytest.mark.parametrize(
    ("size", "options", "pictures"),
    [
        ((800, 600), {}, 1),
        ((1024, 768), {"tile_size": 256, "thumbnails": [320]}, 12 + 1),  # 4 x 3 grid tiles and a thumbnail
        ((640, 480), {"save_to_12bit": True}, 1),
    ],
)
def test_every_coded_picture_of_a_sound_heic_is_checked_and_passes(
    size: tuple[int, int], options: dict[str, object], pictures: int
) -> None:
    data = heic(size, **options)
    assert check_heif_items(data) == pictures
    assert decode_upload(data, LIMITS).original_size == size


def test_a_grid_heic_with_damaged_tiles_is_refused_though_libheif_decodes_it() -> None:
    """A phone's HEIC is a grid of tiles, and libheif decodes a grid whose tiles are damaged without an
    error (a single picture it refuses where the damage reaches a NAL length)."""
    data = bytearray(heic((1024, 768), tile_size=256))
    start, end = media_data(bytes(data))
    damaged = (end - start) // 10
    middle = start + (end - start - damaged) // 2
    data[middle : middle + damaged] = np.random.default_rng(0).integers(0, 256, damaged, np.uint8).tobytes()
    with Image.open(io.BytesIO(bytes(data))) as image:
        image.load()  # what the service got before: a picture partly of noise, no error
    with pytest.raises(UploadRejected) as rejected:
        decode_upload(bytes(data), LIMITS)
    assert rejected.value.code == "undecodable_image" and rejected.value.status == 422
    assert "HEIC is damaged" in str(rejected.value) and "send the photo again" in str(rejected.value)


@pytest.mark.parametrize(
    ("item", "reason"),
    [
        (_nal(PARAMETERS, SLICE)[:-1], "fit its picture"),  # cut short
        (_nal(PARAMETERS, SLICE) + b"\x00\x00", "past the end"),  # a length field cut short
        (_nal(PARAMETERS, SLICE[:-1] + b"\x00"), "zero byte"),
        (_nal(PARAMETERS, bytes([0x80 | SLICE[0]]) + SLICE[1:]), "header"),  # forbidden_zero_bit
        (_nal(PARAMETERS, SLICE[:1] + b"\x00" + SLICE[2:]), "header"),  # temporal id plus 1 = 0
        (_nal(PARAMETERS), "no coded slice"),
        (_nal(b"\x26"), "fit its picture"),  # shorter than a NAL header
    ],
)
def test_nal_units_that_do_not_hold_together_are_named(item: bytes, reason: str) -> None:
    with pytest.raises(DamagedHeif, match=reason):
        _check_nal_units(item, 4)


def test_sound_nal_units_pass_whatever_the_length_field_size() -> None:
    for length_size in (1, 2, 4):
        _check_nal_units(_nal(PARAMETERS, SLICE, SLICE, length_size=length_size), length_size)


def test_a_container_the_reader_does_not_follow_is_left_to_libheif() -> None:
    assert check_heif_items(b"") == 0
    assert check_heif_items(b"\x00\x00\x00\x10ftypheic\x00\x00\x00\x00") == 0  # no meta box
    data = heic((800, 600))
    meta = data.index(b"iloc")
    assert check_heif_items(data[: meta - 4] + b"\x00\x00\x00\x08xxxx" + data[meta + 4 :]) == 0


@pytest.fixture(scope="module")
def grid_with_thumbnail() -> bytes:
    return heic((1024, 768), tile_size=256, thumbnails=[320])


def test_a_sound_heic_agrees_with_its_own_thumbnail(grid_with_thumbnail: bytes) -> None:
    picture, _, drafted = _decode(grid_with_thumbnail, draft_side=None)
    assert not drafted
    disagreement = thumbnail_disagreement(picture, grid_with_thumbnail)
    assert disagreement is not None and disagreement <= THUMBNAIL_DISAGREEMENT
    assert decode_upload(grid_with_thumbnail, LIMITS).original_size == (1024, 768)


@pytest.mark.parametrize("unit", [1, 5, 10])  # three of the 12 tiles' slices (the thumbnail's comes last)
def test_damage_inside_a_slice_is_refused_where_the_thumbnail_disagrees(
    grid_with_thumbnail: bytes, unit: int
) -> None:
    """Damage that leaves every NAL unit whole passes the container check and decodes without an error,
    into a picture partly of noise: only its disagreement with the thumbnail shows it."""
    damaged = damaged_inside_a_slice(grid_with_thumbnail, unit)
    assert check_heif_items(damaged) == 13
    with Image.open(io.BytesIO(damaged)) as image:
        image.load()
    with pytest.raises(UploadRejected, match="does not match the photo's own thumbnail") as rejected:
        decode_upload(damaged, LIMITS)
    assert rejected.value.code == "undecodable_image" and rejected.value.status == 422


def test_a_heic_without_a_thumbnail_is_not_compared() -> None:
    data = heic((800, 600))
    picture, _, _ = _decode(data, draft_side=None)
    assert thumbnail_disagreement(picture, data) is None


@pytest.fixture(scope="module")
def small_heic() -> bytes:
    return heic((512, 384), tile_size=256, thumbnails=[128])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(edits=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=8))
def test_any_damage_gives_a_verdict_never_a_crash(small_heic: bytes, edits: list[tuple[int, int]]) -> None:
    data = bytearray(small_heic)
    for position, value in edits:
        data[position % len(data)] = value
    try:
        checked = check_heif_items(bytes(data))
    except DamagedHeif:
        return
    assert 0 <= checked <= 5  # 2 x 2 tiles and a thumbnail at most
