"""Reader for the SPIDER lumbar-spine MRI layout (`spider`; van der Graaf et al. 2024).

The Zenodo record publishes (docs/datasets.md, "SPIDER"):

    images/<patient>_<series>.mha   sagittal MRI volume, series t1, t2 or t2_SPACE
    masks/<patient>_<series>.mha    label volume on the same grid: 1-25 vertebrae numbered
                                    from the bottom (1 = L5), 100 spinal canal, 101-125
                                    partially visible vertebrae, 201-225 discs numbered from
                                    the bottom (201 = L5/S1, the disc below vertebra 1)
    radiological_gradings.csv       one row per patient and disc: Patient, IVD label (1 =
                                    L5/S1, the disc of mask label 201), Modic, UP endplate,
                                    LOW endplate, Spondylolisthesis, Disc herniation,
                                    Disc narrowing, Disc bulging, Pfirrman grade
    overview.csv                    per-series acquisition data (optional here; not used)

`read_spider` gives one `SpiderStudy` per patient with a readable T2 series: each vertebra
and disc label present on the mid-sagittal slice becomes a point at its centroid (pixels
and mm, from the MHA header's spacing; a header without ElementSpacing is refused, never
given a default), and each point its labels in the task's vocabulary: for `spider_disc`
the disc's Pfirrmann grade, for `spider_spine` the disc's findings (`finding_codes`: Modic
change, herniation, bulging, narrowing, else normal) and the one class 'vertebra' of a
vertebra (docs/datasets.md, "The findings task"). A level absent from that slice, a
bad file and a bad CSV row are reported (file, patient, column) and skipped, never
invented. Volumes are reoriented to one axis order with SimpleITK (`DICOMOrient`, "PIR":
columns posterior, rows inferior, slices to the patient's right), because SPIDER stores
the 2-D TSE series and the 3-D SPACE series with different axis orders.

Hand-written here (no library does it): reading the MetaImage text header to check that it
states ElementSpacing, since ITK silently assumes 1 mm when the key is missing, and that
NDims, DimSize, ElementSpacing and the pixel data's length agree, so that a bad or
truncated file is reported in one line naming it and the key (`_checked_header`) rather
than by ITK's multi-line exception, and by `inspect` rather than first by the cache build.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lit_spine.task import PFIRRMANN_GRADES, Task, get_task
from lit_spine.utils import one_line, parse_int

IMAGES_DIR = "images"
MASKS_DIR = "masks"
GRADINGS_CSV = "radiological_gradings.csv"
OVERVIEW_CSV = "overview.csv"
GRADING_COLUMNS = (
    "Patient",
    "IVD label",
    "Modic",
    "UP endplate",
    "LOW endplate",
    "Spondylolisthesis",
    "Disc herniation",
    "Disc narrowing",
    "Disc bulging",
    "Pfirrman grade",
)
# Allowed values of the other gradings (docs/datasets.md): Modic type 0-3, the rest binary.
OTHER_GRADINGS = {c: (0, 1) for c in GRADING_COLUMNS[3:9]} | {"Modic": (0, 1, 2, 3)}
SERIES = ("t1", "t2", "t2_SPACE")
T2_SERIES = ("t2", "t2_SPACE")  # the task's series, in order of preference
NAME_RE = re.compile(r"^(\d+)_(t1|t2|t2_SPACE)\.mha$")
ORIENTATION = "PIR"  # DICOM convention: axis 0 -> posterior, 1 -> inferior, 2 -> right
CANAL_LABEL = 100
VERTEBRA_LABELS = range(1, 26)
PARTIAL_VERTEBRA_LABELS = range(101, 126)
DISC_LABELS = range(201, 226)
# The tasks this reader feeds (docs/datasets.md, "SPIDER").
SPIDER_TASKS = ("spider_disc", "spider_spine")
# spider_findings disc code -> (gradings column, the values that mean the finding is there).
# Modic is 0 (none) or the Modic type 1-3; the other three are binary (0 absent, 1 present).
FINDING_COLUMNS: dict[str, tuple[str, tuple[int, ...]]] = {
    "v2": ("Modic", (1, 2, 3)),
    "v3": ("Disc herniation", (1,)),
    "v4": ("Disc bulging", (1,)),
    "v5": ("Disc narrowing", (1,)),
}
# Vertebra k counted from the bottom (1 = L5), as far as the lumbar and thoracic names go.
_NAMES = ("L5", "L4", "L3", "L2", "L1", *(f"T{n}" for n in range(12, 0, -1)))


class SpiderFormatError(ValueError):
    """A file of the layout is missing or lacks required columns."""


def vertebra_name(k: int) -> str:
    """Name of vertebra label k (1 = L5, 5 = L1, 6 = T12); beyond T1: 'vertebra k'."""
    return _NAMES[k - 1] if 1 <= k <= len(_NAMES) else f"vertebra {k}"


def disc_name(k: int) -> str:
    """Name of disc label 200 + k, the disc below vertebra k: 1 -> 'L5/S1', 2 -> 'L4/L5'."""
    below = "S1" if k == 1 else vertebra_name(k - 1)
    return f"{vertebra_name(k)}/{below}"


DISC_LABEL_OF = {disc_name(k): 200 + k for k in range(1, 26)}  # 'L5/S1' -> 201
LABEL_OF = DISC_LABEL_OF | {vertebra_name(k): k for k in range(1, 26)}  # also 'L5' -> 1


def finding_codes(values: dict[str, int]) -> tuple[str, ...] | None:
    """The `spider_findings` disc codes of one gradings row's valid values: every finding
    whose column says it is there (Modic 1-3, herniation / bulging / narrowing 1), or
    ('v1',) normal when none is. None when one of the four columns has no valid value: the
    disc's label set is then unknown (a missing finding is not taken as absent)."""
    if any(column not in values for column, _ in FINDING_COLUMNS.values()):
        return None
    found = tuple(c for c, (column, yes) in FINDING_COLUMNS.items() if values[column] in yes)
    return found or ("v1",)


