"""The shared decode and manifest-driven preprocessing used by both training and serving."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
from PIL import Image

from service.inference.manifest import (
    InputSpec,
    Manifest,
    ModelIntegrityError,
    read_manifest,
    sha256_of,
    write_manifest,
)
from service.inference.preprocess import fit, normalize, prepare
from service.io.imaging import ImageDecodeError, load_rgb


def _encode(image: Image.Image, fmt: str = "PNG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _spec(**changes: object) -> InputSpec:
    fields: dict[str, object] = {
        "name": "image",
        "width": 64,
        "height": 48,
        "channels": ("R", "G", "B"),
        "resize": "letterbox",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.25, 0.25, 0.25),
    }
    fields.update(changes)
    return InputSpec(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "mode",
    ["RGB", "L", "P", "RGBA", "LA", "CMYK", "I;16", "1"],
)
def test_every_pixel_mode_decodes_to_rgb_uint8(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    data = _encode(Image.new(mode, (30, 20)), fmt)
    rgb = load_rgb(data)
    assert rgb.shape == (20, 30, 3) and rgb.dtype == np.uint8


def test_sixteen_bit_grey_keeps_its_range() -> None:
    wide = np.array([[0, 32768, 65535]], dtype=np.uint16)
    rgb = load_rgb(_encode(Image.fromarray(wide)))
    assert rgb[0, :, 0].tolist() == [0, 128, 255]


def test_alpha_is_composited_on_black() -> None:
    rgba = Image.new("RGBA", (4, 4), (255, 255, 255, 0))
    assert load_rgb(_encode(rgba)).max() == 0


# What a viewer shows for each EXIF orientation tag, written independently of Pillow's transpose table.
_UPRIGHT = {
    1: lambda p: p,
    2: lambda p: p[:, ::-1],
    3: lambda p: p[::-1, ::-1],
    4: lambda p: p[::-1],
    5: lambda p: p.transpose(1, 0, 2),
    6: lambda p: np.rot90(p, k=-1),
    7: lambda p: p[::-1, ::-1].transpose(1, 0, 2),
    8: lambda p: np.rot90(p, k=1),
}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation: int) -> None:
    pixels = np.random.default_rng(orientation).integers(0, 255, (20, 30, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    upright = load_rgb(_encode(Image.fromarray(pixels), "PNG", exif=exif))
    np.testing.assert_array_equal(upright, _UPRIGHT[orientation](pixels))


def test_undecodable_bytes_raise_a_decode_error() -> None:
    with pytest.raises(ImageDecodeError):
        load_rgb(b"definitely not an image")


def test_letterbox_keeps_aspect_and_maps_boxes_back() -> None:
    image = np.full((300, 800, 3), 200, np.uint8)
    fitted, placement = fit(image, _spec())
    assert fitted.shape == (48, 64, 3)
    assert placement.scale_x == pytest.approx(placement.scale_y, rel=0.02)
    assert fitted[0, 32, 0] == 0 and fitted[24, 32, 0] == 200, "pads top/bottom, keeps the middle"
    box = (100.0, 50.0, 700.0, 250.0)
    assert placement.to_source(placement.to_input(box)) == pytest.approx(box)


def test_stretch_fills_the_input() -> None:
    fitted, placement = fit(np.zeros((300, 800, 3), np.uint8), _spec(resize="stretch"))
    assert fitted.shape == (48, 64, 3) and placement.pad_x == placement.pad_y == 0


def test_normalize_applies_scale_mean_std_in_nchw() -> None:
    fitted = np.full((48, 64, 3), 255, np.uint8)
    fitted[..., 1] = 0
    tensor = normalize(fitted, _spec())
    assert tensor.shape == (1, 3, 48, 64) and tensor.dtype == np.float32
    assert tensor[0, 0].max() == pytest.approx((1.0 - 0.5) / 0.25)
    assert tensor[0, 1].max() == pytest.approx((0.0 - 0.5) / 0.25)


def test_four_channel_input_with_lesion_probability() -> None:
    spec = _spec(channels=("R", "G", "B", "lesion_probability"), mean=(0.5,) * 4, std=(0.25,) * 4)
    image = np.zeros((100, 100, 4), np.uint8)
    image[..., 3] = 255
    tensor, _ = prepare(image, spec)
    assert tensor.shape == (1, 4, 48, 64)
    assert tensor[0, 3, 24, 32] == pytest.approx(2.0), "the extra channel is resized and normalised too"


def test_spec_rejects_mismatched_channel_stats() -> None:
    with pytest.raises(ValueError, match="one entry per channel"):
        _spec(mean=(0.5, 0.5))


def test_manifest_round_trip_and_integrity(tmp_path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"model bytes")
    manifest = Manifest(
        name="detector",
        version="1.0.0",
        sha256=sha256_of(tmp_path / "model.onnx"),
        input=_spec(),
        outputs=({"name": "score", "shape": ("batch", 1), "description": "P(cervix)"},),  # type: ignore[arg-type]
        command="python -m training export detector",
        intended_use="test",
        limitations="test",
    )
    write_manifest(tmp_path, manifest)
    assert read_manifest(tmp_path) == manifest
    (tmp_path / "model.onnx").write_bytes(b"tampered")
    with pytest.raises(ModelIntegrityError, match="make models"):
        read_manifest(tmp_path)
    data = json.loads((tmp_path / "manifest.json").read_text())
    data["input"]["mean"] = [0.5]
    (tmp_path / "manifest.json").write_text(json.dumps(data))
    with pytest.raises(ValueError):
        read_manifest(tmp_path, verify=False)


def test_crop_box_grows_squares_and_clips() -> None:
    from service.inference.preprocess import crop, crop_box

    region = crop_box((300, 200, 500, 300), width=800, height=600, margin=0.1)
    left, top, right, bottom = region
    assert (right - left) == (bottom - top) == 240, "200x100 box + 10 % each side, squared to its long side"
    assert (left + right) / 2 == 400 and (top + bottom) / 2 == 250, "stays centred on the box"
    edge = crop_box((700, 500, 800, 600), width=800, height=600, margin=0.5)
    assert edge[2] == 800 and edge[3] == 600, "clipped to the frame"
    assert crop(np.zeros((600, 800, 3), np.uint8), region).shape == (240, 240, 3)
    degenerate = crop_box((10, 10, 10, 10), width=20, height=20, margin=0.1)
    assert degenerate[2] > degenerate[0] and degenerate[3] > degenerate[1]
