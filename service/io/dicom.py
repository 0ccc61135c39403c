"""DICOM photos: VL Photographic Image and Secondary Capture files, as colposcopes and archives store them.

The header is read and checked (class, modality, frames, the image pixel module, transfer syntax, pixel
count) before a single pixel is decoded, so a 200000x200000 header costs a parse of a few hundred bytes,
never the 120 GB its pixels would need. Baseline JPEG pixel data, what most colposcopes write, is the JPEG
file itself inside the DICOM: it goes through `decode_upload`, with the DCT-scaled decode the JPEG path
has, so a photo gets the same pixels (and decision) whichever of the two wrappers it came in. Other
encodings are decoded by pydicom's handlers (native, RLE; JPEG-LS by pyjpegls; JPEG 2000 by Pillow).

Patient identifiers are read only by `read_context`, which the FHIR output alone calls; nothing here
logs a header value, and an error message names only registered UIDs (class, transfer syntax) and DICOM's
defined terms (modality, photometric interpretation), never what a field holds otherwise.
"""

from __future__ import annotations

import io
import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import pydicom
from PIL import Image
from pydicom import config as dicom_config
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.errors import InvalidDicomError
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.pixels import get_decoder
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from service.io.decoding import (
    DecodedImage,
    DecodeLimits,
    UploadRejected,
    check_jpeg_segments,
    check_size,
    decode_upload,
    jpeg_frame_size,
)

DICOM_MEDIA_TYPE = "application/dicom"
_MAGIC_OFFSET = 128  # a Part 10 file: a 128-byte preamble, then "DICM"
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"  # (7FE0,0010) as written in little-endian syntaxes

VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
ACCEPTED_CLASSES = {VL_PHOTOGRAPHIC: "VL Photographic Image", SECONDARY_CAPTURE: "Secondary Capture Image"}
# XC: external-camera photography (the VL Photographic modality); OT: what Secondary Capture writers put;
# ES: endoscopy, which some colposcopes report. Modality is optional in Secondary Capture.
PHOTO_MODALITIES = frozenset({"XC", "OT", "ES"})
COLOUR_INTERPRETATIONS = frozenset({"RGB", "YBR_FULL", "YBR_FULL_422"})
# JPEG 2000's own colour transforms: only with its syntaxes, whose decoder undoes them.
_JPEG_2000 = frozenset({"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91"})
_JPEG_2000_INTERPRETATIONS = frozenset({"YBR_RCT", "YBR_ICT"})
_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_JPEG_LS = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
# Header values named back to the client only when DICOM defines them: a field can carry anything.
_KNOWN_MODALITIES = frozenset({
    "AR", "AU", "BI", "BMD", "CR", "CT", "DG", "DOC", "DX", "ECG", "EPS", "GM", "HD", "IO", "IVOCT", "IVUS",
    "KO", "LS", "MG", "MR", "NM", "OAM", "OCT", "OP", "OPM", "OPT", "OPV", "OSS", "PR", "PT", "PX", "REG",
    "RF", "RTDOSE", "RTIMAGE", "RTPLAN", "RTSTRUCT", "SEG", "SM", "SR", "TG", "US", "VA", "XA",
})  # fmt: skip
_DEFINED_INTERPRETATIONS = frozenset({
    "MONOCHROME1", "MONOCHROME2", "PALETTE COLOR", "RGB", "HSV", "ARGB", "CMYK", "YBR_FULL", "YBR_FULL_422",
    "YBR_PARTIAL_422", "YBR_PARTIAL_420", "YBR_ICT", "YBR_RCT", "XYB",
})  # fmt: skip
# Transfer syntaxes offered to a decoder; any other is refused by name (415).
_CANDIDATE_SYNTAXES = (
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    _JPEG_BASELINE,
    _JPEG_EXTENDED,  # 8-bit data only, checked below
    *sorted(_JPEG_LS),  # lossless, near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
)

