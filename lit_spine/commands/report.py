"""`lit-spine report`: tables and plots from sweep or run folders.

Calls `lit_spine.report.print_report` (and `latest_sweep` for `--latest`).
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_spine.commands import common

NAME = "report"


def build_parser():
    """The `lit-spine report` parser."""
    from lit_spine.report import DEFAULT_METRIC, SEED_KEYS

    parser = common.command_parser(
        NAME,
        "Rank sweep cells (configuration minus training seed): mean ± std, n, 95% "
        "bootstrap CI, runs not converged, runtime, images/s, parameters; paired differences, "
        "P(A>B), Holm-corrected p-values and seeds to separate against a baseline cell; "
        "the protocol and a verdict in words; learning-curve, per-factor and "
        "norm-vs-batch-size plots.",
    )
    parser.add_argument(
        "paths",
        nargs="*",
        help="sweep folders (with state.json), run folders, or folders holding run folders",
    )
    common.add_flag(
        parser, "--latest", "report the most recently updated sweep under --sweeps-root"
    )
    parser.add_argument("--sweeps-root", default="sweep_runs", help="where --latest looks")
    common.add_out(
        parser,
        None,
        "output folder (default: SWEEP_DIR/report for one folder, else reports/<time>)",
    )
    parser.add_argument(
        "--metric",
        default=None,
        help=f"metric to rank by (default: the sweep's, else {DEFAULT_METRIC})",
    )
    parser.add_argument(
        "--goal",
        choices=["maximize", "minimize"],
        default=None,
        help="default: the sweep's, else maximize",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        help="cell to compare against, e.g. 'norm=batchnorm' or 'norm=batchnorm,drop_rate=0.0' "
        "(short or full keys); default: the first listed value of every factor in the sweep "
        "file, else the best cell",
    )
    parser.add_argument(
        "--seed-key",
        action="append",
        default=None,
        metavar="KEY",
        help=f"config key(s) that only seed a replicate (default: {', '.join(SEED_KEYS)}); "
        "repeat for several",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine report`."""
    args = common.parse(build_parser(), argv)
    return common.run(NAME, lambda: _report(args), (ValueError,))


def _report(args) -> int:
    from lit_spine.report import SEED_KEYS, latest_sweep, print_report

    paths = list(args.paths)
    if args.latest:
        paths.append(str(latest_sweep(args.sweeps_root)))
    if not paths:
        raise common.UsageError("give sweep or run folders, or --latest")
    print_report(
        paths,
        args.out,
        metric=args.metric,
        goal=args.goal,
        baseline=args.baseline,
        seed_keys=tuple(args.seed_key or SEED_KEYS),
    )
    return 0
