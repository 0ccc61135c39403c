"""Request-time decoding: check an upload before paying for it, then decode only the pixels needed.

A 12 MP phone JPEG costs about five times more to decode at full size than at 1/4 scale (libjpeg's DCT
scaling), and the detector only needs 192 px. So JPEGs are decoded at the smallest DCT scale that keeps
`decode_min_side`; if the cervix then turns out too small in those pixels for the focus check (which must
not judge an upsampled crop), the crop is decoded again at the smallest scale that is enough.

HEVC has no such scaling, but a HEIC may carry embedded thumbnails (scaled copies of the photo): the
smallest one that keeps `decode_min_side` stands in for the reduced decode, and a larger one for the crop
when it has enough pixels; otherwise the photo is decoded in full, its grid tiles on `decode_threads`, and
left in libheif's buffer, which Pillow reduces a strip of rows at a time (`RowBuffer`).
PNG has neither (Pillow decodes it in full, once, and the crop is cut from those pixels).

Before any of that, the bytes are checked where a decoder would not complain: a JPEG's marker segments, a
PNG's chunks, a HEIC's coded pictures (`service.io.heif_items`); and after it, a HEIC decoded in full
against its own thumbnail.
"""

from __future__ import annotations

import io
import logging
import math
import re
import warnings
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from service.io.heif_items import DamagedHeif, check_heif_items
from service.io.imaging import exif_orientation, to_rgb

# Pillow format name -> media type. MPO is what many phones write: a JPEG with extra frames (depth, preview).
SUPPORTED_FORMATS = {
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "PNG": "image/png",
    "WEBP": "image/webp",
    "HEIF": "image/heif",
}
# Formats Pillow can decode smaller than stored: JPEG by DCT scaling, HEIF by picking an embedded thumbnail
# (pillow-heif's draft() takes only a scaled copy: same aspect ratio, rotation, mirroring, crop and profile).
_REDUCIBLE = {"JPEG", "MPO", "HEIF"}
_SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that rotate by 90 degrees
# Every upload's pixel count is checked against the service's own limit before decoding, so Pillow's
# warning for large images is noise here (its hard error above twice its limit still applies).
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
# Pillow's other warnings ("Corrupt EXIF data", "Tag data larger than file") are about the client's file,
# which gets its own answer; on stderr they would only bypass the JSON log, with library paths.
warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
# Pillow's debug log prints EXIF values (a clinic app may put a patient's name there): never let it through.
logging.getLogger("PIL").setLevel(logging.INFO)


def register_heif(decode_threads: int = 1) -> None:
    """Teach Pillow HEIC/HEIF (iPhones' default format). Idempotent. `decode_threads`: how many of a
    grid image's tiles libheif decodes at once (pillow-heif's default, 4, ignores how many requests the
    service decodes side by side)."""
    from pillow_heif import register_heif_opener

    register_heif_opener(decode_threads=decode_threads)


class UploadRejected(ValueError):
    """An upload the service will not decode; `code` and `status` become the problem response."""

    code = "undecodable_image"
    status = 422


class UnsupportedImageType(UploadRejected):
    code = "unsupported_image_type"
    status = 415


class TooManyPixels(UploadRejected):
    code = "too_many_pixels"
    status = 413


class ImageTooSmall(UploadRejected):
    code = "image_too_small"
    status = 422


class AnimatedImage(UploadRejected):
    code = "animated_image"
    status = 422


class TooManyScans(UploadRejected):
    code = "too_many_scans"
    status = 422


