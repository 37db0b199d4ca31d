"""Score a prediction file against an annotation file (docs/metric.md).

Both files use the annotation schema; predicted points may carry a `"score"` in [0, 1]
(1.0 when absent). Distances are in millimetres with the pixel spacing of each study's
annotated image, read from the DICOM headers under `--data-root` (or one `--spacing-mm`
for every study). The numbers come from `lit_spine.metrics.score_detections`, the same core
the training-time `SpineDetectionMetric` uses.

    lit-spine evaluate --pred runs/x/predictions.json --gt data/val_annotation.json \
        --data-root data [--radius-mm 8] [--baseline-radius-mm 6] [--vocab tianchi2020] [--json]

Both files pass the same checks (lit_spine.data.annotation: errors stop with exit code 2,
problems are listed under the table and in the JSON's "problems"). A spacing is never assumed:
an annotated image without a usable PixelSpacing stops the run, naming the study and file,
unless `--skip-missing-spacing` leaves such studies out (listed in "skipped_studies").
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lit_spine.data.annotation import (
    ImageFacts,
    Problem,
    StudyAnnotation,
    check_against_images,
    load_annotations,
    one_line,
)
from lit_spine.data.dicom import (
    DatasetError,
    Series,
    SliceHeader,
    Study,
    implausible_spacing,
    index_dataset,
)
from lit_spine.data.labels import POINT_INDEX, Vocabulary, get_vocabulary
from lit_spine.metrics import (
    DetectionReport,
    GroundTruthArrays,
    PredictionArrays,
    check_radii,
    score_detections,
)

# Plausible in-plane pixel spacing of a clinical image (MRI is about 0.2-2 mm, radiographs
# 0.1 mm); outside this range, or with rows and columns more than 4:1 apart, a header value is
# a unit or export error, and scoring in it would give a wrong millimetre figure.


class EvaluationError(ValueError):
    """The files cannot be scored as they are (unknown study, missing spacing, ...)."""


def spacing_problem(row_mm: object, col_mm: object) -> str | None:
    """Why (row, col) is not a usable pixel spacing, or None when it is (the reader's rule)."""
    try:
        row, col = float(row_mm), float(col_mm)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return f"not numbers: {row_mm!r}, {col_mm!r}"
    if not (math.isfinite(row) and math.isfinite(col)):
        return f"not finite ({row:g}, {col:g})"
    reason = implausible_spacing(row, col)
    return None if reason is None else f"({row:g}, {col:g}) mm {reason}"


@dataclass(frozen=True)
class SkippedStudy:
    """A ground-truth study left out of scoring (only with --skip-missing-spacing)."""

    study: str
    file: str | None
    reason: str

    def to_dict(self) -> dict:
        """JSON-ready dict."""
        return {"study": self.study, "file": self.file, "reason": self.reason}


@dataclass
class StudyImages:
    """Spacing (and, from DICOM, image facts) of each scored study, plus what was left out."""

    spacing_mm: dict[str, tuple[float, float]]
    images: dict[str, ImageFacts] = field(default_factory=dict)
    skipped: list[SkippedStudy] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _index_data_root(data_root: Path, gt_path: str | Path | None) -> list[Study]:
    """Studies under `data_root`: a split folder, or a dataset root whose split folders are
    searched (the ground truth's own split `<root>/<split>` first)."""
    try:
        return index_dataset(data_root)
    except DatasetError as err:
        splits = sorted(p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if gt_path is not None:
            own = data_root / Path(gt_path).name.removesuffix("_annotation.json")
            splits.sort(key=lambda p: p != own)
        found: list[Study] = []
        for split in splits:
            try:
                found += index_dataset(split)
            except DatasetError:
                continue
        if not found:
            raise EvaluationError(one_line(err)) from None
        return found


def _unreadable_files_of(studies: list[Study], study_uid: str) -> list[str]:
    """The 'skipped <file>: <reason>' problems of the folder(s) holding `study_uid`."""
    return [
        p
        for s in studies
        if s.study_uid == study_uid
        for p in s.problems
        if p.startswith("skipped")
    ]


def study_images(
    gt: Mapping[str, StudyAnnotation],
    data_root: str | Path | None = None,
    spacing_mm: tuple[float, float] | None = None,
    gt_path: str | Path | None = None,
    skip_missing_spacing: bool = False,
) -> StudyImages:
    """(row, col) spacing of each ground-truth study's annotated image from its DICOM header
    under `data_root` (with its size and series length for the point checks); `spacing_mm`,
    when given, is used for every study instead.

    A study whose image has no usable spacing (missing or implausible PixelSpacing, file
    unreadable or absent) raises `EvaluationError`, or is skipped when `skip_missing_spacing`.
    """
    if spacing_mm is not None:
        reason = spacing_problem(*spacing_mm)
        if reason is not None:
            raise EvaluationError(f"--spacing-mm: {reason}")
        return StudyImages({uid: (float(spacing_mm[0]), float(spacing_mm[1])) for uid in gt})
    if data_root is None:
        raise EvaluationError(
            "pixel spacing needed: pass --data-root (DICOM files) or --spacing-mm ROW,COL"
        )
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise EvaluationError(f"--data-root {one_line(data_root)}: not a folder")
    studies = _index_data_root(data_root, gt_path)
    by_instance: dict[str, tuple[SliceHeader, Series]] = {}
    for s in studies:
        for series in s.series:
            for h in series.slices:
                by_instance.setdefault(h.instance_uid, (h, series))
    out = StudyImages({})
    fix = (
        "pass --spacing-mm ROW,COL to use one spacing for every study, or "
        "--skip-missing-spacing to leave such studies out"
    )
    for study in gt.values():
        uid = one_line(study.study_uid)
        found = by_instance.get(study.instance_uid) if study.instance_uid else None
        if found is None:
            if not study.instance_uid:
                reason = "the annotation names no instanceUid, so its image is unknown"
            else:
                unreadable = _unreadable_files_of(studies, study.study_uid)
                reason = (
                    f"no readable DICOM image for annotated instance "
                    f"{one_line(study.instance_uid)} under {one_line(data_root)}"
                    + (
                        f" ({len(unreadable)} unreadable file(s) in its folder, e.g. "
                        f"{one_line(unreadable[0])})"
                        if unreadable
                        else "; point --data-root at the split's images"
                    )
                )
            file = None
        else:
            header, series = found
            file = header.path
            # The header reader falls back to a default spacing (source "default") rather than
            # fail; that fallback, or no pair at all, is exactly what must not be scored.
            source = getattr(header, "spacing_source", "PixelSpacing")
            pair = header.spacing_mm
            if source not in ("PixelSpacing", "ImagerPixelSpacing"):
                reason = one_line(
                    getattr(header, "spacing_problem", None) or "PixelSpacing missing or invalid"
                )
            elif not isinstance(pair, (tuple, list)) or len(pair) != 2:
                reason = f"PixelSpacing unreadable ({pair!r})"
            else:
                reason = spacing_problem(*pair)
            if reason is None:
                out.spacing_mm[study.study_uid] = tuple(map(float, header.spacing_mm))
                out.images[study.study_uid] = ImageFacts(header.rows, header.cols, series.n_slices)
                if source != "PixelSpacing":
                    out.problems.append(
                        Problem(
                            "spacing_source",
                            file,
                            study.study_uid,
                            None,
                            f"no PixelSpacing; using {source} {header.spacing_mm}",
                        )
                    )
                continue
            reason = f"{one_line(file)}: {reason}"
        if not skip_missing_spacing:
            raise EvaluationError(f"study {uid}: no usable pixel spacing: {reason}; {fix}")
        out.skipped.append(SkippedStudy(study.study_uid, file, reason))
    return out


def study_spacing(
    gt: Mapping[str, StudyAnnotation],
    data_root: str | Path | None = None,
    spacing_mm: tuple[float, float] | None = None,
    gt_path: str | Path | None = None,
) -> dict[str, tuple[float, float]]:
    """(row, col) spacing of each ground-truth study's annotated image (see `study_images`)."""
    return study_images(gt, data_root, spacing_mm, gt_path).spacing_mm


def studies_to_arrays(
    gt: Mapping[str, StudyAnnotation],
    pred: Mapping[str, StudyAnnotation],
    spacing_by_study: Mapping[str, tuple[float, float]],
    vocab: str | Vocabulary = "tianchi2020",
    ignore_unknown: bool = False,
    pred_source: str = "<predictions>",
) -> tuple[GroundTruthArrays, PredictionArrays, np.ndarray, list[Problem]]:
    """Flat arrays for `score_detections`: study indices follow the ground-truth order; each
    predicted point becomes one row per label (score 1.0 when absent), in file order.

    Returns (ground truth, predictions, spacing (S, 2), problems). Only ground-truth studies
    in `spacing_by_study` are scored (predictions of the others are dropped without a word:
    the caller reports those studies as skipped); a scored study the prediction file does not
    list is reported, its points count as missed. Predictions for studies without ground
    truth raise `EvaluationError`, or are dropped and reported when `ignore_unknown`.
    """
    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    problems: list[Problem] = []
    unknown = [uid for uid in pred if uid not in gt]
    if unknown and not ignore_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise EvaluationError(
            f"prediction file has study {one_line(unknown[0])}{more} that is not in the ground "
            f"truth; check the files belong to the same split, or pass --ignore-unknown to skip them"
        )
    if unknown:
        problems.append(
            Problem(
                "unknown_study",
                str(pred_source),
                None,
                None,
                f"ignored {len(unknown)} predicted studies without ground truth: "
                + ", ".join(unknown[:5])
                + (" ..." if len(unknown) > 5 else ""),
            )
        )
    scored = [uid for uid in gt if uid in spacing_by_study]
    unpredicted = [uid for uid in scored if uid not in pred]
    if unpredicted:
        one = len(unpredicted) == 1
        problems.append(
            Problem(
                "unpredicted_study",
                str(pred_source),
                None,
                None,
                f"{len(unpredicted)} ground-truth {'study has' if one else 'studies have'} no "
                f"predictions ({'' if one else 'first: '}"
                + ", ".join(unpredicted[:5])
                + (" ..." if len(unpredicted) > 5 else "")
                + f"); {'its' if one else 'their'} points count as missed",
            )
        )
    study_index = {uid: i for i, uid in enumerate(scored)}
    spacing = np.array([spacing_by_study[uid] for uid in scored], dtype=np.float64).reshape(-1, 2)

    g_study, g_point, g_xy, g_labels = [], [], [], []
    for uid, s_i in study_index.items():
        for p in gt[uid].points:
            g_study.append(s_i)
            g_point.append(POINT_INDEX[p.identification])
            g_xy.append((p.x, p.y))
            row = np.zeros(vocab.num_classes, dtype=bool)
            row[[vocab.class_index(p.kind, code) for code in p.labels]] = True
            g_labels.append(row)
    p_study, p_point, p_cls, p_xy, p_score = [], [], [], [], []
    class_index = {
        (kind, code): vocab.class_index(kind, code)
        for kind in ("vertebra", "disc")
        for code in vocab.codes(kind)
    }
    for uid, study in pred.items():
        if uid not in study_index:
            continue
        if (
            study.instance_uid
            and gt[uid].instance_uid
            and study.instance_uid != gt[uid].instance_uid
        ):
            problems.append(
                Problem(
                    "instance_mismatch",
                    str(pred_source),
                    uid,
                    None,
                    f"predicted instance {study.instance_uid} differs from the annotated "
                    f"{gt[uid].instance_uid}; scored in the annotated image's pixels",
                )
            )
        s_i = study_index[uid]
        for p in study.points:
            for code in p.labels:
                p_study.append(s_i)
                p_point.append(POINT_INDEX[p.identification])
                p_cls.append(class_index[(p.kind, code)])
                p_xy.append((p.x, p.y))
                p_score.append(1.0 if p.score is None else p.score)
    gt_arrays = GroundTruthArrays(
        np.array(g_study, dtype=np.int64),
        np.array(g_point, dtype=np.int64),
        np.array(g_xy, dtype=np.float64).reshape(-1, 2),
        np.array(g_labels, dtype=bool).reshape(-1, vocab.num_classes),
    )
    pred_arrays = PredictionArrays(
        np.array(p_study, dtype=np.int64),
        np.array(p_point, dtype=np.int64),
        np.array(p_cls, dtype=np.int64),
        np.array(p_xy, dtype=np.float64).reshape(-1, 2),
        np.array(p_score, dtype=np.float64),
    )
    return gt_arrays, pred_arrays, spacing, problems


@dataclass
class Evaluation:
    """The report, every reported problem of both files, and the studies left out."""

    report: DetectionReport
    problems: list[Problem]
    skipped: list[SkippedStudy]

    def to_dict(self) -> dict:
        """The report's JSON plus 'problems' and 'skipped_studies'."""
        return {
            **self.report.to_dict(),
            "problems": [p.to_dict() for p in self.problems],
            "skipped_studies": [s.to_dict() for s in self.skipped],
        }


def _file_problems(studies: Mapping[str, StudyAnnotation]) -> list[Problem]:
    return [p for s in studies.values() for p in s.problems]


def _no_gt_points(gt_path: str | Path, n_skipped: int = 0) -> str:
    skipped = f" ({n_skipped} studies skipped)" if n_skipped else ""
    return (
        f"no ground-truth points to score in {one_line(gt_path)}{skipped}; a score of an empty "
        "evaluation set would mean nothing"
    )


def evaluate_files(
    pred_path: str | Path,
    gt_path: str | Path,
    data_root: str | Path | None = None,
    spacing_mm: tuple[float, float] | None = None,
    vocab: str = "tianchi2020",
    radius_mm: float = 8.0,
    baseline_radius_mm: float = 6.0,
    sdr_radii_mm: Sequence[float] = (2.0, 4.0, 6.0, 8.0),
    ignore_unknown: bool = False,
    skip_missing_spacing: bool = False,
) -> Evaluation:
    """Check both files, then score the predictions against the annotation (docs/metric.md)."""
    try:
        check_radii(radius_mm, baseline_radius_mm, sdr_radii_mm)
    except ValueError as err:
        raise EvaluationError(str(err)) from None
    gt = load_annotations(gt_path, vocab)
    if not any(s.points for s in gt.values()):  # before any check that blames the predictions
        raise EvaluationError(_no_gt_points(gt_path))
    pred = load_annotations(pred_path, vocab, predictions=True)
    images = study_images(gt, data_root, spacing_mm, gt_path, skip_missing_spacing)
    problems = _file_problems(gt) + _file_problems(pred) + images.problems
    problems += check_against_images(gt, images.images, str(gt_path))
    problems += check_against_images(pred, images.images, str(pred_path))
    gt_a, pred_a, spacing, more = studies_to_arrays(
        gt, pred, images.spacing_mm, vocab, ignore_unknown, str(pred_path)
    )
    if not len(gt_a.point):
        raise EvaluationError(_no_gt_points(gt_path, len(images.skipped)))
    report = score_detections(
        gt_a, pred_a, spacing, vocab, radius_mm, baseline_radius_mm, sdr_radii_mm
    )
    return Evaluation(report, problems + more, images.skipped)


def _fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None or v != v else f"{v:.{digits}f}"


def format_table(report: DetectionReport) -> str:
    """Readable per-class and overall table."""
    vocab = get_vocabulary(report.vocab)
    meanings = {
        f"{kind}/{code}": text
        for kind in ("vertebra", "disc")
        for code, text in getattr(vocab, kind).items()
    }
    head = (
        f"{'class':<13} {'meaning':<28} {'GT':>5} {'TP':>5} {'FP':>5} {'FN':>5} "
        f"{'prec':>6} {'recall':>6} {'F1':>6} {'AP':>6}"
    )
    lines = [
        f"Point detection at R = {report.radius_mm:g} mm ({report.n_studies} studies, "
        f"{report.n_gt_points} GT points, {report.n_predictions} prediction rows)",
        head,
        "-" * len(head),
    ]
    for name, c in report.classes.items():
        lines.append(
            f"{name:<13} {meanings[name][:28]:<28} {c.n_gt:>5} {c.tp:>5} {c.fp:>5} {c.fn:>5} "
            f"{_fmt(c.precision):>6} {_fmt(c.recall):>6} {_fmt(c.f1):>6} {_fmt(c.ap):>6}"
        )
    lines.append("-" * len(head))
    lines.append(
        f"{'pooled':<13} {'':<28} {report.tp + report.fn:>5} {report.tp:>5} {report.fp:>5} "
        f"{report.fn:>5} {_fmt(report.precision):>6} {_fmt(report.recall):>6} "
        f"{_fmt(report.f1):>6} {_fmt(report.map):>6}"
    )
    overall = [
        (f"mAP @ {report.radius_mm:g} mm", _fmt(report.map, 4)),
        (
            "precision / recall / F1",
            f"{_fmt(report.precision, 4)} / {_fmt(report.recall, 4)} / {_fmt(report.f1, 4)}",
        ),
        (
            f"2020 baseline macro-F1 @ {report.baseline_radius_mm:g} mm",
            _fmt(report.baseline_macro_f1, 4),
        ),
        (f"key-point recall @ {report.baseline_radius_mm:g} mm", _fmt(report.keypoint_recall, 4)),
    ]
    width = max(len(label) for label, _ in overall) + 2
    lines += ["", *(f"{label:<{width}}{value}" for label, value in overall), ""]
    radii = list(report.localisation["all"].sdr)
    head = (
        f"{'localisation':<13} {'points':>6} {'missing':>7} {'MRE mm':>7} {'median':>7} "
        + " ".join(f"{f'<{r:g}mm':>7}" for r in radii)
    )
    lines += [head, "-" * len(head)]
    for group, r in report.localisation.items():
        lines.append(
            f"{group:<13} {r.n_points:>6} {r.n_missing:>7} {_fmt(r.mre_mm, 2):>7} "
            f"{_fmt(r.median_re_mm, 2):>7} " + " ".join(f"{_fmt(v):>7}" for v in r.sdr.values())
        )
    return "\n".join(lines)


def format_problems(evaluation: Evaluation) -> str:
    """The skipped studies and problems under the table, one line each."""
    lines = []
    if evaluation.skipped:
        lines += ["", f"Skipped studies ({len(evaluation.skipped)}, not scored)"]
        lines += [f"  study {one_line(s.study)}: {one_line(s.reason)}" for s in evaluation.skipped]
    if evaluation.problems:
        lines += ["", f"Problems ({len(evaluation.problems)})"]
        lines += [f"  {p.line()}" for p in evaluation.problems]
    return "\n".join(lines)
