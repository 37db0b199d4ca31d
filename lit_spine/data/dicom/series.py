"""Grouping slices into series and studies: plane, weighting, localizers, slice order.

`index_dataset` / `index_study` read every file of a dataset root through `read_header`
(threads when asked), group slices by study and series, classify each series' plane
(ImageOrientationPatient) and weighting (SeriesDescription, else EchoTime/RepetitionTime),
flag localizers and order slices along the series normal. Unreadable files are skipped and
reported in the study's ``problems``; nothing here raises for one bad file.
`instance_spacing` maps every instance to its validated spacing (for scoring in mm).
"""

from __future__ import annotations

import os
import re
from collections import Counter
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lit_spine.data.dicom.header import SliceHeader, _read_header_safe, _routed_warnings
from lit_spine.data.dicom.limits import (
    LOCALIZER_WORDS,
    MIN_MATRIX_PX,
    NOT_DICOM_SUFFIXES,
    PLANE_THRESHOLD,
    T1_MAX_ECHO_MS,
    T1_MAX_REPETITION_MS,
    T2_MIN_ECHO_MS,
    T2_MIN_REPETITION_MS,
    DatasetError,
)
from lit_spine.data.dicom.side_files import find_annotation, find_series_map
from lit_spine.utils import one_line


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
    unreadable: dict[str, str] = field(default_factory=dict)  # path -> why it was skipped

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
    unreadable: dict[str, str] = {}
    for path, res in results:
        if isinstance(res, str):
            problems.append(f"skipped {one_line(path)}: {res}")
            unreadable[str(path)] = res
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
        folder, study_uid, series, len(results), len(headers), problems, unreadable
    )  # fmt: skip


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
