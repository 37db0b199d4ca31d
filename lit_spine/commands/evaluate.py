"""`lit-spine evaluate`: score a prediction file against an annotation file (docs/metric.md).

Calls `lit_spine.evaluate.evaluate_files` and prints `format_table` + `format_problems`, or
the JSON of `Evaluation.to_dict`. The radius and spacing options are checked while parsing.
"""

from __future__ import annotations

import argparse
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
        raise argparse.ArgumentTypeError(
            f"expected ROW,COL in mm (e.g. 0.7,0.7), got {one_line(text, 80)!r}"
        ) from None
    reason = spacing_problem(row, col)
    if reason is not None:
        lo, hi = SPACING_RANGE_MM
        raise argparse.ArgumentTypeError(
            f"ROW,COL must be finite spacings in {lo:g}-{hi:g} mm, at most "
            f"1:{MAX_SPACING_ASPECT:g} apart; {one_line(text, 80)!r}: {reason}"
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
        raise argparse.ArgumentTypeError(
            f"expected distinct comma-separated radii in mm, each finite and > 0 (e.g. 2,4,6,8), "
            f"got {one_line(text, 80)!r}"
        )
    return radii


def build_parser():
    """The `lit-spine evaluate` parser."""
    parser = common.command_parser(
        NAME,
        "Score a prediction file against an annotation file (docs/metric.md): "
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
    from lit_spine.evaluate import EvaluationError

    args = common.parse(build_parser(), argv)
    return common.run(
        NAME, lambda: _evaluate(args), (AnnotationError, EvaluationError, DatasetError)
    )


def _evaluate(args) -> int:
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
