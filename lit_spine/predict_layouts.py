"""Prediction files of the rsna2024 and spider tasks, written by `lit-spine predict`.

The formats (docs/datasets.md, "Prediction files"):

- rsna2024: `submission.csv`, the competition's submission format (`row_id`,
  `normal_mild`, `moderate`, `severe`; `row_id` = `<study_id>_<condition>_<level>`, e.g.
  `4000000_spinal_canal_stenosis_l1_l2`), and `coordinates.csv`, the predicted points in
  the schema of `train_label_coordinates.csv` (`study_id`, `series_id`, `instance_number`,
  `condition`, `level`, `x`, `y`) plus `score` (the heatmap peak).
- spider: `predictions.csv`, one row per patient and point: `patient`, `series`,
  `slice_index`, `level`, `x`, `y` (pixels of the reoriented mid-sagittal slice), `x_mm`,
  `y_mm`, `point_score`, `labels` (the emitted labels, top first, as the suite's metric
  emits them), `grade` (the top one) and one probability column per class
  (`spider_class_columns`): `pfirrmann_1` .. `pfirrmann_5` for `spider_disc`; `p_vertebra`
  and `p_normal`, `p_modic`, `p_herniation`, `p_bulging`, `p_narrowing` for `spider_spine`
  (a point's row fills its own kind's columns and leaves the others empty).

Hand-written because the choice is the suite's: an rsna2024 study is several cache items
(one per labelled instance) and each item predicts every level; a level's prediction is
taken from the item whose heatmap peak for that level is highest (no label is used to
choose it), and its instance is that item's. The severity probabilities are normalised to
sum 1 per level, as the competition's metric does before scoring.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from lit_spine.data.rsna import SUBMISSION_COLUMNS, grade_column, point_conditions
from lit_spine.metrics import PredictionRows
from lit_spine.task import SPIDER_FINDING_NAMES, Task, Vocabulary
from lit_spine.utils import atomic_write_text

SUBMISSION_CSV = "submission.csv"
COORDINATES_CSV = "coordinates.csv"
SPIDER_PREDICTIONS_CSV = "predictions.csv"
PREDICTION_COORDS_COLUMNS = (
    "study_id", "series_id", "instance_number", "condition", "level", "x", "y", "score",
)  # fmt: skip
SPIDER_PREDICTION_COLUMNS = (
    "patient", "series", "slice_index", "level", "x", "y", "x_mm", "y_mm", "point_score",
    "labels", "grade",
)  # fmt: skip
WRITTEN_TASKS = (
    "tianchi2020", "rsna2024_canal", "rsna2024_foraminal", "spider_disc", "spider_spine",
)  # fmt: skip


def point_probabilities(merged: dict, task: Task, row: int, k: int) -> np.ndarray:
    """The class probabilities of point `k` of batch row `row` (its kind's head)."""
    kind = task.point_kinds[k]
    return np.asarray(merged[f"{kind}_probs"][row, task.points_of_kind(kind).index(k)], float)


def pfirrmann_column(grade: int) -> str:
    """Probability column of Pfirrmann grade `grade` (1-5) in the spider predictions."""
    return f"pfirrmann_{grade}"


def spider_class_columns(task: Task, vocab: Vocabulary) -> dict[tuple[str, str], tuple[str, str]]:
    """(kind, code) -> (probability column, label token) of a spider task's classes:
    `spider_disc` disc vN -> ('pfirrmann_N', 'N'); `spider_spine` -> ('p_<name>', '<name>')
    with the names of `SPIDER_FINDING_NAMES` and 'vertebra' for the vertebra class."""
    if task.name == "spider_disc":
        return {("disc", c): (pfirrmann_column(int(c[1:])), c[1:]) for c in vocab.disc}
    if task.name == "spider_spine":
        out = {("vertebra", c): ("p_vertebra", "vertebra") for c in vocab.vertebra}
        return out | {("disc", c): (f"p_{SPIDER_FINDING_NAMES[c]}", SPIDER_FINDING_NAMES[c])
                      for c in vocab.disc}  # fmt: skip
    raise ValueError(f"task {task.name!r} is not a spider task")


def rsna2024_frames(merged: dict, cache, task: Task) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(submission, coordinates) of the rsna2024 predictions of `merged` (predict outputs)."""
    conditions = point_conditions(task)
    by_study: dict[int, list[int]] = {}
    for row, index in enumerate(merged["index"].tolist()):
        by_study.setdefault(int(cache.records[index]["study_id"]), []).append(row)
    submission, coordinates = [], []
    for study_id, rows in sorted(by_study.items()):
        for k, point in enumerate(task.point_names):
            best = max(rows, key=lambda r: float(merged["scores"][r, k]))
            index = int(merged["index"][best])
            rec = cache.records[index]
            probs = point_probabilities(merged, task, best, k)
            total = float(probs.sum())
            if not (np.isfinite(probs).all() and total > 0):
                raise ValueError(
                    f"study {study_id} {point}: severity probabilities {probs.tolist()} cannot "
                    "be normalised (non-finite or all zero); no prediction file written"
                )
            condition, level = conditions[point]
            submission.append(
                {"row_id": f"{study_id}_{grade_column(condition, level)}"}
                | dict(zip(SUBMISSION_COLUMNS[1:], (probs / total).tolist()))
            )
            x, y = cache.to_original(index, merged["points"][best][k])
            coordinates.append(
                {
                    "study_id": study_id,
                    "series_id": int(rec["series_id"]),
                    "instance_number": int(rec["instance_number"]),
                    "condition": condition,
                    "level": level,
                    "x": float(x),
                    "y": float(y),
                    "score": float(merged["scores"][best, k]),
                }
            )
    return (
        pd.DataFrame(submission, columns=list(SUBMISSION_COLUMNS)),
        pd.DataFrame(coordinates, columns=list(PREDICTION_COORDS_COLUMNS)),
    )


def spider_frame(
    merged: dict, cache, task: Task, vocab: Vocabulary, rows: PredictionRows
) -> pd.DataFrame:
    """One row per patient and point of the spider predictions of `merged`."""
    classes = spider_class_columns(task, vocab)
    records = []
    for row, index in enumerate(merged["index"].tolist()):
        rec = cache.records[index]
        xy = cache.to_original(index, merged["points"][row])
        row_mm, col_mm = rec["orig_spacing_mm"]
        emitted: dict[int, list[str]] = {}
        for r, ok in enumerate(rows.valid[row].tolist()):
            if ok:
                kind, code = vocab.classes[int(rows.cls[row, r])].split("/")
                emitted.setdefault(int(rows.point_index[row, r]), []).append(classes[kind, code][1])
        for k, level in enumerate(task.point_names):
            kind = task.point_kinds[k]
            probs = point_probabilities(merged, task, row, k)
            grades = emitted.get(k, [])
            records.append(
                {
                    "patient": int(rec["patient"]),
                    "series": rec["series"],
                    "slice_index": int(rec["slice_index"]),
                    "level": level,
                    "x": float(xy[k, 0]),
                    "y": float(xy[k, 1]),
                    "x_mm": float(xy[k, 0]) * col_mm,
                    "y_mm": float(xy[k, 1]) * row_mm,
                    "point_score": float(merged["scores"][row, k]),
                    "labels": " ".join(grades),
                    "grade": grades[0],
                }
                | {classes[kind, c][0]: float(p) for c, p in zip(vocab.codes(kind), probs)}
            )
    columns = [*SPIDER_PREDICTION_COLUMNS, *dict.fromkeys(c for c, _ in classes.values())]
    return pd.DataFrame(records, columns=columns)


def write_layout_predictions(
    out_dir: Path, merged: dict, cache, task: Task, vocab: Vocabulary, rows: PredictionRows
) -> list[Path]:
    """Write the prediction file(s) of an rsna2024 or spider task; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if task.name.startswith("rsna2024"):
        submission, coordinates = rsna2024_frames(merged, cache, task)
        frames = {SUBMISSION_CSV: submission, COORDINATES_CSV: coordinates}
    elif task.name in ("spider_disc", "spider_spine"):
        frames = {SPIDER_PREDICTIONS_CSV: spider_frame(merged, cache, task, vocab, rows)}
    else:
        raise ValueError(f"task {task.name!r} has no layout prediction file")
    paths = []
    for name, frame in frames.items():
        atomic_write_text(out_dir / name, frame.to_csv(index=False, float_format="%.9g"))
        paths.append(out_dir / name)
    return paths
