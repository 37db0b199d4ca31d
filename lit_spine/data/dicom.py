"""DICOM study reading: index headers without pixels, group series, choose the annotated slice.

A dataset root holds one folder per study (``<root>/<split>/study<N>/*.dcm``, all series
mixed, file names arbitrary; see ``docs/data-format.md``). Reading happens in two steps:

1. `index_dataset` reads every file through one routine, `read_header`: the size and the
   128-byte preamble are checked first (a 1 GiB zero-filled file is rejected after reading 132
   bytes), the header is parsed with ``stop_before_pixels`` and ``defer_size`` (large elements
   are skipped, not read) inside a byte limit, and every header value the suite uses is
   validated (thresholds below, named ``*_MM`` / ``MAX_*``): Rows/Columns against the length
   of the PixelData element, rescale slope/intercept, PixelSpacing. pydicom warnings are
   captured per file and become problem lines naming the file. Slices are grouped by study and
   series, each series' plane (ImageOrientationPatient) and weighting (SeriesDescription, else
   EchoTime/RepetitionTime) classified, localizers flagged, slices ordered along the series
   normal. Unreadable files are skipped and reported in the study's ``problems``; nothing here
   raises for one bad file.
2. `choose_slice` picks the slice to use: the annotation's instance when it names one that
   exists, else the series-map series, else the T2 sagittal series (highest mean intensity
   among sagittal T2 series, which rejects the fat-suppressed variant) and its middle frame
   ``(n - 1) // 2``; with no T2 sagittal series another sagittal series is used and flagged as
   a fallback; localizers are never chosen. Only the middle slice of each competing series is
   decoded, once, through a `PixelReader`, which later hands the same array to the cache
   builder. `decode_pixels` survives any decoder-plugin failure (a Rust panic included) and
   raises `DicomFileError` naming the file instead.

Written by hand (no library does it): the preamble check, the PixelData length check from the
element header, the value validation and the series choice. Parsing and decoding are
pydicom's (`pydicom.dcmread`, `pydicom.pixels.pixel_array`, `apply_modality_lut`).
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import struct
import sys
import tempfile
import threading
import warnings
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as _pydicom_pixel_array
from pydicom.uid import DeflatedExplicitVRLittleEndian
from tqdm.auto import tqdm

from lit_spine.data.annotation import StudyAnnotation
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


# ----------------------------------------------------------------------------- headers


@dataclass(frozen=True)
class SliceHeader:
    """What the suite needs from one DICOM file, read without its pixel data."""

    path: str
    study_uid: str
    series_uid: str
    instance_uid: str
    description: str
    rows: int
    cols: int
    # (row spacing, column spacing) in mm, validated; None when no trustworthy value exists,
    # and then `spacing_problem` says why (never a guessed 1.0).
    spacing_mm: tuple[float, float] | None
    spacing_source: str  # "PixelSpacing", "ImagerPixelSpacing" or "none"
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    instance_number: int | None
    photometric: str
    echo_time_ms: float | None = None
    repetition_time_ms: float | None = None
    image_type: tuple[str, ...] = ()
    spacing_problem: str | None = None
    warnings: tuple[str, ...] = ()  # pydicom warnings met while reading this file

    @property
    def normal(self) -> np.ndarray | None:
        """Unit slice normal: cross product of the row and column direction cosines."""
        if self.orientation is None:
            return None
        n = np.cross(self.orientation[:3], self.orientation[3:])
        norm = float(np.linalg.norm(n))
        return n / norm if norm > 1e-6 else None


class _Bad(ValueError):
    """A validation failure whose message is already the reason to report."""


def _tag_name(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"{keyword} ({tag >> 16:04X},{tag & 0xFFFF:04X})" if tag is not None else keyword


def _missing(keyword: str) -> str:
    tag = pydicom.datadict.tag_for_keyword(keyword)
    return f"{keyword} missing" + (f" (tag {tag >> 16:04X},{tag & 0xFFFF:04X})" if tag else "")


def _raw_value(ds: pydicom.Dataset, keyword: str) -> object:
    """The element's value; a value pydicom cannot convert raises naming the tag."""
    try:
        return ds.get(keyword)
    except Exception as err:  # noqa: BLE001 - pydicom raises ValueError, struct.error, ...
        raise _Bad(f"{_tag_name(keyword)}: unreadable value ({_error_text(err)})") from None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """`n` finite floats from a multi-valued DICOM element, or None when odd or missing."""
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, (str, bytes, int, float)) else [value]
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError, OverflowError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _int_value(
    ds: pydicom.Dataset, keyword: str, lo: int, hi: int, default: int | None = None
) -> int:
    """An integer header value within [lo, hi]; raises ValueError naming the tag otherwise."""
    value = _raw_value(ds, keyword)
    if value is None or value == "":
        if default is None:
            raise _Bad(_missing(keyword))
        return default
    try:
        number = int(value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        raise _Bad(f"{_tag_name(keyword)}: {value!r} is not an integer") from None
    if not lo <= number <= hi:
        raise _Bad(f"{_tag_name(keyword)} = {number} is outside [{lo}, {hi}]")
    return number


def _float_value(ds: pydicom.Dataset, keyword: str) -> float | None:
    """A single finite float, or None when missing or malformed (optional tags only)."""
    pair = _floats(_raw_value(ds, keyword), 1)
    return pair[0] if pair is not None else None


def validate_spacing(value: object, keyword: str = "PixelSpacing") -> tuple[float, float]:
    """(row_mm, col_mm) from a PixelSpacing-like value; raises ValueError saying what is wrong.

    Accepted: two finite numbers (one is read as square pixels) within `SPACING_RANGE_MM`
    whose ratio is at most `MAX_SPACING_ASPECT`.
    """
    name = _tag_name(keyword)
    if value is None or value == "":
        raise _Bad(_missing(keyword))
    pair = _floats(value, 2) or _floats(value, 1)
    if pair is None:
        raise _Bad(f"{name} = {one_line(value, 80)!r} is not two finite numbers")
    row_mm, col_mm = pair[0], pair[-1]
    reason = implausible_spacing(row_mm, col_mm)
    if reason is not None:
        raise _Bad(f"{name} = {row_mm:g}\\{col_mm:g} mm {reason}")
    return row_mm, col_mm


def implausible_spacing(row_mm: float, col_mm: float) -> str | None:
    """Why finite (row, col) mm are not a trustworthy pixel spacing, or None when they are.

    The one plausibility rule for spacings read from headers and given on the command line.
    """
    lo, hi = SPACING_RANGE_MM
    if not (lo <= row_mm <= hi and lo <= col_mm <= hi):
        return f"is outside the plausible {lo:g}..{hi:g} mm"
    if max(row_mm, col_mm) / min(row_mm, col_mm) > MAX_SPACING_ASPECT:
        return f"is more anisotropic than 1:{MAX_SPACING_ASPECT:g}"
    return None


def _spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float] | None, str, str | None]:
    """(spacing, source, problem): PixelSpacing, else ImagerPixelSpacing, else none."""
    reasons = []
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            return (
                validate_spacing(_raw_value(ds, key), key),
                key,
                (f"{'; '.join(reasons)}; using ImagerPixelSpacing" if reasons else None),
            )
        except ValueError as err:
            reasons.append(str(err))
    return None, "none", "; ".join(reasons)


