"""Reader for the RSNA 2024 Lumbar Spine Degenerative Classification layout (`rsna2024`).

The competition publishes (docs/datasets.md):

    train_series_descriptions.csv  study_id, series_id, series_description
    train_label_coordinates.csv    study_id, series_id, instance_number, condition, level, x, y
    train.csv                      study_id, one column per condition-level, e.g.
                                   spinal_canal_stenosis_l1_l2 in {Normal/Mild, Moderate, Severe}
    train_images/<study_id>/<series_id>/<instance_number>.dcm

`read_rsna2024` gives one `RsnaStudy` per study that has the task's series, with each
point on the instance the coordinates name and its grade: `rsna2024_canal` reads the Spinal
Canal Stenosis rows on Sagittal T2/STIR, `rsna2024_foraminal` the Left / Right Neural
Foraminal Narrowing rows on Sagittal T1 (`point_conditions` maps a task's points to the
CSVs' condition and level). Missing grades, missing coordinates, missing files and malformed
rows are reported (file, row, column) and skipped, never invented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from lit_spine.task import RSNA_SEVERITIES, Task, get_task
from lit_spine.utils import parse_float, parse_int

SERIES_CSV = "train_series_descriptions.csv"
COORDS_CSV = "train_label_coordinates.csv"
GRADES_CSV = "train.csv"
IMAGES_DIR = "train_images"
SERIES_COLUMNS = ("study_id", "series_id", "series_description")
COORDS_COLUMNS = ("study_id", "series_id", "instance_number", "condition", "level", "x", "y")
CANAL_CONDITION = "Spinal Canal Stenosis"
# The five conditions of train.csv, in the competition's order.
RSNA_CONDITIONS = (
    CANAL_CONDITION,
    "Left Neural Foraminal Narrowing",
    "Right Neural Foraminal Narrowing",
    "Left Subarticular Stenosis",
    "Right Subarticular Stenosis",
)
# The competition's submission file (sample_submission.csv): one row per study, condition
# and level, `row_id` = f"{study_id}_{grade_column(condition, level)}", then the three
# severity probabilities in the order of RSNA_SEVERITIES.
SUBMISSION_COLUMNS = ("row_id", "normal_mild", "moderate", "severe")


def point_conditions(task: Task) -> dict[str, tuple[str, str]]:
    """Each point of an rsna2024 task -> (condition, level) as the CSVs spell them."""
    if task.name == "rsna2024_canal":
        return {lv: (CANAL_CONDITION, lv) for lv in task.point_names}
    if task.name == "rsna2024_foraminal":
        # 'L1/L2 left' -> ('Left Neural Foraminal Narrowing', 'L1/L2')
        return {
            point: (f"{point.split()[1].title()} Neural Foraminal Narrowing", point.split()[0])
            for point in task.point_names
        }
    raise ValueError(
        f"task {task.name!r} is not an rsna2024 task; use rsna2024_canal or rsna2024_foraminal"
    )


class RsnaFormatError(ValueError):
    """A file of the layout is missing or lacks required columns."""


def grade_column(condition: str, level: str) -> str:
    """train.csv column of a condition at a level: ('Spinal Canal Stenosis', 'L1/L2') ->
    'spinal_canal_stenosis_l1_l2'."""
    return f"{condition.lower().replace(' ', '_')}_{level.lower().replace('/', '_')}"


@dataclass
class RsnaPoint:
    """One point's annotation: the instance it lies on, pixel (x, y) and its file; `level` is
    the task's point name (for the foraminal task, e.g. 'L1/L2 left')."""

    level: str
    instance_number: int
    x: float
    y: float
    path: Path


@dataclass
class RsnaStudy:
    study_id: int
    series_id: int
    points: dict[str, RsnaPoint] = field(default_factory=dict)
    grades: dict[str, int] = field(default_factory=dict)  # level -> index in RSNA_SEVERITIES


@dataclass
class RsnaDataset:
    root: Path
    task: Task
    studies: list[RsnaStudy]
    problems: list[str]

    def summary(self) -> dict:
        """Counts for `lit-spine inspect`: studies, points, grades, problems."""
        return {
            "format": "rsna2024",
            "task": self.task.name,
            "series": self.task.series,
            "studies": len(self.studies),
            "points": sum(len(s.points) for s in self.studies),
            "grades": sum(len(s.grades) for s in self.studies),
            "problems": list(self.problems),
        }


def _read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    if not path.is_file():
        raise RsnaFormatError(
            f"{path}: file not found; an rsna2024 root holds {SERIES_CSV}, {COORDS_CSV}, "
            f"{GRADES_CSV} and {IMAGES_DIR}/ (docs/datasets.md)"
        )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise RsnaFormatError(
            f"{path}: missing column(s) {', '.join(missing)}; found {', '.join(frame.columns)}"
        )
    return frame