# A progressive JPEG is a series of scans, each refining the whole image, and a decoder must run every
# one: 20,000 copies of one scan fit in 600 KB and took Pillow four minutes at 1/8 scale (a "scan bomb";
# libjpeg-turbo guards its own tools with -maxscans). Cameras and encoders write about 10 (libjpeg's
# default progression: 10 scans), so 100 leaves room for any real photo.
MAX_JPEG_SCANS = 100
MAX_JPEG_SEGMENTS = 2000  # markers of all kinds; a photo has a few dozen (EXIF, ICC, tables, scans)
# Bytes between segments that are no segment (stray bytes, fill 0xFF): libjpeg skips them with a warning,
# but Pillow's header parser reads them one by one in Python (19 MB of fill took it 7 s). A file has none.
MAX_JPEG_PADDING = 65536
# Inside entropy-coded data 0xFF is followed by 0x00 (stuffing) or a restart marker; any other byte after
# it starts the next marker segment (fill bytes 0xFF may come before it).
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Between segments, as libjpeg reads it (next_marker): stray bytes are skipped to the next 0xFF, fill bytes
# 0xFF are skipped, and 0xFF 0x00 is more junk. Whatever a decoder skips, the walk must skip too, or one
# stray byte would end the walk and let every scan after it through. Markers are found with bytes.find and
# an anchored match of the fill run: a searching regex such as rb"\xff+(.)" backtracks quadratically over a
# long run of 0xFF bytes (40 KB took 10 s).
_FILL = re.compile(rb"\xff+")
_FRAME_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})  # SOFn and JPEG-LS SOF55
_ARITHMETIC_FRAMES = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})  # SOF9-11, SOF13-15
_STANDALONE_MARKERS = frozenset({0x01, 0xD8, *range(0xD0, 0xD8)})
_JPEG_START = b"\xff\xd8"
# PNG: Pillow streams IDAT data to zlib without checking the chunks' CRCs, and decodes a PNG cut off before
# IEND; a corrupted upload would then be judged on whatever came out. So the chunk structure is checked
# first (CRC-32 runs at memory speed: 14.8 ms for a 36 MB PNG), and the header's fields with it.
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PNG_CHUNKS = 50_000  # libpng writes 8 KB IDAT chunks: 2,500 for a 20 MB file
_PNG_BIT_DEPTHS = {0: {1, 2, 4, 8, 16}, 2: {8, 16}, 3: {1, 2, 4, 8}, 4: {8, 16}, 6: {8, 16}}  # by colour type


@dataclass(frozen=True)
class DecodeLimits:
    max_pixels: int
    min_side: int
    decode_min_side: int