# Header values never reach a log line: pydicom's debug log and its value-validation warnings quote them,
# and its pixel decoders log a traceback at ERROR for a corrupt frame (which the client gets as a 422).
logging.getLogger("pydicom").setLevel(logging.CRITICAL)
dicom_config.settings.reading_validation_mode = dicom_config.IGNORE
warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


class NotDicom(UploadRejected):
    code = "not_dicom"


class TruncatedDicom(UploadRejected):
    code = "truncated_dicom"


class InvalidDicom(UploadRejected):
    code = "invalid_dicom"


class UnsupportedDicomClass(UploadRejected):
    code = "unsupported_dicom_class"


class WrongModality(UploadRejected):
    code = "wrong_modality"


class MultiFrameDicom(UploadRejected):
    code = "multi_frame_dicom"


class MissingPixelData(UploadRejected):
    code = "missing_pixel_data"


class IncompletePixelModule(UploadRejected):
    code = "incomplete_pixel_module"


class UnsupportedPixelFormat(UploadRejected):
    code = "unsupported_pixel_format"


class UnsupportedTransferSyntax(UploadRejected):
    code = "unsupported_transfer_syntax"
    status = 415


def is_dicom(data: bytes) -> bool:
    """A DICOM Part 10 file (what application/dicom means): "DICM" after the 128-byte preamble."""
    return data[_MAGIC_OFFSET : _MAGIC_OFFSET + 4] == b"DICM"


def decode_dicom(data: bytes, limits: DecodeLimits) -> DecodedImage:
    """Check a DICOM photo's header, then decode its one frame to upright RGB (as `decode_upload` does)."""
    dataset = _read(data)
    with _malformed_is_invalid():
        syntax = _check(dataset, data, limits)
    if syntax in _JPEG_LS or syntax in (_JPEG_BASELINE, _JPEG_EXTENDED):
        frame = _only_frame(dataset)
        # Baseline frames get the scan limit in decode_upload, as any JPEG does; extended frames go to
        # pydicom's decoder, so they get it here. JPEG-LS stuffs its scan data differently, and has no
        # progressive scans to repeat.
        _check_jpeg_frame(frame, dataset, check_scans=syntax == _JPEG_EXTENDED)
        if syntax == _JPEG_BASELINE:
            image = decode_upload(frame, limits)
            image.media_type = DICOM_MEDIA_TYPE
            return image
    if syntax in _JPEG_2000:
        _check_codestream_size(_only_frame(dataset), dataset)
    rgb = _decode_pixels(dataset)
    # Native pixels come whole: box-reduce for the whole-photo stages, keep the full ones for the crop.
    full = Image.fromarray(rgb)
    factor = min(full.size) // limits.decode_min_side
    reduced = np.asarray(full.reduce(factor)) if factor >= 2 else rgb
    return DecodedImage(
        rgb=reduced, original_size=full.size, media_type=DICOM_MEDIA_TYPE, _data=data, _full=full
    )


@dataclass(frozen=True)
class DicomContext:
    """What the FHIR output takes from the header: who, which encounter, which study and image."""

    patient_id: str | None
    patient_id_issuer: str | None
    admission_id: str | None
    accession_number: str | None
    study_uid: str | None
    series_uid: str | None
    sop_instance_uid: str | None
    sop_class_uid: str | None
    modality: str | None
    acquired: str | None  # FHIR dateTime, from AcquisitionDateTime or ContentDate/ContentTime