def label_level(value: int) -> tuple[str, str] | None:
    """(kind, level name) of a mask label value: 1 -> ('vertebra', 'L5'), 201 ->
    ('disc', 'L5/S1'), 100 -> ('canal', 'canal'), 103 -> ('partial vertebra', 'L3');
    None for 0 and for values the dataset does not document."""
    if value in VERTEBRA_LABELS:
        return "vertebra", vertebra_name(value)
    if value in DISC_LABELS:
        return "disc", disc_name(value - 200)
    if value == CANAL_LABEL:
        return "canal", "canal"
    if value in PARTIAL_VERTEBRA_LABELS:
        return "partial vertebra", vertebra_name(value - 100)
    return None


@dataclass
class SpiderPoint:
    """A structure's centroid on the mid-sagittal slice: pixel (x = column, y = row) and mm."""

    level: str
    label: int
    x: float
    y: float
    x_mm: float
    y_mm: float


@dataclass
class SpiderStudy:
    patient: int
    series: str  # 't2' or 't2_SPACE'
    image_path: Path
    mask_path: Path
    slice_index: int  # the mid-sagittal slice, after reorientation to ORIENTATION
    n_slices: int
    shape: tuple[int, int]  # (rows, cols) of a sagittal slice
    spacing_mm: tuple[float, float, float]  # (row, col, slice)
    points: dict[str, SpiderPoint] = field(default_factory=dict)  # vertebrae and discs
    grades: dict[str, int] = field(default_factory=dict)  # disc level -> index of its grade
    labels: dict[str, tuple[str, ...]] = field(default_factory=dict)  # point -> task codes
    gradings: dict[str, dict[str, int]] = field(default_factory=dict)  # disc -> other columns


@dataclass
class SpiderDataset:
    root: Path
    task: Task
    studies: list[SpiderStudy]
    problems: list[str]
    series_found: int = 0
    overview_rows: int | None = None

    def summary(self) -> dict:
        """Counts for `lit-spine inspect`: series, studies, points, grades, problems."""
        levels = set(self.task.point_names)
        return {
            "format": "spider",
            "task": self.task.name,
            "series": self.task.series,
            "series_files": self.series_found,
            "overview_rows": self.overview_rows,
            "studies": len(self.studies),
            "points": sum(len(levels & set(s.points)) for s in self.studies),
            "grades": sum(len(s.grades) for s in self.studies),
            "labelled_points": sum(len(s.labels) for s in self.studies),
            "problems": list(self.problems),
        }


