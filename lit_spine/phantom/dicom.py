"""DICOM encoding of phantom slices: MR Image Storage files with consistent geometry headers.

Everything written is derived from the study's seed (UIDs are name-based UUIDs
of the study's parameters, dates from the random stream), so a seed gives byte-identical
files on every machine and with any number of worker processes.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    ExplicitVRLittleEndian,
    MRImageStorage,
    RLELossless,
)

IMPLEMENTATION_VERSION = "LIT_SPINE_PH1"


def phantom_uid(*parts: object) -> str:
    """A deterministic UID ('2.25.<int>') from the given parts (seed, split, index, role...).

    A name-based UUID (version 5 style, SHA-1 of the parts) under the 2.25 root; pydicom's
    `generate_uid(prefix=None)` would ignore its entropy sources and return a random one.
    """
    digest = hashlib.sha1("\x1f".join(["lit_spine.phantom", *map(str, parts)]).encode()).digest()
    value = uuid.UUID(bytes=digest[:16], version=5).int
    return str(UID(f"2.25.{value}"))


@dataclass(frozen=True)
class Plane:
    """An image plane in patient coordinates (DICOM LPS, mm)."""

    centre: np.ndarray  # patient position of the image centre
    row_dir: np.ndarray  # direction of increasing column index (first IOP triplet)
    col_dir: np.ndarray  # direction of increasing row index (second IOP triplet)
    rows: int
    cols: int
    row_spacing: float  # mm between rows (PixelSpacing[0])
    col_spacing: float  # mm between columns (PixelSpacing[1])

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_dir, self.col_dir)

    @property
    def origin(self) -> np.ndarray:
        """Patient position of the centre of pixel (row 0, column 0): ImagePositionPatient."""
        return (
            self.centre
            - 0.5 * (self.cols - 1) * self.col_spacing * self.row_dir
            - 0.5 * (self.rows - 1) * self.row_spacing * self.col_dir
        )

    def to_pixels(self, points: np.ndarray) -> np.ndarray:
        """(N, 3) patient points projected to (N, 2) pixel (column, row)."""
        rel = np.atleast_2d(points) - self.origin
        return np.column_stack(
            [rel @ self.row_dir / self.col_spacing, rel @ self.col_dir / self.row_spacing]
        )


@dataclass
class SeriesInfo:
    """Header values shared by every slice of one series."""

    uid: str
    number: int
    description: str
    sequence: str  # 'T2', 'T1' or 'T2FS'
    echo_ms: float
    repetition_ms: float
    slice_thickness: float
    spacing_between: float
    photometric: str = "MONOCHROME2"
    bits_stored: int = 12
    rle: bool = False
    window: tuple[float, float] = (500.0, 1000.0)


@dataclass
class StudyInfo:
    """Header values shared by every file of one study."""

    uid: str
    frame_uid: str
    patient_id: str
    patient_name: str
    age: int
    sex: str
    date: str
    time: str
    field_t: float
    manufacturer: str
    position: str = "HFS"


def _ds(v: float) -> str:
    """A DICOM Decimal String value of at most 16 characters."""
    text = f"{v:.6g}"
    return text if len(text) <= 16 else f"{v:.4e}"


def build_dataset(
    study: StudyInfo,
    series: SeriesInfo,
    plane: Plane,
    pixels: np.ndarray,
    sop_uid: str,
    instance_number: int,
) -> FileDataset:
    """One MR slice as a complete Part-10 dataset (file meta included)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    ds = FileDataset("", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "M", "ND"]
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = study.date
    ds.StudyTime = study.time
    ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = study.time
    ds.AccessionNumber = ""
    ds.Modality = "MR"
    ds.Manufacturer = study.manufacturer
    ds.InstitutionName = "lit_spine phantom"
    ds.ReferringPhysicianName = ""
    ds.StudyDescription = "LUMBAR SPINE"
    ds.SeriesDescription = series.description
    ds.ManufacturerModelName = "phantom"
    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = study.sex
    ds.PatientAge = f"{study.age:03d}Y"
    ds.BodyPartExamined = "LSPINE"
    ds.ScanningSequence = "SE"
    ds.SequenceVariant = "SK"
    ds.ScanOptions = "FS" if series.sequence == "T2FS" else ""
    ds.MRAcquisitionType = "2D"
    ds.SliceThickness = _ds(series.slice_thickness)
    ds.RepetitionTime = _ds(series.repetition_ms)
    ds.EchoTime = _ds(series.echo_ms)
    ds.MagneticFieldStrength = _ds(study.field_t)
    ds.SpacingBetweenSlices = _ds(series.spacing_between)
    ds.PatientPosition = study.position
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = "1"
    ds.SeriesNumber = series.number
    ds.InstanceNumber = instance_number
    ds.ImagePositionPatient = [_ds(v) for v in plane.origin]
    ds.ImageOrientationPatient = [_ds(v) for v in (*plane.row_dir, *plane.col_dir)]
    ds.FrameOfReferenceUID = study.frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = _ds(float(plane.origin @ plane.normal))
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = series.photometric
    ds.Rows, ds.Columns = pixels.shape
    ds.PixelSpacing = [_ds(plane.row_spacing), _ds(plane.col_spacing)]
    ds.BitsAllocated = 16
    ds.BitsStored = series.bits_stored
    ds.HighBit = series.bits_stored - 1
    ds.PixelRepresentation = 0
    ds.WindowCenter = _ds(series.window[0])
    ds.WindowWidth = _ds(series.window[1])
    arr = np.ascontiguousarray(pixels, dtype=np.uint16)
    if series.rle:
        ds.compress(RLELossless, arr, generate_instance_uid=False)
    else:
        ds.PixelData = arr.tobytes()
    return ds


def write_dataset(ds: FileDataset, path) -> None:
    """Write a dataset as a conformant Part-10 file."""
    pydicom.dcmwrite(path, ds, enforce_file_format=True)