class _BoundedFile(io.RawIOBase):
    """A read-only file that ends (raises) once a read passes `limit` bytes from the start."""

    def __init__(self, f, limit: int) -> None:
        self._f, self._limit = f, limit
        self.reads = 0
        self.zero_reads = 0
        self.name = getattr(f, "name", None)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._f.seek(offset, whence)

    def tell(self) -> int:
        return self._f.tell()

    def read(self, n: int = -1) -> bytes:
        pos = self._f.tell()
        self.reads += 1
        if self.reads > MAX_HEADER_READS:
            raise _HeaderTooLarge(pos)
        if n is None or n < 0:  # "the rest" (deflated files): only if it fits in the limit
            rest = self._f.read(max(self._limit - pos, 0) + 1)
            if len(rest) > self._limit - pos:
                raise _HeaderTooLarge(pos)
            return rest
        if pos + n > self._limit:
            raise _HeaderTooLarge(pos)
        data = self._f.read(n)
        # Zero-filled space parses as endless empty elements: stop after a short run of them.
        if len(data) >= 4 and not data.strip(b"\0"):
            self.zero_reads += 1
            if self.zero_reads > MAX_ZERO_READS:
                raise _HeaderTooLarge(pos, zero_filled=True)
        else:
            self.zero_reads = 0
        return data

    def readinto(self, b) -> int:  # pragma: no cover - pydicom uses read()
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)


class _HeaderTooLarge(Exception):
    def __init__(self, pos: int, zero_filled: bool = False) -> None:
        super().__init__(pos)
        self.pos, self.zero_filled = pos, zero_filled


def _check_preamble(path: str, size: int, head: bytes) -> bool:
    """True when the file has the 'DICM' marker; False for a bare dataset; raises otherwise."""
    if size < MIN_FILE_BYTES:
        raise _Bad(f"file is only {size} bytes")
    if head[128:132] == b"DICM":
        return True
    # Old exports lack the preamble and start directly with a group 0002 or 0008 element.
    group_le, group_be = struct.unpack("<H", head[:2])[0], struct.unpack(">H", head[:2])[0]
    if {group_le, group_be} & {0x0002, 0x0008}:
        return False
    raise _Bad("not a DICOM file (no 'DICM' marker at byte 128 and no DICOM element at byte 0)")


def _expected_pixel_bytes(rows: int, cols: int, frames: int, samples: int, bits: int, pi: str):
    """Byte length of native (uncompressed) pixel data described by the header."""
    if pi == "YBR_FULL_422" and samples == 3:
        samples_per_pixel = 2.0  # Cb and Cr are shared by two pixels
    else:
        samples_per_pixel = float(samples)
    n_bits = rows * cols * frames * samples_per_pixel * bits
    return int(math.ceil(n_bits / 8))


def _pixel_element_length(f, ds: pydicom.Dataset, size: int) -> tuple[int, int]:
    """(declared length, offset of the value) of the PixelData element at the file position."""
    implicit, little = ds.original_encoding
    endian = "<" if little in (True, None) else ">"
    start = f.tell()
    head = f.read(8)
    if len(head) < 8:
        raise _Bad("no PixelData (7FE0,0010) element: not an image")
    group, elem = struct.unpack(endian + "HH", head[:4])
    if (group, elem) != (0x7FE0, 0x0010):
        raise _Bad(
            f"no PixelData (7FE0,0010) element (found ({group:04X},{elem:04X})): not an image"
        )
    # Some writers switch to implicit VR mid-file (pydicom copes and warns): no VR letters.
    if implicit or not head[4:6].isalpha() or not head[4:6].isupper():
        return struct.unpack(endian + "L", head[4:8])[0], start + 8
    extra = f.read(4)
    if len(extra) < 4:
        raise _Bad("truncated: PixelData (7FE0,0010) element header is cut off")
    return struct.unpack(endian + "L", extra)[0], start + 12


# warnings.catch_warnings swaps process-wide state, so threads reading headers at the same
# time would mix up whose warning is whose. Instead, one routing hook is installed while any
# read runs, and each thread collects the warnings of its own file in a thread-local list.
_warning_sink = threading.local()
_routing_lock = threading.Lock()
_routing_depth = 0
_saved_warning_state: tuple | None = None


def _route_warning(message, category, filename, lineno, file=None, line=None) -> None:
    sink = getattr(_warning_sink, "notes", None)
    if sink is not None:
        sink.append(one_line(message, 200))
    elif _saved_warning_state is not None:
        _saved_warning_state[1](message, category, filename, lineno, file, line)


@contextlib.contextmanager
def _routed_warnings():
    """Route warnings to the per-thread sinks (re-entrant; the first entry installs it)."""
    global _routing_depth, _saved_warning_state
    with _routing_lock:
        if _routing_depth == 0:
            _saved_warning_state = (list(warnings.filters), warnings.showwarning)
            warnings.simplefilter("always")
            warnings.showwarning = _route_warning
        _routing_depth += 1
    try:
        yield
    finally:
        with _routing_lock:
            _routing_depth -= 1
            if _routing_depth == 0 and _saved_warning_state is not None:
                warnings.filters[:] = _saved_warning_state[0]
                warnings.showwarning = _saved_warning_state[1]
                _saved_warning_state = None