# ------------------------------------------------------------------------------- volumes
# Bytes per value of the MetaImage element types (MET_LONG is 4 in MetaIO, at least 4
# anywhere: a lower bound never calls a complete file truncated).
ELEMENT_BYTES = {"MET_CHAR": 1, "MET_UCHAR": 1, "MET_SHORT": 2, "MET_USHORT": 2, "MET_INT": 4,
                 "MET_UINT": 4, "MET_LONG": 4, "MET_ULONG": 4, "MET_LONG_LONG": 8,
                 "MET_ULONG_LONG": 8, "MET_FLOAT": 4, "MET_DOUBLE": 8}  # fmt: skip


def _parse_header(f) -> dict[str, str]:
    out: dict[str, str] = {}
    for _ in range(64):
        line = f.readline(4096)
        if not line:
            break
        key, sep, value = line.decode("latin-1").partition("=")
        if not sep:
            break
        out[key.strip()] = value.strip()
        if key.strip() == "ElementDataFile":
            break
    return out


def mha_header(path: Path) -> dict[str, str]:
    """The MetaImage text header (key = value lines up to ElementDataFile)."""
    with open(path, "rb") as f:
        return _parse_header(f)


def _numbers(path: Path, header: dict[str, str], key: str, n: int, kind=float) -> list:
    """The n positive finite values of a header key, else ValueError naming file, key, value."""
    text = header.get(key, "")
    try:
        values = [kind(v) for v in text.split()]
    except ValueError:
        values = []
    if len(text.split()) != n:
        raise ValueError(f"{path}: {key} {one_line(text, 80)!r} has {len(text.split())} "
                         f"values for NDims {n}")  # fmt: skip
    if len(values) != n or not all(math.isfinite(v) and v > 0 for v in values):
        what = "integers" if kind is int else "finite numbers"
        raise ValueError(f"{path}: {key} {one_line(text, 80)!r} is not {n} positive {what}")
    return values


def _checked_header(path: Path) -> dict[str, str]:
    """The header, checked before ITK sees the file (ITK's own messages are multi-line and
    often name a stale errno): readable, NDims 3, DimSize and ElementSpacing with 3 positive
    values each, and, for pixel data stored in the file (LOCAL), at least as many bytes after
    the header as it states (CompressedDataSize, or DimSize x channels x element size), so
    `read_spider` and `inspect` report a truncated volume. Damage inside compressed data
    that keeps the size, and a separate data file, are found only when the volume is read
    (the mask here, the image by the cache build)."""
    try:
        with open(path, "rb") as f:
            header = _parse_header(f)
            have = os.fstat(f.fileno()).st_size - f.tell()
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err})") from err
    if header.get("NDims") != "3":
        ndims = one_line(header.get("NDims", "(none)"), 80)
        raise ValueError(f"{path}: NDims {ndims!r} in the MetaImage header; expected a 3-D "
                         "volume (NDims = 3)")  # fmt: skip
    if "ElementSpacing" not in header:
        raise ValueError(
            f"{path}: the MetaImage header has no ElementSpacing, so no distance in mm can "
            "be computed (no default spacing is assumed)"
        )
    size = _numbers(path, header, "DimSize", 3, int)
    _numbers(path, header, "ElementSpacing", 3)
    if header.get("ElementDataFile") != "LOCAL" or header.get("BinaryData") == "False":
        return header
    if header.get("CompressedData") == "True":
        need, what = parse_int(header.get("CompressedDataSize", "")), "CompressedDataSize"
    else:
        channels = parse_int(header.get("ElementNumberOfChannels", "1")) or 1
        item = ELEMENT_BYTES.get(header.get("ElementType", ""))
        need = item and math.prod(size) * channels * item
        what = f"DimSize x {header.get('ElementType')}"
    if need and have < need:
        raise ValueError(f"{path}: pixel data has {have} bytes, the header's {what} needs "
                         f"{need}; the file is truncated")  # fmt: skip
    return header


def _itk_error(path: Path, err: RuntimeError) -> ValueError:
    """ITK's multi-line exception as one line naming the file: its text after the last
    'ITK ERROR:' / 'sitk::ERROR:' (the source-file location before it says nothing here)."""
    text = re.split(r"(?:ITK|sitk::)ERROR:", " ".join(str(err).split()))[-1]
    return ValueError(f"{path}: not a readable MetaImage ({one_line(text.strip(), 200)})")