def read_context(data: bytes) -> DicomContext:
    """The identifiers in a DICOM photo's header (pixel data not read). Only for the FHIR output."""
    dataset = _read(data, stop_before_pixels=True)

    def text(keyword: str) -> str | None:
        with _malformed_is_invalid():
            value = dataset.get(keyword)
            if value is None:
                return None
            # A value of several (PatientID is one-valued, but files break that) as DICOM writes it.
            joined = "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)
            return "".join(c for c in joined if c.isprintable()).strip() or None

    return DicomContext(
        patient_id=text("PatientID"),
        patient_id_issuer=text("IssuerOfPatientID"),
        admission_id=text("AdmissionID"),
        accession_number=text("AccessionNumber"),
        study_uid=text("StudyInstanceUID"),
        series_uid=text("SeriesInstanceUID"),
        sop_instance_uid=text("SOPInstanceUID"),
        sop_class_uid=text("SOPClassUID"),
        modality=text("Modality"),
        acquired=_fhir_datetime(
            text("AcquisitionDateTime") or (text("ContentDate") or "") + (text("ContentTime") or "")
        ),
    )


def require_dicom(data: bytes) -> None:
    """For bytes declared application/dicom: a photo sent under that type is a client mistake, refused
    rather than guessed at."""
    if not is_dicom(data):
        raise NotDicom(
            "the body is not a DICOM file (no 'DICM' after the 128-byte preamble); send a DICOM Part 10 "
            f"file as {DICOM_MEDIA_TYPE}, or the photo itself as image/*"
        )


def _read(data: bytes, *, stop_before_pixels: bool = False) -> Dataset:
    require_dicom(data)
    # A deflated data set is refused before pydicom reads it: pydicom inflates it whole, so 2 MB of upload
    # became 4 GB of memory before any check. Photo devices do not write it.
    if _declares_deflate(data):
        raise UnsupportedTransferSyntax(
            f"deflated DICOM data sets are not accepted; export with one of: {_decodable_syntaxes()}"
        )
    try:
        return pydicom.dcmread(io.BytesIO(data), stop_before_pixels=stop_before_pixels)
    except (EOFError, InvalidDicomError) as error:
        raise TruncatedDicom(_truncated_detail()) from error
    except Exception as error:  # any parser failure on untrusted bytes is the client's file, not a 500
        raise _invalid(error) from error


def _declares_deflate(data: bytes) -> bool:
    """Whether pydicom would inflate the data set: its file meta read by pydicom's own reader, the one
    `dcmread` starts with (a hand-written walk disagreed with it on a padded UID, a duplicated element or a
    long element first: each let a deflate bomb through). The reader is pydicom's private function; a
    pydicom that lacks it fails the tests."""
    fp = io.BytesIO(data)
    try:
        read_preamble(fp, False)
        meta = _read_file_meta_info(fp)
    except Exception:  # dcmread fails on the same file meta before it inflates anything: that judges it
        return False
    return bool(meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian)


def _uid_name(uid: str) -> str:
    """A UID's registered name; never the value itself when it has none (a header field can carry anything,
    a patient's name included, and error details reach the client and the logs)."""
    if not uid:
        return "(none)"
    name = UID(uid).name
    return name if name != uid else "(an unregistered UID)"


def _decodable_syntaxes() -> str:
    return ", ".join(UID(uid).name for uid in _CANDIDATE_SYNTAXES if get_decoder(uid).is_available)


@contextmanager
def _malformed_is_invalid() -> Iterator[None]:
    """pydicom parses values when they are first read: a malformed one (an unknown VR, a number that is
    not one) fails there, and is the client's file, not a 500."""
    try:
        yield
    except (MemoryError, UploadRejected):
        raise
    except Exception as error:
        raise _invalid(error) from error


def _invalid(error: Exception) -> InvalidDicom:
    # The type only: pydicom's messages can quote header values (a patient's name).
    return InvalidDicom(f"the DICOM file is malformed ({type(error).__name__}); export the image again")


def _truncated_detail() -> str:
    return "the DICOM file ends before its data does (truncated in transfer?); send the whole file"


