"""The bad-input corpus (generated, never stored) and fuzzing: every input gets an answer, never a 5xx."""

from __future__ import annotations

import io
import struct
import sys
import zlib
from collections.abc import Iterator

import httpx
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from bench.run import Server
from service.app import create_app
from service.settings import Settings
from tests import dicom_inputs as dcm
from tests import heic_inputs
from tests import service_inputs as make

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(Settings(max_upload_bytes=2_000_000))) as test_client:
        yield test_client


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_claiming(width: int, height: int) -> bytes:
    """A decompression bomb: a well-formed PNG that claims `width` x `height` and carries a few hundred
    bytes of compressed zeros. Decoding it would allocate width x height x 3 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(bytes(100_000), 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """(kind, data) of each chunk of a well-formed PNG."""
    chunks, position = [], 8
    while position < len(png):
        (length,) = struct.unpack(">I", png[position : position + 4])
        chunks.append((png[position + 4 : position + 8], png[position + 8 : position + 8 + length]))
        position += 12 + length
    return chunks


def _png_bad_idat_crc(png: bytes) -> bytes:
    """The PNG with its first IDAT chunk's CRC wrong: its pixels are what a flipped bit would give."""
    at = png.index(b"IDAT")
    (length,) = struct.unpack(">I", png[at - 4 : at])
    out = bytearray(png)
    out[at + 4 + length] ^= 0xFF  # the first byte of the CRC after the chunk's data
    return bytes(out)


def _png_rebuilt(png: bytes, ihdr_byte: int | None = None, value: int = 0, drop: bytes = b"") -> bytes:
    """The PNG rebuilt with valid CRCs: one IHDR byte set to `value`, and chunks of kind `drop` left out."""
    chunks = [(kind, bytearray(data)) for kind, data in _png_chunks(png) if kind != drop]
    if ihdr_byte is not None:
        chunks[0][1][ihdr_byte] = value
    return b"\x89PNG\r\n\x1a\n" + b"".join(_chunk(kind, bytes(data)) for kind, data in chunks)


def _relabelled_arithmetic(jpeg: bytes) -> bytes:
    """A baseline JPEG whose frame header (SOF0) says arithmetic coding (SOF9), as one corrupted byte does:
    libjpeg then decodes its Huffman data without complaint, into noise."""
    position = 2
    while jpeg[position + 1] != 0xC0:  # walk the segments by their lengths to the frame header
        position += 2 + struct.unpack(">H", jpeg[position + 2 : position + 4])[0]
    return jpeg[: position + 1] + b"\xc9" + jpeg[position + 2 :]


def _animated(fmt: str) -> bytes:
    frames = [Image.fromarray(np.full((100, 100, 3), v, np.uint8)) for v in (0, 200)]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:])
    return buffer.getvalue()


def _progressive(size: tuple[int, int] = (400, 300)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (120, 60, 60)).save(buffer, "JPEG", progressive=True, quality=50)
    return buffer.getvalue()


def _scan_bomb(copies: int = 5000) -> bytes:
    """A progressive JPEG whose last scan is repeated: a few hundred KB that a decoder must run thousands
    of scans over (with 20,000 copies of a 4000x3000 photo's scan, Pillow took four minutes)."""
    photo = _progressive((4000, 3000))
    last_scan = photo.rfind(b"\xff\xda")
    return photo[:-2] + photo[last_scan:-2] * copies + b"\xff\xd9"


def _segment_flood(count: int = 200_000) -> bytes:
    """Empty comment segments before the first scan: each costs Pillow's header parser a Python loop."""
    photo = _progressive()
    first_scan = photo.find(b"\xff\xda")
    return photo[:first_scan] + b"\xff\xfe\x00\x02" * count + photo[first_scan:]


def _behind_a_stray_byte(photo: bytes, before: bytes) -> bytes:
    """One junk byte where a marker belongs: libjpeg skips it (with a warning) and decodes the rest."""
    at = photo.find(before)
    return photo[:at] + b"\x00" + photo[at:]


def _deflated_behind_an_implicit_file_meta() -> bytes:
    """A file meta written in implicit VR (against the standard, but pydicom reads it) that declares a
    deflated data set: 10 MB of zeros in 10 KB."""
    uid = b"1.2.840.10008.1.2.1.99\x00"
    meta = (2).to_bytes(2, "little") + (0x10).to_bytes(2, "little") + len(uid).to_bytes(4, "little") + uid
    return bytes(128) + b"DICM" + meta + zlib.compress(bytes(10_000_000))[2:-4]


