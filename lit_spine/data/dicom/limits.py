"""What a usable DICOM file looks like: the tags read, the thresholds, the errors.

The header tags the suite reads, the file suffixes never tried, and every limit a file
must meet (``*_MM`` / ``MAX_*``: file and header sizes, matrix, frames, bits, spacing range
and aspect, the sequence timing that names a weighting, what makes a localizer), with the
errors raised for a dataset (`DatasetError`) or one file (`DicomFileError`, `SpacingError`).
The values are explained in docs/data-format.md and README "Your own data".
"""

from __future__ import annotations

import os

from lit_spine.utils import one_line

HEADER_TAGS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SeriesDescription",
    "ImageType",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "EchoTime",
    "RepetitionTime",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "BitsStored",
    "PixelRepresentation",
    "SamplesPerPixel",
    "NumberOfFrames",
    "RescaleSlope",
    "RescaleIntercept",
)
# Files with these suffixes are never DICOM; everything else is tried (exports often have none).
# fmt: off
NOT_DICOM_SUFFIXES = frozenset({
    ".json", ".txt", ".md", ".csv", ".png", ".jpg", ".jpeg", ".npy",
    ".xml", ".html", ".pdf", ".zip", ".gz", ".py", ".yaml", ".yml",
})
# fmt: on
PLANE_THRESHOLD = 0.75  # |normal component| above this names the plane (spec)

# --- what a usable file looks like (see docs/data-format.md; README "Your own data")
MIN_FILE_BYTES = 132  # 128-byte preamble + "DICM"
# Everything before PixelData; real headers (Siemens CSA included) stay far below this.
MAX_HEADER_BYTES = 16 * 2**20
# A header needing more reads than this is not one (zero-filled files parse as endless
# empty elements); real MR headers take a few thousand.
MAX_HEADER_READS = 200_000
MAX_ZERO_READS = 64  # consecutive all-zero reads of 4+ bytes: zero-filled space, not a header
# Elements longer than this are skipped while parsing the header, never read.
DEFER_SIZE_BYTES = 256 * 1024
# Native PixelData may be longer than Rows x Columns needs (padding) by at most this fraction.
MAX_PIXEL_EXCESS = 0.25
MAX_MATRIX_PX = 8192  # Rows / Columns above this are not an MR slice
MAX_FRAMES = 4096
ALLOWED_BITS_ALLOCATED = frozenset({1, 8, 16, 32, 64})
# PixelSpacing outside this range, or more anisotropic than MAX_SPACING_ASPECT, is not trusted.
SPACING_RANGE_MM = (0.05, 20.0)
MAX_SPACING_ASPECT = 4.0
# Weighting from the sequence timing when the description names none (ms): long TE and TR
# give T2 contrast, short TE and TR give T1 contrast; anything between stays 'unknown'.
T2_MIN_ECHO_MS, T2_MIN_REPETITION_MS = 80.0, 1500.0
T1_MAX_ECHO_MS, T1_MAX_REPETITION_MS = 30.0, 1000.0
# Localizers (scouts) are never chosen: flagged by ImageType/description, mixed planes, or a
# matrix smaller than this; series with fewer slices than MIN_SERIES_SLICES are a last resort.
MIN_MATRIX_PX = 32
MIN_SERIES_SLICES = 3
LOCALIZER_WORDS = ("LOCALIZER", "LOCALISER", "SCOUT", "SURVEY", "LOCATOR", "3-PLANE", "3PLANE")
# pydicom decoder plugins raise anything, a Rust panic (BaseException) included; only these
# are let through so that Ctrl-C still stops the run.
_NEVER_CAUGHT = (KeyboardInterrupt, SystemExit, GeneratorExit)


class DatasetError(ValueError):
    """A dataset folder cannot be used at all (missing, empty, no DICOM files)."""


class DicomFileError(ValueError):
    """One file cannot be used: `path` and a one-line `reason` (naming the tag when one is at fault)."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        self.path = str(path)
        self.reason = one_line(reason)
        super().__init__(f"{one_line(self.path)}: {self.reason}")


class SpacingError(DicomFileError):
    """A file's PixelSpacing is missing or not trustworthy (reason names the tag and value)."""


def _error_text(err: BaseException) -> str:
    """A plugin's exception as one line, with its type when the message alone says nothing."""
    msg = one_line(str(err).strip())
    name = type(err).__name__
    return f"{name}: {msg}" if msg else name
