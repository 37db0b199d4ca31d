"""`lit-spine evaluate`: score a prediction file against an annotation file (spec/metric.md).

Both files use the annotation schema; predicted points may carry a `"score"` in [0, 1]
(1.0 when absent). Distances are in millimetres with the pixel spacing of each study's
annotated image, read from the DICOM headers under `--data-root` (or one `--spacing-mm`
for every study). The numbers come from `lit_spine.metrics.score_detections`, the same core
the training-time `SpineDetectionMetric` uses.

    lit-spine evaluate --pred runs/x/predictions.json --gt data/val_annotation.json \
        --data-root data [--radius-mm 8] [--baseline-radius-mm 6] [--vocab tianchi2020] [--json]
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from lit_spine.data.annotation import AnnotationError, StudyAnnotation, load_annotations
from lit_spine.data.dicom import DatasetError, read_spacing_for_instances
from lit_spine.data.labels import POINT_INDEX, VOCABULARIES, Vocabulary, get_vocabulary
from lit_spine.metrics import (
    DetectionReport,
    GroundTruthArrays,
    PredictionArrays,
    score_detections,
)


class EvaluationError(ValueError):
    """The files cannot be scored as they are (unknown study, missing spacing, ...)."""


def _spacing_by_instance(
    data_root: Path, gt_path: str | Path | None
) -> dict[str, tuple[float, float]]:
    """{SOPInstanceUID: (row, col)} under `data_root`: a split folder, or a dataset root whose
    split folders are searched (the ground truth's own split `<root>/<split>` first)."""
    try:
        return read_spacing_for_instances(data_root)
    except DatasetError as err:
        splits = sorted(p for p in data_root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if gt_path is not None:
            own = data_root / Path(gt_path).name.removesuffix("_annotation.json")
            splits.sort(key=lambda p: p != own)
        found: dict[str, tuple[float, float]] = {}
        for split in splits:
            try:
                found.update(read_spacing_for_instances(split))
            except DatasetError:
                continue
        if not found:
            raise EvaluationError(str(err)) from None
        return found


def study_spacing(
    gt: Mapping[str, StudyAnnotation],
    data_root: str | Path | None = None,
    spacing_mm: tuple[float, float] | None = None,
    gt_path: str | Path | None = None,
) -> dict[str, tuple[float, float]]:
    """(row, col) spacing of each ground-truth study's annotated image, from the DICOM headers
    under `data_root` (`lit_spine.data.dicom.read_spacing_for_instances`); `spacing_mm`, when
    given, is used for every study instead."""
    if spacing_mm is not None:
        return {uid: (float(spacing_mm[0]), float(spacing_mm[1])) for uid in gt}
    if data_root is None:
        raise EvaluationError(
            "pixel spacing needed: pass --data-root (DICOM files) or --spacing-mm ROW,COL"
        )
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise EvaluationError(f"--data-root {data_root}: not a folder")
    for study in gt.values():
        if not study.instance_uid:
            raise EvaluationError(
                f"ground truth study {study.study_uid} names no instanceUid, so its pixel spacing "
                f"is unknown; fix the annotation or pass --spacing-mm ROW,COL"
            )
    by_instance = _spacing_by_instance(data_root, gt_path)
    out = {}
    for study in gt.values():
        if study.instance_uid not in by_instance:
            raise EvaluationError(
                f"study {study.study_uid}: no DICOM image for annotated instance "
                f"{study.instance_uid} under {data_root}; point --data-root at the split's images "
                f"or pass --spacing-mm ROW,COL"
            )
        out[study.study_uid] = by_instance[study.instance_uid]
    return out


def studies_to_arrays(
    gt: Mapping[str, StudyAnnotation],
    pred: Mapping[str, StudyAnnotation],
    spacing_by_study: Mapping[str, tuple[float, float]],
    vocab: str | Vocabulary = "tianchi2020",
    ignore_unknown: bool = False,
) -> tuple[GroundTruthArrays, PredictionArrays, np.ndarray, list[str]]:
    """Flat arrays for `score_detections`: study indices follow the ground-truth order; each
    predicted point becomes one row per label (score 1.0 when absent), in file order.

    Returns (ground truth, predictions, spacing (S, 2), warnings). Predictions for studies
    without ground truth raise `EvaluationError`, or are dropped with a warning when
    `ignore_unknown`.
    """
    vocab = get_vocabulary(vocab) if isinstance(vocab, str) else vocab
    warnings: list[str] = []
    unknown = [uid for uid in pred if uid not in gt]
    if unknown and not ignore_unknown:
        more = f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""
        raise EvaluationError(
            f"prediction file has study {unknown[0]}{more} that is not in the ground truth; "
            f"check the files belong to the same split, or pass --ignore-unknown to skip them"
        )
    if unknown:
        warnings.append(
            f"ignored {len(unknown)} predicted studies without ground truth: "
            + ", ".join(unknown[:5])
            + (" ..." if len(unknown) > 5 else "")
        )
    study_index = {uid: i for i, uid in enumerate(gt)}
    spacing = np.array([spacing_by_study[uid] for uid in gt], dtype=np.float64).reshape(-1, 2)

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
            warnings.append(
                f"study {uid}: predicted instance {study.instance_uid} differs from the "
                f"annotated {gt[uid].instance_uid}; scored in the annotated image's pixels"
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
    return gt_arrays, pred_arrays, spacing, warnings


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
) -> tuple[DetectionReport, list[str]]:
    """Score a prediction file against an annotation file; returns (report, warnings)."""
    gt = load_annotations(gt_path, vocab)
    pred = load_annotations(pred_path, vocab, predictions=True)
    spacing = study_spacing(gt, data_root, spacing_mm, gt_path)
    arrays = studies_to_arrays(gt, pred, spacing, vocab, ignore_unknown)
    report = score_detections(*arrays[:3], vocab, radius_mm, baseline_radius_mm, sdr_radii_mm)
    return report, arrays[3]


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


def _spacing_arg(text: str) -> tuple[float, float]:
    try:
        row, col = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected ROW,COL in mm (e.g. 0.7,0.7), got {text!r}"
        ) from None
    if not (row > 0 and col > 0):
        raise argparse.ArgumentTypeError(f"spacings must be positive, got {text!r}")
    return row, col


def _radii_arg(text: str) -> tuple[float, ...]:
    try:
        radii = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated radii in mm, got {text!r}"
        ) from None
    return radii


