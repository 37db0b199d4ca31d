"""`lit-spine sweep FILE`: run a W&B sweep file offline (or online with `--online`).

Calls `lit_spine.sweep.run_sweep`. `--config FILE` here is not a file of sweep options: it is
an overlay added to every run's `lit-spine fit` command after the sweep file's own `--config`
entries (e.g. `--config experiments/data/challenge2020.yaml` sweeps on that data), and part
of the sweep's identity, as the sweep file is.
"""

from __future__ import annotations

from collections.abc import Sequence

from lit_spine.commands import common

NAME = "sweep"
# options given to lit_spine.sweep.run_sweep under their own name
PASSED_ON = (
    "workers",
    "count",
    "max_runs",
    "out",
    "force",
    "dry_run",
    "online",
    "project",
    "entity",
)


def build_parser():
    """The `lit-spine sweep` parser."""
    from lit_spine.sweep import DEFAULT_OUT

    parser = common.command_parser(
        NAME,
        "Run a W&B sweep file. Offline (default): plan runs with W&B's `sweeps` engine, run "
        "them in parallel, log each to W&B offline, keep <out>/<name>/state.json so that a "
        "rerun skips finished runs, and end with the report table and plots. "
        "With --online: create the sweep on a W&B server and start agents.",
        epilog=(
            "examples:\n"
            "  lit-spine sweep sweeps/default.yaml --workers 2\n"
            "  lit-spine sweep sweeps/full.yaml --workers 4 --dry-run\n"
            "  lit-spine sweep sweeps/full.yaml --count 20   # the first 20 grid points\n"
            "  lit-spine sweep sweeps/default.yaml --config experiments/data/challenge2020.yaml\n"
            "  lit-spine sweep sweeps/full.yaml --online --project lit_spine --workers 4\n"
            "Rerunning the same command continues an interrupted sweep."
        ),
        config=False,
    )
    parser.add_argument("sweep_file", help="W&B sweep YAML (see sweeps/*.yaml)")
    parser.add_argument(
        "--config",
        action="append",
        default=[],
        metavar="FILE",
        help="LightningCLI YAML added to every run's command after the sweep file's own "
        "--config entries, e.g. a data overlay (repeatable, in order); a different overlay "
        "is a different sweep state, as a changed sweep file is",
    )
    common.add_workers(
        parser,
        1,
        "runs at once; CPU threads are divided among them and, with several "
        "GPUs, each run gets one (CUDA_VISIBLE_DEVICES)",
    )
    parser.add_argument(
        "--count",
        type=int | None,
        help="total runs of the sweep: required for random/bayes (or run_cap in the file); "
        "for grid, plan only the first N points. Online: runs per agent, as `wandb agent --count`",
    )
    parser.add_argument(
        "--max-runs",
        type=int | None,
        help="offline: start at most N runs in this invocation, then stop (rerun to continue)",
    )
    common.add_out(
        parser,
        DEFAULT_OUT,
        "parent folder of sweep folders; the sweep goes to OUT/<name>/",
    )
    common.add_force(
        parser,
        "continue even though the sweep file (or the --config overlay) changed and finished "
        "runs left the plan (they move to OUT/<name>/stale/)",
    )
    common.add_flag(parser, "--dry-run", "print the planned commands and exit")
    common.add_flag(parser, "--no-report", "skip the report at the end")
    common.add_flag(
        parser,
        "--online",
        "create the sweep on a W&B server (needs `wandb login` and network) and run agents",
    )
    parser.add_argument("--project", default="lit_spine", help="W&B project for --online")
    parser.add_argument("--entity", default=None, help="W&B entity (user or team) for --online")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `lit-spine sweep`."""
    from lit_spine.sweep import SweepError, run_sweep

    args = common.parse(build_parser(), argv)

    def checked() -> None:
        for option, value in (("--workers", args.workers), ("--count", args.count),
                              ("--max-runs", args.max_runs)):  # fmt: skip
            if value is not None and value < 1:
                raise common.UsageError(f"{option} must be at least 1, got {value}")

    return common.run(
        NAME,
        lambda: (
            checked()
            or run_sweep(
                args.sweep_file,
                report=not args.no_report,
                overlay=args.config,
                **{k: getattr(args, k) for k in PASSED_ON},
            )
        ),
        (SweepError,),
    )
