"""`lit-spine` (alias `lightning`): LightningCLI subcommands plus the suite's own tools.

`fit`, `validate`, `test` and `predict` go to LightningCLI; the suite's commands
(`phantom`, `inspect`, `evaluate`, `describe`, `sweep`, `report`, `bench`) live in
`lit_spine.commands` (jsonargparse, one module each, the conventions in
`lit_spine.commands.common`), imported only when called so that `--help` stays fast.
"""

from __future__ import annotations

import importlib
import sys

# name -> one-line description; the command is `lit_spine.commands.<name>.main(argv) -> int`.
SUITE_COMMANDS: dict[str, str] = {
    "phantom": "write synthetic lumbar-spine MRI studies as DICOM",
    "inspect": "show what the suite sees in a dataset folder",
    "evaluate": "score a prediction file against an annotation file",
    "describe": "parameters, FLOPs, receptive field, norm/drop map",
    "sweep": "run a W&B sweep file offline (or online with --online)",
    "report": "tables and plots from sweep or run folders",
    "bench": "time training, data, metric and phantom; write BENCHMARKS.md",
}
LIGHTNING_COMMANDS: dict[str, str] = {
    "fit": "train a model (LightningCLI)",
    "validate": "run one validation epoch on a checkpoint",
    "test": "score a checkpoint on the test split",
    "predict": "write a prediction file and overlay PNGs",
}


def _usage(prog: str) -> str:
    lines = [f"usage: {prog} <command> [options]   ({prog} <command> --help for details)", ""]
    lines.append("training (LightningCLI):")
    lines += [f"  {name:<10} {text}" for name, text in LIGHTNING_COMMANDS.items()]
    lines.append("")
    lines.append("suite tools:")
    lines += [f"  {name:<10} {text}" for name, text in SUITE_COMMANDS.items()]
    lines.append("")
    lines.append(f"example: {prog} fit --config experiments/smoke.yaml")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Dispatch to a suite command or to LightningCLI."""
    argv = list(sys.argv[1:] if argv is None else argv)
    prog = "lit-spine"
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage(prog))
        return 0 if argv else 2
    if argv[0] in ("-V", "--version"):
        from lit_spine import __version__

        print(__version__)
        return 0
    command = argv[0]
    if command in SUITE_COMMANDS:
        module = importlib.import_module(f"lit_spine.commands.{command}")
        return int(module.main(argv[1:]) or 0)
    if command in LIGHTNING_COMMANDS:
        import os

        from lit_spine.data.cache import CacheError
        from lit_spine.phantom.generate import PhantomError
        from lit_spine.train_cli import run_lightning_cli

        try:
            run_lightning_cli(argv)
        except (ValueError, OSError, CacheError, PhantomError) as err:
            # A bad setting or bad data (the suite's errors name the key, file or value):
            # one line, not Lightning's traceback, unless asked for.
            if os.environ.get("LIT_SPINE_TRACEBACK"):
                raise
            print(f"{prog} {command}: {str(err).strip()}", file=sys.stderr)
            print(f"({prog}: LIT_SPINE_TRACEBACK=1 prints the traceback)", file=sys.stderr)
            return 2
        return 0
    from lit_spine.utils import choose

    try:
        choose(command, [*LIGHTNING_COMMANDS, *SUITE_COMMANDS], "command")
    except ValueError as err:
        print(f"{prog}: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