def build_parser() -> argparse.ArgumentParser:
    """The `lit-spine evaluate` argument parser."""
    parser = argparse.ArgumentParser(
        prog="lit-spine evaluate",
        description="Score a prediction file against an annotation file (spec/metric.md): "
        "point detection at R (P/R/F1, AP, mAP), the 2020 baseline's macro-F1 and "
        "key-point recall, radial errors in mm.",
    )
    parser.add_argument(
        "--pred", required=True, help="prediction file (annotation schema, optional 'score')"
    )
    parser.add_argument("--gt", required=True, help="annotation file (ground truth)")
    parser.add_argument(
        "--data-root",
        help="the split's image folder (<root>/<split>) or the dataset "
        "root; the annotated images' PixelSpacing is read",
    )
    parser.add_argument(
        "--spacing-mm",
        type=_spacing_arg,
        metavar="ROW,COL",
        help="one pixel spacing for every study instead of reading DICOM headers",
    )
    parser.add_argument("--radius-mm", type=float, default=8.0, help="hit radius R (default 8)")
    parser.add_argument(
        "--baseline-radius-mm",
        type=float,
        default=6.0,
        help="radius of the 2020 baseline's macro-F1 (default 6)",
    )
    parser.add_argument(
        "--sdr-mm",
        type=_radii_arg,
        default=(2.0, 4.0, 6.0, 8.0),
        metavar="R1,R2,...",
        help="success-rate radii (default 2,4,6,8)",
    )
    parser.add_argument(
        "--vocab",
        default="tianchi2020",
        choices=sorted(VOCABULARIES),
        help="label vocabulary of both files (default tianchi2020)",
    )
    parser.add_argument(
        "--ignore-unknown",
        action="store_true",
        help="skip (with a warning) predicted studies that are not in the ground truth",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object instead of tables"
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lit-spine evaluate`; exit 2 with a message on unusable input."""
    args = build_parser().parse_args(argv)
    try:
        report, warnings = evaluate_files(
            args.pred,
            args.gt,
            data_root=args.data_root,
            spacing_mm=args.spacing_mm,
            vocab=args.vocab,
            radius_mm=args.radius_mm,
            baseline_radius_mm=args.baseline_radius_mm,
            sdr_radii_mm=args.sdr_mm,
            ignore_unknown=args.ignore_unknown,
        )
    except (AnnotationError, EvaluationError, DatasetError) as err:
        print(f"lit-spine evaluate: error: {err}", file=sys.stderr)
        return 2
    for w in warnings:
        print(f"lit-spine evaluate: warning: {w}", file=sys.stderr)
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(format_table(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