def read_header(path: str | os.PathLike) -> SliceHeader:
    """Read and validate one file's header without its pixel data.

    Raises `DicomFileError` (path + one-line reason naming the tag at fault) if unusable;
    pydicom's warnings about the file land in `SliceHeader.warnings`, not on stderr.
    """
    path = str(path)
    notes: list[str] = []
    _warning_sink.notes = notes
    try:
        with _routed_warnings():
            header = _read_header(path)
    except _Bad as err:
        raise DicomFileError(path, str(err)) from None
    except Exception as err:  # noqa: BLE001 - any parser failure is this file's problem
        raise DicomFileError(path, f"cannot parse the header: {_error_text(err)}") from None
    finally:
        _warning_sink.notes = None
    unique = tuple(dict.fromkeys(notes))
    return header if not unique else _replace(header, warnings=unique)


def _replace(h: SliceHeader, **kw) -> SliceHeader:
    from dataclasses import replace

    return replace(h, **kw)


def _read_header(path: str) -> SliceHeader:
    size = os.path.getsize(path)
    with open(path, "rb") as raw:
        has_preamble = _check_preamble(path, size, raw.read(132))
        raw.seek(0)
        f = _BoundedFile(raw, MAX_HEADER_BYTES)
        try:
            ds = pydicom.dcmread(
                f,
                stop_before_pixels=True,
                defer_size=DEFER_SIZE_BYTES,
                specific_tags=list(HEADER_TAGS),
                force=not has_preamble,
            )
        except _HeaderTooLarge as err:
            if err.pos >= size:
                raise _Bad(
                    f"truncated: an element before PixelData runs past the end of the file "
                    f"(to byte {err.pos} of {size})"
                ) from None
            if err.zero_filled:
                raise _Bad(f"zero-filled from about byte {err.pos}: not an image slice") from None
            raise _Bad(
                f"no end to the header before byte {err.pos} (more than "
                f"{MAX_HEADER_BYTES // 2**20} MiB or {MAX_HEADER_READS} elements before "
                "PixelData): not an image slice"
            ) from None
        except EOFError:
            raise _Bad(f"truncated: the header ends early ({size} bytes)") from None
        except Exception as err:  # noqa: BLE001 - pydicom's parse errors name no file
            raise _Bad(
                f"cannot parse the header near byte {raw.tell()}: {_error_text(err)}"
            ) from None
        missing = [
            k
            for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns")
            if _raw_value(ds, k) in (None, "")  # Rows = 0 is a bad value, not a missing one
        ]
        if missing:
            raise _Bad(f"not a DICOM image (no {', '.join(missing)})")
        rows = _int_value(ds, "Rows", 1, MAX_MATRIX_PX)
        cols = _int_value(ds, "Columns", 1, MAX_MATRIX_PX)
        frames = _int_value(ds, "NumberOfFrames", 1, MAX_FRAMES, default=1)
        samples = _int_value(ds, "SamplesPerPixel", 1, 4, default=1)
        bits = _int_value(ds, "BitsAllocated", 1, 64, default=16)
        if bits not in ALLOWED_BITS_ALLOCATED:
            raise _Bad(f"{_tag_name('BitsAllocated')} = {bits} is not one of 1, 8, 16, 32, 64")
        stored = _int_value(ds, "BitsStored", 1, bits, default=bits)
        del stored  # validated only: a BitsStored above BitsAllocated breaks decoding
        _int_value(ds, "PixelRepresentation", 0, 1, default=0)
        _check_rescale(ds)
        photometric = str(_raw_value(ds, "PhotometricInterpretation") or "MONOCHROME2")
        photometric = photometric.strip().upper()
        meta = getattr(ds, "file_meta", None)
        ts = meta.get("TransferSyntaxUID") if meta is not None else None
        if ts is not None:
            try:
                ts.is_compressed  # noqa: B018 - raises for a UID that is no transfer syntax
            except (ValueError, AttributeError):
                raise _Bad(
                    f"TransferSyntaxUID (0002,0010) = {one_line(ts, 70)!r} is not a transfer syntax"
                ) from None
        if ts != DeflatedExplicitVRLittleEndian:  # deflated: the element offsets are not the file's
            length, value_at = _pixel_element_length(f, ds, size)
            if length == 0xFFFFFFFF:
                if ts is not None and not ts.is_compressed:
                    raise _Bad(
                        f"PixelData (7FE0,0010) is encapsulated but the transfer syntax {ts} "
                        "is not a compressed one"
                    )
                if size - value_at < 16:
                    raise _Bad("truncated: encapsulated PixelData (7FE0,0010) is empty")
            else:
                if value_at + length > size:
                    raise _Bad(
                        f"truncated: PixelData (7FE0,0010) claims {length} bytes, the file holds "
                        f"{max(size - value_at, 0)} after its start ({size} bytes in all)"
                    )
                if ts is None or not ts.is_compressed:
                    expected = _expected_pixel_bytes(rows, cols, frames, samples, bits, photometric)
                    # Writers pad (an odd length by one byte, some by a row); more excess
                    # than MAX_PIXEL_EXCESS of the image means Rows/Columns/frames are wrong.
                    if not expected <= length <= expected * (1 + MAX_PIXEL_EXCESS) + 1:
                        raise _Bad(
                            f"PixelData (7FE0,0010) holds {length} bytes but Rows x Columns x "
                            f"frames x samples x bits = {rows} x {cols} x {frames} x {samples} "
                            f"x {bits} needs {expected}: Rows/Columns do not match the data"
                        )
        spacing, spacing_source, spacing_problem = _spacing(ds)
        position = _floats(_raw_value(ds, "ImagePositionPatient"), 3)
        orientation = _floats(_raw_value(ds, "ImageOrientationPatient"), 6)
        try:
            instance_number = int(_raw_value(ds, "InstanceNumber"))  # type: ignore[arg-type]
        except (TypeError, ValueError, OverflowError):
            instance_number = None
        image_type = _raw_value(ds, "ImageType")
        if isinstance(image_type, str):
            image_type = image_type.split("\\")
        try:
            image_type = tuple(str(v).strip().upper() for v in (image_type or ()))
        except TypeError:
            image_type = ()
        return SliceHeader(
            path=path,
            study_uid=one_line(_raw_value(ds, "StudyInstanceUID"), 128),
            series_uid=one_line(_raw_value(ds, "SeriesInstanceUID"), 128),
            instance_uid=one_line(_raw_value(ds, "SOPInstanceUID"), 128),
            description=one_line(_raw_value(ds, "SeriesDescription") or "", 128),
            rows=rows,
            cols=cols,
            spacing_mm=spacing,
            spacing_source=spacing_source,
            position=position,  # type: ignore[arg-type]
            orientation=orientation,  # type: ignore[arg-type]
            instance_number=instance_number,
            photometric=photometric,
            echo_time_ms=_float_value(ds, "EchoTime"),
            repetition_time_ms=_float_value(ds, "RepetitionTime"),
            image_type=image_type,
            spacing_problem=spacing_problem,
        )