def read_volume(path: Path):
    """Read an .mha volume reoriented to ORIENTATION: (array (slices, rows, cols), spacing
    (row, col, slice) mm, the SimpleITK image). Raises ValueError naming the file."""
    import SimpleITK as sitk

    header = _checked_header(path)
    try:
        image = sitk.ReadImage(str(path))
    except RuntimeError as err:
        raise _itk_error(path, err) from err
    if image.GetDimension() != 3:
        raise ValueError(f"{path}: {image.GetDimension()}-D image, expected a 3-D volume")
    image = sitk.DICOMOrient(image, ORIENTATION)
    col_mm, row_mm, slice_mm = image.GetSpacing()
    spacing = (float(row_mm), float(col_mm), float(slice_mm))
    if not all(math.isfinite(v) and v > 0 for v in spacing):
        raise ValueError(f"{path}: ElementSpacing {header['ElementSpacing']!r} is not positive")
    return sitk.GetArrayFromImage(image), spacing, image


def _same_grid(a, b) -> bool:
    return (
        a.GetDimension() == b.GetDimension() == 3
        and tuple(a.GetSize()) == tuple(b.GetSize())
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-4, atol=1e-5)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), atol=1e-3)
        and np.allclose(a.GetDirection(), b.GetDirection(), atol=1e-4)
    )


def mask_points(
    mask_slice: np.ndarray, spacing: tuple[float, float]
) -> tuple[dict[str, SpiderPoint], list[int]]:
    """Centroid of every vertebra (1-25) and disc (201-225) label on one slice, by level
    name; also the undocumented label values found (ignored). `spacing` = (row, col) mm."""
    from scipy import ndimage

    values = [int(v) for v in np.unique(mask_slice) if v != 0]
    unknown = [v for v in values if label_level(v) is None]
    wanted = [v for v in values if v in VERTEBRA_LABELS or v in DISC_LABELS]
    centres = ndimage.center_of_mass(np.ones(mask_slice.shape), mask_slice, wanted)
    points = {}
    for value, (row, col) in zip(wanted, centres):
        level = label_level(value)[1]
        points[level] = SpiderPoint(
            level, value, float(col), float(row), float(col) * spacing[1], float(row) * spacing[0]
        )
    return points, unknown


# ------------------------------------------------------------------------------- gradings
def read_gradings(path: Path, problems: list[str]) -> dict[int, dict[int, dict[str, int]]]:
    """patient -> IVD label -> {column: value} of the valid rows; bad rows are reported."""
    if not path.is_file():
        raise SpiderFormatError(
            f"{path}: file not found; a spider root holds {IMAGES_DIR}/, {MASKS_DIR}/ and "
            f"{GRADINGS_CSV} (docs/datasets.md)"
        )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in GRADING_COLUMNS if c not in frame.columns]
    if missing:
        raise SpiderFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}"
        )
    out: dict[int, dict[int, dict[str, int]]] = {}
    for row, rec in frame.iterrows():
        where = f"{path} row {row + 2}"
        patient, ivd = parse_int(rec["Patient"]), parse_int(rec["IVD label"])
        if patient is None:
            problems.append(f"{where}: column Patient {rec['Patient']!r} is not an integer; "
                            "row skipped")  # fmt: skip
            continue
        where += f" (patient {patient})"
        if ivd is None or ivd not in range(1, 26):
            problems.append(f"{where}: column IVD label {rec['IVD label']!r} is not an integer "
                            "1-25; row skipped")  # fmt: skip
            continue
        if ivd in out.get(patient, {}):
            problems.append(f"{where}: second row for IVD label {ivd}; the first is kept")
            continue
        values: dict[str, int] = {}
        grade = parse_int(rec["Pfirrman grade"])
        if grade in PFIRRMANN_GRADES:
            values["Pfirrman grade"] = grade
        else:
            problems.append(
                f"{where}: column Pfirrman grade {rec['Pfirrman grade']!r} is not one of "
                f"{', '.join(map(str, PFIRRMANN_GRADES))}; disc {disc_name(ivd)} has no grade"
            )
        for column, allowed in OTHER_GRADINGS.items():
            value = parse_int(rec[column])
            if value in allowed:
                values[column] = value
            else:
                problems.append(f"{where}: column {column} {rec[column]!r} is not one of "
                                f"{', '.join(map(str, allowed))}; left out")  # fmt: skip
        out.setdefault(patient, {})[ivd] = values
    return out


