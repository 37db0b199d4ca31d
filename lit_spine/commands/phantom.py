"""`lit-spine phantom`: write the built-in phantom dataset (and/or its preview PNG).

Calls `lit_spine.phantom.generate.generate_phantom` / `lit_spine.phantom.preview.write_preview`
(challenge layout) or `lit_spine.phantom.rsna2024.write_rsna2024_phantom` (`--layout rsna2024`)
or `lit_spine.phantom.spider.write_spider_phantom` (`--layout spider`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from lit_spine.commands import common

NAME = "phantom"
VOCABS = ("tianchi2020", "seed7")


def build_parser():
    """The `lit-spine phantom` parser."""
    parser = common.command_parser(
        NAME,
        "Write synthetic lumbar-spine MRI studies (DICOM + annotation JSON) in the challenge "
        "layout. Deterministic for a seed; safe to interrupt and rerun.",
        epilog="difficulty: 0 easy (clean images, obvious lesions), 1 default (textbook lesion "
        "sizes, realistic noise), 2 hard (noisy, strong shading, varied anatomy, subtle "
        "lesions).",
    )
    common.add_out(parser, "data/phantom", "dataset folder")
    parser.add_argument("--studies", type=int, default=120, help="studies in all splits")
    common.add_seed(parser)
    common.add_layout(
        parser, "--layout", "file layout to write (rsna2024, spider: docs/datasets.md)"
    )
    common.add_vocab(parser, f"label vocabulary, {' or '.join(VOCABS)}")
    parser.add_argument(
        "--splits",
        help="fractions or counts, e.g. train=0.7,val=0.15,test=0.15 (default) "
        "or train=80,val=20,test=20",
    )
    parser.add_argument(
        "--size",
        type=int | None,
        help="force square images of this many px (default: realistic 384-640, some non-square)",
    )
    parser.add_argument(
        "--difficulty", type=float, default=1.0, help="0 easy .. 1 default .. 2 hard"
    )
    common.add_workers(parser, common.cpu_count(), "processes (default: CPU count)")
    parser.add_argument(
        "--preview",
        nargs="?",
        const="",
        default=None,
        metavar="PNG",
        help="also save a PNG grid of annotated slices (default OUT/preview.png); "
        "works on an existing dataset too",
    )
    common.add_force(parser, "replace a phantom made with other parameters")
    common.add_flag(parser, "--no-progress", "hide the progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine phantom`; exit 2 with a one-line message on unusable input."""
    from lit_spine.phantom.generate import PhantomError

    args = common.parse(build_parser(), argv)
    return common.run(NAME, lambda: _phantom(args), (PhantomError, ValueError, FileExistsError))


def _phantom(args) -> int:
    from lit_spine.phantom.generate import MARKER, generate_phantom
    from lit_spine.phantom.preview import write_preview

    root = Path(args.out)
    vocab = common.check_vocab(args.vocab, VOCABS)
    # The other layouts through their marker, as the data module makes them: written once,
    # a phantom of other parameters replaced, a non-empty folder that is no phantom refused.
    if args.layout == "rsna2024":
        from lit_spine.phantom.rsna2024 import ensure_rsna2024_phantom

        ensure_rsna2024_phantom(root, args.studies, args.seed, args.size or 64)
        print(f"phantom: {args.studies} studies in rsna2024 layout in {root}")
        return 0
    if args.layout == "spider":
        from lit_spine.phantom.spider import ensure_spider_phantom

        ensure_spider_phantom(root, args.studies, args.seed, args.size or 64)
        print(f"phantom: {args.studies} patients in spider layout in {root}")
        return 0
    preview_only = (
        args.preview is not None
        and not (root / MARKER).exists()
        and any(root.glob("*_annotation.json"))
    )
    if not preview_only:
        generate_phantom(
            root,
            args.studies,
            args.seed,
            args.splits,
            vocab,
            args.size,
            args.difficulty,
            progress=not args.no_progress,
            workers=max(1, args.workers),
            force=args.force,
        )
        print(f"phantom: {args.studies} studies in {root}")
    if args.preview is not None:
        png = write_preview(root, args.preview or None, vocab=vocab)
        print(f"preview: {png}")
    return 0