def _check_rescale(ds: pydicom.Dataset) -> None:
    """Raise ValueError naming the tag when RescaleSlope/Intercept are not usable numbers."""
    for key in ("RescaleSlope", "RescaleIntercept"):
        value = _raw_value(ds, key)
        if value is None or value == "":
            continue
        number = _floats(value, 1)
        if number is None:
            raise _Bad(f"{_tag_name(key)} = {one_line(value, 60)!r} is not a finite number")
        if key == "RescaleSlope" and number[0] == 0:
            raise _Bad(f"{_tag_name(key)} = 0 would map every pixel to one value")


def read_pixel_spacing(path: str | os.PathLike) -> tuple[float, float]:
    """(row_mm, col_mm) of one file, validated (`validate_spacing`); never a guessed value.

    PixelSpacing is used, else ImagerPixelSpacing. Raises `SpacingError` naming the file and
    the tag when neither is usable, `DicomFileError` when the file itself is unreadable.
    """
    h = read_header(path)
    if h.spacing_mm is None:
        raise SpacingError(h.path, h.spacing_problem or "PixelSpacing (0028,0030) missing")
    return h.spacing_mm


def _read_header_safe(path: str) -> SliceHeader | str:
    """`read_header`, with any failure turned into a one-line reason (never raises)."""
    try:
        return read_header(path)
    except DicomFileError as err:
        return err.reason
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the run
        return _error_text(err)


# ----------------------------------------------------------------------------- series


def classify_plane(normal: np.ndarray | None) -> str:
    """'sagittal', 'coronal', 'axial' or 'unknown' from a unit slice normal (spec thresholds)."""
    if normal is None:
        return "unknown"
    x, y, z = (abs(float(v)) for v in normal)
    if x > PLANE_THRESHOLD:
        return "sagittal"
    if z > PLANE_THRESHOLD:
        return "axial"
    if y > PLANE_THRESHOLD:
        return "coronal"
    return "oblique"


def classify_weighting(description: str) -> str:
    """'T1' if 'T1' is in the upper-cased description, else 'T2' if 'T2' is, else 'unknown'."""
    text = description.upper()
    if "T1" in text:
        return "T1"
    if "T2" in text:
        return "T2"
    return "unknown"


def classify_weighting_by_timing(echo_ms: float | None, repetition_ms: float | None) -> str:
    """'T2' for long TE and TR, 'T1' for short TE and TR (thresholds above), else 'unknown'."""
    if echo_ms is None or repetition_ms is None:
        return "unknown"
    if echo_ms >= T2_MIN_ECHO_MS and repetition_ms >= T2_MIN_REPETITION_MS:
        return "T2"
    if echo_ms <= T1_MAX_ECHO_MS and repetition_ms <= T1_MAX_REPETITION_MS:
        return "T1"
    return "unknown"


def _median(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.median(found)) if found else None


def _plane_from_description(description: str) -> str:
    text = description.upper()
    for key, plane in (("SAG", "sagittal"), ("AX", "axial"), ("TRA", "axial"), ("COR", "coronal")):
        if key in text:
            return plane
    return "unknown"


@dataclass
class Series:
    """One series of a study, slices ordered along the normal (top-to-bottom channel order).

    `weighting_source` is 'description', 'timing' (EchoTime/RepetitionTime) or 'none';
    `localizer` holds the reason a series is a localizer (never chosen), else None.
    """

    uid: str
    description: str
    plane: str
    weighting: str
    slices: list[SliceHeader]
    weighting_source: str = "description"
    localizer: str | None = None

    @property
    def n_slices(self) -> int:
        return len(self.slices)

    @property
    def middle_index(self) -> int:
        """The middle frame, ``(n - 1) // 2``."""
        return (len(self.slices) - 1) // 2

    def index_of(self, instance_uid: str) -> int | None:
        """Position of an instance in the ordered slices, or None."""
        for i, s in enumerate(self.slices):
            if s.instance_uid == instance_uid:
                return i
        return None

    def neighbours(self, index: int, radius: int) -> list[SliceHeader]:
        """Slices ``index - radius .. index + radius``, replicating the edge slice at the ends."""
        last = len(self.slices) - 1
        return [self.slices[min(max(index + d, 0), last)] for d in range(-radius, radius + 1)]


def _localizer_reason(description: str, slices: list[SliceHeader], planes: list[str]) -> str | None:
    """Why a series is a localizer (scout), or None."""
    words = {w for h in slices for w in h.image_type} | {description.upper()}
    for word in LOCALIZER_WORDS:
        if any(word in w for w in words):
            return f"ImageType/description says {word.lower()}"
    known = {p for p in planes if p not in ("unknown", "oblique")}
    if len(known) > 1:
        return f"slices in {len(known)} planes ({', '.join(sorted(known))})"
    small = min(min(h.rows, h.cols) for h in slices)
    if small < MIN_MATRIX_PX:
        return f"matrix {slices[0].cols}x{slices[0].rows} is below {MIN_MATRIX_PX} px"
    return None


