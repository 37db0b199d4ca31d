"""Score rsna2024 and spider prediction files against the layout's own labels.

The files are those `lit-spine predict` writes (`lit_spine/predict_layouts.py`,
docs/datasets.md "Prediction files"); the labels are read from the data root.

- rsna2024: the competition's sample-weighted log loss (weights 1/2/4) per condition of the
  submission file, computed by `metrics_rsna.rsna_weighted_logloss`, the function behind
  `val/rsna_canal_logloss`, over the graded (study, level) pairs of the predicted studies;
  per competition condition (left and right sides pooled into one loss, as the
  competition's metric does), their mean, and the any_severe_spinal term
  (`metrics_rsna.rsna_any_severe_logloss`) where the file has canal rows;
  and, where a coordinates file is given, the localisation error in mm: the distance
  between the predicted and the labelled point in patient coordinates (each pixel placed
  with its own file's ImagePositionPatient, ImageOrientationPatient and PixelSpacing), so a
  point on a neighbouring slice counts the slice gap too; the hit and success rates count
  d < R, strictly, as docs/metric.md. Hand-written: no library scores this file format.
- spider: the suite's metric (`metrics.score_detections`, docs/metric.md) with the mask
  centroids and the labels (`spider_disc`: Pfirrmann grades; `spider_spine`: the disc
  findings and the vertebra class) that `data/spider.py` reads as ground truth; the task is
  the one whose probability columns the file has (`predict_layouts.spider_class_columns`).

Missing labels (an empty grade, a level without coordinates, an image without a usable
header) are reported and the item is left out, never filled in. Studies of the data that
the prediction file does not name are counted, not scored (a prediction of one fold).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from lit_spine.data.rsna import (
    CANAL_CONDITION,
    COORDS_COLUMNS,
    COORDS_CSV,
    GRADES_CSV,
    IMAGES_DIR,
    RSNA_CONDITIONS,
    SUBMISSION_COLUMNS,
    RsnaFormatError,
    _read_csv,
    grade_column,
)
from lit_spine.metrics import (
    DetectionReport,
    GroundTruthArrays,
    PredictionArrays,
    check_radii,
    score_detections,
)
from lit_spine.metrics_rsna import rsna_any_severe_logloss, rsna_weighted_logloss
from lit_spine.predict_layouts import (
    COORDINATES_CSV,
    PREDICTION_COORDS_COLUMNS,
    SPIDER_PREDICTION_COLUMNS,
    spider_class_columns,
)
from lit_spine.task import RSNA_LEVELS, RSNA_SEVERITIES, get_task
from lit_spine.utils import parse_float, parse_int

# train.csv column -> (condition, level), for reading a row_id back.
GRADE_COLUMNS = {grade_column(c, lv): (c, lv) for c in RSNA_CONDITIONS for lv in RSNA_LEVELS}
# The logged name of a condition's log loss; the canal one is `val/rsna_canal_logloss`'s.
LOGLOSS_NAMES = {
    "Spinal Canal Stenosis": "rsna_canal_logloss",
    "Left Neural Foraminal Narrowing": "rsna_left_foraminal_logloss",
    "Right Neural Foraminal Narrowing": "rsna_right_foraminal_logloss",
    "Left Subarticular Stenosis": "rsna_left_subarticular_logloss",
    "Right Subarticular Stenosis": "rsna_right_subarticular_logloss",
}
# The competition's conditions (its metric: 'spinal', 'foraminal', 'subarticular' in the
# row_id): the name of each one's log loss, pooled over the train.csv conditions it covers.
COMPETITION_LOGLOSS = {
    "rsna_canal_logloss": ("Spinal Canal Stenosis",),
    "rsna_foraminal_logloss": (
        "Left Neural Foraminal Narrowing",
        "Right Neural Foraminal Narrowing",
    ),
    "rsna_subarticular_logloss": ("Left Subarticular Stenosis", "Right Subarticular Stenosis"),
}
ANY_SEVERE_LOGLOSS = "rsna_any_severe_spinal_logloss"


class LayoutEvaluationError(ValueError):
    """A prediction file or the labels cannot be scored as they are."""


@dataclass
class LayoutEvaluation:
    """What `evaluate_rsna2024` / `evaluate_spider` found: figures, counts and problems."""

    format: str
    metrics: dict[str, float | int | None]
    problems: list[str] = field(default_factory=list)
    detection: DetectionReport | None = None

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        out = {"format": self.format, "metrics": self.metrics, "problems": self.problems}
        if self.detection is not None:
            out["detection"] = self.detection.to_dict()
        return out


def _read_pred(path: Path, columns: Sequence[str], what: str) -> pd.DataFrame:
    try:
        return _read_csv(path, tuple(columns))
    except RsnaFormatError as err:
        raise LayoutEvaluationError(
            f"{err} ({what}: the columns lit-spine predict writes, docs/datasets.md)"
        ) from None


# ---------------------------------------------------------------------------- rsna2024
def read_submission(path: Path, problems: list[str]) -> dict[tuple[int, str, str], np.ndarray]:
    """(study_id, condition, level) -> the three probabilities of a submission file; bad
    rows are reported (file, row, column) and skipped."""
    frame = _read_pred(path, SUBMISSION_COLUMNS, "a submission file")
    out: dict[tuple[int, str, str], np.ndarray] = {}
    for row, rec in frame.iterrows():
        where = f"{path} row {row + 2}"
        head, _, rest = rec["row_id"].strip().partition("_")
        study = parse_int(head)
        if study is None or rest not in GRADE_COLUMNS:
            problems.append(
                f"{where}: row_id {rec['row_id']!r} is not <study_id>_<condition>_<level> "
                "(e.g. 4000000_spinal_canal_stenosis_l1_l2); row skipped"
            )
            continue
        probs = [parse_float(rec[c]) for c in SUBMISSION_COLUMNS[1:]]
        if any(p is None or p < 0 for p in probs) or sum(probs) <= 0:
            bad = ", ".join(f"{c} {rec[c]!r}" for c in SUBMISSION_COLUMNS[1:])
            problems.append(f"{where}: probabilities {bad} are not non-negative numbers with "
                            "a positive sum; row skipped")  # fmt: skip
            continue
        key = (study, *GRADE_COLUMNS[rest])
        if key in out:
            problems.append(f"{where}: second row for {rec['row_id']!r}; the first is kept")
            continue
        out[key] = np.array(probs, dtype=np.float64)
    return out


def _int_rows(
    frame: pd.DataFrame, column: str, path: Path, problems: list[str]
) -> Iterator[tuple[int, pd.Series, int]]:
    """(file row number, row, integer value of `column`) per row of `frame` read from `path`;
    a row whose `column` is not an integer is reported and skipped."""
    for row, rec in frame.iterrows():
        value = parse_int(rec[column])
        if value is None:
            problems.append(f"{path} row {row + 2}: {column} {rec[column]!r} is not an integer; "
                            "row skipped")  # fmt: skip
            continue
        yield row + 2, rec, value


def _patient_xyz(header, x: float, y: float) -> np.ndarray | None:
    """Patient coordinates (mm) of pixel (x = column, y = row), or None without geometry."""
    if header.position is None or header.orientation is None or header.spacing_mm is None:
        return None
    row_mm, col_mm = header.spacing_mm
    o = np.asarray(header.orientation, dtype=np.float64)
    return np.asarray(header.position, float) + x * col_mm * o[:3] + y * row_mm * o[3:]


def _coordinates(path: Path, columns, problems: list[str]) -> dict[tuple, dict]:
    """(study_id, condition, level) -> {series_id, instance_number, x, y} of a coordinates
    file (the labels' or the predicted ones); bad rows are reported and skipped."""
    frame = _read_pred(path, columns, "a coordinates file")
    out: dict[tuple, dict] = {}
    for row, rec in frame.iterrows():
        where = f"{path} row {row + 2}"
        values = {
            "study_id": parse_int(rec["study_id"]),
            "series_id": parse_int(rec["series_id"]),
            "instance_number": parse_int(rec["instance_number"]),
            "x": parse_float(rec["x"]),
            "y": parse_float(rec["y"]),
        }
        bad = [f"{c} {rec[c]!r}" for c, v in values.items() if v is None]
        if bad:
            problems.append(f"{where}: column(s) {', '.join(bad)} not a valid number; skipped")
            continue
        key = (values["study_id"], rec["condition"].strip(), rec["level"].strip())
        if key in out:
            problems.append(f"{where}: second point for {key[1]} {key[2]}; the first is kept")
            continue
        out[key] = values
    return out


def _rsna_localisation(
    root: Path,
    coords_path: Path,
    studies: set[int],
    radius_mm: float,
    sdr_radii_mm: Sequence[float],
    problems: list[str],
) -> dict[str, float | int | None]:
    from lit_spine.data.dicom import DicomFileError, read_header

    predicted = _coordinates(coords_path, PREDICTION_COORDS_COLUMNS, problems)
    truth = _coordinates(root / COORDS_CSV, COORDS_COLUMNS, problems)
    headers: dict[Path, object] = {}

    def header(p: dict):
        path = (
            root / IMAGES_DIR / str(p["study_id"]) / str(p["series_id"])
            / f"{p['instance_number']}.dcm"
        )  # fmt: skip
        if path not in headers:
            try:
                headers[path] = read_header(path) if path.is_file() else f"{path} not found"
            except DicomFileError as err:
                headers[path] = f"{path}: {err.reason}"
        return path, headers[path]

    errors, same = [], 0
    for key, pred in sorted(predicted.items()):
        where = f"{coords_path}: study {key[0]} {key[1]} {key[2]}"
        if key[0] not in studies:
            continue  # the study is not scored (reported with the submission)
        gt = truth.get(key)
        if gt is None:
            problems.append(f"{where}: no labelled point in {COORDS_CSV}; not scored")
            continue
        points = []
        for p in (pred, gt):
            path, h = header(p)
            if isinstance(h, str):
                points.append(h)
                continue
            xyz = _patient_xyz(h, p["x"], p["y"])
            points.append(
                xyz
                if xyz is not None
                else f"{path} has no position, orientation "
                f"or usable pixel spacing ({h.spacing_problem or 'missing tags'})"
            )
        bad = [p for p in points if isinstance(p, str)]
        if bad:
            problems.append(f"{where}: {'; '.join(bad)}; distance not computed")
            continue
        errors.append(float(np.linalg.norm(points[0] - points[1])))
        same += (pred["series_id"], pred["instance_number"]) == (
            gt["series_id"],
            gt["instance_number"],
        )
    n = len(errors)
    e = np.array(errors)
    out: dict[str, float | int | None] = {
        "localisation_points": n,
        "localisation_mre_mm": float(e.mean()) if n else None,
        "localisation_median_mm": float(np.median(e)) if n else None,
        f"localisation_hit_rate@{radius_mm:g}mm": float((e < radius_mm).mean()) if n else None,
        "localisation_same_instance_rate": same / n if n else None,
    }
    for r in sdr_radii_mm:
        out[f"localisation_sdr@{r:g}mm"] = float((e < r).mean()) if n else None
    return out


def evaluate_rsna2024(
    pred: str | Path,
    data_root: str | Path,
    coordinates: str | Path | None = None,
    radius_mm: float = 8.0,
    sdr_radii_mm: Sequence[float] = (2.0, 4.0, 6.0, 8.0),
    ignore_unknown: bool = False,
) -> LayoutEvaluation:
    """Score a submission file (and its coordinates file) against `data_root`'s labels.

    `coordinates` defaults to `coordinates.csv` beside `pred` when that file exists.
    """
    pred, root = Path(pred), Path(data_root)
    check_radii(radius_mm, radius_mm, sdr_radii_mm)
    problems: list[str] = []
    submitted = read_submission(pred, problems)
    if not submitted:
        shown = " | ".join(problems[:3]) if problems else "the file has no data row"
        raise LayoutEvaluationError(
            f"{pred}: no usable submission row; nothing to score ({len(problems)} problem(s)"
            f"{', the first 3' if len(problems) > 3 else ''}: {shown})"
        )
    conditions = sorted({c for _, c, _ in submitted}, key=RSNA_CONDITIONS.index)
    grades_path = root / GRADES_CSV
    try:
        columns = [grade_column(c, lv) for c in conditions for lv in RSNA_LEVELS]
        grades = _read_csv(grades_path, ("study_id", *columns))
    except RsnaFormatError as err:
        raise LayoutEvaluationError(str(err)) from None
    truth: dict[int, dict] = {}
    repeated: list[tuple[int, int]] = []  # (row, study) of a second train.csv row
    for row, rec, sid in _int_rows(grades, "study_id", grades_path, problems):
        if sid in truth:
            repeated.append((row, sid))
        else:
            truth[sid] = {"row": row, "rec": rec}
    studies = {s for s, _, _ in submitted}
    for row, sid in repeated:
        if sid in studies:  # as data/rsna.py reports it; an unpredicted study is not scored
            problems.append(f"{grades_path} row {row}: second row for study {sid} (the first "
                            f"is row {truth[sid]['row']}); the first is kept")  # fmt: skip
    unknown = sorted(studies - set(truth))
    if unknown and not ignore_unknown:
        raise LayoutEvaluationError(
            f"{pred}: {len(unknown)} predicted studies are not in {grades_path} (first: "
            f"{unknown[:5]}); check --data-root, or pass --ignore-unknown to skip them"
        )
    for sid in unknown:
        problems.append(f"{pred}: study {sid} is not in {grades_path}; not scored")
    studies -= set(unknown)
    metrics: dict[str, float | int | None] = {
        "studies_scored": len(studies),
        "studies_not_predicted": len(set(truth) - studies),
    }
    scored: dict[str, tuple[list[np.ndarray], list[int], list[int]]] = {}
    for condition in conditions:
        probs, labels, study_of = [], [], []
        for sid in sorted(studies):
            rec, row = truth[sid]["rec"], truth[sid]["row"]
            for level in RSNA_LEVELS:
                col = grade_column(condition, level)
                text = rec[col].strip()
                p = submitted.get((sid, condition, level))
                if p is None:
                    problems.append(f"{pred}: no row for {sid}_{col}; level not scored")
                elif not text:
                    problems.append(f"{grades_path} row {row} (study {sid}): column {col} is "
                                    "empty; grade missing, level not scored")  # fmt: skip
                elif text not in RSNA_SEVERITIES:
                    problems.append(
                        f"{grades_path} row {row} (study {sid}): column {col} value {text!r} "
                        f"is not one of {', '.join(RSNA_SEVERITIES)}; level not scored"
                    )
                else:
                    probs.append(p)
                    labels.append(RSNA_SEVERITIES.index(text))
                    study_of.append(sid)
        scored[condition] = (probs, labels, study_of)
        name = LOGLOSS_NAMES[condition]
        metrics[f"{name}_levels"] = len(labels)
        if labels:
            metrics[name] = _logloss(probs, labels)
        else:
            metrics[name] = None
            problems.append(f"{condition}: no graded level of a predicted study; its log loss "
                            "is undefined")  # fmt: skip
    metrics |= _competition_terms(scored)
    if coordinates is None and (pred.parent / COORDINATES_CSV).is_file():
        coordinates = pred.parent / COORDINATES_CSV
    if coordinates is not None:
        metrics |= _rsna_localisation(
            root, Path(coordinates), studies, radius_mm, sdr_radii_mm, problems
        )
    return LayoutEvaluation("rsna2024", metrics, list(dict.fromkeys(problems)))


def _logloss(probs: list[np.ndarray], labels: list[int]) -> float:
    return rsna_weighted_logloss(np.array(probs)[:, None], np.array(labels)[:, None])


def _competition_terms(
    scored: dict[str, tuple[list[np.ndarray], list[int], list[int]]],
) -> dict[str, float | int | None]:
    """The competition's terms from each train.csv condition's scored (probabilities,
    grades, study) lists: one log loss per competition condition over the levels of all its
    sides (the canal one is the canal condition's own), their mean where there are several,
    and the any_severe_spinal term where the canal condition has a scored level."""
    out: dict[str, float | int | None] = {}
    losses = []
    for name, covered in COMPETITION_LOGLOSS.items():
        parts = [scored[c] for c in covered if c in scored]
        if not parts:
            continue
        probs = [p for part in parts for p in part[0]]
        labels = [g for part in parts for g in part[1]]
        if len(covered) > 1:  # the one-condition canal loss is already there
            out[f"{name}_levels"] = len(labels)
            out[name] = _logloss(probs, labels) if labels else None
        if labels:
            losses.append(_logloss(probs, labels))
    if len(losses) > 1:
        out["rsna_mean_logloss"] = float(np.mean(losses))
    canal = scored.get(CANAL_CONDITION)
    if canal is not None and canal[1]:
        studies: dict[int, tuple[list[float], list[int]]] = {}
        for p, g, sid in zip(*canal):
            severe, grades = studies.setdefault(sid, ([], []))
            severe.append(float(p[-1]))
            grades.append(g)
        out[f"{ANY_SEVERE_LOGLOSS}_studies"] = len(studies)
        out[ANY_SEVERE_LOGLOSS] = rsna_any_severe_logloss(list(studies.values()))
    return out


# ---------------------------------------------------------------------------- spider
def evaluate_spider(
    pred: str | Path,
    data_root: str | Path,
    radius_mm: float = 8.0,
    baseline_radius_mm: float = 6.0,
    sdr_radii_mm: Sequence[float] = (2.0, 4.0, 6.0, 8.0),
    ignore_unknown: bool = False,
) -> LayoutEvaluation:
    """Score a spider predictions file with the suite's metric against `data_root`."""
    from lit_spine.data.spider import read_spider

    pred = Path(pred)
    frame = _read_pred(pred, SPIDER_PREDICTION_COLUMNS, "a spider file")
    task = _spider_task_of(pred, frame)
    vocab = task.vocabulary()
    classes = spider_class_columns(task, vocab)
    token_class = {token: (kind, code) for (kind, code), (_, token) in classes.items()}
    data = read_spider(data_root, task.name)
    problems = [f"{data_root}: {p}" for p in data.problems]
    truth = {st.patient: st for st in data.studies}
    by_patient: dict[int, list[tuple[int, pd.Series]]] = {}
    for row, rec, patient in _int_rows(frame, "patient", pred, problems):
        by_patient.setdefault(patient, []).append((row, rec))
    unknown = sorted(set(by_patient) - set(truth))
    if unknown and not ignore_unknown:
        raise LayoutEvaluationError(
            f"{pred}: {len(unknown)} predicted patients are not usable studies of {data_root} "
            f"(first: {unknown[:5]}); check --data-root, or pass --ignore-unknown to skip them"
        )
    gt_rows, pred_rows, spacing = [], [], []
    for patient in unknown:
        problems.append(f"{pred}: patient {patient} is not a usable study of {data_root}; "
                        "not scored")  # fmt: skip
    for patient in sorted(set(by_patient) - set(unknown)):
        st = truth[patient]
        rows = by_patient[patient]
        if any(parse_int(r["slice_index"]) != st.slice_index or r["series"] != st.series
               for _, r in rows):  # fmt: skip
            problems.append(
                f"{pred}: patient {patient} predicted on another series or slice than the "
                f"labels' ({st.series}, mid slice {st.slice_index}); patient not scored"
            )
            continue
        s = len(spacing)
        spacing.append(st.spacing_mm[:2])
        for level, point in st.points.items():
            if level not in task.point_index:
                continue
            k = task.point_index[level]
            labels = np.zeros(vocab.num_classes, dtype=bool)
            for code in st.labels.get(level, ()):  # none: a point without a class (reported)
                labels[vocab.class_index(task.point_kinds[k], code)] = True
            gt_rows.append((s, k, (point.x, point.y), labels))
        for line, rec in rows:
            where = f"{pred} row {line}"
            level = rec["level"].strip()
            if level not in task.point_index:
                problems.append(f"{where}: level {rec['level']!r} is not one of "
                                f"{', '.join(task.point_names)}; row skipped")  # fmt: skip
                continue
            kind = task.point_kinds[task.point_index[level]]
            x, y, score = (
                parse_float(rec["x"]),
                parse_float(rec["y"]),
                parse_float(rec["point_score"]),
            )
            found = [token_class.get(t) for t in rec["labels"].split()]
            columns = [classes[kind, c][0] for c in vocab.codes(kind)]
            probs = {c: parse_float(rec[col]) for c, col in zip(vocab.codes(kind), columns)}
            if (
                None in (x, y, score, *probs.values())
                or not found
                or any(f is None or f[0] != kind for f in found)
            ):
                problems.append(f"{where}: x, y, point_score, labels or {', '.join(columns)} "
                                f"not valid for a {kind} point; row skipped")  # fmt: skip
                continue
            for _, code in found:
                pred_rows.append(
                    (s, task.point_index[level], vocab.class_index(kind, code), (x, y),
                     min(max(score * probs[code], 0.0), 1.0))
                )  # fmt: skip
    if not spacing:
        raise LayoutEvaluationError(f"{pred}: no patient could be scored. Problems:\n  "
                                    + "\n  ".join(problems[:20]))  # fmt: skip
    gt = GroundTruthArrays(
        np.array([r[0] for r in gt_rows], dtype=np.int64),
        np.array([r[1] for r in gt_rows], dtype=np.int64),
        np.array([r[2] for r in gt_rows], dtype=np.float64).reshape(-1, 2),
        np.array([r[3] for r in gt_rows], dtype=bool).reshape(-1, vocab.num_classes),
    )
    preds = PredictionArrays(
        np.array([r[0] for r in pred_rows], dtype=np.int64),
        np.array([r[1] for r in pred_rows], dtype=np.int64),
        np.array([r[2] for r in pred_rows], dtype=np.int64),
        np.array([r[3] for r in pred_rows], dtype=np.float64).reshape(-1, 2),
        np.array([r[4] for r in pred_rows], dtype=np.float64),
    )
    report = score_detections(
        gt, preds, np.array(spacing, dtype=np.float64), vocab, radius_mm, baseline_radius_mm,
        sdr_radii_mm, task=task,
    )  # fmt: skip
    metrics: dict[str, float | int | None] = {
        "studies_scored": len(spacing),
        "studies_not_predicted": len(set(truth) - set(by_patient)),
    }
    metrics |= {k: (None if isinstance(v, float) and math.isnan(v) else v)
                for k, v in report.flat().items()}  # fmt: skip
    return LayoutEvaluation("spider", metrics, list(dict.fromkeys(problems)), report)


def _spider_task_of(pred: Path, frame: pd.DataFrame):
    """The spider task whose probability columns a predictions file has."""
    for name in ("spider_disc", "spider_spine"):
        task = get_task(name)
        wanted = {col for col, _ in spider_class_columns(task, task.vocabulary()).values()}
        if wanted <= set(frame.columns):
            return task
    raise LayoutEvaluationError(
        f"{pred}: neither the spider_disc columns (pfirrmann_1 .. pfirrmann_5) nor the "
        "spider_spine ones (p_vertebra, p_normal, p_modic, p_herniation, p_bulging, "
        "p_narrowing) found; write the file with lit-spine predict (docs/datasets.md)"
    )


def format_layout(evaluation: LayoutEvaluation) -> str:
    """A readable table of a layout evaluation, then its problems."""
    from lit_spine.evaluate import format_table

    lines = []
    if evaluation.detection is not None:
        lines += [format_table(evaluation.detection), ""]
        shown = {k: v for k, v in evaluation.metrics.items() if k.startswith("studies_")}
    else:
        shown = evaluation.metrics
    width = max(len(k) for k in shown) + 2
    for key, value in shown.items():
        text = "-" if value is None else f"{value:.4f}" if isinstance(value, float) else value
        lines.append(f"{key:<{width}}{text}")
    if evaluation.problems:
        lines += ["", f"Problems ({len(evaluation.problems)})"]
        lines += [f"  {p}" for p in evaluation.problems]
    return "\n".join(lines)
