"""Decoding one slice's pixels, surviving any decoder-plugin failure.

`decode_pixels` decodes with `pydicom.pixels.pixel_array` and `apply_modality_lut`; a
plugin failure of any kind (a Rust panic included) becomes a `DicomFileError` naming the
file, and the decoder's native stderr is kept only when it fails. `PixelReader` decodes each
file once and hands the same array to the series choice and later to the cache builder;
its `stack` reads a slice with its neighbours, the slice standing in for one that fails.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings

import numpy as np
import pydicom
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as _pydicom_pixel_array

from lit_spine.data.dicom.header import SliceHeader, _Bad, _check_preamble, _check_rescale
from lit_spine.data.dicom.limits import _NEVER_CAUGHT, DicomFileError, _error_text
from lit_spine.utils import one_line


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

    def stack(
        self,
        headers: list[SliceHeader],
        centre: np.ndarray,
        where: str,
        problems: list[str],
        stand_in: str,
    ) -> np.ndarray:
        """The slices of `headers` (e.g. `Series.neighbours`) as one (C, H, W) array.

        `centre` is the labelled slice, already decoded: it replaces a slice that cannot be
        decoded or has another size, and the problem appended says that `stand_in` (e.g.
        "the annotated slice") stands in.
        """
        stack = []
        for h in headers:
            try:
                arr = self(h)
            except DicomFileError as err:
                problems.append(
                    f"{where}: skipped {one_line(err.path)}: {err.reason}; {stand_in} stands in"
                )
                arr = centre
            if arr.shape != centre.shape:
                problems.append(
                    f"{where}: neighbour {one_line(h.path)} is {arr.shape[1]}x{arr.shape[0]}, "
                    f"not {centre.shape[1]}x{centre.shape[0]}; {stand_in} stands in"
                )
                arr = centre
            stack.append(arr)
        return np.stack(stack)