def _build_series(uid: str, slices: list[SliceHeader], problems: list[str]) -> Series:
    description = Counter(s.description for s in slices).most_common(1)[0][0]
    normals = [s.normal for s in slices]
    planes = [classify_plane(n) for n in normals]
    localizer = _localizer_reason(description, slices, planes)
    plane = Counter(planes).most_common(1)[0][0]
    if plane == "unknown":
        plane = _plane_from_description(description)
        problems.append(
            f"series {uid} ({description!r}): no usable ImageOrientationPatient; "
            f"plane {plane!r} guessed from the description"
        )
    elif len(set(planes)) > 1:
        # Localizers mix planes in one series; keep the majority plane's slices.
        slices = [s for s, p in zip(slices, planes) if p == plane]
        normals = [s.normal for s in slices]
    normal = next((n for n in normals if n is not None), None)
    if normal is not None and all(s.position is not None for s in slices):
        key = lambda s: float(np.dot(s.position, normal))  # noqa: E731
    else:
        if len(slices) > 1:
            problems.append(
                f"series {uid} ({description!r}): ImagePositionPatient/Orientation missing; "
                "slices ordered by InstanceNumber"
            )
        key = lambda s: s.instance_number if s.instance_number is not None else 0  # noqa: E731
    # Ties broken by instance number then path, so the order never depends on listing order.
    slices = sorted(slices, key=lambda s: (key(s), s.instance_number or 0, s.path))
    weighting, source = classify_weighting(description), "description"
    if weighting == "unknown":
        echo = _median([s.echo_time_ms for s in slices])
        repetition = _median([s.repetition_time_ms for s in slices])
        weighting = classify_weighting_by_timing(echo, repetition)
        source = "timing" if weighting != "unknown" else "none"
    return Series(uid, description, plane, weighting, slices, source, localizer)


@dataclass
class Study:
    """One study folder: its series and everything that went wrong reading it."""

    folder: Path
    study_uid: str | None
    series: list[Series]
    n_files: int
    n_readable: int
    problems: list[str] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.folder.name

    def get_series(self, uid: str) -> Series | None:
        return next((s for s in self.series if s.uid == uid), None)

    def find_instance(self, instance_uid: str) -> tuple[Series, int] | None:
        """(series, index) holding an instance, or None."""
        for s in self.series:
            i = s.index_of(instance_uid)
            if i is not None:
                return s, i
        return None


def _candidate_files(folder: Path) -> list[Path]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or Path(name).suffix.lower() in NOT_DICOM_SUFFIXES:
                continue
            files.append(Path(dirpath) / name)
    return files


def study_folders(root: str | os.PathLike) -> list[Path]:
    """Study folders under `root`: its sub-folders, or `root` itself when it holds files directly.

    Raises DatasetError when `root` does not exist or is not a folder.
    """
    root = Path(root)
    if not root.exists():
        raise DatasetError(f"{root}: no such folder")
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder (expected a folder of study folders)")
    subdirs = sorted(
        (p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=_natural_key
    )
    direct = [
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NOT_DICOM_SUFFIXES
    ]
    splits = [p.name for p in subdirs if find_annotation(p) or find_series_map(p)]
    if splits:
        raise DatasetError(
            f"{root} holds split folders ({', '.join(splits)}), not study folders; "
            f"point at one split, e.g. {root / splits[0]}"
        )
    return [root] if direct and not subdirs else subdirs


def _natural_key(path: Path) -> tuple:
    """study2 before study10."""
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", path.name))


def _group_study(folder: Path, results: list[tuple[Path, SliceHeader | str]]) -> Study:
    problems: list[str] = []
    headers: list[SliceHeader] = []
    seen: set[str] = set()
    for path, res in results:
        if isinstance(res, str):
            problems.append(f"skipped {one_line(path)}: {res}")
            continue
        problems += [f"{one_line(path)}: pydicom warning: {w}" for w in res.warnings]
        if res.instance_uid in seen:
            problems.append(f"skipped {path}: duplicate SOPInstanceUID {res.instance_uid}")
        else:
            seen.add(res.instance_uid)
            headers.append(res)
    study_uid = None
    if headers:
        uids = Counter(h.study_uid for h in headers)
        study_uid = uids.most_common(1)[0][0]
        if len(uids) > 1:
            others = [u for u in uids if u != study_uid]
            problems.append(
                f"folder mixes {len(uids)} StudyInstanceUIDs; using {study_uid}, "
                f"ignoring {sum(uids[u] for u in others)} files of {', '.join(others)}"
            )
            headers = [h for h in headers if h.study_uid == study_uid]
    else:
        problems.append(
            "no readable DICOM image in this folder"
            if results
            else "no DICOM files in this folder (study left out)"
        )
    by_series: dict[str, list[SliceHeader]] = {}
    for h in headers:
        by_series.setdefault(h.series_uid, []).append(h)
    series = [_build_series(uid, sl, problems) for uid, sl in by_series.items()]
    series.sort(key=lambda s: (s.description, s.uid))
    for s in series:
        if s.localizer:
            problems.append(
                f"series {s.uid} ({s.description!r}) is a localizer ({s.localizer}); never chosen"
            )
        if s.plane != "sagittal" or s.localizer:
            continue
        bad = [h for h in s.slices if h.spacing_source != "PixelSpacing"]
        if bad:
            # One line per series, naming a file: the same reason usually holds for all slices.
            problems.append(
                f"series {s.uid} ({s.description!r}): {len(bad)} of {s.n_slices} slices have "
                f"no usable PixelSpacing, e.g. {one_line(bad[0].path)}: {bad[0].spacing_problem}"
                + (
                    ""
                    if bad[0].spacing_mm is not None
                    else "; such a slice has no spacing in mm and is not used"
                )
            )
    return Study(
        folder, study_uid, series, n_files=len(results), n_readable=len(headers), problems=problems
    )


class StudyIndex(list):
    """The studies of a dataset (a list of `Study`) plus `problems` that belong to no study."""

    def __init__(self, studies: Iterable[Study] = (), problems: Iterable[str] = ()) -> None:
        super().__init__(studies)
        self.problems: list[str] = list(problems)


# Header parsing holds the GIL: on a local disk threads were slower than one (measured: 1120
# files, 1 thread 1600 files/s, 4 threads 760, 2 forked processes 780). Threads only pay off on
# high-latency (network) storage, hence `workers` defaults to 1.
DEFAULT_WORKERS = 1


def index_study(folder: str | os.PathLike, workers: int = DEFAULT_WORKERS) -> Study:
    """Index one study folder from headers only (no pixel data is read)."""
    folder = Path(folder)
    files = _candidate_files(folder)
    return _group_study(folder, _read_all(files, workers))


def _read_all(
    files: list[Path], workers: int, progress: bool = False
) -> list[tuple[Path, SliceHeader | str]]:
    bar = tqdm(total=len(files), desc="reading headers", unit="file", leave=False,
               disable=None if progress else True)  # fmt: skip
    with bar:
        if workers <= 1:
            results = []
            for f in files:
                results.append((f, _read_header_safe(str(f))))
                bar.update()
            return results
        with _routed_warnings(), ThreadPoolExecutor(workers) as pool:
            headers = []
            for h in pool.map(_read_header_safe, map(str, files)):
                headers.append(h)
                bar.update()
            return list(zip(files, headers))


def index_dataset(
    root: str | os.PathLike, workers: int | None = None, progress: bool = False
) -> StudyIndex:
    """Index every study folder under `root` (headers only).

    Raises DatasetError for a missing path or a folder without any candidate file; per-file
    and per-study trouble goes into each `Study.problems`, and trouble of the dataset itself
    (files lying beside the study folders) into the result's `problems`. A study folder
    without DICOM files is kept as a study with no series, so that it is reported.
    `progress` shows a bar on a terminal.
    """
    root = Path(root)
    folders = study_folders(root)
    files_by_folder = [(f, _candidate_files(f)) for f in folders]
    if not any(files for _, files in files_by_folder):
        raise DatasetError(
            f"{root}: no DICOM files found. Expected <root>/<split>/study<N>/*.dcm "
            "(one folder per study) or a single study folder."
        )
    dataset_problems = []
    if folders != [root]:
        loose = _loose_files(root)
        if loose:
            dataset_problems.append(
                f"{len(loose)} files lie directly in {one_line(root)} beside the study folders "
                f"and are ignored (e.g. {one_line(loose[0].name)}); move each into its study folder"
            )
    all_files = [p for _, files in files_by_folder for p in files]
    workers = DEFAULT_WORKERS if workers is None else workers
    results = dict(_read_all(all_files, workers, progress))
    studies = [_group_study(f, [(p, results[p]) for p in files]) for f, files in files_by_folder]
    return StudyIndex(studies, dataset_problems)


def _loose_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() not in NOT_DICOM_SUFFIXES
    )