def read_rsna2024(root: str | Path, task: str = "rsna2024_canal") -> RsnaDataset:
    """Read the layout under `root` for `task`; every skipped item is listed in `problems`."""
    root = Path(root)
    spec = get_task(task)
    conditions = point_conditions(spec)  # point -> (condition, level); other tasks refused
    point_of = {cl: point for point, cl in conditions.items()}
    problems: list[str] = []
    series = _read_csv(root / SERIES_CSV, SERIES_COLUMNS)
    coords = _read_csv(root / COORDS_CSV, COORDS_COLUMNS)
    grades_path = root / GRADES_CSV
    columns = {point: grade_column(*conditions[point]) for point in spec.point_names}
    grades = _read_csv(grades_path, ("study_id", *columns.values()))

    # Series choice: the task's description; several such series in a study -> the first
    # one with coordinates (reported), else the first listed.
    chosen: dict[int, int] = {}
    candidates: dict[int, list[int]] = {}
    for row, rec in series.iterrows():
        sid, ser = parse_int(rec["study_id"]), parse_int(rec["series_id"])
        if sid is None or ser is None:
            problems.append(
                f"{root / SERIES_CSV} row {row + 2}: study_id {rec['study_id']!r} / series_id "
                f"{rec['series_id']!r} is not an integer; row skipped"
            )
            continue
        if rec["series_description"].strip() == spec.series:
            candidates.setdefault(sid, []).append(ser)
    # The task's condition rows. A value that differs from the competition's spelling only in
    # case is reported and skipped, as a misspelt level is: nothing is read from a guess.
    wanted = {c for c, _ in conditions.values()}
    spelt = {c.casefold(): c for c in wanted}
    condition = coords["condition"].str.strip()
    for row, rec in coords[
        ~condition.isin(wanted) & condition.str.casefold().isin(spelt)
    ].iterrows():
        problems.append(
            f"{root / COORDS_CSV} row {row + 2} (study {rec['study_id']}): condition "
            f"{rec['condition']!r} is not spelled {spelt[rec['condition'].strip().casefold()]!r} "
            "as the competition spells it; row skipped (fix the spelling to use it)"
        )
    canal = coords[condition.isin(wanted)].assign(condition=condition[condition.isin(wanted)])
    with_coords = {
        (parse_int(a), parse_int(b)) for a, b in zip(canal["study_id"], canal["series_id"])
    }
    for sid, sers in candidates.items():
        labelled = [s for s in sers if (sid, s) in with_coords]
        chosen[sid] = (labelled or sers)[0]
        if len(sers) > 1:
            problems.append(
                f"{root / SERIES_CSV}: study {sid} has {len(sers)} {spec.series!r} series "
                f"{sers}; using {chosen[sid]}"
            )
    studies = {sid: RsnaStudy(sid, ser) for sid, ser in sorted(chosen.items())}

    for row, rec in canal.iterrows():
        where = f"{root / COORDS_CSV} row {row + 2} (study {rec['study_id']})"
        sid, ser = parse_int(rec["study_id"]), parse_int(rec["series_id"])
        if sid not in studies:
            problems.append(f"{where}: study has no {spec.series!r} series in {SERIES_CSV}")
            continue
        if ser != studies[sid].series_id:
            problems.append(
                f"{where}: series_id {rec['series_id']!r} is not the chosen {spec.series!r} "
                f"series {studies[sid].series_id}; skipped"
            )
            continue
        level = point_of.get((rec["condition"], rec["level"].strip()))
        if level is None:
            levels = sorted({lv for _, lv in conditions.values()})
            problems.append(
                f"{where}: column level {rec['level']!r} is not one of {', '.join(levels)}"
            )
            continue
        inst, x, y = parse_int(rec["instance_number"]), parse_float(rec["x"]), parse_float(rec["y"])
        bad = [
            f"{col} {rec[col]!r}"
            for col, val in (("instance_number", inst), ("x", x), ("y", y))
            if val is None
        ]
        if bad:
            problems.append(f"{where}: column(s) {', '.join(bad)} not a valid number; skipped")
            continue
        if level in studies[sid].points:
            what = level if level == rec["level"].strip() else f"{rec['condition']} {level}"
            problems.append(f"{where}: second {what} point for this study; the first is kept")
            continue
        path = root / IMAGES_DIR / str(sid) / str(ser) / f"{inst}.dcm"
        if not path.is_file():
            problems.append(f"{where}: image {path} not found; point skipped")
            continue
        studies[sid].points[level] = RsnaPoint(level, inst, x, y, path)

    graded: dict[int, int] = {}  # study -> its train.csv row
    for row, rec in grades.iterrows():
        sid = parse_int(rec["study_id"])
        if sid is None:
            problems.append(
                f"{grades_path} row {row + 2}: study_id {rec['study_id']!r} is not an integer; "
                "row skipped"
            )
            continue
        if sid not in studies:
            continue
        if sid in graded:
            problems.append(
                f"{grades_path} row {row + 2}: second row for study {sid} (the first is row "
                f"{graded[sid]}); the first is kept"
            )
            continue
        graded[sid] = row + 2
        for level, col in columns.items():
            text = rec[col].strip()
            if not text:
                problems.append(
                    f"{grades_path} row {row + 2} (study {sid}): column {col} is empty; "
                    "grade missing, level skipped"
                )
            elif text not in RSNA_SEVERITIES:
                problems.append(
                    f"{grades_path} row {row + 2} (study {sid}): column {col} value {text!r} "
                    f"is not one of {', '.join(RSNA_SEVERITIES)}; level skipped"
                )
            else:
                studies[sid].grades[level] = RSNA_SEVERITIES.index(text)

    kept = []
    for st in studies.values():
        if st.study_id not in graded:
            problems.append(
                f"{grades_path}: no row for study {st.study_id}; its levels are kept without "
                "a grade (not scored for the condition)"
            )
        absent = [lv for lv in spec.point_names if lv not in st.points]
        if absent:
            problems.append(
                f"study {st.study_id} series {st.series_id}: no coordinates for "
                f"{', '.join(absent)}; those levels are not annotated"
            )
        if st.points:
            kept.append(st)
        else:
            problems.append(f"study {st.study_id}: no usable point; study skipped")
    return RsnaDataset(root, spec, kept, problems)