def _check(dataset: Dataset, data: bytes, limits: DecodeLimits) -> str:
    """The transfer syntax of a single-frame colour photo the service will decode; else UploadRejected.
    Only the header is read: nothing here touches the pixel data."""
    # pydicom reads a truncated file without an error: what is cut off is simply absent (an encapsulated
    # pixel data element cut short takes the whole data set with it). Pixel data whose tag is in the bytes
    # but not in the data set, or no data set at all after the file meta, is a file cut short.
    if "PixelData" not in dataset and (_PIXEL_DATA_TAG in data or not len(dataset)):
        raise TruncatedDicom(_truncated_detail())
    modality = str(dataset.get("Modality", "") or "").strip().upper()
    sop_class = str(dataset.get("SOPClassUID", "") or "")
    if modality and modality not in PHOTO_MODALITIES:
        shown = modality if modality in _KNOWN_MODALITIES else "not a defined term"
        raise WrongModality(
            f"the DICOM modality ({shown}) is not a photograph; send a VL Photographic Image (XC) "
            "or Secondary Capture of the cervix"
        )
    if sop_class not in ACCEPTED_CLASSES:
        raise UnsupportedDicomClass(
            f"DICOM objects of class {_uid_name(sop_class)} are not accepted; send a "
            f"{' or '.join(ACCEPTED_CLASSES.values())}"
        )
    frames = _integer(dataset, "NumberOfFrames", default=1)
    if frames != 1:
        held = f"holds {frames} frames" if frames > 1 else f"gives NumberOfFrames as {frames}"
        raise MultiFrameDicom(f"the DICOM file {held}; send one photo per file (one frame each)")
    if "PixelData" not in dataset:
        raise MissingPixelData(
            "the DICOM file has no pixel data; send the image itself, not only its header (or, if the file "
            "was cut short, all of it)"
        )
    missing = [
        keyword
        for keyword in ("Rows", "Columns", "SamplesPerPixel", "PhotometricInterpretation", "BitsAllocated")
        if dataset.get(keyword) in (None, "")
    ]
    if missing:
        raise IncompletePixelModule(
            f"the DICOM image pixel module lacks {', '.join(missing)}; export the photo again with a "
            "complete header"
        )
    width, height = _integer(dataset, "Columns"), _integer(dataset, "Rows")
    check_size(width, height, limits)
    interpretation = str(dataset.PhotometricInterpretation).strip().upper()
    samples, bits = _integer(dataset, "SamplesPerPixel"), _integer(dataset, "BitsAllocated")
    accepted = COLOUR_INTERPRETATIONS
    if str(dataset.file_meta.get("TransferSyntaxUID", "")) in _JPEG_2000:
        accepted = accepted | _JPEG_2000_INTERPRETATIONS
    if interpretation not in accepted or samples != 3 or bits != 8:
        shown = (
            interpretation if interpretation in _DEFINED_INTERPRETATIONS else "an undefined interpretation"
        )
        raise UnsupportedPixelFormat(
            f"the DICOM pixels are {shown}, {samples} samples of {bits} bits; send 8-bit "
            f"colour ({', '.join(sorted(COLOUR_INTERPRETATIONS))}, 3 samples per pixel)"
        )
    return _check_syntax(dataset, width * height * 3)


def _check_syntax(dataset: Dataset, native_size: int) -> str:
    syntax = UID(str(dataset.file_meta.get("TransferSyntaxUID", "") or ""))
    if syntax not in _CANDIDATE_SYNTAXES or not get_decoder(syntax).is_available:
        decodable = _decodable_syntaxes()
        raise UnsupportedTransferSyntax(
            f"DICOM pixel data in {_uid_name(syntax)} cannot be decoded here; export with one of: {decodable}"
        )
    if not syntax.is_encapsulated:
        if dataset.PhotometricInterpretation.strip().upper() == "YBR_FULL_422":
            native_size = native_size * 2 // 3  # two luma samples share one pair of chroma samples
        if len(dataset.PixelData) < native_size:
            raise TruncatedDicom(_truncated_detail())
    return str(syntax)


def _only_frame(dataset: Dataset) -> bytes:
    try:
        return next(generate_frames(dataset.PixelData, number_of_frames=1))
    except Exception as error:  # a broken item structure: the encapsulation, not the JPEG, is damaged
        raise TruncatedDicom(_truncated_detail()) from error