# ----------------------------------------------------------------------------- pixels


def decode_pixels(path: str | os.PathLike) -> np.ndarray:
    """Decode one slice to finite float32 (rows, cols): modality LUT applied, MONOCHROME1 inverted.

    Colour data (RGB, YBR_FULL, YBR_FULL_422, ...) becomes one grey channel (luminance), a
    multi-frame file stands for its middle frame. Any transfer syntax with an installed
    pydicom decoder plugin works. Raises `DicomFileError` naming the file for any failure of
    the file or of a plugin (a Rust panic included); pydicom warnings are raised as failures
    only when decoding fails, otherwise they are dropped (the header read reports them).
    """
    path = str(path)
    try:
        with warnings.catch_warnings(), _native_stderr_kept_on_success():
            warnings.simplefilter("ignore")
            out = _decode(path)
    except _NEVER_CAUGHT:
        raise
    except DicomFileError:
        raise
    except _Bad as err:
        raise DicomFileError(path, str(err)) from None
    except BaseException as err:  # noqa: BLE001 - plugins panic (pyo3 PanicException)
        raise DicomFileError(path, f"cannot decode: {_error_text(err)}") from None
    if not np.isfinite(out).all():
        bad = int(np.size(out) - np.isfinite(out).sum())
        raise DicomFileError(path, f"decoded pixels hold {bad} NaN/inf values")
    return out


@contextlib.contextmanager
def _native_stderr_kept_on_success():
    """Hold what native code writes to fd 2 (a Rust panic prints a backtrace there): on
    failure it is dropped, since the raised error already carries the message; on success it
    is passed on."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        ok = False
        try:
            yield
            ok = True
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            if ok:
                held.seek(0)
                text = held.read()
                if text:
                    os.write(2, text)


def _decode(path: str) -> np.ndarray:
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        has_preamble = _check_preamble(path, size, f.read(132))
    ds = pydicom.dcmread(path, force=not has_preamble)
    _check_rescale(ds)
    photometric = str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper()
    arr = _pydicom_pixel_array(ds)  # YBR_* is converted to RGB (pydicom's as_rgb default)
    samples = int(ds.get("SamplesPerPixel") or 1)
    rows, cols = int(ds.Rows), int(ds.Columns)
    if samples > 1 and arr.ndim >= 3 and arr.shape[-1] == samples:
        # ITU-R BT.601 luma: the grey an MR viewer shows for an RGB export.
        weights = np.array([0.299, 0.587, 0.114], np.float64)[: arr.shape[-1]]
        arr = (arr[..., :3].astype(np.float64) * weights).sum(axis=-1) / weights.sum()
    if arr.ndim == 3:  # multi-frame: the middle frame stands for the file
        arr = arr[(arr.shape[0] - 1) // 2]
    if arr.shape != (rows, cols):
        raise _Bad(f"decoded shape {arr.shape} is not Rows x Columns = ({rows}, {cols})")
    stored = arr
    # apply_modality_lut rescales only when both tags are there; one alone still counts.
    for key in ("RescaleSlope", "RescaleIntercept"):
        if key in ds and ds[key].value in (None, ""):  # present but empty: absent
            del ds[key]
    has_slope, has_intercept = "RescaleSlope" in ds, "RescaleIntercept" in ds
    if has_slope != has_intercept:
        if has_slope:
            ds.RescaleIntercept = 0
        else:
            ds.RescaleSlope = 1
    out = np.asarray(apply_modality_lut(stored, ds), dtype=np.float64)
    if photometric == "MONOCHROME1":
        # Invert across the stored range so values stay comparable with MONOCHROME2 series.
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        if int(ds.get("PixelRepresentation") or 0) == 1:
            lo_hi = np.array([-(1 << (bits - 1)), (1 << (bits - 1)) - 1])
        else:
            lo_hi = np.array([0, (1 << bits) - 1])
        bounds = np.asarray(apply_modality_lut(lo_hi.astype(stored.dtype), ds), np.float64)
        out = float(bounds.min() + bounds.max()) - out
    return out.astype(np.float32)


class PixelReader:
    """Decodes slices on demand and keeps each result, so that no file is decoded twice.

    A failure is kept too (the same `DicomFileError` is raised again without a second try).
    `decoded` counts real decodes (tests and benchmarks use it); `forget()` drops the kept
    arrays once a study is done.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray | DicomFileError] = {}
        self.decoded = 0

    def __call__(self, header: SliceHeader) -> np.ndarray:
        arr = self._arrays.get(header.path)
        if arr is None:
            try:
                arr = decode_pixels(header.path)
            except DicomFileError as err:
                arr = err
            self.decoded += 1
            if not isinstance(arr, DicomFileError) and arr.shape != (header.rows, header.cols):
                arr = DicomFileError(
                    header.path,
                    f"decoded {arr.shape[1]}x{arr.shape[0]} pixels, the header read "
                    f"{header.cols}x{header.rows}",
                )
            self._arrays[header.path] = arr
        if isinstance(arr, DicomFileError):
            raise arr
        return arr

    @property
    def failures(self) -> list[DicomFileError]:
        """The files that could not be decoded so far (each once)."""
        return [a for a in self._arrays.values() if isinstance(a, DicomFileError)]

    def forget(self) -> None:
        self._arrays.clear()


