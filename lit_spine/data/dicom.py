"""DICOM study reading: index headers without pixels, group series, choose the annotated slice.

A dataset root holds one folder per study (``<root>/<split>/study<N>/*.dcm``, all series
mixed, file names arbitrary; see ``spec/data-format.md``). Reading happens in two steps:

1. `index_dataset` reads only the header tags listed in `HEADER_TAGS` of every file
   (``stop_before_pixels``), groups slices by study and series, classifies each series'
   plane (from ImageOrientationPatient) and weighting (from SeriesDescription), and orders
   slices along the series normal. Unreadable, truncated or non-image files are skipped and
   reported in the study's ``problems``; nothing here raises for one bad file.
2. `choose_slice` picks the slice to use: the annotation's instance when it names one that
   exists, else the series-map series, else the T2 sagittal series (highest mean intensity
   among sagittal T2 series, which rejects the fat-suppressed variant) and its middle frame
   ``(n - 1) // 2``. Only the middle slice of each competing series is decoded, once, through
   a `PixelReader`, which later hands the same array to the cache builder.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError
from tqdm.auto import tqdm

from lit_spine.data.annotation import StudyAnnotation

HEADER_TAGS: tuple[str, ...] = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SeriesDescription",
    "PixelSpacing",
    "ImagerPixelSpacing",
    "ImagePositionPatient",
    "ImageOrientationPatient",
    "InstanceNumber",
    "PhotometricInterpretation",
    "Rows",
    "Columns",
    "BitsAllocated",
    "SamplesPerPixel",
    "NumberOfFrames",
)
# Files with these suffixes are never DICOM; everything else is tried (exports often have none).
# fmt: off
NOT_DICOM_SUFFIXES = frozenset({
    ".json", ".txt", ".md", ".csv", ".png", ".jpg", ".jpeg", ".npy",
    ".xml", ".html", ".pdf", ".zip", ".gz", ".py", ".yaml", ".yml",
})
# fmt: on
PLANE_THRESHOLD = 0.75  # |normal component| above this names the plane (spec)
DEFAULT_SPACING_MM = (1.0, 1.0)


class DatasetError(ValueError):
    """A dataset folder cannot be used at all (missing, empty, no DICOM files)."""


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
    spacing_mm: tuple[float, float]  # (row spacing, column spacing)
    spacing_source: str  # "PixelSpacing", "ImagerPixelSpacing" or "default"
    position: tuple[float, float, float] | None
    orientation: tuple[float, float, float, float, float, float] | None
    instance_number: int | None
    photometric: str

    @property
    def normal(self) -> np.ndarray | None:
        """Unit slice normal: cross product of the row and column direction cosines."""
        if self.orientation is None:
            return None
        n = np.cross(self.orientation[:3], self.orientation[3:])
        norm = float(np.linalg.norm(n))
        return n / norm if norm > 1e-6 else None


def _floats(value: object, n: int) -> tuple[float, ...] | None:
    """`n` finite floats from a multi-valued DICOM element, or None when odd or missing."""
    if value is None:
        return None
    try:
        items = list(value) if not isinstance(value, (str, bytes, int, float)) else [value]
        out = tuple(float(v) for v in items)
    except (TypeError, ValueError):
        return None
    if len(out) != n or not all(math.isfinite(v) for v in out):
        return None
    return out


def _spacing(ds: pydicom.Dataset) -> tuple[tuple[float, float], str]:
    for key in ("PixelSpacing", "ImagerPixelSpacing"):
        value = ds.get(key)
        pair = _floats(value, 2) or _floats(value, 1)
        if pair is not None:
            pair = (pair[0], pair[-1])
            if all(v > 0 for v in pair):
                return (pair[0], pair[1]), key
    return DEFAULT_SPACING_MM, "default"


def _expected_pixel_bytes(ds: pydicom.Dataset) -> int | None:
    """Byte length of uncompressed pixel data, or None for compressed transfer syntaxes."""
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if ts is not None and ts.is_compressed:
        return None
    bits = int(ds.get("BitsAllocated") or 16)
    frames = int(ds.get("NumberOfFrames") or 1)
    samples = int(ds.get("SamplesPerPixel") or 1)
    return int(ds.Rows) * int(ds.Columns) * frames * samples * max(bits, 8) // 8


def read_header(path: str | os.PathLike) -> SliceHeader:
    """Read one file's header without pixel data; raises ValueError with the reason if unusable."""
    path = str(path)
    size = os.path.getsize(path)
    if size < 132:
        raise ValueError(f"file is only {size} bytes")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS))
    except InvalidDicomError:
        # No 128-byte preamble + "DICM": older exports; parse anyway and judge by the tags found.
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=list(HEADER_TAGS), force=True
        )
    missing = [
        k
        for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Rows", "Columns")
        if not ds.get(k)
    ]
    if missing:
        raise ValueError(f"not a DICOM image (no {', '.join(missing)})")
    expected = _expected_pixel_bytes(ds)
    if expected is not None and size < expected:
        raise ValueError(f"truncated: {size} bytes, pixel data alone needs {expected}")
    spacing, spacing_source = _spacing(ds)
    position = _floats(ds.get("ImagePositionPatient"), 3)
    orientation = _floats(ds.get("ImageOrientationPatient"), 6)
    try:
        instance_number = int(ds.get("InstanceNumber"))
    except (TypeError, ValueError):
        instance_number = None
    return SliceHeader(
        path=path,
        study_uid=str(ds.StudyInstanceUID).strip(),
        series_uid=str(ds.SeriesInstanceUID).strip(),
        instance_uid=str(ds.SOPInstanceUID).strip(),
        description=str(ds.get("SeriesDescription") or "").strip(),
        rows=int(ds.Rows),
        cols=int(ds.Columns),
        spacing_mm=spacing,
        spacing_source=spacing_source,
        position=position,  # type: ignore[arg-type]
        orientation=orientation,  # type: ignore[arg-type]
        instance_number=instance_number,
        photometric=str(ds.get("PhotometricInterpretation") or "MONOCHROME2").strip().upper(),
    )