@dataclass(frozen=True)
class RowBuffer:
    """An upright 8-bit RGB picture left in its decoder's own buffer (libheif's: 3 bytes a pixel, rows
    `stride` bytes apart), of which Pillow copies only the pixels asked for: a crop copies its box, a
    reduction one strip of its box at a time. The pixels are those of Pillow's own `reduce`/`crop` of the
    whole picture, without a full-size Pillow copy of it (4 bytes a pixel): one 12 MP HEIC assessment peaked
    92 MB above its start with that copy, 67.5 MB without it (README "Sizing")."""

    data: memoryview
    size: tuple[int, int]
    stride: int

    @property
    def width(self) -> int:
        return self.size[0]

    @property
    def height(self) -> int:
        return self.size[1]

    def reduce(self, factor: int, box: tuple[int, int, int, int] | None = None) -> Image.Image:
        """`Image.reduce(factor, box)` of the whole picture, strip by strip: each strip starts a multiple of
        `factor` rows below the box's top, so every block averages the same pixels."""
        left, top, right, bottom = box or (0, 0, *self.size)
        reduced = Image.new("RGB", (math.ceil((right - left) / factor), math.ceil((bottom - top) / factor)))
        step = _STRIP_BLOCKS * factor
        for y in range(top, bottom, step):
            strip = self.crop((left, y, right, min(y + step, bottom)))
            reduced.paste(strip.reduce(factor), (0, (y - top) // factor))
        return reduced

    def crop(self, box: tuple[int, int, int, int]) -> Image.Image:
        """`Image.crop(box)` for a box inside the picture: only the box's own pixels are copied."""
        left, top, right, bottom = box
        if not (0 <= left < right <= self.width and 0 <= top < bottom <= self.height):
            raise ValueError(f"box {box} is not inside the {self.width}x{self.height} picture")
        # From the box's first pixel to its last: its rows keep the buffer's stride, the view copies nothing.
        pixels = self.data[top * self.stride + 3 * left : (bottom - 1) * self.stride + 3 * right]
        return Image.frombytes("RGB", (right - left, bottom - top), pixels, "raw", "RGB", self.stride)


# Output rows per strip: 32 of a 12 MP photo at 1/9 are 288 of its rows, at most 4.6 MB of Pillow pixels.
_STRIP_BLOCKS = 32
# What a decode gives: Pillow's pixels, or a HEIC's decoded in full still in libheif's buffer.
Picture = Image.Image | RowBuffer


@dataclass
class DecodedImage:
    """An upright RGB image, possibly at reduced scale, that can still give full-resolution crops."""

    rgb: np.ndarray  # HxWx3 uint8, upright, `scale` times the original size
    original_size: tuple[int, int]  # (width, height) of the upright full-resolution image
    media_type: str
    _data: bytes = field(repr=False)
    # Pixels finer than `rgb`, when there are, kept as they were decoded: a crop is cut from them without
    # copying the whole photo into an array first (a 50 MP PNG would need 150 MB more for that).
    _full: Picture | None = field(default=None, repr=False)

    @property
    def scale(self) -> float:
        return self.rgb.shape[1] / self.original_size[0]

    def region(self, box: tuple[int, int, int, int], min_side: int) -> np.ndarray:
        """Pixels of `box` (original coordinates) with at least `min_side` pixels on its short side where
        the original has them: from the decoded pixels when they suffice, else from a finer decode (the
        smallest JPEG DCT scale or HEIC thumbnail that is enough, or full resolution), made once and kept."""
        x0, y0, x1, y1 = box
        needed = min(1.0, min_side / max(1, min(x1 - x0, y1 - y0)))
        if self.scale >= needed:
            s = self.scale
            top, left = round(y0 * s), round(x0 * s)
            return self.rgb[top : max(round(y1 * s), top + 1), left : max(round(x1 * s), left + 1)]
        if self._full is None or self._full.width / self.original_size[0] < needed:
            side = math.ceil(min(self.original_size) * needed)
            self._full, _, _ = _decode(self._data, draft_side=side)
        s = self._full.width / self.original_size[0]
        top, left = round(y0 * s), round(x0 * s)
        width, height = self._full.size
        left, top = min(left, width - 1), min(top, height - 1)  # reduce() refuses a box outside the image
        area = (left, top, min(max(round(x1 * s), left + 1), width), min(max(round(y1 * s), top + 1), height))
        # A full decode (PNG, WebP, a HEIC without a large thumbnail) can give far more pixels than the
        # stages need: reduce by whole factors, as JPEG's DCT scaling does, never below `min_side`; the
        # region is reduced in place, without copying it out at full size first.
        factor = min(area[2] - area[0], area[3] - area[1]) // min_side
        return np.asarray(self._full.reduce(factor, box=area) if factor >= 2 else self._full.crop(area))


def decode_upload(data: bytes, limits: DecodeLimits) -> DecodedImage:
    """Validate and decode an upload, refusing unsupported, oversized and animated images before decoding."""
    if data[:2] == _JPEG_START:  # before Pillow: its own header parser loops over every segment in Python
        check_jpeg_segments(data)
    elif data[:8] == _PNG_SIGNATURE:
        check_png_chunks(data)
    image = _open(data, limits.max_pixels)
    try:
        width, height, media_type = _check(image, limits)
        if image.format == "HEIF":  # libheif would conceal the damage and decode noise
            check_heif(data)
        decoded, orientation, drafted = _decode_opened(image, data, draft_side=limits.decode_min_side)
    except BaseException:
        image.close()
        raise
    if decoded is not image:
        image.close()
    upright_size = (height, width) if orientation in _SWAPS_AXES else (width, height)
    factor = min(decoded.size) // limits.decode_min_side
    # Still far more pixels than the whole-photo stage needs: a cheap box reduction.
    if isinstance(decoded, RowBuffer):  # no array of it without Pillow's rows: reduce(1) is a copy
        rgb = np.asarray(decoded.reduce(max(1, factor)))
    else:
        rgb = np.asarray(decoded.reduce(factor) if factor >= 2 else decoded)
    # Pixels finer than the reduction are kept for the crop: a HEIC thumbnail costs as much to decode again
    # as it did the first time, with no cheaper scale to ask for.
    finer = None if drafted and factor < 2 else decoded
    return DecodedImage(rgb=rgb, original_size=upright_size, media_type=media_type, _data=data, _full=finer)


def check_size(width: int, height: int, limits: DecodeLimits) -> None:
    """The pixel-count and short-side limits, from a header, before any pixel is decoded."""
    if width * height > limits.max_pixels:
        raise TooManyPixels(
            f"the image is {width}x{height} pixels, more than the {limits.max_pixels} allowed; "
            "send the photo at a lower resolution"
        )
    if min(width, height) < limits.min_side:
        raise ImageTooSmall(
            f"the image is {width}x{height} pixels; send a photo at least {limits.min_side} pixels "
            "on its short side"
        )


def _check(image: Image.Image, limits: DecodeLimits) -> tuple[int, int, str]:
    """Width, height and media type of an opened upload that the service will decode; else UploadRejected."""
    media_type = SUPPORTED_FORMATS.get(image.format or "")
    if media_type is None:
        raise UnsupportedImageType(
            f"{image.format or 'this'} images are not accepted; send JPEG, PNG, WebP or HEIC"
        )
    width, height = image.size
    check_size(width, height, limits)
    frames = getattr(image, "n_frames", 1)
    if image.format != "MPO" and frames > 1:
        if image.format == "HEIF":  # a HEIC's top-level images (a burst, a collection) are not animation
            raise AnimatedImage(f"the HEIC holds {frames} images; send one photo per upload")
        raise AnimatedImage("animated images are not accepted; send a single photo")
    return width, height, media_type


def check_jpeg_segments(data: bytes) -> None:
    """Refuse a JPEG whose first image has more than MAX_JPEG_SCANS scans, or is arithmetic-coded, before
    decoding it. Cameras and encoders write Huffman-coded JPEGs; an arithmetic-coded frame is almost always
    a Huffman one relabelled by corruption, which libjpeg decodes without complaint into noise.

    Walks the marker segments by their lengths, so bytes inside an APPn segment (an EXIF thumbnail is a
    JPEG of its own, an ICC profile is anything) are never taken for markers; only the entropy-coded data
    after each scan header is searched for the next marker. Between segments it skips what libjpeg skips
    (stray bytes, fill bytes). The walk itself is bounded (MAX_JPEG_SEGMENTS): a flood of tiny segments
    would otherwise cost a Python loop per segment."""
    scans = 0
    for marker, _ in _jpeg_segments(data):
        if marker in _ARITHMETIC_FRAMES:
            raise UnsupportedImageType(
                "arithmetic-coded JPEGs are not accepted (cameras write Huffman-coded ones); "
                "save the photo again as a standard JPEG"
            )
        if marker == 0xDA:
            scans += 1
            if scans > MAX_JPEG_SCANS:
                raise TooManyScans(
                    f"the JPEG has more than {MAX_JPEG_SCANS} scans (a camera writes about 10); "
                    "save the photo again as a standard JPEG"
                )


def check_png_chunks(data: bytes) -> None:
    """Refuse a PNG whose chunks do not hold together, before decoding it: every chunk's CRC-32 must match,
    IHDR must come first with a colour type, bit depth and methods PNG defines, and IEND must end the image
    (a PNG without one was cut off). What follows IEND is ignored, as decoders do."""
    view, position, chunks = memoryview(data), len(_PNG_SIGNATURE), 0
    while True:
        if position + 12 > len(data):
            raise UploadRejected(_PNG_CUT_OFF)
        length = int.from_bytes(view[position : position + 4], "big")
        kind = bytes(view[position + 4 : position + 8])
        end = position + 12 + length
        if end > len(data):
            raise UploadRejected(_PNG_CUT_OFF)
        if zlib.crc32(view[position + 4 : end - 4]) != int.from_bytes(view[end - 4 : end], "big"):
            name = kind.decode("ascii") if kind.isalpha() else "unnamed"
            raise UploadRejected(
                f"the PNG's {name} chunk fails its checksum: the file is corrupt; "
                "take or send the photo again"
            )
        if chunks == 0:
            _check_png_header(kind, view[position + 8 : end - 4])
        chunks += 1
        if kind == b"IEND":
            return
        if chunks > MAX_PNG_CHUNKS:
            raise UploadRejected(
                f"the PNG has more than {MAX_PNG_CHUNKS} chunks (an encoder writes a few thousand at most); "
                "save the photo again as a standard PNG or JPEG"
            )
        position = end


_PNG_CUT_OFF = "the PNG ends before its last chunk: it may be truncated; take or send the photo again"


def _check_png_header(kind: bytes, header: memoryview) -> None:
    if kind != b"IHDR" or len(header) != 13:
        raise UploadRejected("the PNG does not start with its header chunk (IHDR); save the photo again")
    depth, colour, compression, filtering, interlace = header[8:13]
    if depth not in _PNG_BIT_DEPTHS.get(colour, set()) or compression or filtering or interlace > 1:
        raise UploadRejected(
            f"the PNG's header is not one PNG defines (bit depth {depth}, colour type {colour}, interlace "
            f"method {interlace}); save the photo again as a standard PNG or JPEG"
        )


def check_heif(data: bytes) -> None:
    """Refuse a HEIC whose coded pictures do not hold together (`service.io.heif_items`), before decoding."""
    try:
        check_heif_items(data)
    except DamagedHeif as error:
        raise UploadRejected(f"the HEIC is damaged ({error}); take or send the photo again") from error


# A HEIC's thumbnail is coded apart from its picture, so it is a second witness of it. Damage inside one
# slice's coded data leaves the NAL units whole (check_heif cannot see it) and libheif decodes noise there
# without an error; that part of the picture then no longer looks like the thumbnail. Both are compared as
# means over cells of THUMBNAIL_CELL thumbnail pixels, coarse enough that the thumbnail's own resampling
# filter and compression do not count (README "Bad input" has the measured margins).
THUMBNAIL_CELL = 16
# Above every sound HEIC measured (README "Bad input"): the thumbnail's own coding error is what sound ones
# show, largest (33) in a 128 px thumbnail coded at x265's fastest preset; damage mostly shows far more.
THUMBNAIL_DISAGREEMENT = 48


def check_heif_thumbnail(picture: Picture, data: bytes) -> None:
    """Refuse a HEIC whose fully decoded `picture` (upright RGB) disagrees with its own smallest thumbnail
    somewhere; a HEIC without a thumbnail that is a scaled copy of it is not checked."""
    disagreement = thumbnail_disagreement(picture, data)
    if disagreement is not None and disagreement > THUMBNAIL_DISAGREEMENT:
        raise UploadRejected(
            "the HEIC is damaged (part of the picture does not match the photo's own thumbnail); "
            "take or send the photo again"
        )


def thumbnail_disagreement(picture: Picture, data: bytes) -> int | None:
    """The largest difference between `picture` and its smallest thumbnail, as means over cells in any
    channel, or None when there is no thumbnail to compare with."""
    thumbnail = _smallest_thumbnail(data)
    if thumbnail is None:
        return None
    cells = (thumbnail.width // THUMBNAIL_CELL, thumbnail.height // THUMBNAIL_CELL)
    if min(cells) < 2:
        return None
    factor = max(1, min(picture.width // thumbnail.width, picture.height // thumbnail.height))
    # A box filter, as the cells are.
    reduced = picture.reduce(factor) if factor >= 2 or isinstance(picture, RowBuffer) else picture
    picture_means, thumbnail_means = (
        np.asarray(image.resize(cells, Image.Resampling.BOX), np.int16) for image in (reduced, thumbnail)
    )
    return int(np.abs(picture_means - thumbnail_means).max())


def _smallest_thumbnail(data: bytes) -> Image.Image | None:
    """A HEIC's smallest thumbnail that is a scaled copy of it, upright RGB as its picture; None if none."""
    with _open(data) as image:
        header_size = image.size
        image.draft("RGB", (1, 1))
        if image.size == header_size or not _same_shape(image.size, header_size):
            return None
        thumbnail, _, _ = _decode_opened(image, data, draft_side=None, compare_thumbnail=False)
        # draft() picked a thumbnail, whose size is not the picture's, so Pillow decoded it (_heif_rows).
        assert isinstance(thumbnail, Image.Image)
        # Closing the file frees the pixels of an image that came back as itself: keep a copy (a thumbnail).
        return thumbnail.copy() if thumbnail is image else thumbnail


def jpeg_frame_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the frame header of a JPEG (or JPEG-LS), read before decoding; None if none."""
    for marker, payload in _jpeg_segments(data):
        if marker in _FRAME_MARKERS and len(payload) >= 5:
            return int.from_bytes(payload[3:5], "big"), int.from_bytes(payload[1:3], "big")
    return None


def _jpeg_segments(data: bytes) -> Iterator[tuple[int, bytes]]:
    """(marker, the first bytes of its payload) for each marker segment of a JPEG's first image, up to its
    end of image; the entropy-coded data after each scan header is skipped. A layout that ends early ends
    the walk: the decoder then judges the file."""
    position, segments, padding, end = 2, 0, 0, len(data)
    while position + 4 <= end:
        at = data.find(b"\xff", position)
        if at < 0:
            return
        marker_at = _FILL.match(data, at).end()  # type: ignore[union-attr]  # data[at] is 0xFF
        padding += marker_at - 1 - position  # all but the marker's own 0xFF
        if padding > MAX_JPEG_PADDING:
            raise UploadRejected(
                f"the JPEG has more than {MAX_JPEG_PADDING} bytes of padding between its segments; "
                "save the photo again as a standard JPEG"
            )
        position = marker_at
        if position >= end:
            return
        marker, position = data[position], position + 1
        segments += 1  # junk counts too: each costs this loop a turn
        if segments > MAX_JPEG_SEGMENTS:
            raise UploadRejected(
                f"the JPEG has more than {MAX_JPEG_SEGMENTS} marker segments (a camera writes a few dozen); "
                "save the photo again as a standard JPEG"
            )
        if marker == 0x00:  # 0xFF 0x00 between segments: junk
            continue
        if marker == 0xD9:  # end of image: an MPO's other frames follow, but Pillow decodes the first
            return
        if marker in _STANDALONE_MARKERS:
            yield marker, b""
            continue
        length = int.from_bytes(data[position : position + 2], "big")
        yield marker, data[position + 2 : position + min(length, 16)]
        position += max(length, 2)
        if marker == 0xDA:
            scan_data = _NEXT_MARKER.search(data, position)
            if scan_data is None:
                return
            position = scan_data.start()


def _formats() -> list[str]:
    """Pillow plugins allowed to parse untrusted bytes: the accepted formats, plus a few common ones
    recognised only to be refused by name (415) rather than as undecodable."""
    wanted = (*SUPPORTED_FORMATS, "GIF", "BMP", "TIFF", "ICO", "JPEG2000", "AVIF")
    Image.init()
    return [name for name in wanted if name in Image.OPEN]


def _open(data: bytes, max_pixels: int | None = None) -> Image.Image:
    if not data:
        raise UploadRejected("the upload is empty; attach the photo")
    try:
        return Image.open(io.BytesIO(data), formats=_formats())
    except Image.DecompressionBombError as error:
        # Pillow refuses a header above twice its own MAX_IMAGE_PIXELS before the service can check its own,
        # lower, limit: the answer gives the service's limit, not Pillow's wording.
        limit = max_pixels if max_pixels is not None else 2 * (Image.MAX_IMAGE_PIXELS or 0)
        raise TooManyPixels(
            f"the image has more than the {limit} pixels allowed; send the photo at a lower resolution"
        ) from error
    except Exception as error:  # any parser failure on untrusted bytes is the client's problem, not a 500
        raise UploadRejected(
            "the upload is not a readable image; send a JPEG, PNG, WebP or HEIC photo"
        ) from error


def _decode(data: bytes, draft_side: int | None) -> tuple[Picture, int, bool]:
    image = _open(data)
    try:
        decoded = _decode_opened(image, data, draft_side)
    except BaseException:
        image.close()
        raise
    if decoded[0] is not image:
        image.close()
    return decoded


def _decode_opened(
    image: Image.Image, data: bytes, draft_side: int | None, *, compare_thumbnail: bool = True
) -> tuple[Picture, int, bool]:
    """Upright RGB pixels, the EXIF orientation applied, and whether a reduced decode (JPEG DCT scaling,
    a HEIC thumbnail) gave them; a HEIC decoded in full is checked against its thumbnail unless told not
    to, and comes back in libheif's buffer when that is upright 8-bit RGB already (`RowBuffer`). An
    upright RGB image comes back as itself, loaded, not copied: the caller must not close it (closing
    frees its pixels), and need not (it reads from bytes in memory)."""
    try:
        header_size = image.size
        if draft_side is not None and image.format in _REDUCIBLE:
            image.draft("RGB", (draft_side, draft_side))
        drafted = image.size != header_size
        if drafted and not _same_shape(image.size, header_size):
            # Boxes are mapped back by one scale factor, so a thumbnail of another shape would misplace
            # them (pillow-heif should never pick one): decode in full instead.
            return _decode(data, draft_side=None)
        orientation = exif_orientation(image)
        rows = _heif_rows(image, orientation) if image.format == "HEIF" and not drafted else None
        rgb: Picture = rows if rows is not None else to_rgb(image, orientation)
        if isinstance(rgb, Image.Image):
            rgb.load()  # decode here, inside the error handling: a truncated file fails now, as a 422
        if compare_thumbnail and image.format == "HEIF" and not drafted:
            check_heif_thumbnail(rgb, data)
        return rgb, orientation, drafted
    except (MemoryError, UploadRejected):
        raise
    except Exception as error:  # truncated data, corrupt chunks, codec errors: all the client's file
        raise UploadRejected(
            f"the image could not be decoded ({type(error).__name__}); it may be truncated or corrupt: "
            "take or send the photo again"
        ) from error


def _heif_rows(image: Image.Image, orientation: int) -> RowBuffer | None:
    """The HEIC's picture decoded in full into libheif's buffer, when that buffer already is what to_rgb
    would make (8-bit RGB, upright: libheif applies the container's rotation and mirroring itself); None
    to let Pillow decode it (alpha, an EXIF orientation, or a plugin that keeps no HeifFile)."""
    heif_file = getattr(image, "_heif_file", None)  # pillow-heif's plugin keeps it until load()
    if heif_file is None or orientation != 1:
        return None
    picture = heif_file[image.tell()]
    if picture.mode != "RGB" or picture.size != image.size:  # a thumbnail picked by draft(): Pillow's way
        return None
    rows = picture.data  # decodes here, inside the caller's error handling
    return RowBuffer(memoryview(rows), picture.size, picture.stride)


def _same_shape(reduced: tuple[int, int], full: tuple[int, int]) -> bool:
    """Whether `reduced` is `full` scaled down, within two pixels of rounding (pillow-heif's allowance)."""
    (w, h), (full_w, full_h) = reduced, full
    return abs(w * full_h - h * full_w) <= 2 * max(full_w, full_h)