# ----------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class SliceChoice:
    """The slice of a study the suite uses, and why ('annotation', 'series_map' or 'auto').

    `fallback` says why an automatic choice is not a proper T2 sagittal series (None if it is).
    """

    series: Series
    index: int
    source: str
    fallback: str | None = None

    @property
    def header(self) -> SliceHeader:
        return self.series.slices[self.index]

    @property
    def instance_uid(self) -> str:
        return self.header.instance_uid

    def describe(self) -> str:
        return (
            f"series {self.series.uid} ({self.series.description!r}) "
            f"instance {self.instance_uid} (index {self.index}/{self.series.n_slices})"
        )


def _candidate_tiers(study: Study, exclude: Iterable[str]) -> list[tuple[list[Series], str | None]]:
    """Sagittal non-localizer series in order of preference, each tier with its fallback note."""
    exclude = set(exclude)
    sagittal = [
        s
        for s in study.series
        if s.plane == "sagittal" and s.n_slices > 0 and not s.localizer and s.uid not in exclude
    ]
    enough = [s for s in sagittal if s.n_slices >= MIN_SERIES_SLICES]
    few = [s for s in sagittal if s.n_slices < MIN_SERIES_SLICES]
    few_note = f"fewer than {MIN_SERIES_SLICES} slices"
    return [
        ([s for s in enough if s.weighting == "T2"], None),
        ([s for s in enough if s.weighting != "T2"], "no T2 sagittal series"),
        ([s for s in few if s.weighting == "T2"], f"the T2 sagittal series has {few_note}"),
        ([s for s in few if s.weighting != "T2"], f"no T2 sagittal series; {few_note}"),
    ]


def _auto_series(
    study: Study, reader: PixelReader | None, problems: list[str] | None, exclude: Iterable[str]
) -> tuple[Series | None, str | None]:
    """(series, fallback note) of the automatic choice; decodes only to break ties."""
    for candidates, note in _candidate_tiers(study, exclude):
        if len(candidates) == 1:
            return candidates[0], note
        reader = reader or PixelReader()
        best, best_mean = None, -math.inf
        for s in candidates:
            try:
                mean = float(reader(s.slices[s.middle_index]).mean())
            except DicomFileError as err:
                if problems is not None:
                    problems.append(f"skipped {one_line(err.path)}: {err.reason}")
                continue
            if mean > best_mean:
                best, best_mean = s, mean
        if best is not None:
            return best, note
    return None, None


def t2_sagittal_series(
    study: Study,
    reader: PixelReader | None = None,
    problems: list[str] | None = None,
    exclude: Iterable[str] = (),
) -> Series | None:
    """The T2 sagittal series: highest mean intensity (of the middle slice) among sagittal T2
    series, else among any sagittal series (a fallback); None when there is no sagittal series.

    Localizers are never candidates; series with fewer than `MIN_SERIES_SLICES` slices only
    when nothing else is left. Only when several series compete is anything decoded: the
    middle slice of each. Series whose uid is in `exclude` are not considered.
    """
    return _auto_series(study, reader, problems, exclude)[0]


def auto_choice(
    study: Study,
    reader: PixelReader | None = None,
    problems: list[str] | None = None,
    exclude: Iterable[str] = (),
) -> SliceChoice | None:
    """The automatic choice: middle frame of the T2 sagittal series (a fallback is reported)."""
    series, note = _auto_series(study, reader, problems, exclude)
    if series is None:
        return None
    choice = SliceChoice(series, series.middle_index, "auto", note)
    if note and problems is not None:
        problems.append(
            f"{note}: using {series.weighting} {series.plane} series {series.uid} "
            f"({series.description!r}, {series.n_slices} slices) as a fallback"
        )
    return choice


def _describe_series(study: Study) -> str:
    if not study.series:
        return "none"
    return "; ".join(
        f"{s.description or '<no description>'} ({s.plane}, {s.weighting}, {s.n_slices} slices"
        + (", localizer)" if s.localizer else ")")
        for s in study.series
    )


