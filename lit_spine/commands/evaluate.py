"""`lit-spine evaluate`: score a prediction file against the data's labels (docs/metric.md).

`--format tianchi2020` (default) calls `lit_spine.evaluate.evaluate_files` and prints
`format_table` + `format_problems`, or the JSON of `Evaluation.to_dict`; `--format rsna2024`
and `--format spider` call `lit_spine.evaluate_layouts` on the prediction files of those
layouts, with the labels read from `--data-root` (docs/datasets.md, "Prediction files").
The radius and spacing options are checked while parsing.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from typing import Any

from lit_spine.commands import common
from lit_spine.utils import one_line

NAME = "evaluate"


def _spacing(text: Any) -> tuple[float, float]:
    """Type of `--spacing-mm ROW,COL`: one plausible pixel spacing in mm."""
    from lit_spine.data.dicom import MAX_SPACING_ASPECT, SPACING_RANGE_MM
    from lit_spine.evaluate import spacing_problem

    try:
        parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
        row, col = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise common.OptionValueError(
            f"expected ROW,COL in mm (e.g. 0.7,0.7), got {one_line(text, 80)!r}"
        ) from None
    reason = spacing_problem(row, col)
    if reason is not None:
        lo, hi = SPACING_RANGE_MM
        raise common.OptionValueError(
            f"ROW,COL must be finite spacings in {lo:g}-{hi:g} mm, at most "
            f"{MAX_SPACING_ASPECT:g}:1 apart; {one_line(text, 80)!r}: {reason}"
        )
    return row, col


def _radii(text: Any) -> tuple[float, ...]:
    """Type of `--sdr-mm R1,R2,...`: distinct finite radii in mm > 0."""
    from lit_spine.metrics import radius_problem

    try:
        parts = text if isinstance(text, (list, tuple)) else str(text).split(",")
        radii = tuple(float(v) for v in parts)
    except (TypeError, ValueError):
        radii = ()
    if not radii or any(radius_problem(r) for r in radii) or len(set(radii)) != len(radii):
        raise common.OptionValueError(
            f"expected distinct comma-separated radii in mm, each finite and > 0 (e.g. 2,4,6,8), "
            f"got {one_line(text, 80)!r}"
        )
    return radii


def build_parser():
    """The `lit-spine evaluate` parser."""
    parser = common.command_parser(
        NAME,
        "Score a prediction file against the data's labels (docs/metric.md): "
        "point detection at R (P/R/F1, AP, mAP), the 2020 baseline's macro-F1 and "
        "key-point recall, radial errors in mm; for rsna2024 the competition's weighted "
        "log loss and the localisation error (docs/datasets.md).",
    )
    common.add_layout(
        parser,
        "--format",
        "layout of the prediction file: tianchi2020 (predictions.json), rsna2024 "
        "(submission.csv), spider (predictions.csv)",
    )
    parser.add_argument(
        "--pred",
        required=True,
        help="prediction file (tianchi2020: annotation schema, optional 'score'; rsna2024: "
        "submission.csv; spider: predictions.csv)",
    )
    parser.add_argument(
        "--gt", help="annotation file (ground truth; tianchi2020 only, required there)"
    )
    parser.add_argument(
        "--data-root",
        help="tianchi2020: the split's image folder (<root>/<split>) or the dataset root, "
        "whose annotated images' PixelSpacing is read; rsna2024 / spider (required): the "
        "layout's root, whose labels are the ground truth",
    )
    parser.add_argument(
        "--coordinates",
        help="rsna2024: the predicted points (default: coordinates.csv beside --pred, when "
        "it exists)",
    )
    parser.add_argument(
        "--spacing-mm",
        type=_spacing,
        metavar="ROW,COL",
        help="one pixel spacing for every study instead of reading DICOM headers",
    )
    parser.add_argument(
        "--radius-mm",
        type=common.positive_radius("--radius-mm"),
        default=8.0,
        help="hit radius R",
    )
    parser.add_argument(
        "--baseline-radius-mm",
        type=common.positive_radius("--baseline-radius-mm"),
        default=6.0,
        help="radius of the 2020 baseline's macro-F1",
    )
    parser.add_argument(
        "--sdr-mm",
        type=_radii,
        default=(2.0, 4.0, 6.0, 8.0),
        metavar="R1,R2,...",
        help="success-rate radii",
    )
    common.add_vocab(parser, "label vocabulary of both files")
    common.add_flag(
        parser,
        "--ignore-unknown",
        "skip (with a reported problem) predicted studies that are not in the ground truth",
    )
    common.add_flag(
        parser,
        "--skip-missing-spacing",
        "leave out (and list) ground-truth studies whose annotated image has no usable "
        "PixelSpacing, instead of stopping",
    )
    common.add_json(parser, "print one JSON object instead of tables")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine evaluate`; exit 2 with a one-line message on unusable input."""
    from lit_spine.data.annotation import AnnotationError
    from lit_spine.data.dicom import DatasetError
    from lit_spine.data.spider import SpiderFormatError
    from lit_spine.evaluate import EvaluationError
    from lit_spine.evaluate_layouts import LayoutEvaluationError

    args = common.parse(build_parser(), argv)
    errors = (AnnotationError, EvaluationError, DatasetError)
    errors += (LayoutEvaluationError, SpiderFormatError)
    return common.run(NAME, lambda: _evaluate(args), errors)


