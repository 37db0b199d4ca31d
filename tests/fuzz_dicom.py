"""Builders of malformed DICOM inputs for the fuzz tests (`test_fuzz_dicom.py`).

Each builder starts from a valid slice written by `dicom_factory.write_slice` and breaks one
thing, so that a test knows which outcome to expect.
"""

from __future__ import annotations

import contextlib
import re
import struct
from pathlib import Path

import numpy as np
import pydicom
import pydicom.config
from dicom_factory import write_slice

STUDY_UID = "1.2.826.0.1.3680043.8.498.1"
SERIES_UID = "1.2.826.0.1.3680043.8.498.2"
# Raw Python texts that must never reach a user without the file and the tag beside them.
RAW_TEXTS = ("invalid literal for int()", "unpack requires a buffer", "could not convert string")


def pixels(shape=(24, 20), seed: int = 0) -> np.ndarray:
    """A uint16 test image (noise around 1000)."""
    return np.random.default_rng(seed).integers(200, 3000, shape).astype(np.uint16)


def base_slice(path: Path, shape=(24, 20), seed: int = 0, **kwargs) -> Path:
    """A valid single-frame T2 sagittal slice."""
    write_slice(
        path,
        pixels(shape, seed),
        study_uid=STUDY_UID,
        series_uid=SERIES_UID,
        description="T2_TSE_SAG",
        **kwargs,
    )
    return path


@contextlib.contextmanager
def lax_writing():
    """Let pydicom write values that break their VR (that is the point of the fuzz)."""
    settings = pydicom.config.settings
    old = settings.writing_validation_mode, settings.reading_validation_mode
    settings.writing_validation_mode = pydicom.config.IGNORE
    settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        yield
    finally:
        settings.writing_validation_mode, settings.reading_validation_mode = old


def with_value(path: Path, keyword: str, value) -> Path:
    """Rewrite `path` with `keyword` set to `value` (None deletes it), raw if need be."""
    with lax_writing():
        ds = pydicom.dcmread(path)
        if value is None:
            if keyword in ds:
                del ds[keyword]
        elif keyword in ("Rows", "Columns", "BitsAllocated", "BitsStored", "SamplesPerPixel"):
            ds[keyword].value = int(value)
        else:
            tag = pydicom.datadict.tag_for_keyword(keyword)
            vr = pydicom.datadict.dictionary_VR(tag)
            raw = value if isinstance(value, bytes) else str(value).encode("latin-1")
            if len(raw) % 2:
                raw += b" "
            ds[tag] = pydicom.dataelem.RawDataElement(
                pydicom.tag.Tag(tag), vr, len(raw), raw, 0, False, True
            )
        ds.save_as(path)
    return path


def pixel_value_offset(data: bytes) -> tuple[int, int]:
    """(offset of the PixelData value, its declared length) in an explicit-VR LE file."""
    at = data.rfind(b"\xe0\x7f\x10\x00")
    if data[at + 4 : at + 6] in (b"OB", b"OW"):
        return at + 12, struct.unpack("<L", data[at + 8 : at + 12])[0]
    return at + 8, struct.unpack("<L", data[at + 4 : at + 8])[0]


def claim_pixel_length(path: Path, length: int) -> Path:
    """Patch the PixelData element's declared length (e.g. a 1 GiB claim)."""
    data = bytearray(path.read_bytes())
    at = data.rfind(b"\xe0\x7f\x10\x00")
    data[at + 8 : at + 12] = struct.pack("<L", length)
    path.write_bytes(bytes(data))
    return path


def names_file_and_is_one_line(reason: str) -> bool:
    """A reason is one line, and a raw Python text in it comes with a tag or a parse note."""
    if "\n" in reason or "\r" in reason:
        return False
    for raw in RAW_TEXTS:
        if raw in reason and not (
            re.search(r"\([0-9A-F]{4},[0-9A-F]{4}\)", reason) or "cannot" in reason
        ):
            return False
    return True


def panic_rle(path: Path) -> Path:
    """Break an RLE slice so that pylibjpeg-rle panics in Rust (a BaseException, not an
    Exception): segment 2 is pointed inside segment 1, so the decoder writes past its output.
    Falls back to an offset past the frame (a plain error) if this image does not panic."""
    data = bytearray(path.read_bytes())
    start = data.rfind(b"\xfe\xff\x00\xe0") + 8
    for low_byte in (0x00, 0x10, 0x80):
        trial = bytearray(data)
        trial[start + 8] = low_byte
        path.write_bytes(bytes(trial))
        try:
            _ = pydicom.dcmread(path).pixel_array
        except Exception:  # noqa: BLE001, S110 - a plain failure: try the next variant
            continue
        except BaseException as err:  # noqa: BLE001 - the panic wanted here
            if type(err).__name__ == "PanicException":
                return path
            raise
    data[start + 8 : start + 12] = (len(data) - start + 2000).to_bytes(4, "little")
    path.write_bytes(bytes(data))
    return path