# ------------------------------------------------------------------------------- dataset
def _series_files(root: Path, problems: list[str]) -> tuple[dict[int, dict[str, Path]], int]:
    """patient -> series -> image file, and the number of series files. Two names of one
    patient's series (01_t2.mha, 1_t2.mha) are both left out: which one the gradings and
    the mask belong to is unknown."""
    folder = root / IMAGES_DIR
    if not folder.is_dir():
        raise SpiderFormatError(
            f"{folder}: folder not found; a spider root holds {IMAGES_DIR}/, {MASKS_DIR}/ and "
            f"{GRADINGS_CSV} (docs/datasets.md)"
        )
    found: dict[int, dict[str, list[Path]]] = {}
    for path in sorted(folder.iterdir()):
        match = NAME_RE.match(path.name)
        if not match:
            if not path.name.startswith("."):
                problems.append(f"{path}: name is not <patient>_<{'|'.join(SERIES)}>.mha; skipped")
            continue
        found.setdefault(int(match.group(1)), {}).setdefault(match.group(2), []).append(path)
    out: dict[int, dict[str, Path]] = {}
    for patient, series in found.items():
        out[patient] = {name: paths[0] for name, paths in series.items() if len(paths) == 1}
        for name, paths in series.items():
            if len(paths) > 1:
                problems.append(
                    f"patient {patient}: {' and '.join(map(str, paths))} are both its {name} "
                    "series; which one the gradings and mask belong to is unknown, series skipped"
                )
    return out, sum(len(paths) for series in found.values() for paths in series.values())


def read_study(
    patient: int, series: str, image_path: Path, mask_path: Path, spec: Task, problems: list[str]
) -> SpiderStudy | None:
    """One patient's T2 series: geometry checks and the mask points of the mid slice."""
    where = f"patient {patient} ({mask_path})"
    try:
        image_grid, mask_grid = _grid(image_path), _grid(mask_path)
        if not _same_grid(image_grid, mask_grid):
            problems.append(
                f"{where}: image {image_path.name} and mask are not on the same grid (size "
                f"{image_grid.GetSize()} / {mask_grid.GetSize()}, spacing, origin or "
                "direction differ); study skipped"
            )
            return None
        mask, spacing, _ = read_volume(mask_path)
    except (RuntimeError, ValueError) as err:
        problems.append(f"patient {patient}: {one_line(str(err).strip())}; study skipped")
        return None
    if np.issubdtype(mask.dtype, np.floating) and not np.array_equal(mask, np.round(mask)):
        problems.append(f"{where}: mask values are not integer labels; study skipped")
        return None
    mask = mask.astype(np.int64)
    present = {int(v) for v in np.unique(mask)}
    if not ({1, 101} & present):
        problems.append(
            f"{where}: no vertebra label 1 (or 101) anywhere in the mask, so the numbering "
            "from the bottom (1 = L5) cannot be anchored; study skipped rather than guessed"
        )
        return None
    n = mask.shape[0]
    k = (n - 1) // 2
    points, unknown = mask_points(mask[k], spacing[:2])
    if unknown:
        problems.append(f"{where}: undocumented label value(s) {unknown} ignored")
    for level in list(points):
        p = points[level]
        if p.label in DISC_LABELS and not ({p.label - 200, p.label - 100} & present):
            problems.append(
                f"{where}: disc label {p.label} ({level}) but no vertebra {p.label - 200} above "
                "it in the mask; the disc's level cannot be checked, point skipped"
            )
            del points[level]
    for level in spec.point_names:
        if level not in points:
            label = LABEL_OF[level]
            elsewhere = "present on other slices" if label in present else "absent from the mask"
            problems.append(
                f"{where}: {level} (label {label}) not on the mid-sagittal slice {k} of {n} "
                f"({elsewhere}); level not annotated"
            )
    rows, cols = mask.shape[1:]
    return SpiderStudy(patient, series, image_path, mask_path, k, n, (rows, cols), spacing, points)


def _grid(path: Path):
    """The stored grid of a volume file (size, spacing, origin, direction), read from its
    header only."""
    import SimpleITK as sitk

    _checked_header(path)
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        reader.ReadImageInformation()
    except RuntimeError as err:
        raise _itk_error(path, err) from err
    return reader