def _check_codestream_size(frame: bytes, dataset: Dataset) -> None:
    """A JPEG 2000 codestream's own size (its SIZ header) must be the header's Rows x Columns, checked
    before decoding: the pixel count was checked on the header's figures, and a larger codestream cost
    seconds to decode before the mismatch showed."""
    try:
        with Image.open(io.BytesIO(frame), formats=["JPEG2000"]) as codestream:
            size = codestream.size
    except Exception as error:  # not a codestream Pillow can read, or one past Pillow's own pixel limit
        raise UploadRejected(
            "the DICOM JPEG 2000 pixel data is not a readable codestream; export the photo again"
        ) from error
    declared = (_integer(dataset, "Columns"), _integer(dataset, "Rows"))
    if size != declared:
        raise UploadRejected(
            f"the JPEG 2000 pixel data is {size[0]}x{size[1]} pixels but the DICOM header says "
            f"{declared[0]}x{declared[1]}; export the photo again"
        )


def _check_jpeg_frame(frame: bytes, dataset: Dataset, *, check_scans: bool) -> None:
    """A JPEG (or JPEG-LS) frame must be one, of the header's Rows x Columns, checked before decoding: the
    pixel count was checked on the header's figures, and a 2.5 KB JPEG-LS frame of 12000x12000 inside a
    320x240 header decoded to 1.2 GB. With `check_scans`, also the JPEG path's scan limit."""
    size = jpeg_frame_size(frame) if frame[:2] == b"\xff\xd8" else None
    if size is None:
        raise UploadRejected(
            "the DICOM pixel data is not the JPEG its transfer syntax says; export the photo again"
        )
    declared = (_integer(dataset, "Columns"), _integer(dataset, "Rows"))
    if size != declared:
        raise UploadRejected(
            f"the JPEG pixel data is {size[0]}x{size[1]} pixels but the DICOM header says "
            f"{declared[0]}x{declared[1]}; export the photo again"
        )
    if check_scans:
        check_jpeg_segments(frame)


def _decode_pixels(dataset: Dataset) -> np.ndarray:
    try:
        rgb = dataset.pixel_array  # YBR is converted to RGB (pydicom's default)
    except MemoryError:
        raise
    except Exception as error:  # codec errors on the client's bytes
        raise UploadRejected(
            f"the DICOM pixel data could not be decoded ({type(error).__name__}); it may be corrupt: "
            "export the photo again"
        ) from error
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise UnsupportedPixelFormat("the DICOM pixel data did not decode to one 8-bit colour image")
    return np.ascontiguousarray(rgb)


def _integer(dataset: Dataset, keyword: str, default: int = 0) -> int:
    value = dataset.get(keyword, default)
    try:
        return int(value if value not in (None, "") else default)
    except (TypeError, ValueError) as error:
        raise IncompletePixelModule(f"the DICOM attribute {keyword} is not a number") from error


def _fhir_datetime(value: str) -> str | None:
    """A DICOM DT (YYYYMMDDHHMMSS.FFFFFF&ZZXX, tail optional) as a FHIR dateTime; None if unusable. DICOM
    times are local unless they carry an offset, and FHIR wants a zone with any time: without one, the
    date alone is given."""
    zone = ""
    for sign in "+-":
        if sign in value:
            value, offset = value.split(sign, 1)
            if len(offset) == 4 and offset.isdigit():
                zone = f"{sign}{offset[:2]}:{offset[2:]}"
    digits = value.split(".")[0]
    if len(digits) < 8 or not digits.isdigit():
        return None
    date = f"{digits[:4]}-{digits[4:6]}-{digits[6:8]}"
    if len(digits) < 14 or not zone:
        return date
    return f"{date}T{digits[8:10]}:{digits[10:12]}:{digits[12:14]}{zone}"
