"""Fuzz the DICOM side: every malformed file, folder or pixel stream gets its expected outcome.

Outcome classes: (1) a `DicomFileError` whose one-line reason names the tag at fault (the
file is skipped and reported, the rest of its study is read), (2) a readable header with the
problem recorded (e.g. no trustworthy spacing), (3) a good slice that decodes to finite
pixels equal to the ones written. Generated inputs come from `hypothesis` and parametrised
cases; each runs under a time limit (`pytest-timeout`, hypothesis deadlines), so a hang fails.
pydicom's own bundled test files are the real-data fixture.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pydicom
import pytest
from dicom_factory import AXIAL, SAGITTAL, StudyWriter, write_slice
from fuzz_dicom import (
    base_slice,
    claim_pixel_length,
    names_file_and_is_one_line,
    panic_rle,
    pixel_value_offset,
    pixels,
    with_value,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    RLELossless,
)

from lit_spine.commands.inspect import main
from lit_spine.data.cache import CacheSettings, build_cache
from lit_spine.data.dicom import (
    MAX_MATRIX_PX,
    MAX_PIXEL_EXCESS,
    MAX_SPACING_ASPECT,
    SPACING_RANGE_MM,
    DicomFileError,
    PixelReader,
    SpacingError,
    choose_slice,
    decode_pixels,
    index_dataset,
    index_study,
    instance_spacing,
    read_header,
    read_pixel_spacing,
    read_spacing_for_instances,
)
from lit_spine.data.inspect import format_table, inspect_dataset

FUZZ = settings(
    max_examples=40,
    deadline=3000,  # ms per generated input: a hang fails the case
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
    derandomize=True,  # the same inputs on every run and machine
    database=None,
)


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def fresh(workdir: Path, name: str = "x.dcm", **kwargs) -> Path:
    """A new valid slice in its own folder (hypothesis reuses the module fixture)."""
    folder = Path(tempfile.mkdtemp(dir=workdir))
    return base_slice(folder / name, **kwargs)


def assert_clear_error(err: DicomFileError, path: Path, *words: str) -> None:
    assert err.path == str(path) and str(err).startswith(str(path))
    assert names_file_and_is_one_line(err.reason), err.reason
    for w in words:
        assert w in err.reason, (w, err.reason)


# ----------------------------------------------------------------------------- header values


def expected_length_ok(rows: int, cols: int, bits: int, length: int) -> bool:
    need = math.ceil(rows * cols * bits / 8)
    return need <= length <= need * (1 + MAX_PIXEL_EXCESS) + 1


@pytest.mark.timeout(60)
@FUZZ
@given(
    key=st.sampled_from(["Rows", "Columns"]),
    value=st.one_of(st.integers(0, 70), st.integers(MAX_MATRIX_PX + 1, 65535)),
)
def test_rows_columns_against_pixel_data(workdir, key, value):
    path = with_value(fresh(workdir), key, value)
    rows, cols = (value, 20) if key == "Rows" else (24, value)
    if not 1 <= value <= MAX_MATRIX_PX:
        with pytest.raises(DicomFileError) as e:
            read_header(path)
        assert_clear_error(e.value, path, key, "outside")
    elif expected_length_ok(rows, cols, 16, 24 * 20 * 2):
        h = read_header(path)
        assert (h.rows, h.cols) == (rows, cols)
    else:
        with pytest.raises(DicomFileError) as e:
            read_header(path)
        assert_clear_error(e.value, path, "PixelData (7FE0,0010)", "Rows/Columns do not match")


@pytest.mark.timeout(60)
@FUZZ
@given(
    slope=st.one_of(
        st.sampled_from(["nan", "inf", "-inf", "0", "0.0", "abc", "1e999", "", "1\\2"]),
        st.floats(-100, 100, allow_nan=False).map(lambda v: f"{v:.6g}"),
    ),
    key=st.sampled_from(["RescaleSlope", "RescaleIntercept"]),
)
def test_rescale_values(workdir, slope, key):
    path = with_value(fresh(workdir), key, slope)
    try:
        number = float(slope)
    except ValueError:
        number = None
    finite = number is not None and math.isfinite(number)
    bad = slope != "" and (not finite or (key == "RescaleSlope" and number == 0))
    if bad:
        with pytest.raises(DicomFileError) as e:
            read_header(path)
        assert_clear_error(e.value, path, key)
        with pytest.raises(DicomFileError) as e:
            decode_pixels(path)
        assert_clear_error(e.value, path, key)
    else:
        read_header(path)
        out = decode_pixels(path)
        m = number if (key == "RescaleSlope" and slope != "") else 1.0
        c = number if (key == "RescaleIntercept" and slope != "") else 0.0
        np.testing.assert_allclose(out, pixels() * m + c, rtol=1e-5, atol=1e-3)


def spacing_verdict(text: str | None) -> tuple[float, float] | None:
    """The spacing the rules accept for a PixelSpacing text, or None."""
    if text is None:
        return None
    try:
        parts = [float(v) for v in text.split("\\")]
    except ValueError:
        return None
    if len(parts) not in (1, 2) or not all(math.isfinite(v) for v in parts):
        return None
    row, col = parts[0], parts[-1]
    lo, hi = SPACING_RANGE_MM
    if not (lo <= row <= hi and lo <= col <= hi):
        return None
    if max(row, col) / min(row, col) > MAX_SPACING_ASPECT:
        return None
    return row, col


spacing_texts = st.one_of(
    st.sampled_from(
        [
            "",
            "nan\\nan",
            "0\\0",
            "-0.8\\-0.8",
            "1e-9\\1e-9",
            "1e6\\1e6",
            "0.8\\8",
            "inf\\1",
            "abc",
            "0.8",
            "0.8\\0.8\\0.8",
            "0.7\\0.9",
            "20\\20",
            "0.05\\0.05",
            "0.8\\3.2",
        ]
    ),  # fmt: skip
    st.tuples(st.floats(1e-4, 50.0), st.floats(1e-4, 50.0)).map(
        lambda p: f"{p[0]:.4g}\\{p[1]:.4g}"
    ),
)


@pytest.mark.timeout(60)
@FUZZ
@given(text=spacing_texts)
def test_pixel_spacing_is_validated_never_guessed(workdir, text):
    path = with_value(fresh(workdir), "PixelSpacing", text if text != "" else None)
    want = spacing_verdict(text or None)
    h = read_header(path)  # a bad spacing never makes the slice unreadable
    if want is None:
        assert h.spacing_mm is None and "PixelSpacing" in h.spacing_problem
        with pytest.raises(SpacingError) as e:
            read_pixel_spacing(path)
        assert_clear_error(e.value, path, "PixelSpacing")
        assert read_spacing_for_instances(path.parent) == {}
        (value,) = instance_spacing(path.parent).values()
        assert isinstance(value, str) and str(path) in value and "PixelSpacing" in value
    else:
        assert h.spacing_mm == pytest.approx(want) and h.spacing_source == "PixelSpacing"
        assert read_pixel_spacing(path) == pytest.approx(want)


@pytest.mark.timeout(60)
@FUZZ
@given(
    key=st.sampled_from(
        [
            "NumberOfFrames",
            "InstanceNumber",
            "ImagePositionPatient",
            "ImageOrientationPatient",
            "EchoTime",
            "RepetitionTime",
            "SamplesPerPixel",
            "BitsAllocated",
            "BitsStored",
            "SeriesDescription",
            "ImageType",
            "PhotometricInterpretation",
        ]
    ),  # fmt: skip
    value=st.sampled_from(
        [
            "1",
            "2",
            "0",
            "-1",
            "1A",
            "abc",
            "nan",
            "1e999",
            "",
            "1\\2\\3",
            "\x00\x01",
            "1" * 40,
            "0\\1\\0\\0\\0\\-1",
        ]
    ),  # fmt: skip
)
def test_other_header_values(workdir, key, value):
    """Optional geometry/timing tags degrade to 'unknown'; structural ones fail naming the tag."""
    if key in ("SamplesPerPixel", "BitsAllocated", "BitsStored"):
        try:
            value = int(value)
        except ValueError:
            return  # binary US tags cannot hold text
        if not 0 <= value <= 65535:
            return
    path = with_value(fresh(workdir), key, value)
    structural = {"NumberOfFrames", "SamplesPerPixel", "BitsAllocated", "BitsStored"}
    try:
        h = read_header(path)
    except DicomFileError as err:
        assert key in structural or key == "PhotometricInterpretation", (key, value, err)
        assert_clear_error(err, path)
        assert key in err.reason or "PixelData" in err.reason or "Bits" in err.reason, err.reason
        return
    if key in structural - {"BitsStored"}:  # any BitsStored <= BitsAllocated is valid
        # Only values that describe the same 24 x 20 x 16-bit data may pass.
        assert str(value).strip() in ("1", "16", "") or value in (1, 16), (key, value)
    decoded = PixelReader()
    try:
        out = decoded(h)
        assert out.shape == (24, 20) and np.isfinite(out).all()
    except DicomFileError as err:  # e.g. an unknown PhotometricInterpretation
        assert_clear_error(err, path)


# ----------------------------------------------------------------------------- files as bytes


@pytest.mark.timeout(60)
@FUZZ
@given(frac=st.floats(0.0, 0.999))
def test_truncated_anywhere(workdir, frac):
    path = fresh(workdir)
    data = path.read_bytes()
    value_at, length = pixel_value_offset(data)
    cut = int(len(data) * frac)
    path.write_bytes(data[:cut])
    with pytest.raises(DicomFileError) as e:
        read_header(path)
    assert_clear_error(e.value, path)
    if cut < 132:
        assert "file is only" in e.value.reason or "not a DICOM file" in e.value.reason
    elif cut >= value_at - 12:
        assert "truncated" in e.value.reason or "no PixelData" in e.value.reason
    with pytest.raises(DicomFileError):
        decode_pixels(path)


@pytest.mark.timeout(60)
@FUZZ
@given(data=st.binary(min_size=0, max_size=3000), dicm=st.booleans())
def test_random_bytes_are_rejected_with_a_reason(workdir, data, dicm):
    path = Path(tempfile.mkdtemp(dir=workdir)) / "r.dcm"
    path.write_bytes((b"\0" * 128 + b"DICM" + data) if dicm else data)
    with pytest.raises(DicomFileError) as e:
        read_header(path)
    assert_clear_error(e.value, path)


@pytest.mark.timeout(60)
@FUZZ
@given(offset=st.integers(0, 10_000), value=st.integers(0, 255), n=st.integers(1, 12))
def test_flipped_header_bytes(workdir, offset, value, n):
    """Any byte flips in the header: a clean reason or a header that still decodes."""
    path = fresh(workdir)
    data = bytearray(path.read_bytes())
    value_at, _ = pixel_value_offset(bytes(data))
    for k in range(n):
        data[(offset + 37 * k) % value_at] = (value + k) % 256
    path.write_bytes(bytes(data))
    try:
        h = read_header(path)
    except DicomFileError as err:
        assert_clear_error(err, path)
        return
    try:
        out = PixelReader()(h)
    except DicomFileError as err:
        assert_clear_error(err, path)
        return
    assert out.shape == (h.rows, h.cols) and np.isfinite(out).all()


@pytest.fixture(scope="module")
def compressed(workdir):
    """One valid slice per compressed transfer syntax."""
    out = {}
    for ts in (RLELossless, JPEG2000Lossless):
        out[str(ts)] = fresh(workdir, "c.dcm", transfer_syntax=ts, shape=(64, 64)).read_bytes()
    return out


@pytest.mark.timeout(90)
@FUZZ
@given(
    ts=st.sampled_from([str(RLELossless), str(JPEG2000Lossless)]),
    seed=st.integers(0, 2**32 - 1),
    n=st.integers(1, 16),
    near_start=st.booleans(),
)
def test_corrupt_compressed_pixels_never_escape(workdir, compressed, ts, seed, n, near_start):
    """Decoder plugins fail in any way (the RLE plugin panics in Rust): always a DicomFileError
    naming the file, or finite pixels of the right shape."""
    data = bytearray(compressed[ts])
    start = data.rfind(b"\xfe\xff\x00\xe0")  # the last item: the frame
    rng = np.random.default_rng(seed)
    span = 64 if near_start else len(data) - start - 8
    for j in rng.integers(start + 8, start + 8 + span, n):
        data[int(j)] = int(rng.integers(0, 256))
    path = Path(tempfile.mkdtemp(dir=workdir)) / "c.dcm"
    path.write_bytes(bytes(data))
    h = read_header(path)
    try:
        out = decode_pixels(path)
    except DicomFileError as err:
        assert_clear_error(err, path, "cannot decode")
        return
    assert out.shape == (h.rows, h.cols) and np.isfinite(out).all()


def test_rle_panic_is_caught_and_its_backtrace_held_back(tmp_path, capfd):
    """A known Rust panic of pylibjpeg-rle: caught (BaseException), nothing on stderr."""
    path = panic_rle(base_slice(tmp_path / "rle.dcm", shape=(32, 32), transfer_syntax=RLELossless))
    capfd.readouterr()
    with pytest.raises(DicomFileError) as e:
        decode_pixels(path)
    assert_clear_error(e.value, path, "cannot decode: PanicException: index out of bounds")
    assert capfd.readouterr().err == ""


@pytest.mark.timeout(10)
def test_one_gib_zero_file_is_skipped_at_once(tmp_path):
    for name, head in (("zero.dcm", b""), ("zero_dicm.dcm", b"\0" * 128 + b"DICM")):
        path = tmp_path / name
        with open(path, "wb") as f:
            f.write(head)
            f.truncate(2**30)  # sparse: no real disk use
        with pytest.raises(DicomFileError) as e:
            read_header(path)
        assert "not a DICOM file" in e.value.reason or "zero-filled" in e.value.reason
        path.unlink()


@pytest.mark.timeout(10)
@pytest.mark.parametrize("claim", [2**30, 2**31, 0xFFFFFFFE, 24 * 20 * 2 + 2, 10])
def test_pixel_element_length_claims(tmp_path, claim):
    path = claim_pixel_length(base_slice(tmp_path / "a.dcm"), claim)
    with pytest.raises(DicomFileError) as e:
        read_header(path)
    want = "truncated" if claim > 24 * 20 * 2 else "Rows/Columns do not match"
    assert_clear_error(e.value, path, want)


@pytest.mark.parametrize("size", [0, 1, 4, 100, 131], ids=lambda n: f"{n}B")
def test_tiny_files(tmp_path, size):
    path = tmp_path / "t.dcm"
    path.write_bytes(b"DICM"[:size] + b"\0" * max(size - 4, 0))
    with pytest.raises(DicomFileError) as e:
        read_header(path)
    assert_clear_error(e.value, path, f"file is only {size} bytes")


def test_pydicom_warnings_name_the_file(tmp_path, capfd):
    """pydicom warns about this file (implicit VR inside explicit): a problem line, no stderr."""
    path = tmp_path / "s" / "rgb.dcm"
    path.parent.mkdir()
    shutil.copy(get_testdata_file("SC_rgb_jpeg.dcm"), path)
    study = index_study(path.parent)
    assert any(
        p.startswith(f"{path}: pydicom warning:") and "implicit VR" in p for p in study.problems
    ), study.problems
    assert capfd.readouterr().err == ""


# ----------------------------------------------------------------------------- transfer syntaxes


@pytest.mark.parametrize(
    "ts",
    [ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless],
    ids=lambda t: t.name,
)  # fmt: skip
def test_lossless_syntaxes_decode_exactly(tmp_path, ts):
    """(Big endian and JPEG-LS: pydicom's bundled MR_small_* files, below.)"""
    values = pixels((64, 48), seed=3)
    if ts in (ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian):
        path = base_slice(tmp_path / "a.dcm", shape=(64, 48), seed=3)
        ds = pydicom.dcmread(path)
        ds.file_meta.TransferSyntaxUID = ts
        ds.save_as(path, implicit_vr=ts.is_implicit_VR, little_endian=ts.is_little_endian)
    else:
        path = base_slice(tmp_path / "a.dcm", shape=(64, 48), seed=3, transfer_syntax=ts)
    h = read_header(path)
    assert (h.rows, h.cols, h.spacing_mm) == (64, 48, (0.8, 0.8))
    np.testing.assert_array_equal(decode_pixels(path), values.astype(np.float32))


def _raw_slice(path: Path, ds_edit) -> Path:
    base_slice(path)
    ds = pydicom.dcmread(path)
    ds_edit(ds)
    ds.save_as(path)
    return path


def test_one_bit_data_decodes(tmp_path):
    bits = (np.random.default_rng(0).random((16, 24)) > 0.5).astype(np.uint8)

    def edit(ds):
        ds.Rows, ds.Columns = bits.shape
        ds.BitsAllocated = ds.BitsStored = 1
        ds.HighBit = 0
        ds.PixelData = pydicom.pixels.pack_bits(bits)

    path = _raw_slice(tmp_path / "b.dcm", edit)
    assert read_header(path).rows == 16
    np.testing.assert_array_equal(decode_pixels(path), bits.astype(np.float32))


def test_ybr_full_422_becomes_its_luma(tmp_path):
    src = get_testdata_file("SC_ybr_full_422_uncompressed.dcm")
    rgb = pydicom.dcmread(src).pixel_array.astype(np.float64)  # pydicom converts to RGB
    grey = decode_pixels(src)
    assert grey.shape == rgb.shape[:2]
    np.testing.assert_allclose(grey, rgb @ [0.299, 0.587, 0.114], atol=1e-3)
    assert read_header(src).photometric == "YBR_FULL_422"


def test_deflated_bundled_file_is_read_not_called_truncated():
    path = get_testdata_file("image_dfl.dcm")
    h = read_header(path)
    assert decode_pixels(path).shape == (h.rows, h.cols)


def test_multiframe_uses_the_middle_frame(tmp_path):
    frames = np.stack([np.full((8, 10), 100 * (k + 1), np.uint16) for k in range(5)])

    def edit(ds):
        ds.NumberOfFrames = 5
        ds.Rows, ds.Columns = 8, 10
        ds.PixelData = frames.tobytes()

    path = _raw_slice(tmp_path / "m.dcm", edit)
    read_header(path)
    assert (decode_pixels(path) == 300).all()


def test_nan_float_pixels_are_refused(tmp_path):
    def edit(ds):
        arr = np.full((24, 20), np.nan, np.float32)
        del ds.PixelData
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 32, 32, 31
        ds.FloatPixelData = arr.tobytes()

    path = _raw_slice(tmp_path / "f.dcm", edit)
    with pytest.raises(DicomFileError) as e:
        read_header(path)  # no PixelData element: not a (usable) image
    assert_clear_error(e.value, path, "PixelData")


# ----------------------------------------------------------------------------- real files


REAL_FILES = sorted(f for f in get_testdata_files() if f.endswith(".dcm"))


@pytest.mark.timeout(20)
@pytest.mark.parametrize("path", REAL_FILES, ids=lambda p: Path(p).name)
def test_pydicom_bundled_files(path):
    """Each real scanner/test file: a clean refusal, or a header whose pixels decode finite."""
    try:
        h = read_header(path)
    except DicomFileError as err:
        assert err.path == path and names_file_and_is_one_line(err.reason)
        return
    try:
        out = PixelReader()(h)
    except DicomFileError as err:
        assert err.path == path and names_file_and_is_one_line(err.reason)
        return
    assert out.shape == (h.rows, h.cols) and out.dtype == np.float32 and np.isfinite(out).all()


@pytest.mark.parametrize(
    "name, outcome",
    [("MR_small.dcm", "ok"), ("MR_small_RLE.dcm", "ok"), ("MR_small_bigendian.dcm", "ok"),
     ("MR_small_padded.dcm", "ok"), ("MR_small_jpeg_ls_lossless.dcm", "ok"),
     ("MR_small_expb.dcm", "ok"), ("MR_small_implicit.dcm", "ok"), ("MR_truncated.dcm", "truncated"), ("image_dfl.dcm", "ok"),
     ("SC_rgb_rle_2frame.dcm", "ok"), ("badVR.dcm", "NumberOfFrames"),
     ("no_meta.dcm", "not a DICOM file"), ("rtplan.dcm", "not a DICOM image")],
)  # fmt: skip
def test_bundled_files_known_outcomes(name, outcome):
    path = get_testdata_file(name)
    if outcome == "ok":
        h = read_header(path)
        ref = pydicom.dcmread(path)
        assert (h.rows, h.cols) == (ref.Rows, ref.Columns)
        assert np.isfinite(decode_pixels(path)).all()
    else:
        with pytest.raises(DicomFileError) as e:
            read_header(path)
        assert outcome in e.value.reason


@pytest.mark.timeout(60)
def test_inspect_on_all_bundled_files(tmp_path, capsys):
    """All pydicom test files in one folder: inspect reports every unusable file by name."""
    study = tmp_path / "real" / "study1"
    study.mkdir(parents=True)
    for i, f in enumerate(REAL_FILES):
        shutil.copy(f, study / f"{i:03d}_{Path(f).name}")
    assert main([str(tmp_path / "real"), "--json"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    (report,) = json.loads(captured.out)["studies"]
    assert report["n_files"] == len(REAL_FILES)
    skipped = [p for p in report["problems"] if p.startswith("skipped ")]
    readable = report["n_readable"]
    assert 0 < readable < len(REAL_FILES)
    for name in ("MR_truncated.dcm", "rtplan.dcm", "badVR.dcm"):
        assert any(name in p for p in skipped), name
    assert all("\n" not in p for p in report["problems"])


# ----------------------------------------------------------------------------- folders and series


def _t2(w: StudyWriter, **kw):
    return w.series("t2", "T2_TSE_SAG", n=5, level=1500, **kw)


@pytest.mark.parametrize(
    "kind",
    ["t1_only", "stir_only", "timing_t2", "timing_t1", "localizer_16", "localizer_3plane",
     "localizer_imagetype", "few_slices", "axial_only"],
)  # fmt: skip
def test_series_choice_shapes(tmp_path, kind):
    w = StudyWriter(tmp_path / "s", seed=1)
    want, fallback = None, False
    if kind == "t1_only":
        want, fallback = w.series("t1", "T1_TSE_SAG", n=5), True
    elif kind == "stir_only":
        want, fallback = w.series("stir", "STIR_SAG", n=5), True
    elif kind == "timing_t2":
        w.series("a", "SAG_A", n=5, level=3000)  # brighter, but no weighting at all
        want = w.series("b", "SAG_B", n=5, level=500)
        for p in want.paths:
            with_value(with_value(p, "EchoTime", "100"), "RepetitionTime", "3000")
        for p in w.info.series["a"].paths:
            with_value(with_value(p, "EchoTime", "10"), "RepetitionTime", "500")
    elif kind == "timing_t1":
        want, fallback = w.series("a", "SAG_A", n=5), True
        for p in want.paths:
            with_value(with_value(p, "EchoTime", "12"), "RepetitionTime", "600")
    elif kind == "localizer_16":
        want = _t2(w)
        w.series("loc", "T2_LOC_SAG_SMALL", n=5, shape=(16, 16), level=9000)
    elif kind == "localizer_3plane":
        want = _t2(w)
        loc = w.series("loc", "T2 SAG TRIPLE", n=3, level=9000)
        with_value(loc.paths[1], "ImageOrientationPatient", "1\\0\\0\\0\\1\\0")
        with_value(loc.paths[2], "ImageOrientationPatient", "1\\0\\0\\0\\0\\-1")
    elif kind == "localizer_imagetype":
        want = _t2(w)
        loc = w.series("loc", "T2_SAG_B", n=5, level=9000)
        for p in loc.paths:
            with_value(p, "ImageType", "ORIGINAL\\PRIMARY\\LOCALIZER")
    elif kind == "few_slices":
        want, fallback = w.series("t2", "T2_TSE_SAG", n=2), True
    elif kind == "axial_only":
        w.series("ax", "T2_TRA", n=5, orientation=AXIAL)
    study = index_study(tmp_path / "s")
    choice, auto, problems = choose_slice(study, reader=PixelReader(), verify=True)
    if want is None:
        assert choice is None and any("no T2 sagittal series" in p for p in problems)
        return
    assert choice.series.uid == want.uid, (kind, problems)
    assert (choice.fallback is not None) == fallback, (kind, choice.fallback)
    if fallback:
        assert any("as a fallback" in p for p in problems)
    if kind.startswith("localizer"):
        assert any("is a localizer" in p and "never chosen" in p for p in study.problems)
    if kind == "timing_t2":
        assert choice.series.weighting == "T2" and choice.series.weighting_source == "timing"


@pytest.mark.timeout(60)
@pytest.mark.parametrize("bad", ["truncated", "rle_panic", "zeros", "garbage", "rows"])
def test_undecodable_chosen_slice_moves_on_and_inspect_says_so(tmp_path, bad, capsys):
    """The brightest T2 series' middle slice is broken: inspect and the cache skip it, report
    it once, and use the other T2 series; the cache never holds a non-finite image."""
    w = StudyWriter(tmp_path / "train" / "study1", seed=2)
    good = w.series("t2", "T2_TSE_SAG", n=5, level=800)
    ts = RLELossless if bad == "rle_panic" else None
    broken = w.series(
        "b", "T2_TSE_SAG_B", n=5, level=2000, **({"transfer_syntax": ts} if ts else {})
    )
    path = broken.paths[broken.instance_uids.index(broken.middle)]
    data = bytearray(path.read_bytes())
    if bad == "truncated":
        data = data[: len(data) - 100]
    elif bad == "rle_panic":
        data = panic_rle(path).read_bytes()
    elif bad == "zeros":
        data = b"\0" * len(data)
    elif bad == "garbage":
        data = np.random.default_rng(0).bytes(len(data))
    path.write_bytes(bytes(data))
    if bad == "rows":
        with_value(path, "Rows", 10)
    reports, _ = inspect_dataset(tmp_path / "train")
    (r,) = reports
    # A header-level failure drops that file only (its series keeps 4 slices and, brighter,
    # wins); a decode failure of the chosen slice moves the choice to the other series.
    want = good.uid if bad == "rle_panic" else broken.uid
    assert r["t2_sagittal"]["series_uid"] == want
    assert r["t2_sagittal"]["instance_uid"] != broken.middle
    assert r["n_readable"] == 9  # of 10 files: the broken one is never counted as readable
    assert r["n_undecodable"] == (1 if bad == "rle_panic" else 0)
    assert sum(str(path) in p for p in r["problems"]) == 1, r["problems"]
    cache = build_cache(
        tmp_path / "train", CacheSettings(image_size=16), tmp_path / "c", progress=False
    )
    assert len(cache) == 1 and cache.records[0]["series_uid"] == want
    assert np.isfinite(np.asarray(cache.images, np.float32)).all()
    assert sum(str(path) in p for p in cache.problems) == 1, cache.problems


@pytest.mark.timeout(60)
def test_folder_shapes_are_reported_in_table_and_json(tmp_path, capsys):
    root = tmp_path / "train"
    _t2(StudyWriter(root / "study1", seed=1))
    (root / "study2").mkdir()  # empty study folder
    (root / "study3").mkdir()
    (root / "study3" / "notes.txt").write_text("not dicom")
    odd = root / "study4"
    _t2(StudyWriter(odd, seed=4))
    weird = odd / "bad\nname.dcm"
    weird.write_bytes(b"\0" * 200)
    loose = root / "stray_slice.dcm"
    base_slice(loose)
    assert main([str(root), "--json"]) == 0
    obj = json.loads(capsys.readouterr().out)
    by_name = {r["study"]: r for r in obj["studies"]}
    assert set(by_name) == {"study1", "study2", "study3", "study4"}
    assert by_name["study2"]["n_files"] == 0
    assert any("no DICOM files in this folder" in p for p in by_name["study2"]["problems"])
    assert any(
        "1 files lie directly in" in p and "stray_slice.dcm" in p for p in obj["problems"]
    ), obj["problems"]
    assert any("bad\\nname.dcm" in p for p in by_name["study4"]["problems"])
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    block = out.split("\nproblems\n", 1)[1].splitlines()
    assert all(line.startswith("  ") for line in block)  # one row per problem, none broken
    assert "stray_slice.dcm" in out and "study2: no DICOM files" in out


@pytest.mark.timeout(60)
def test_fallback_is_shown_as_fallback(tmp_path, capsys):
    w = StudyWriter(tmp_path / "train" / "study1", seed=5)
    w.series("t1", "T1_TSE_SAG", n=5)
    assert main([str(tmp_path / "train"), "--json"]) == 0
    (r,) = json.loads(capsys.readouterr().out)["studies"]
    assert r["t2_sagittal"]["weighting"] == "T1" and r["t2_sagittal"]["fallback"]
    assert any("as a fallback" in p for p in r["problems"])
    assert main([str(tmp_path / "train")]) == 0
    assert "[fallback T1]" in capsys.readouterr().out


@pytest.mark.timeout(60)
def test_missing_spacing_study_is_left_out_of_the_cache(tmp_path):
    root = tmp_path / "train"
    _t2(StudyWriter(root / "study1", seed=1))
    _t2(StudyWriter(root / "study2", seed=2), spacing=None)
    cache = build_cache(root, CacheSettings(image_size=16), tmp_path / "c", progress=False)
    assert [r["study"] for r in cache.records] == ["study1"]
    assert any(
        p.startswith("study2: study left out") and "PixelSpacing missing" in p
        for p in cache.problems
    ), cache.problems
    reports, _ = inspect_dataset(root)
    assert reports[1]["t2_sagittal"]["pixel_spacing"] is None
    assert "-" in format_table(reports, [])


def test_index_dataset_problems_attribute(tmp_path):
    root = tmp_path / "train"
    _t2(StudyWriter(root / "study1", seed=1))
    write_slice(root / "x.dcm", pixels(), study_uid="1", series_uid="2", description="T2",
                orientation=SAGITTAL)  # fmt: skip
    studies = index_dataset(root)
    assert len(studies) == 1 and len(studies.problems) == 1


@pytest.mark.timeout(60)
def test_threaded_indexing_keeps_each_warning_with_its_file(tmp_path, capfd):
    """Header threads collect warnings per file (catch_warnings would mix them up)."""
    study = tmp_path / "s"
    _t2(StudyWriter(study, seed=3))
    warned = [study / f"w{i}.dcm" for i in range(6)]
    for p in warned:
        shutil.copy(get_testdata_file("SC_rgb_jpeg.dcm"), p)
    (one,) = index_dataset(study, workers=4)
    lines = [p for p in one.problems if "pydicom warning" in p]
    assert sorted(line.split(": pydicom warning")[0] for line in lines) == sorted(map(str, warned))
    assert capfd.readouterr().err == ""


@pytest.mark.timeout(60)
def test_inspect_with_one_bundled_file_per_study(tmp_path, capsys):
    """Each pydicom test file as its own study: every study is listed; a study either shows a
    decoded slice or says why it has none."""
    root = tmp_path / "real"
    for i, f in enumerate(REAL_FILES):
        (root / f"study{i:03d}").mkdir(parents=True)
        shutil.copy(f, root / f"study{i:03d}" / Path(f).name)
    assert main([str(root), "--json"]) == 0
    captured = capsys.readouterr()
    obj = json.loads(captured.out)
    # Many test files share a StudyInstanceUID: a dataset problem, in the JSON and on stderr.
    assert obj["problems"] and all("appears in" in p for p in obj["problems"])
    assert captured.err.splitlines() == [f"lit-spine inspect: {p}" for p in obj["problems"]]
    studies = obj["studies"]
    assert len(studies) == len(REAL_FILES)
    for r in studies:
        assert r["n_files"] == 1
        if r["t2_sagittal"] is None:
            assert r["problems"], r["study"]
        else:
            assert r["n_readable"] == 1 and r["n_undecodable"] == 0
