"""What every suite command shares: the parser, the option blocks, the error rule.

Conventions (docs/architecture.md, "Command lines"):

- `lit-spine NAME --help` prints `usage: lit-spine NAME ...` and exits 0.
- `--config FILE` (repeatable): a YAML file of the command's option values (keys as
  `--print_config` writes them); files apply left to right, options on the command line win.
  `describe` reads LightningCLI experiment files there (the net's `init_args`), `sweep` passes
  its files on to every run (a data overlay).
- Options are spelled with dashes (`--data-root`); the underscore spelling jsonargparse derives
  from a typed signature (`--norm_group_size`) is accepted too, and the other way round.
- A value that does not parse (wrong type, not among the choices) stops before any work, as
  argparse does: usage, then `error: argument --OPTION: ...` naming the value (and the choices),
  exit 2 (`SystemExit`). Input found unusable while working (a missing file, an unknown
  vocabulary, a bad combination) prints one line `lit-spine NAME: error: ...` and `main`
  returns 2.

Hand-written, as jsonargparse has no setting for either: the spelling rule
(`_spelled_as_declared`; jsonargparse derives option names from parameter names as they are)
and the wording of its value errors (`_Parser.error`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import textwrap
from collections.abc import Callable, Sequence
from typing import Any

from jsonargparse import ActionConfigFile, ArgumentParser, DefaultHelpFormatter

from lit_spine.utils import one_line


class _HelpFormatter(DefaultHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """jsonargparse's help (types and defaults shown); epilogs (examples) kept as written."""


class _Parser(ArgumentParser):
    """jsonargparse's parser; its `Parser key "x": ...` errors are worded as argparse's
    `argument --x: ...`, on one line, so that every bad value reads alike."""

    def error(self, message: str, ex: Exception | None = None):  # type: ignore[override]
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', message, re.S)
        if match:
            key, rest = match.groups()
            known = self._option_string_actions
            option = next(
                (o for o in (f"--{key.replace('_', '-')}", f"--{key}") if o in known), None
            )
            if option is not None:
                message = f"argument {option}: {' '.join(rest.split())}"
        super().error(message, ex)


class UsageError(ValueError):
    """A value that parsed but cannot be used; `run` prints it as one error line (exit 2)."""


def command_parser(
    name: str,
    description: str,
    epilog: str | None = None,
    config: bool = True,
    parser_mode: str = "yaml",
) -> ArgumentParser:
    """The parser of `lit-spine NAME`, with `--config FILE` unless the command defines its own."""
    parser = _Parser(
        prog=f"lit-spine {name}",
        description=textwrap.fill(description, 79),
        epilog=epilog,
        formatter_class=_HelpFormatter,
        parser_mode=parser_mode,
        exit_on_error=True,
    )
    if config:
        parser.add_argument(
            "--config",
            action=ActionConfigFile,
            help="YAML file of option values (keys as --print_config writes them); repeatable, "
            "applied left to right, command-line options win",
        )
    return parser


def _spelled_as_declared(parser: ArgumentParser, argv: Sequence[str]) -> list[str]:
    """`--a-b` for a declared `--a_b` (and the reverse), so both spellings work everywhere."""
    known = parser._option_string_actions  # argparse's map of every declared option string
    out: list[str] = []
    for k, token in enumerate(argv):
        if token == "--":
            return out + list(argv[k:])
        name, eq, value = token.partition("=")
        if name.startswith("--") and name not in known:
            for alt in ("--" + name[2:].replace("-", "_"), "--" + name[2:].replace("_", "-")):
                if alt in known:
                    token = alt + eq + value
                    break
        out.append(token)
    return out