def read_spider(root: str | Path, task: str = "spider_disc") -> SpiderDataset:
    """Read the layout under `root` for `task`; every skipped item is listed in `problems`."""
    root = Path(root)
    spec = get_task(task)
    if spec.name not in SPIDER_TASKS:
        raise ValueError(f"task {task!r} has no spider reader; use {' or '.join(SPIDER_TASKS)}")
    problems: list[str] = []
    files, series_found = _series_files(root, problems)
    gradings = read_gradings(root / GRADINGS_CSV, problems)
    for patient in sorted(set(gradings) - set(files)):  # a volume renamed or not copied
        n = len(gradings[patient])
        problems.append(f"{root / GRADINGS_CSV} (patient {patient}): {n} graded disc(s) but "
                        f"no {IMAGES_DIR}/{patient}_<series>.mha; rows unused")  # fmt: skip
    overview_rows = None
    if (root / OVERVIEW_CSV).is_file():
        overview_rows = len(pd.read_csv(root / OVERVIEW_CSV, dtype=str, keep_default_na=False))
    studies: list[SpiderStudy] = []
    for patient, series in sorted(files.items()):
        if not series:
            continue  # each series had two files (reported)
        choice = next((s for s in T2_SERIES if s in series), None)
        if choice is None:
            problems.append(f"patient {patient}: no T2 series ({', '.join(sorted(series))} "
                            "only); patient skipped")  # fmt: skip
            continue
        if choice != T2_SERIES[0]:
            problems.append(f"patient {patient}: no {T2_SERIES[0]} series; using {choice}")
        image_path = series[choice]
        mask_path = root / MASKS_DIR / image_path.name
        if not mask_path.is_file():
            problems.append(f"patient {patient}: mask {mask_path} not found; patient skipped")
            continue
        study = read_study(patient, choice, image_path, mask_path, spec, problems)
        if study is None:
            continue
        rows = gradings.get(patient, {})
        if not rows:
            problems.append(f"{root / GRADINGS_CSV}: no row for patient {patient}; its discs "
                            "have no grade")  # fmt: skip
        for ivd, values in sorted(rows.items()):
            level = disc_name(ivd)
            if level not in study.points:
                if level in spec.point_names:
                    problems.append(
                        f"{root / GRADINGS_CSV} (patient {patient}): IVD label {ivd} ({level}) "
                        "is graded but has no point on the mid-sagittal slice; grade unused"
                    )
                continue
            study.gradings[level] = {c: v for c, v in values.items() if c != "Pfirrman grade"}
            if "Pfirrman grade" in values and level in spec.point_names:
                study.grades[level] = PFIRRMANN_GRADES.index(values["Pfirrman grade"])
        _task_labels(study, spec, problems)
        if not any(level in study.points for level in spec.point_names):
            problems.append(f"patient {patient}: no point of the task on the mid-sagittal "
                            "slice; patient skipped")  # fmt: skip
            continue
        studies.append(study)
    return SpiderDataset(root, spec, studies, problems, series_found, overview_rows)


def _task_labels(study: SpiderStudy, spec: Task, problems: list[str]) -> None:
    """Fill `study.labels` for the task's points on the slice; a point without labels is
    reported (present for the heatmap loss, no class target), never given one."""
    for level, kind in zip(spec.point_names, spec.point_kinds):
        if level not in study.points:
            continue
        if spec.name == "spider_disc":
            if level in study.grades:
                study.labels[level] = (f"v{PFIRRMANN_GRADES[study.grades[level]]}",)
            else:
                problems.append(f"patient {study.patient}: {level} has a point but no "
                                "Pfirrmann grade; its class is not scored")  # fmt: skip
        elif kind == "vertebra":
            study.labels[level] = ("v1",)  # the one vertebra class: no grading to map
        else:
            codes = finding_codes(study.gradings.get(level, {}))
            if codes is None:
                lacking = [c for c, _ in FINDING_COLUMNS.values()
                           if c not in study.gradings.get(level, {})]  # fmt: skip
                problems.append(
                    f"patient {study.patient}: {level} has a point but no valid "
                    f"{', '.join(lacking)} grading; its findings are not scored"
                )
            else:
                study.labels[level] = codes