def _read_header_safe(path: str) -> SliceHeader | str:
    """`read_header`, with any failure turned into a one-line reason (never raises)."""
    try:
        return read_header(path)
    except Exception as err:  # noqa: BLE001 - one bad file must never stop the run
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return reason[:200]


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


def _plane_from_description(description: str) -> str:
    text = description.upper()
    for key, plane in (("SAG", "sagittal"), ("AX", "axial"), ("TRA", "axial"), ("COR", "coronal")):
        if key in text:
            return plane
    return "unknown"


@dataclass
class Series:
    """One series of a study, slices ordered along the normal (top-to-bottom channel order)."""

    uid: str
    description: str
    plane: str
    weighting: str
    slices: list[SliceHeader]

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


def _build_series(uid: str, slices: list[SliceHeader], problems: list[str]) -> Series:
    description = Counter(s.description for s in slices).most_common(1)[0][0]
    normals = [s.normal for s in slices]
    planes = [classify_plane(n) for n in normals]
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
    return Series(uid, description, plane, classify_weighting(description), slices)


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
            problems.append(f"skipped {path}: {res}")
        elif res.instance_uid in seen:
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
        problems.append("no readable DICOM image in this folder")
    by_series: dict[str, list[SliceHeader]] = {}
    for h in headers:
        by_series.setdefault(h.series_uid, []).append(h)
    series = [_build_series(uid, sl, problems) for uid, sl in by_series.items()]
    series.sort(key=lambda s: (s.description, s.uid))
    for s in series:
        if s.plane == "sagittal" and any(h.spacing_source != "PixelSpacing" for h in s.slices):
            src = Counter(h.spacing_source for h in s.slices if h.spacing_source != "PixelSpacing")
            problems.append(
                f"series {s.uid} ({s.description!r}): PixelSpacing missing or invalid; using "
                + (
                    "ImagerPixelSpacing"
                    if "ImagerPixelSpacing" in src
                    else f"{DEFAULT_SPACING_MM[0]} mm (distances in mm will be wrong)"
                )
            )
    return Study(
        folder, study_uid, series, n_files=len(results), n_readable=len(headers), problems=problems
    )


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
        with ThreadPoolExecutor(workers) as pool:
            headers = []
            for h in pool.map(_read_header_safe, map(str, files)):
                headers.append(h)
                bar.update()
            return list(zip(files, headers))