def choose_slice(
    study: Study,
    annotation: StudyAnnotation | None = None,
    series_uid: str | None = None,
    reader: PixelReader | None = None,
    compare_auto: bool = False,
    verify: bool = False,
) -> tuple[SliceChoice | None, SliceChoice | None, list[str]]:
    """Pick the slice to use: (choice, automatic choice or None if not computed, problems).

    An annotation naming an existing instance wins, then a series map's `series_uid` (middle
    frame), then the automatic choice. With `compare_auto` the automatic choice is always
    computed and a disagreement with the annotation is reported. With `verify` the chosen
    slice is decoded (through `reader`, so it is decoded once): an automatic choice that
    fails moves on to the next series, a failing annotated slice leaves the study out.
    """
    problems: list[str] = []
    auto: SliceChoice | None = None
    auto_done = False
    if verify and reader is None:
        reader = PixelReader()

    def decodes(choice: SliceChoice) -> bool:
        if not verify:
            return True
        try:
            reader(choice.header)  # type: ignore[misc]
            return True
        except DicomFileError as err:
            problems.append(
                f"skipped {one_line(err.path)}: {err.reason}; the {choice.source} choice "
                f"({choice.describe()}) cannot be used"
            )
            return False

    def get_auto() -> SliceChoice | None:
        nonlocal auto, auto_done
        if not auto_done:
            excluded: list[str] = []
            while True:
                auto = auto_choice(study, reader, problems, excluded)
                if auto is None or decodes(auto):
                    break
                excluded.append(auto.series.uid)
            auto_done = True
        return auto

    choice: SliceChoice | None = None
    left_out = False
    if annotation is not None and annotation.instance_uid:
        found = study.find_instance(annotation.instance_uid)
        if found is not None:
            choice = SliceChoice(found[0], found[1], "annotation")
            if annotation.series_uid and annotation.series_uid != found[0].uid:
                problems.append(
                    f"annotation names series {annotation.series_uid} but instance "
                    f"{annotation.instance_uid} belongs to series {found[0].uid}; using the instance"
                )
            if not decodes(choice):
                # The points belong to that slice: another slice would silently move them.
                problems.append("the annotated slice cannot be decoded; study left out")
                choice, left_out = None, True
        else:
            fallback = get_auto()
            problems.append(
                f"annotation names instance {annotation.instance_uid} (series "
                f"{annotation.series_uid}) which is not in this study folder; falling back to "
                + (
                    f"the automatic choice: {fallback.describe()}"
                    if fallback
                    else "the automatic choice, but there is none"
                )
            )
    if choice is None and series_uid and not left_out:
        series = study.get_series(series_uid)
        if series is not None and series.n_slices:
            choice = SliceChoice(series, series.middle_index, "series_map")
            if not decodes(choice):
                choice = None
                problems.append("using the automatic choice instead of the series map's series")
        else:
            problems.append(
                f"series map names series {series_uid}, not in this study folder; "
                "using the automatic choice"
            )
    if compare_auto or (choice is None and not left_out):
        get_auto()
    if choice is None and not left_out:
        choice = auto
        if choice is None:
            problems.append(
                "no T2 sagittal series (nor any other usable sagittal series; localizers are "
                f"never used); series found: {_describe_series(study)}"
            )
    elif (
        choice is not None
        and compare_auto
        and auto is not None
        and choice.source == "annotation"
        and (auto.instance_uid != choice.instance_uid)
    ):
        problems.append(
            f"annotated slice {choice.describe()} differs from the automatic choice "
            f"{auto.describe()}"
        )
    return choice, auto, problems


# ----------------------------------------------------------------------------- side files


def find_side_file(root: str | os.PathLike, kind: str) -> Path | None:
    """``<parent>/<split>_<kind>.json`` for ``root = <parent>/<split>``, when it exists."""
    root = Path(root).resolve()
    candidate = root.parent / f"{root.name}_{kind}.json"
    return candidate if candidate.is_file() else None


def find_annotation(root: str | os.PathLike) -> Path | None:
    """The split's annotation file beside `root` (``<split>_annotation.json``), if any."""
    return find_side_file(root, "annotation")


def find_series_map(root: str | os.PathLike) -> Path | None:
    """The split's series map beside `root` (``<split>_series_map.json``), if any."""
    return find_side_file(root, "series_map")


def load_series_map(path: str | os.PathLike) -> dict[str, str]:
    """Read ``[{"studyUid": ..., "seriesUid": ...}]`` into {study uid: series uid}."""
    from lit_spine.data.annotation import AnnotationError

    path = Path(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except json.JSONDecodeError as err:
        raise AnnotationError(
            f"{path}: malformed JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    if not isinstance(obj, list):
        raise AnnotationError(f"{path}: expected a JSON list of {{studyUid, seriesUid}} objects")
    out: dict[str, str] = {}
    for i, item in enumerate(obj):
        if not isinstance(item, dict) or not item.get("studyUid") or not item.get("seriesUid"):
            raise AnnotationError(f"{path}: entry {i} needs 'studyUid' and 'seriesUid'")
        out[str(item["studyUid"])] = str(item["seriesUid"])
    return out


def unknown_annotation_studies(
    studies: Iterable[Study], annotated_uids: Iterable[str], root: str | os.PathLike, what: str
) -> list[str]:
    """Problems for annotation (or series map) studies that match no study folder under root."""
    found = {s.study_uid for s in studies}
    return [
        f"{what} names study {uid}, which matches no study folder under {root} "
        "(studies are matched by StudyInstanceUID)"
        for uid in annotated_uids
        if uid not in found
    ]


def instance_spacing(
    root: str | os.PathLike, workers: int | None = None
) -> dict[str, tuple[float, float] | str]:
    """{SOPInstanceUID: (row_mm, col_mm) or the reason there is none} under `root` (headers only).

    The spacing is validated (`validate_spacing`: PixelSpacing, else ImagerPixelSpacing);
    a string value names the file and says what is wrong, e.g. ``"<path>: PixelSpacing
    (0028,0030) = 0\\0 mm is outside the plausible 0.05..20 mm"``. Never a guessed 1.0.
    Unreadable files have no uid and are absent (they are in `index_dataset`'s problems).
    """
    out: dict[str, tuple[float, float] | str] = {}
    for study in index_dataset(root, workers):
        for series in study.series:
            for h in series.slices:
                out[h.instance_uid] = (
                    h.spacing_mm
                    if h.spacing_mm is not None
                    else f"{one_line(h.path)}: {h.spacing_problem}"
                )
    return out


def read_spacing_for_instances(
    root: str | os.PathLike, workers: int | None = None
) -> dict[str, tuple[float, float]]:
    """{SOPInstanceUID: (row_mm, col_mm)} for every image under `root` with a usable spacing.

    For `lit-spine evaluate`, which scores distances in mm on the annotated instances; an
    instance without a trustworthy spacing is absent (see `instance_spacing` for the reason).
    """
    return {
        uid: value
        for uid, value in instance_spacing(root, workers).items()
        if not isinstance(value, str)
    }
