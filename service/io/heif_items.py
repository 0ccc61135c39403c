"""A HEIC's coded pictures checked for damage before decoding, from the container's own bookkeeping.

libheif (inside pillow-heif) conceals damage in a grid's tiles, and a phone's HEIC is a grid (a 12 MP
iPhone photo has 48 tiles of 512 px): with 10 % of such a file's media data overwritten by random bytes,
30 of 30 decoded without an error, partly into noise, which the gate would then judge (`python -m
bench.heic_damage`; a single picture libheif refuses where the damage reaches its NAL lengths, as this
check would, and decodes otherwise). pillow-heif 1.8.1 exposes neither libheif's strict decoding nor its
decoding warnings, so the service reads what the container says about each coded picture (ISO/IEC
14496-12 item location, ISO/IEC 23008-12 item info and properties) and checks that the bytes hold
together: each HEVC item (a grid tile, a whole picture, a thumbnail) must lie inside the file and be a run
of length-prefixed NAL units that fills it exactly, each with a valid NAL header and a nonzero last byte
(H.265 7.4.2: "the last byte of the NAL unit shall not be equal to 0x00"), and at least one coded slice.

Damage inside a slice's entropy-coded data that leaves the NAL lengths intact is not seen here: only
decoding shows it, and a HEIC decoded in full is then compared with its own thumbnail
(`service.io.decoding.check_heif_thumbnail`). So this catches damage that reaches the length fields, which
is likelier the more bytes are damaged and the more tiles a photo has.

The walk only refuses on positive evidence. A container it does not understand (no `meta`, an item
location it cannot resolve, an item stored in another item) is left to libheif, which knows more variants
than this reader needs to: the check must never turn a valid photo away.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

_HEVC_ITEM = b"hvc1"


class DamagedHeif(ValueError):
    """A coded picture whose bytes do not hold together; the message says which and how."""


class _Unreadable(Exception):
    """The container is of a kind this reader does not follow: leave the judgement to libheif."""


@dataclass(frozen=True)
class Box:
    kind: bytes
    start: int  # first byte of the payload
    end: int  # one past the last byte


def boxes(data: memoryview, start: int, end: int) -> Iterator[Box]:
    """The ISO BMFF boxes from `start` to `end`, in order."""
    position = start
    while position + 8 <= end:
        size, header = int.from_bytes(data[position : position + 4], "big"), 8
        kind = bytes(data[position + 4 : position + 8])
        if size == 1:
            if position + 16 > end:
                raise _Unreadable
            size, header = int.from_bytes(data[position + 8 : position + 16], "big"), 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            raise _Unreadable  # a cut-off container: libheif refuses it with its own error
        yield Box(kind, position + header, position + size)
        position += size


def _child(data: memoryview, parent: Box, kind: bytes) -> Box:
    for box in boxes(data, parent.start, parent.end):
        if box.kind == kind:
            return box
    raise _Unreadable


class _Reader:
    """Big-endian fields of one box, read in order; running off its end means the box is not understood."""

    def __init__(self, data: memoryview, box: Box) -> None:
        self.data, self.position, self.end = data, box.start, box.end

    def uint(self, size: int) -> int:
        if size == 0:
            return 0
        if self.position + size > self.end:
            raise _Unreadable
        value = int.from_bytes(self.data[self.position : self.position + size], "big")
        self.position += size
        return value

    def version_and_flags(self) -> tuple[int, int]:
        version = self.uint(1)
        return version, self.uint(3)


def _hevc_items(data: memoryview, iinf: Box) -> set[int]:
    reader = _Reader(data, iinf)
    version, _ = reader.version_and_flags()
    reader.uint(2 if version == 0 else 4)  # entry count: the boxes say it again
    items = set()
    for infe in boxes(data, reader.position, iinf.end):
        if infe.kind != b"infe":
            continue
        entry = _Reader(data, infe)
        entry_version, _ = entry.version_and_flags()
        if entry_version < 2:
            continue  # no item type before version 2 (and phones write 2)
        item_id = entry.uint(2 if entry_version == 2 else 4)
        entry.uint(2)  # protection index
        if bytes(data[entry.position : entry.position + 4]) == _HEVC_ITEM:
            items.add(item_id)
    return items


def _item_locations(data: memoryview, iloc: Box) -> dict[int, list[tuple[int, int]] | None]:
    """Item -> its extents as (file offset, length), or None where stored otherwise than in the file."""
    reader = _Reader(data, iloc)
    version, _ = reader.version_and_flags()
    sizes = reader.uint(1)
    offset_size, length_size = sizes >> 4, sizes & 15
    sizes = reader.uint(1)
    base_offset_size, index_size = sizes >> 4, (sizes & 15) if version in (1, 2) else 0
    if {offset_size, length_size, base_offset_size, index_size} - {0, 4, 8}:
        raise _Unreadable
    locations: dict[int, list[tuple[int, int]] | None] = {}
    for _ in range(reader.uint(2 if version < 2 else 4)):
        item_id = reader.uint(2 if version < 2 else 4)
        method = reader.uint(2) & 15 if version in (1, 2) else 0
        reader.uint(2)  # data reference index: 0, this file
        base = reader.uint(base_offset_size)
        extents = []
        for _ in range(reader.uint(2)):
            reader.uint(index_size)
            extents.append((base + reader.uint(offset_size), reader.uint(length_size)))
        locations[item_id] = extents if method == 0 else None  # 1: in idat, 2: in another item
    return locations


def _decoder_configs(data: memoryview, iprp: Box) -> dict[int, Box]:
    """Item -> its hvcC property box."""
    ipco = _child(data, iprp, b"ipco")
    properties = list(boxes(data, ipco.start, ipco.end))
    ipma = _child(data, iprp, b"ipma")
    reader = _Reader(data, ipma)
    version, flags = reader.version_and_flags()
    configs = {}
    for _ in range(reader.uint(4)):
        item_id = reader.uint(2 if version < 1 else 4)
        for _ in range(reader.uint(1)):
            index = reader.uint(2) & 0x7FFF if flags & 1 else reader.uint(1) & 0x7F
            if 0 < index <= len(properties) and properties[index - 1].kind == b"hvcC":
                configs[item_id] = properties[index - 1]
    return configs


def _nal_length_size(data: memoryview, hvcc: Box) -> int:
    if hvcc.end - hvcc.start < 23:
        raise DamagedHeif("an HEVC picture's decoder configuration is cut short")
    return (data[hvcc.start + 21] & 3) + 1


def _check_nal_units(item: bytes | memoryview, length_size: int) -> None:
    position, slices = 0, 0
    while position < len(item):
        if position + length_size > len(item):
            raise DamagedHeif("a NAL unit's length runs past the end of its picture")
        length = int.from_bytes(item[position : position + length_size], "big")
        position += length_size
        if length < 2 or position + length > len(item):
            raise DamagedHeif("a NAL unit's length does not fit its picture")
        first, second = item[position], item[position + 1]
        if first & 0x80 or not second & 7:  # forbidden_zero_bit set, nuh_temporal_id_plus1 zero
            raise DamagedHeif("a NAL unit's header is not one HEVC allows")
        if item[position + length - 1] == 0:
            raise DamagedHeif("a NAL unit ends in a zero byte, which HEVC never writes")
        slices += (first >> 1) & 63 < 32  # VCL NAL unit types: coded slice segments
        position += length
    if not slices:
        raise DamagedHeif("an HEVC picture holds no coded slice")


def check_heif_items(data: bytes) -> int:
    """Raise DamagedHeif when a coded HEVC picture of this HEIF file is damaged (see the module doc);
    else the number of pictures checked (0: a container this reader does not follow)."""
    view = memoryview(data)
    try:
        meta = next(box for box in boxes(view, 0, len(data)) if box.kind == b"meta")
        meta = Box(meta.kind, meta.start + 4, meta.end)  # a full box: version and flags first
        hevc = _hevc_items(view, _child(view, meta, b"iinf"))
        locations = _item_locations(view, _child(view, meta, b"iloc"))
        configs = _decoder_configs(view, _child(view, meta, b"iprp"))
    except (_Unreadable, StopIteration):
        return 0
    checked = 0
    for item_id in sorted(hevc):
        extents = locations.get(item_id)
        if extents is None:
            continue  # not in the file's bytes, or no location at all: libheif judges
        if any(offset + length > len(data) for offset, length in extents):
            raise DamagedHeif("an HEVC picture lies past the end of the file: it may be truncated")
        if item_id not in configs:
            raise DamagedHeif("an HEVC picture has no decoder configuration")
        if any(length == 0 for _, length in extents):
            continue  # length 0: to the end of the file; rare, and not worth a second reading
        item = (
            view[extents[0][0] : sum(extents[0])]
            if len(extents) == 1
            else b"".join(view[offset : offset + length] for offset, length in extents)
        )
        _check_nal_units(item, _nal_length_size(view, configs[item_id]))
        checked += 1
    return checked
