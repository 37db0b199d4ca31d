"""`lit-spine inspect ROOT`: what the suite sees in a dataset folder, before any training.

Calls `lit_spine.data.inspect.inspect_dataset` / `format_table` (challenge layout) or
`inspect_rsna2024` (`--format rsna2024`) or `inspect_spider` (`--format spider`) and prints
the table or the JSON.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence

from lit_spine.commands import common

NAME = "inspect"


def build_parser():
    """The `lit-spine inspect` parser."""
    parser = common.command_parser(
        NAME,
        "Show what the suite sees in a dataset folder: studies, series, the chosen "
        "T2 sagittal slice, annotated points and every problem.",
    )
    parser.add_argument("root", help="a split folder of study folders (or one study folder)")
    parser.add_argument(
        "--annotation",
        help="annotation JSON (default: <split>_annotation.json beside ROOT when it exists)",
    )
    parser.add_argument(
        "--series-map",
        help="series map JSON (default: <split>_series_map.json beside ROOT when it exists)",
    )
    common.add_vocab(parser)
    common.add_layout(
        parser,
        "--format",
        "dataset layout (rsna2024: ROOT holds the competition CSVs; spider: ROOT holds "
        "images/, masks/ and radiological_gradings.csv)",
    )
    parser.add_argument(
        "--task",
        help="rsna2024: rsna2024_canal (default) or rsna2024_foraminal; spider: spider_disc "
        "(default) or spider_spine (docs/datasets.md)",
    )
    common.add_json(
        parser, 'print {"studies": [one object per study], "problems": [dataset-level problems]}'
    )
    common.add_workers(
        parser, None, "header-reading threads (1, the default, is fastest on a local disk)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine inspect`; exit 0 (problems are reported), 2 on unusable input."""
    from lit_spine.data.annotation import AnnotationError
    from lit_spine.data.dicom import DatasetError
    from lit_spine.data.rsna import RsnaFormatError
    from lit_spine.data.spider import SpiderFormatError

    args = common.parse(build_parser(), argv)
    errors = (DatasetError, AnnotationError, RsnaFormatError, SpiderFormatError, ValueError)
    return common.run(NAME, lambda: _inspect(args), errors)


def _inspect(args) -> int:
    from lit_spine.data.inspect import (
        format_table,
        inspect_dataset,
        inspect_rsna2024,
        inspect_spider,
    )
    from lit_spine.data.spider import SPIDER_TASKS

    # The tasks each layout's inspect reads (FORMAT_TASKS of data/datamodule.py, which
    # imports torch: not loaded for a header scan).
    tasks = {"rsna2024": ("rsna2024_canal", "rsna2024_foraminal"), "spider": SPIDER_TASKS}
    if args.task and args.task not in tasks.get(args.format, ()):
        raise common.UsageError(
            f"--task {args.task!r} does not fit --format {args.format}; --task is for --format "
            "rsna2024 (rsna2024_canal, rsna2024_foraminal) and spider (spider_disc, "
            "spider_spine)"
        )
    if args.format == "rsna2024":
        summary, problems, text = inspect_rsna2024(args.root, args.task or "rsna2024_canal")
        payload = json.dumps(summary, indent=1) if args.json else text
        return _print(payload, problems if args.json else [])
    if args.format == "spider":
        summary, problems, text = inspect_spider(args.root, args.task or "spider_disc")
        payload = json.dumps(summary, indent=1) if args.json else text
        return _print(payload, problems if args.json else [])
    vocab = common.check_vocab(args.vocab)
    reports, problems = inspect_dataset(
        args.root, args.annotation, args.series_map, vocab, args.workers
    )
    if args.json:
        payload = json.dumps({"studies": reports, "problems": problems}, indent=1)
        return _print(payload, problems)
    return _print(format_table(reports, problems), [])


def _print(text: str, problems: list[str]) -> int:
    """Print the result, then the dataset problems on stderr."""
    print(text)
    for p in problems:
        print(f"lit-spine {NAME}: {p}", file=sys.stderr)
    return 0
