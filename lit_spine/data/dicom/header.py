"""Reading one DICOM header without its pixels, every value the suite uses validated.

`read_header` checks the size and the 128-byte preamble first (a 1 GiB zero-filled file is
rejected after reading 132 bytes), parses with ``stop_before_pixels`` and ``defer_size``
(large elements are skipped, not read) inside a byte limit, and validates Rows/Columns
against the length of the PixelData element, rescale slope/intercept and PixelSpacing
(`validate_spacing`). pydicom warnings are captured per file and become problem lines naming
the file. Written by hand (no library does it): the preamble check, the PixelData length
check from the element header and the value validation; parsing is `pydicom.dcmread`.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import struct
import threading
import warnings
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from lit_spine.data.dicom import limits
from lit_spine.data.dicom.limits import DicomFileError, SpacingError, _error_text
from lit_spine.utils import one_line


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
    lo, hi = limits.SPACING_RANGE_MM
    if not (lo <= row_mm <= hi and lo <= col_mm <= hi):
        return f"is outside the plausible {lo:g}..{hi:g} mm"
    if max(row_mm, col_mm) / min(row_mm, col_mm) > limits.MAX_SPACING_ASPECT:
        return f"is more anisotropic than 1:{limits.MAX_SPACING_ASPECT:g}"
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
        if self.reads > limits.MAX_HEADER_READS:
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
            if self.zero_reads > limits.MAX_ZERO_READS:
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
    if size < limits.MIN_FILE_BYTES:
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
        f = _BoundedFile(raw, limits.MAX_HEADER_BYTES)
        try:
            ds = pydicom.dcmread(
                f,
                stop_before_pixels=True,
                defer_size=limits.DEFER_SIZE_BYTES,
                specific_tags=list(limits.HEADER_TAGS),
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
                f"{limits.MAX_HEADER_BYTES // 2**20} MiB or {limits.MAX_HEADER_READS} elements "
                "before PixelData): not an image slice"
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
        rows = _int_value(ds, "Rows", 1, limits.MAX_MATRIX_PX)
        cols = _int_value(ds, "Columns", 1, limits.MAX_MATRIX_PX)
        frames = _int_value(ds, "NumberOfFrames", 1, limits.MAX_FRAMES, default=1)
        samples = _int_value(ds, "SamplesPerPixel", 1, 4, default=1)
        bits = _int_value(ds, "BitsAllocated", 1, 64, default=16)
        if bits not in limits.ALLOWED_BITS_ALLOCATED:
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
                    if not expected <= length <= expected * (1 + limits.MAX_PIXEL_EXCESS) + 1:
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