def index_dataset(
    root: str | os.PathLike, workers: int | None = None, progress: bool = False
) -> list[Study]:
    """Index every study folder under `root` (headers only).

    Raises DatasetError for a missing path or a folder without any candidate file; per-file
    and per-study trouble goes into each `Study.problems`. `progress` shows a bar on a terminal.
    """
    root = Path(root)
    folders = study_folders(root)
    files_by_folder = [(f, _candidate_files(f)) for f in folders]
    files_by_folder = [(f, files) for f, files in files_by_folder if files]
    if not files_by_folder:
        raise DatasetError(
            f"{root}: no DICOM files found. Expected <root>/<split>/study<N>/*.dcm "
            "(one folder per study) or a single study folder."
        )
    all_files = [p for _, files in files_by_folder for p in files]
    workers = DEFAULT_WORKERS if workers is None else workers
    results = dict(_read_all(all_files, workers, progress))
    return [_group_study(f, [(p, results[p]) for p in files]) for f, files in files_by_folder]


# ----------------------------------------------------------------------------- pixels


def decode_pixels(path: str | os.PathLike) -> np.ndarray:
    """Decode one slice to float32 (rows, cols): modality rescale applied, MONOCHROME1 inverted.

    Any transfer syntax with an installed pydicom decoder plugin works. Raises on failure.
    """
    ds = pydicom.dcmread(str(path), force=True)
    arr = ds.pixel_array
    samples = int(ds.get("SamplesPerPixel") or 1)
    if samples > 1:  # colour: luminance-ish mean of the channels
        arr = arr.mean(axis=-1)
    if arr.ndim == 3:  # multi-frame: the middle frame stands for the file
        arr = arr[(arr.shape[0] - 1) // 2]
    if arr.ndim != 2:
        raise ValueError(f"unexpected pixel array shape {arr.shape}")
    out = arr.astype(np.float32)
    if str(ds.get("PhotometricInterpretation", "")).strip().upper() == "MONOCHROME1":
        # Invert across the stored bit range so values stay comparable with MONOCHROME2 series.
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 16)
        if int(ds.get("PixelRepresentation") or 0) == 1:
            out = -out
        else:
            out = float((1 << bits) - 1) - out
    slope = ds.get("RescaleSlope")
    intercept = ds.get("RescaleIntercept")
    if slope is not None or intercept is not None:
        with contextlib.suppress(TypeError, ValueError):  # odd values: keep stored values
            out = out * float(slope if slope is not None else 1.0) + float(intercept or 0.0)
    return out


class PixelReader:
    """Decodes slices on demand and keeps each result, so that no file is decoded twice.

    `decoded` counts real decodes (tests and benchmarks use it); `forget()` drops the kept
    arrays once a study is done.
    """

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}
        self.decoded = 0

    def __call__(self, header: SliceHeader) -> np.ndarray:
        arr = self._arrays.get(header.path)
        if arr is None:
            arr = decode_pixels(header.path)
            self.decoded += 1
            self._arrays[header.path] = arr
        return arr

    def forget(self) -> None:
        self._arrays.clear()


# ----------------------------------------------------------------------------- choice


@dataclass(frozen=True)
class SliceChoice:
    """The slice of a study the suite uses, and why ('annotation', 'series_map' or 'auto')."""

    series: Series
    index: int
    source: str

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