def _evaluate_layout(args) -> int:
    from lit_spine.evaluate_layouts import (
        evaluate_rsna2024,
        evaluate_spider,
        format_layout,
    )

    if not args.data_root:
        raise common.UsageError(
            f"--format {args.format} needs --data-root: the layout's root, whose labels are "
            "the ground truth"
        )
    if args.gt or args.spacing_mm:
        raise common.UsageError(
            f"--gt and --spacing-mm are for --format tianchi2020; {args.format} reads its "
            "labels and pixel spacing from --data-root"
        )
    if args.format == "rsna2024":
        evaluation = evaluate_rsna2024(
            args.pred, args.data_root, args.coordinates, args.radius_mm, tuple(args.sdr_mm),
            args.ignore_unknown,
        )  # fmt: skip
    else:
        if args.coordinates:
            raise common.UsageError("--coordinates is for --format rsna2024")
        evaluation = evaluate_spider(
            args.pred, args.data_root, args.radius_mm, args.baseline_radius_mm,
            tuple(args.sdr_mm), args.ignore_unknown,
        )  # fmt: skip
    if evaluation.problems:
        print(
            f"lit-spine {NAME}: warning: {len(evaluation.problems)} problems, listed "
            + ("in the JSON's 'problems'" if args.json else "under the table"),
            file=sys.stderr,
        )
    if args.json:
        for p in evaluation.problems:
            print(f"lit-spine {NAME}: warning: {one_line(p)}", file=sys.stderr)
        print(json.dumps(evaluation.to_dict()))
    else:
        print(format_layout(evaluation))
    return 0


def _evaluate(args) -> int:
    if args.format != "tianchi2020":
        return _evaluate_layout(args)
    if not args.gt:
        raise common.UsageError("--gt (the annotation file) is required for --format tianchi2020")
    if args.coordinates:
        raise common.UsageError("--coordinates is for --format rsna2024")
    from lit_spine.evaluate import evaluate_files, format_problems, format_table

    evaluation = evaluate_files(
        args.pred,
        args.gt,
        data_root=args.data_root,
        spacing_mm=args.spacing_mm,
        vocab=common.check_vocab(args.vocab),
        radius_mm=args.radius_mm,
        baseline_radius_mm=args.baseline_radius_mm,
        sdr_radii_mm=tuple(args.sdr_mm),
        ignore_unknown=args.ignore_unknown,
        skip_missing_spacing=args.skip_missing_spacing,
    )
    n_issues = len(evaluation.problems) + len(evaluation.skipped)
    if args.json:
        # Problems also go to stderr: a script reading stdout still shows them to its user.
        for s in evaluation.skipped:
            print(
                f"lit-spine {NAME}: skipped: study {one_line(s.study)}: {one_line(s.reason)}",
                file=sys.stderr,
            )
        for p in evaluation.problems:
            print(f"lit-spine {NAME}: warning: {p.line()}", file=sys.stderr)
        print(json.dumps(evaluation.to_dict()))
    else:
        if n_issues:
            print(
                f"lit-spine {NAME}: warning: {len(evaluation.skipped)} skipped studies and "
                f"{len(evaluation.problems)} problems, listed under the table",
                file=sys.stderr,
            )
        print(format_table(evaluation.report) + format_problems(evaluation))
    return 0
