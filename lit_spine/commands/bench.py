"""`lit-spine bench`: time training, data, metric and phantom; write BENCHMARKS.md.

Checks the options and calls `lit_spine.bench.run.run_bench` with them.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from lit_spine.commands import common

NAME = "bench"


def build_parser():
    """The `lit-spine bench` parser."""
    from lit_spine.bench import SECTIONS

    p = common.command_parser(
        NAME,
        "Time training, data, metric and phantom against the obvious "
        "alternatives; print one JSON line per figure and a summary; write BENCHMARKS.md.",
    )
    common.add_out(p, None, "write the Markdown report here (e.g. BENCHMARKS.md)")
    p.add_argument("--json-out", help="write every figure and ratio as JSON here")
    common.add_flag(p, "--quick", "tiny sizes (tests, smoke checks)")
    p.add_argument(
        "--repeats", type=int | None, help="repeats per figure (default 5; 2 with --quick)"
    )
    p.add_argument(
        "--only", type=common.comma_list, help=f"comma-separated sections: {', '.join(SECTIONS)}"
    )
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument(
        "--workdir",
        help="parent folder for the phantom and caches the bench builds "
        "(default: a temporary folder, removed afterwards)",
    )
    common.add_flag(p, "--keep-workdir", "keep the built phantom/caches")
    p.add_argument(
        "--backbones", type=common.comma_list, help="grid backbones (comma-separated timm names)"
    )
    p.add_argument("--norms", type=common.comma_list, help="grid norms (comma-separated)")
    p.add_argument("--image-size", type=int | None, help="network input side in px (default 256)")
    p.add_argument(
        "--batch-size", type=int | None, help="batch of the loader and Lightning sections"
    )
    p.add_argument("--grid-batch", type=int | None, help="batch of the backbone x norm grid")
    p.add_argument(
        "--loop-backbone",
        help="backbone of the Lightning-vs-plain and validation figures "
        "(default mobilenetv3_small_100: the fastest, so overheads show most)",
    )
    p.add_argument(
        "--step-backbones",
        type=common.comma_list,
        help="backbones of the precision/MFU section (default resnet18, mobilenetv3_large_100, "
        "convnext_atto; resnet18 with --quick)",
    )
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time the suite's step under torch.compile (default: on CUDA only; on the "
        "CPU compiling takes minutes)",
    )
    p.add_argument(
        "--sweep-epochs",
        type=int | None,
        help="epochs of the sweep section's runs (default: the preset's own)",
    )
    p.add_argument(
        "--max-minutes",
        type=float,
        default=9.0,
        help="time budget: remaining grid cells are skipped when it runs short",
    )
    return p


def _check(args) -> list[str]:
    """The sections to run; a UsageError names a bad option value and what would do."""
    from lit_spine.bench import SECTIONS

    sections = list(args.only or SECTIONS)
    for s in sections:
        common.choice("--only", s, SECTIONS, "section")
    for name in ("repeats", "image_size", "batch_size", "grid_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise common.UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.image_size is not None and args.image_size % 32:
        raise common.UsageError(
            f"--image-size must be a multiple of 32 (backbone stride), got {args.image_size}"
        )
    for name in (*(args.backbones or ()), *(args.step_backbones or ())):
        from lit_spine.models.backbones import backbone_family

        try:
            backbone_family(name)
        except ValueError as err:
            raise common.UsageError(f"--backbones/--step-backbones: {err}") from None
    if args.norms:
        from lit_spine.models import norms

        for n in args.norms:
            common.choice("--norms", n, norms.NORMS, "norm")
    return sections


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine bench`: exit 0, 1 when a section failed, 2 on bad options."""
    from lit_spine.bench.run import run_bench

    args = common.parse(build_parser(), argv)
    return common.run(NAME, lambda: run_bench(args, _check(args)), ())