def _padded(photo: bytes, size: int) -> bytes:
    """Fill bytes before the quantisation tables: libjpeg skips them, Pillow's header parser reads each."""
    at = photo.find(b"\xff\xdb")
    return photo[:at] + b"\xff" * size + photo[at:]


def _avif() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (160, 120), (120, 60, 60)).save(buffer, "AVIF")
    return buffer.getvalue()


def _dicom_jpeg_2000_larger_than_declared() -> bytes:
    """A JPEG 2000 codestream of 2000x2000 pixels in a DICOM header that says 160x120."""
    return _pixel_data_of(dcm.jpeg_2000(np.zeros((2000, 2000, 3), np.uint8)), dcm.jpeg_2000(PIXELS))


def _pixel_data_of(source: bytes, header: bytes) -> bytes:
    """`header`'s DICOM file (its Rows, Columns, syntax) carrying `source`'s pixel data."""
    ds_source, ds_header = (pydicom.dcmread(io.BytesIO(b)) for b in (source, header))
    ds_header.PixelData = ds_source.PixelData
    buffer = io.BytesIO()
    ds_header.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _deflated_dicom() -> bytes:
    """A native photo in Deflated Explicit VR Little Endian (pydicom deflates it as it writes)."""
    ds = pydicom.dcmread(io.BytesIO(dcm.native(PIXELS)))
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