def parse(parser: ArgumentParser, argv: Sequence[str] | None) -> Any:
    """Parse `argv` (default: sys.argv[1:]) under the conventions above."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return parser.parse_args(_spelled_as_declared(parser, argv))


def run(name: str, body: Callable[[], int | None], errors: tuple[type[BaseException], ...]) -> int:
    """Run a command's body; an error of `errors` (or UsageError) is one line and exit code 2."""
    try:
        code = int(body() or 0)
        sys.stdout.flush()
        return code
    except (UsageError, *errors) as err:
        print(f"lit-spine {name}: error: {one_line(err)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `lit-spine NAME ... | head`: the reader left, nothing is wrong
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


def choice(option: str, value: str, options: Sequence[str], what: str) -> str:
    """`value` if it is one of `options`, else a UsageError naming option, value and choices."""
    from lit_spine.utils import choose

    try:
        return choose(value, options, what)
    except ValueError as err:
        raise UsageError(f"{option}: {err}") from None


# ----------------------------------------------------------------------------- value types
# Each parses a command-line string and accepts its own result again: jsonargparse checks the
# parsed value once more with the same type, and config files give numbers, not strings.


class OptionValueError(argparse.ArgumentTypeError, ValueError):
    """A bad option value: argparse reports it for the command line, and jsonargparse, which
    catches ValueError, for a value read from a --config file (a plain ArgumentTypeError
    escaped it as a traceback)."""


def positive_radius(option: str) -> Callable[[Any], float]:
    """Type of a radius option: a finite number of mm > 0."""

    def parse(text: Any) -> float:
        from lit_spine.metrics import radius_problem

        try:
            value = float(text)
        except (TypeError, ValueError):
            value = None
        if value is None or radius_problem(value) is not None:
            raise OptionValueError(
                f"{option} takes a finite radius in mm > 0 (e.g. 8), got {one_line(text, 80)!r}"
            )
        return value

    parse.__name__ = option  # argparse names the type in some messages
    return parse


def comma_list(text: Any) -> tuple[str, ...]:
    """Type of a comma-separated list of names (`a,b,c`)."""
    if isinstance(text, (list, tuple)):
        return tuple(str(s) for s in text)
    return tuple(s.strip() for s in str(text).split(",") if s.strip())


# ----------------------------------------------------------------------------- option blocks


def add_out(parser: ArgumentParser, default: str | None, help: str) -> None:
    """`--out DIR`: where the command writes."""
    parser.add_argument("--out", default=default, help=help)


def add_seed(parser: ArgumentParser, default: int = 0) -> None:
    """`--seed N`: the random seed; output is deterministic for a seed."""
    parser.add_argument("--seed", type=int, default=default, help="random seed")


def add_flag(parser: ArgumentParser, option: str, help: str) -> None:
    """A switch that takes no value (`--json`, `--force`, `--dry-run`)."""
    parser.add_argument(option, action="store_true", help=help)


def add_json(parser: ArgumentParser, help: str = "print JSON instead of the table") -> None:
    """`--json`: machine-readable output on stdout."""
    add_flag(parser, "--json", help)


def add_force(parser: ArgumentParser, help: str) -> None:
    """`--force`: go on although earlier output disagrees."""
    add_flag(parser, "--force", help)


def add_workers(parser: ArgumentParser, default: int | None, help: str) -> None:
    """`--workers N`: processes or threads at once."""
    parser.add_argument("--workers", type=int, default=default, help=help)


LAYOUTS = (
    "tianchi2020",
    "rsna2024",
    "spider",
)  # dataset layouts: docs/data-format.md, docs/datasets.md


def add_layout(parser: ArgumentParser, option: str, help: str) -> None:
    """`--layout` / `--format NAME`: which dataset layout the command writes or reads."""
    parser.add_argument(option, default=LAYOUTS[0], choices=list(LAYOUTS), help=help)


def add_vocab(parser: ArgumentParser, help: str = "disease vocabulary") -> None:
    """`--vocab NAME`: the label vocabulary (checked with `check_vocab` after parsing)."""
    parser.add_argument("--vocab", default="tianchi2020", help=help)


def check_vocab(value: str, options: Sequence[str] | None = None) -> str:
    """The `--vocab` value, or a UsageError naming it and the valid vocabularies."""
    if options is None:
        from lit_spine.task import VOCABULARIES

        options = sorted(VOCABULARIES)
    return choice("--vocab", value, options, "vocabulary")


def cpu_count() -> int:
    """CPUs this process may use (the default of `--workers` where it counts processes)."""
    return os.cpu_count() or 1
