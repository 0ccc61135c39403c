"""DICOM files built by the tests from photos (pydicom writes them; none is stored): what colposcopes and
archives send, and the odd ones a clinic integration meets."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.pixels import convert_color_space
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from service.io.dicom import SECONDARY_CAPTURE, VL_PHOTOGRAPHIC

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PATIENT_NAME = "DOE^JANE^PATIENT-NAME-MARKER"
PATIENT_ID = "PID-MARKER-0042"
DICOM = "application/dicom"


def _dataset(
    rows: int, columns: int, *, syntax: str, sop_class: str = VL_PHOTOGRAPHIC, modality: str | None = "XC"
) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(sop_class)
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = UID(syntax)
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    if modality is not None:
        ds.Modality = modality
    ds.PatientName, ds.PatientID, ds.IssuerOfPatientID = PATIENT_NAME, PATIENT_ID, "CLINIC-MARKER"
    ds.AccessionNumber, ds.AdmissionID = "ACC-MARKER-7", "ADM-MARKER-9"
    ds.AcquisitionDateTime = "20260315101500+0100"
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.PhotometricInterpretation = "RGB"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    return ds


def _save(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def native(rgb: np.ndarray, **options: Any) -> bytes:
    """Uncompressed RGB (explicit VR little endian): what a Secondary Capture writer typically makes."""
    ds = _dataset(*rgb.shape[:2], syntax=ExplicitVRLittleEndian, **options)
    ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
    return _save(ds)


def monochrome(grey: np.ndarray) -> bytes:
    """A grey-level photo (MONOCHROME2, one sample per pixel): no colour to judge acetowhitening by."""
    ds = _dataset(*grey.shape[:2], syntax=ExplicitVRLittleEndian)
    ds.PhotometricInterpretation, ds.SamplesPerPixel = "MONOCHROME2", 1
    del ds.PlanarConfiguration
    ds.PixelData = np.ascontiguousarray(grey, np.uint8).tobytes()
    return _save(ds)


def ybr_full_422(rgb: np.ndarray) -> bytes:
    """Uncompressed YBR_FULL_422: each pair of pixels stored as Y1 Y2 Cb Cr (chroma averaged)."""
    rgb = rgb[:, : rgb.shape[1] // 2 * 2]
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.float32)
    y = ybr[..., 0].reshape(ybr.shape[0], -1, 2)
    chroma = ybr[..., 1:].reshape(ybr.shape[0], -1, 2, 2).mean(axis=2)
    packed = np.concatenate([y, chroma], axis=2).round().clip(0, 255).astype(np.uint8)
    ds = _dataset(*rgb.shape[:2], syntax=ExplicitVRLittleEndian)
    ds.PhotometricInterpretation = "YBR_FULL_422"
    ds.PixelData = packed.tobytes()
    return _save(ds)


def jpeg(jpeg_bytes: bytes, size: tuple[int, int], interpretation: str = "YBR_FULL_422") -> bytes:
    """A JPEG file as JPEG baseline pixel data: how most colposcopes wrap their photos. `size`: (w, h)."""
    ds = _dataset(size[1], size[0], syntax=JPEGBaseline8Bit)
    ds.PhotometricInterpretation = interpretation
    ds.PixelData = encapsulate([jpeg_bytes])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def compressed(rgb: np.ndarray, syntax: str) -> bytes:
    """RGB compressed by pydicom's own encoders (RLE lossless; JPEG-LS lossless via pyjpegls)."""
    ds = _dataset(*rgb.shape[:2], syntax=ExplicitVRLittleEndian)
    ds.PixelData = np.ascontiguousarray(rgb, np.uint8).tobytes()
    ds.compress(syntax, encoding_plugin="pydicom" if syntax == RLELossless else "pyjpegls")
    return _save(ds)


def jpeg_2000(rgb: np.ndarray, interpretation: str = "YBR_RCT") -> bytes:
    """Lossless JPEG 2000 written by Pillow (OpenJPEG), with its reversible colour transform (YBR_RCT) or
    without (RGB)."""
    buffer = io.BytesIO()
    mct = 1 if interpretation == "YBR_RCT" else 0
    Image.fromarray(rgb).save(buffer, "JPEG2000", irreversible=False, no_jp2=True, mct=mct)
    ds = _dataset(*rgb.shape[:2], syntax=JPEG_2000_LOSSLESS)
    ds.PhotometricInterpretation = interpretation
    ds.PixelData = encapsulate([buffer.getvalue()])
    ds["PixelData"].VR = "OB"
    return _save(ds)


def without(rgb: np.ndarray, keyword: str) -> bytes:
    ds = _dataset(*rgb.shape[:2], syntax=ExplicitVRLittleEndian)
    ds.PixelData = rgb.tobytes()
    delattr(ds, keyword)
    return _save(ds)


def frames(rgb: np.ndarray, count: int) -> bytes:
    ds = _dataset(*rgb.shape[:2], syntax=ExplicitVRLittleEndian)
    ds.NumberOfFrames = count
    ds.PixelData = np.ascontiguousarray(np.stack([rgb] * count), np.uint8).tobytes()
    return _save(ds)


def header_claiming(rows: int, columns: int) -> bytes:
    """A header that claims rows x columns RGB pixels and carries 300 bytes of them. Rows and Columns are
    US (at most 65535): larger claims are written as UL, as a crafted file would, and read as such."""
    ds = _dataset(min(rows, 65535), min(columns, 65535), syntax=ExplicitVRLittleEndian)
    for tag, value in ((0x00280010, rows), (0x00280011, columns)):
        if value > 65535:
            ds.add_new(tag, "UL", value)
    ds.PixelData = bytes(300)
    return _save(ds)


def with_syntax(rgb: np.ndarray, syntax: str) -> bytes:
    """Pixel data labelled with a transfer syntax the service has no decoder for (bytes are not real)."""
    ds = _dataset(*rgb.shape[:2], syntax=syntax)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xf7" + bytes(200)])
    ds["PixelData"].VR = "OB"
    return _save(ds)


JPEG_LS_LOSSLESS, RLE_LOSSLESS, JPEG_2000_LOSSLESS = (
    str(JPEGLSLossless),
    str(RLELossless),
    str(JPEG2000Lossless),
)
JPEG_LOSSLESS_SV1 = "1.2.840.10008.1.2.4.70"  # needs pylibjpeg-libjpeg (GPL): not installed, refused
__all__ = ["CT_IMAGE", "SECONDARY_CAPTURE", "VL_PHOTOGRAPHIC"]