JPEG = make.encode(np.zeros((100, 100, 3), np.uint8))
PNG = make.encode(np.zeros((100, 100, 3), np.uint8), "PNG")
PNG_INTERLACE_9 = _png_rebuilt(PNG, ihdr_byte=12, value=9)
PIXELS = np.random.default_rng(3).integers(0, 255, (120, 160, 3), dtype=np.uint8)
DICOM = dcm.native(PIXELS)
DICOM_JPEG = dcm.jpeg(make.encode(PIXELS), (160, 120))
CORPUS: list[tuple[str, bytes, str, int, str]] = [
    # name, body, content type, status, code
    ("empty", b"", "image/jpeg", 400, "empty_upload"),
    ("truncated jpeg", JPEG[: len(JPEG) // 3], "image/jpeg", 422, "undecodable_image"),
    ("truncated png", PNG[: len(PNG) // 3], "image/png", 422, "undecodable_image"),
    ("jpeg: arithmetic (SOF9)", _relabelled_arithmetic(JPEG), "image/jpeg", 415, "unsupported_image_type"),
    # Pillow decodes a bad IDAT CRC (flipped bits in the pixels) and a cut-off IEND without complaint; the
    # chunk check refuses all four before decoding.
    ("png: IDAT fails its CRC", _png_bad_idat_crc(PNG), "image/png", 422, "undecodable_image"),
    ("png: interlace method 9", PNG_INTERLACE_9, "image/png", 422, "undecodable_image"),
    ("png: cut before IEND", _png_rebuilt(PNG, drop=b"IEND"), "image/png", 422, "undecodable_image"),
    ("png: bit depth 3", _png_rebuilt(PNG, ihdr_byte=8, value=3), "image/png", 422, "undecodable_image"),
    ("random bytes as jpeg", np.random.default_rng(0).bytes(5000), "image/jpeg", 422, "undecodable_image"),
    ("text", b"just some text", "text/plain", 415, "unsupported_media_type"),
    ("html", b"<html><body><img src=x></body></html>", "text/html", 415, "unsupported_media_type"),
    (
        "svg as image",
        b'<svg xmlns="http://www.w3.org/2000/svg"><rect width="9" height="9"/></svg>',
        "image/svg+xml",
        422,
        "undecodable_image",
    ),
    (
        "pdf as image",
        b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF",
        "image/jpeg",
        422,
        "undecodable_image",
    ),
    ("pdf", b"%PDF-1.4\n%%EOF", "application/pdf", 415, "unsupported_media_type"),
    ("zip as image", b"PK\x03\x04" + bytes(200), "image/png", 422, "undecodable_image"),
    ("bomb: 40000x40000 header", _png_header_claiming(40000, 40000), "image/png", 413, "too_many_pixels"),
    ("header claiming 2^31 pixels", _png_header_claiming(65536, 32768), "image/png", 413, "too_many_pixels"),
    ("1x1", make.encode(np.zeros((1, 1, 3), np.uint8), "PNG"), "image/png", 422, "image_too_small"),
    ("20000x2", make.encode(np.zeros((2, 20000, 3), np.uint8), "PNG"), "image/png", 422, "image_too_small"),
    ("animated gif", _animated("GIF"), "image/gif", 415, "unsupported_image_type"),
    ("animated webp", _animated("WEBP"), "image/webp", 422, "animated_image"),
    (
        "bmp",
        make.encode(np.zeros((100, 100, 3), np.uint8), "BMP"),
        "image/bmp",
        415,
        "unsupported_image_type",
    ),
    ("over the upload limit", b"\xff\xd8" + bytes(2_100_000), "image/jpeg", 413, "upload_too_large"),
    ("no content type", JPEG, "", 415, "unsupported_media_type"),
    ("dicom: a JPEG declared as DICOM", JPEG, dcm.DICOM, 422, "not_dicom"),
    ("dicom: preamble only", bytes(128) + b"DICM", dcm.DICOM, 422, "truncated_dicom"),
    ("dicom: truncated", DICOM[: len(DICOM) // 2], dcm.DICOM, 422, "truncated_dicom"),
    ("dicom: truncated jpeg", DICOM_JPEG[: len(DICOM_JPEG) - 200], dcm.DICOM, 422, "truncated_dicom"),
    ("dicom: 200000x200000 header", dcm.header_claiming(200_000, 200_000), dcm.DICOM, 413, "too_many_pixels"),
    ("dicom: two frames", dcm.frames(PIXELS, 2), dcm.DICOM, 422, "multi_frame_dicom"),
    (
        "dicom: CT",
        dcm.native(PIXELS, sop_class=dcm.CT_IMAGE, modality="CT"),
        dcm.DICOM,
        422,
        "wrong_modality",
    ),
    (
        "dicom: no photometric interpretation",
        dcm.without(PIXELS, "PhotometricInterpretation"),
        dcm.DICOM,
        422,
        "incomplete_pixel_module",
    ),
    ("dicom: no pixel data", dcm.without(PIXELS, "PixelData"), dcm.DICOM, 422, "missing_pixel_data"),
    ("dicom: monochrome", dcm.monochrome(PIXELS[..., 0]), dcm.DICOM, 422, "unsupported_pixel_format"),
    (
        "dicom: JPEG lossless",
        dcm.with_syntax(PIXELS, dcm.JPEG_LOSSLESS_SV1),
        dcm.DICOM,
        415,
        "unsupported_transfer_syntax",
    ),
    ("dicom: 40x40", dcm.native(PIXELS[:40, :40]), dcm.DICOM, 422, "image_too_small"),
    ("jpeg scan bomb", _scan_bomb(), "image/jpeg", 422, "too_many_scans"),
    ("jpeg segment flood", _segment_flood(), "image/jpeg", 422, "undecodable_image"),
    # A megabyte of fill bytes: a marker search that backtracked over them would take hours.
    ("jpeg fill-byte flood", b"\xff\xd8" + b"\xff" * 1_000_000, "image/jpeg", 422, "undecodable_image"),
    ("jpeg padded photo", _padded(_progressive(), 100_000), "image/jpeg", 422, "undecodable_image"),
    (
        "jpeg scan bomb behind a stray byte",
        _behind_a_stray_byte(_scan_bomb(), b"\xff\xda"),
        "image/jpeg",
        422,
        "too_many_scans",
    ),
    (
        "jpeg segment flood behind a stray byte",
        _behind_a_stray_byte(_segment_flood(), b"\xff\xfe"),
        "image/jpeg",
        422,
        "undecodable_image",
    ),
    ("avif", _avif(), "image/avif", 415, "unsupported_image_type"),
    (
        "heic: noise inside one tile's slice (its thumbnail disagrees)",
        heic_inputs.damaged_inside_a_slice(heic_inputs.heic((1024, 768), tile_size=256, thumbnails=[320]), 5),
        "image/heic",
        422,
        "undecodable_image",
    ),
    ("dicom: deflated", _deflated_dicom(), dcm.DICOM, 415, "unsupported_transfer_syntax"),
    (
        "dicom: deflated, behind an implicit-VR file meta",
        _deflated_behind_an_implicit_file_meta(),
        dcm.DICOM,
        415,
        "unsupported_transfer_syntax",
    ),
    (
        "dicom: JPEG-LS larger than its header",
        _pixel_data_of(
            dcm.compressed(np.zeros((1200, 1600, 3), np.uint8), dcm.JPEG_LS_LOSSLESS),
            dcm.compressed(PIXELS, dcm.JPEG_LS_LOSSLESS),
        ),
        dcm.DICOM,
        422,
        "undecodable_image",
    ),
    (
        "dicom: JPEG baseline larger than its header",
        dcm.jpeg(make.encode(np.zeros((1200, 1600, 3), np.uint8)), (160, 120)),
        dcm.DICOM,
        422,
        "undecodable_image",
    ),
    (
        "dicom: a JPEG scan bomb as JPEG baseline pixel data",
        dcm.jpeg(_scan_bomb(), (4000, 3000)),
        dcm.DICOM,
        422,
        "too_many_scans",
    ),
    (
        "dicom: a PNG as JPEG baseline pixel data",
        dcm.jpeg(make.encode(PIXELS, "PNG"), (160, 120)),
        dcm.DICOM,
        422,
        "undecodable_image",
    ),
    (
        "dicom: JPEG 2000 larger than its header",
        _dicom_jpeg_2000_larger_than_declared(),
        dcm.DICOM,
        422,
        "undecodable_image",
    ),
]


@pytest.mark.parametrize(
    ("name", "body", "content_type", "status", "code"), CORPUS, ids=[c[0] for c in CORPUS]
)
def test_bad_input_gets_its_problem(
    client: TestClient, name: str, body: bytes, content_type: str, status: int, code: str
) -> None:
    headers = {"content-type": content_type} if content_type else {}
    response = client.post("/v1/assess", content=body, headers=headers)
    assert response.status_code == status, (name, response.text)
    assert response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == code


@pytest.mark.parametrize("variant", ["png16", "cmyk", "grey", "palette_alpha", "la", "rgba", "orientations"])
def test_odd_but_valid_images_are_answered(client: TestClient, variant: str) -> None:
    base = Image.fromarray(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    bodies = {
        "png16": [make.encode(Image.fromarray(np.asarray(base.convert("L"), np.uint16) * 257), "PNG")],
        "cmyk": [make.encode(base.convert("CMYK"))],
        "grey": [make.encode(base.convert("L"))],
        "palette_alpha": [make.encode(base.convert("RGBA").convert("P"), "PNG", transparency=0)],
        "la": [make.encode(base.convert("LA"), "PNG")],
        "rgba": [make.encode(base.convert("RGBA"), "PNG")],
        "orientations": [make.encode(base, exif=_exif(o)) for o in range(1, 9)],
    }[variant]
    for body in bodies:
        response = client.post("/v1/quality", files={"image": ("p", body, "application/octet-stream")})
        assert response.status_code == 200, response.text
        assert response.json()["decision"] in ("recapture", "accept")


def test_a_progressive_jpeg_with_its_ordinary_scans_is_assessed(client: TestClient) -> None:
    photo = make.encode(np.random.default_rng(1).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    progressive = io.BytesIO()
    Image.open(io.BytesIO(photo)).save(progressive, "JPEG", progressive=True, quality=90)
    assert progressive.getvalue().count(b"\xff\xda") == 10  # libjpeg's default progression
    response = client.post(
        "/v1/quality", content=progressive.getvalue(), headers={"content-type": "image/jpeg"}
    )
    assert response.status_code == 200, response.text


def test_a_nameless_photo_part_is_told_how_to_name_it(client: TestClient) -> None:
    body = b"--b\r\nContent-Type: image/jpeg\r\n\r\n" + bytes(5000) + b"\r\n--b--\r\n"
    response = client.post(
        "/v1/assess", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400
    assert response.json()["code"] == "malformed_multipart"
    assert "a nameless form part" in response.json()["detail"] and 'name="image"' in response.json()["detail"]


def test_a_field_name_in_utf8_is_quoted_as_sent(client: TestClient) -> None:
    body = '--b\r\nContent-Disposition: form-data; name="imagé"\r\n\r\nx\r\n--b--\r\n'.encode()
    response = client.post(
        "/v1/assess", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 422
    assert response.json()["code"] == "missing_image" and "'imagé'" in response.json()["detail"]


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


@pytest.mark.parametrize(
    "filename", ["../../etc/passwd", "ÉCHOGRAPHIE ✓.jpg", "a" * 500 + ".jpg", "name\twith\ttabs.jpg", ""]
)
def test_odd_filenames_are_ignored(client: TestClient, filename: str) -> None:
    body = make.encode(np.full((240, 320, 3), 60, np.uint8))
    response = client.post("/v1/quality", files={"image": (filename, body, "image/jpeg")})
    assert response.status_code == 200, response.text
    assert filename not in response.text or not filename


def test_service_stays_ready_after_the_corpus(client: TestClient) -> None:
    for _, body, content_type, _, _ in CORPUS:
        client.post(
            "/v1/quality", content=body, headers={"content-type": content_type} if content_type else {}
        )
    assert client.get("/readyz").status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=4096), content_type=st.sampled_from(["image/jpeg", "image/png", "image/webp"]))
def test_fuzzed_bytes_never_cause_a_server_error(client: TestClient, body: bytes, content_type: str) -> None:
    response = client.post("/v1/assess", content=body, headers={"content-type": content_type})
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["code"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), min_size=1, max_size=12))
def test_corrupted_jpegs_are_answered_or_refused_never_500(client: TestClient, flips: list) -> None:
    """A real JPEG with random bytes overwritten: headers, tables and entropy data all get hit."""
    body = bytearray(make.encode(np.random.default_rng(2).integers(0, 255, (240, 320, 3), dtype=np.uint8)))
    for position, value in flips:
        body[position % len(body)] = value
    response = client.post("/v1/quality", content=bytes(body), headers={"content-type": "image/jpeg"})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    base=st.sampled_from([DICOM, DICOM_JPEG]),
    flips=st.lists(st.tuples(st.integers(min_value=0), st.integers(0, 255)), max_size=12),
    cut=st.one_of(st.none(), st.integers(min_value=0)),
    as_dicom=st.booleans(),
)
def test_corrupted_dicom_is_answered_or_refused_never_500(
    client: TestClient, base: bytes, flips: list, cut: int | None, as_dicom: bool
) -> None:
    """Real DICOM files (native and JPEG baseline) with bytes overwritten and cut short: the file meta,
    the header's lengths and values, the encapsulation and the pixels all get hit."""
    body = bytearray(base)
    for position, value in flips:
        body[position % len(body)] = value
    if cut is not None:
        body = body[: cut % len(body)]
    content_type = dcm.DICOM if as_dicom else "application/octet-stream"
    response = client.post("/v1/assess", content=bytes(body), headers={"content-type": content_type})
    assert response.status_code == 200 or 400 <= response.status_code < 500, response.text


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=4096))
def test_fuzzed_bytes_after_a_dicom_prefix_never_cause_a_server_error(
    client: TestClient, body: bytes
) -> None:
    response = client.post(
        "/v1/assess", content=bytes(128) + b"DICM" + body, headers={"content-type": dcm.DICOM}
    )
    assert 400 <= response.status_code < 500, response.text
    assert response.json()["code"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    include=st.text(max_size=30),
    language=st.text(max_size=40),
    request_id=st.text(max_size=60),
)
def test_fuzzed_parameters_and_headers(
    client: TestClient, include: str, language: str, request_id: str
) -> None:
    headers = {"content-type": "image/jpeg"}
    for name, value in (("Accept-Language", language), ("X-Request-ID", request_id)):
        if value.isascii() and value.isprintable():  # what an HTTP client can put in a header at all
            headers[name] = value
    response = client.post("/v1/assess", params={"include": include}, content=JPEG, headers=headers)
    assert response.status_code in (200, 422), response.text


def test_memory_returns_to_baseline_after_the_corpus() -> None:
    """A live server's resident memory after five passes of the corpus, against after one (allocator warm)."""
    server = Server(
        "cervigate",
        [sys.executable, "-m", "service"],
        "/readyz",
        "/v1/assess",
        env={"CERVIGATE_MAX_UPLOAD_BYTES": "2000000"},
    )
    server.start()
    try:
        good = make.encode(np.full((480, 640, 3), 90, np.uint8))

        def one_pass(client: httpx.Client) -> None:
            for _ in range(10):
                assert client.post(
                    "/v1/assess", content=good, headers={"content-type": "image/jpeg"}
                ).is_success
            for name, body, content_type, status, _ in CORPUS:
                headers = {"content-type": content_type} if content_type else {}
                assert client.post("/v1/assess", content=body, headers=headers).status_code == status, name

        with httpx.Client(base_url=server.url, timeout=30) as client:
            one_pass(client)
            baseline = server.rss_mb()
            for _ in range(5):
                one_pass(client)
            after = server.rss_mb()
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()
    assert (after - baseline) / baseline < 0.05, (baseline, after)


def test_a_multipart_preamble_is_ignored_as_rfc_2046_says(client: TestClient) -> None:
    photo = make.encode(np.random.default_rng(2).integers(0, 255, (240, 320, 3), dtype=np.uint8))
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n' + photo
    for preamble in (b"", b"\r\n", b"This is a multi-part message in MIME format.\r\n"):
        response = client.post(
            "/v1/quality",
            content=preamble + part + b"\r\n--b--\r\n",
            headers={"content-type": "multipart/form-data; boundary=b"},
        )
        assert response.status_code == 200, (preamble, response.text)


def test_a_multipart_body_without_its_boundary_is_told_to_check_it(client: TestClient) -> None:
    body = b'--other\r\nContent-Disposition: form-data; name="image"\r\n\r\n' + bytes(10_000)
    response = client.post(
        "/v1/assess", content=body, headers={"content-type": "multipart/form-data; boundary=b"}
    )
    assert response.status_code == 400 and response.json()["code"] == "malformed_multipart"
    assert "no multipart boundary in the first 4096 bytes" in response.json()["detail"]


def test_a_dicom_jpeg_frame_is_measured_against_its_header_before_it_is_decoded(client: TestClient) -> None:
    """The frame's own header is read first: a JPEG-LS frame of 1600x1200 in a 160x120 header is refused
    by size, not after decoding it (a 12000x12000 one took 1.2 GB)."""
    frame = dcm.compressed(np.zeros((1200, 1600, 3), np.uint8), dcm.JPEG_LS_LOSSLESS)
    body = _pixel_data_of(frame, dcm.compressed(PIXELS, dcm.JPEG_LS_LOSSLESS))
    response = client.post("/v1/assess", content=body, headers={"content-type": dcm.DICOM})
    assert response.status_code == 422
    assert "1600x1200 pixels but the DICOM header says 160x120" in response.json()["detail"]


def test_dicom_header_values_are_never_quoted_back(client: TestClient) -> None:
    """A header field can hold a patient's name: only registered UIDs and defined terms are named."""
    values = {
        "SOPClassUID": "1.2.3." + "4" * 20,  # a well-formed UID nobody registered
        "Modality": "PATIENT-NAME-MARKER",
        "PhotometricInterpretation": "PATIENT-NAME-MARKER",
    }
    for keyword, value in values.items():
        ds = pydicom.dcmread(io.BytesIO(dcm.native(PIXELS)))
        setattr(ds, keyword, value)
        buffer = io.BytesIO()
        ds.save_as(buffer, enforce_file_format=True)
        response = client.post("/v1/assess", content=buffer.getvalue(), headers={"content-type": dcm.DICOM})
        assert 400 <= response.status_code < 500, (keyword, response.text)
        assert "MARKER" not in response.text and "44444" not in response.text, (keyword, response.text)


def test_client_header_values_are_quoted_short_and_printable(client: TestClient) -> None:
    response = client.post(
        "/v1/assess", content=b"x", headers={"content-type": "text/ECHO-MARKER" + "x" * 20_000}
    )
    assert response.status_code == 415 and response.json()["code"] == "unsupported_media_type"
    assert len(response.json()["detail"]) < 300


def test_a_trailing_slash_is_a_problem_not_a_redirect(client: TestClient) -> None:
    response = client.post(
        "/v1/assess/", content=b"x", headers={"content-type": "image/jpeg", "host": "evil.example"},
        follow_redirects=False,
    )  # fmt: skip
    assert response.status_code == 404 and response.json()["code"] == "not_found"
    assert "location" not in response.headers


def test_a_repeated_query_parameter_is_refused_whichever_value_comes_last(client: TestClient) -> None:
    photo = make.encode(np.zeros((240, 320, 3), np.uint8))
    for path in (
        "/v1/assess?include=bogus&include=mask",
        "/v1/assess?include=mask&include=bogus",
        "/v1/assess/fhir?subject=Patient/1&subject=Patient/2",  # the report must not go to the second
        "/v1/quality?stage=saline&stage=saline",
    ):
        response = client.post(path, content=photo, headers={"content-type": "image/jpeg"})
        assert response.status_code == 422 and response.json()["code"] == "invalid_request", path


def test_a_multipart_preamble_over_4_kb_is_refused_however_it_arrives(client: TestClient) -> None:
    photo = make.encode(np.zeros((240, 320, 3), np.uint8))
    part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="p.jpg"\r\n\r\n' + photo
    response = client.post(
        "/v1/quality",
        content=b"p" * 5000 + b"\r\n" + part + b"\r\n--b--\r\n",  # one read: the boundary is in it
        headers={"content-type": "multipart/form-data; boundary=b"},
    )
    assert response.status_code == 400 and response.json()["code"] == "malformed_multipart"