def t2_sagittal_series(
    study: Study, reader: PixelReader | None = None, problems: list[str] | None = None
) -> Series | None:
    """The T2 sagittal series: highest mean intensity (of the middle slice) among sagittal T2
    series, else among any sagittal series; None when the study has no sagittal series.

    Only when several series compete is anything decoded: the middle slice of each.
    """
    sagittal = [s for s in study.series if s.plane == "sagittal" and s.n_slices > 0]
    candidates = [s for s in sagittal if s.weighting == "T2"] or sagittal
    if not candidates:
        return None
    if len(candidates) == 1:
        return candidates[0]
    reader = reader or PixelReader()
    best, best_mean = None, -math.inf
    for s in candidates:
        try:
            mean = float(reader(s.slices[s.middle_index]).mean())
        except Exception as err:  # noqa: BLE001
            if problems is not None:
                problems.append(f"skipped {s.slices[s.middle_index].path}: cannot decode: {err}")
            continue
        if mean > best_mean:
            best, best_mean = s, mean
    return best


def auto_choice(
    study: Study, reader: PixelReader | None = None, problems: list[str] | None = None
) -> SliceChoice | None:
    """The automatic choice: middle frame of the T2 sagittal series."""
    series = t2_sagittal_series(study, reader, problems)
    return SliceChoice(series, series.middle_index, "auto") if series is not None else None


def _describe_series(study: Study) -> str:
    if not study.series:
        return "none"
    return "; ".join(
        f"{s.description or '<no description>'} ({s.plane}, {s.weighting}, {s.n_slices} slices)"
        for s in study.series
    )


def choose_slice(
    study: Study,
    annotation: StudyAnnotation | None = None,
    series_uid: str | None = None,
    reader: PixelReader | None = None,
    compare_auto: bool = False,
) -> tuple[SliceChoice | None, SliceChoice | None, list[str]]:
    """Pick the slice to use: (choice, automatic choice or None if not computed, problems).

    An annotation naming an existing instance wins, then a series map's `series_uid` (middle
    frame), then the automatic choice. With `compare_auto` the automatic choice is always
    computed and a disagreement with the annotation is reported.
    """
    problems: list[str] = []
    auto: SliceChoice | None = None
    auto_done = False

    def get_auto() -> SliceChoice | None:
        nonlocal auto, auto_done
        if not auto_done:
            auto, auto_done = auto_choice(study, reader, problems), True
        return auto

    choice: SliceChoice | None = None
    if annotation is not None and annotation.instance_uid:
        found = study.find_instance(annotation.instance_uid)
        if found is not None:
            choice = SliceChoice(found[0], found[1], "annotation")
            if annotation.series_uid and annotation.series_uid != found[0].uid:
                problems.append(
                    f"annotation names series {annotation.series_uid} but instance "
                    f"{annotation.instance_uid} belongs to series {found[0].uid}; using the instance"
                )
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
    if choice is None and series_uid:
        series = study.get_series(series_uid)
        if series is not None and series.n_slices:
            choice = SliceChoice(series, series.middle_index, "series_map")
        else:
            problems.append(
                f"series map names series {series_uid}, not in this study folder; "
                "using the automatic choice"
            )
    if compare_auto or choice is None:
        get_auto()
    if choice is None:
        choice = auto
        if choice is None:
            problems.append(
                f"no T2 sagittal series (nor any sagittal series); series found: "
                f"{_describe_series(study)}"
            )
    elif (
        compare_auto
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


def read_spacing_for_instances(
    root: str | os.PathLike, workers: int | None = None
) -> dict[str, tuple[float, float]]:
    """{SOPInstanceUID: (row_mm, col_mm)} for every readable image under `root` (headers only).

    For `lit-spine evaluate`, which scores distances in mm on the annotated instances.
    """
    return {
        h.instance_uid: h.spacing_mm
        for study in index_dataset(root, workers)
        for series in study.series
        for h in series.slices
    }
